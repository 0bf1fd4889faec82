"""The simulated sensor: what the camera does to the light that reaches it.

:class:`Sensor` holds the fixed-per-seed sensor maps (pixel response with vignetting,
dust donuts and cold pixels; dark current with amp glow and hot pixels; the bias column
pattern) and turns incident electrons into a 16-bit raw frame (:meth:`Sensor.readout`).
The sky, the motion and the transients are :class:`~livestack.sim.camera.Simulator`'s;
the signal chain is described in :mod:`livestack.sim.camera`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from livestack.sim import sky
from livestack.sim.sky import BLOCK_ROWS, stream_rng

if TYPE_CHECKING:  # camera.py imports this module
    from livestack.sim.camera import SimConfig

#: Temperature step (C) over which dark current and amp glow double.
DARK_DOUBLING_C = 6.3

#: Cosmic-ray hits as ``(y, x, electrons)``.
CosmicHits = tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]


def dark_scale(ccd_temp_c: float) -> float:
    """Dark-current factor relative to 0 C (doubles every 6.3 C)."""
    return float(2.0 ** (ccd_temp_c / DARK_DOUBLING_C))


class Sensor:
    """Sensor maps and read-out of the simulated camera (a pure function of config and seed).

    Parameters
    ----------
    config : SimConfig
    seed : int
        The simulator's seed (>= 0).
    threads : int
        Worker threads for :meth:`readout` (results do not depend on it).

    Attributes
    ----------
    hot_pixels, cold_pixels : ndarray, shape (k, 2), int64
        ``(y, x)`` of the hot and cold pixels.
    hot_pixel_rates_e_per_s : ndarray, shape (k,), float64
        Dark current of each hot pixel at 0 C.
    """

    def __init__(self, config: SimConfig, seed: int, threads: int = 1) -> None:
        self.config = config
        self.seed = int(seed)
        self.threads = max(1, int(threads))
        ny, nx = config.shape
        rng = stream_rng(self.seed, sky.STREAM_SENSOR, 0)
        n_pix = ny * nx
        n_hot = round(config.hot_pixel_fraction * n_pix)
        n_cold = round(config.cold_pixel_fraction * n_pix)
        flat_idx = rng.choice(n_pix, size=n_hot + n_cold, replace=False)
        yx = np.column_stack(np.divmod(flat_idx.astype(np.int64), nx))
        self.hot_pixels: NDArray[np.int64] = yx[:n_hot]
        self.cold_pixels: NDArray[np.int64] = yx[n_hot:]
        self.hot_pixel_rates_e_per_s: NDArray[np.float64] = np.exp(
            rng.uniform(math.log(5.0), math.log(100.0), n_hot))
        self._cold_response = rng.uniform(0.05, 0.5, n_cold)

    @cached_property
    def response(self) -> NDArray[np.float32]:
        """Pixel response (vignetting x dust x cold pixels), median 1, ``(ny, nx)`` float32."""
        cfg = self.config
        ny, nx = cfg.shape
        cy, cx = (ny - 1) / 2.0, (nx - 1) / 2.0
        r2_corner = cx * cx + cy * cy
        resp: NDArray[np.float32]
        if cfg.vignetting > 0:
            # cos^4 law: V = 1 / (1 + (r/f)^2)^2 with V(corner) = 1 - vignetting.
            inv_f2 = ((1.0 - cfg.vignetting) ** -0.5 - 1.0) / r2_corner
            dy2 = ((np.arange(ny, dtype=np.float32) - cy) ** 2 * inv_f2).astype(np.float32)
            dx2 = ((np.arange(nx, dtype=np.float32) - cx) ** 2 * inv_f2).astype(np.float32)
            resp = 1.0 / (1.0 + dy2[:, None] + dx2[None, :]) ** 2
        else:
            resp = np.ones((ny, nx), dtype=np.float32)
        for donut in self.dust_donuts:
            self._apply_donut(resp, *donut)
        if len(self.cold_pixels):
            resp[self.cold_pixels[:, 0], self.cold_pixels[:, 1]] *= self._cold_response
        resp /= np.float32(np.median(resp))
        return np.ascontiguousarray(resp, dtype=np.float32)

    @cached_property
    def dust_donuts(self) -> list[tuple[float, float, float, float]]:
        """Dust shadows as ``(x, y, outer_radius_px, depth)``; depth 5-10 % on the ring."""
        cfg = self.config
        ny, nx = cfg.shape
        rng = stream_rng(self.seed, sky.STREAM_SENSOR, 1)
        out = []
        for _ in range(cfg.n_dust_donuts):
            radius = float(rng.uniform(0.02, 0.05) * min(nx, ny))
            out.append((float(rng.uniform(0.08, 0.92) * nx), float(rng.uniform(0.08, 0.92) * ny),
                        radius, float(rng.uniform(0.05, 0.10))))
        return out

    @staticmethod
    def _apply_donut(resp: NDArray[np.float32], x0: float, y0: float, radius: float,
                     depth: float) -> None:
        """Multiply ``resp`` by a ring-shaped dip (centre dimmed to 40 % of the ring depth)."""
        ny, nx = resp.shape
        reach = math.ceil(radius * 1.4) + 2
        xa, xb = max(int(x0) - reach, 0), min(int(x0) + reach + 1, nx)
        ya, yb = max(int(y0) - reach, 0), min(int(y0) + reach + 1, ny)
        if xa >= xb or ya >= yb:
            return
        yy, xx = np.mgrid[ya:yb, xa:xb]
        r = np.hypot(xx - x0, yy - y0)
        soft = 0.06 * radius + 0.5
        outer = 0.5 * (1.0 + np.tanh((radius - r) / soft))
        inner = 0.5 * (1.0 + np.tanh((0.45 * radius - r) / soft))
        dip = depth * (outer - 0.6 * inner)
        resp[ya:yb, xa:xb] *= (1.0 - dip).astype(np.float32)

    @cached_property
    def dark_rate_0c(self) -> NDArray[np.float32]:
        """Dark current at 0 C in e/s: base + amp glow (top-right corner) + hot pixels."""
        cfg = self.config
        ny, nx = cfg.shape
        rate = np.full((ny, nx), cfg.dark_e_per_s_at_0c, dtype=np.float32)
        if cfg.amp_glow_e_per_s > 0:
            scale = 0.1 * math.hypot(nx, ny)
            dx = ((nx - 1) - np.arange(nx, dtype=np.float32)) ** 2
            dy = np.arange(ny, dtype=np.float32) ** 2
            dist = np.sqrt(dy[:, None] + dx[None, :])
            rate += (cfg.amp_glow_e_per_s * np.exp(-dist / np.float32(scale))).astype(np.float32)
        if len(self.hot_pixels):
            rate[self.hot_pixels[:, 0], self.hot_pixels[:, 1]] += self.hot_pixel_rates_e_per_s
        return rate

    @cached_property
    def bias_columns_adu(self) -> NDArray[np.float32]:
        """Bias level of each column in ADU (bias + fixed column pattern)."""
        cfg = self.config
        rng = stream_rng(self.seed, sky.STREAM_SENSOR, 2)
        pattern = rng.normal(0.0, cfg.bias_pattern_adu, cfg.width)
        return (cfg.bias_adu + pattern).astype(np.float32)

    def true_master_dark(self, exposure_s: float, ccd_temp_c: float) -> NDArray[np.float32]:
        """Noiseless dark signal including bias, in ADU.

        Parameters
        ----------
        exposure_s : float
            Exposure in seconds (0 gives the master bias).
        ccd_temp_c : float
            Sensor temperature in C.

        Returns
        -------
        ndarray, shape (ny, nx), float32
            ``bias + column pattern + dark_rate(T) * exposure / gain``, clipped at
            saturation (full well or 65535 ADU).
        """
        cfg = self.config
        k = exposure_s * dark_scale(ccd_temp_c)
        dark_e = np.minimum(self.dark_rate_0c * np.float32(k), np.float32(cfg.full_well_e))
        adu = dark_e / np.float32(cfg.gain_e_per_adu) + self.bias_columns_adu[None, :]
        return np.minimum(adu, np.float32(65535.0)).astype(np.float32)

    def readout(self, keys: tuple[int, ...], exposure_s: float, ccd_temp_c: float,
                incident: Callable[[int, int], NDArray[np.float32]] | None,
                cosmic: CosmicHits | None) -> NDArray[np.uint16]:
        """Expose, add noise and digitise, in independently seeded row blocks.

        Parameters
        ----------
        keys : tuple of int
            Random-stream keys of the frame (kind and index); block ``b`` draws from
            ``stream_rng(seed, *keys, b)``, so any thread count gives the same frame.
        exposure_s : float
            Seconds of dark current.
        ccd_temp_c : float
            Sensor temperature (C) of the dark current.
        incident : callable or None
            ``incident(y0, y1)`` gives the incident electrons of rows ``[y0, y1)`` as
            float32, before the pixel response; None for a dark or bias.
        cosmic : tuple or None
            Cosmic-ray hits ``(y, x, electrons)`` added after the Poisson draw.

        Returns
        -------
        ndarray, shape (ny, nx), uint16
            Raw ADU, clipped to 0..65535.
        """
        cfg = self.config
        ny, nx = cfg.shape
        out = np.empty((ny, nx), dtype=np.uint16)
        dark_k = exposure_s * dark_scale(ccd_temp_c)
        response = self.response if incident is not None else None
        dark = self.dark_rate_0c if dark_k > 0 else None
        inv_gain = np.float32(1.0 / cfg.gain_e_per_adu)
        rn_adu = np.float32(cfg.read_noise_e / cfg.gain_e_per_adu)
        bias_cols = self.bias_columns_adu
        full_well = np.float32(cfg.full_well_e)

        def block(b: int) -> None:
            y0 = b * BLOCK_ROWS
            y1 = min(y0 + BLOCK_ROWS, ny)
            rng = stream_rng(self.seed, *keys, b)
            mean: NDArray[np.float64] | None = None
            if incident is not None and response is not None:
                mean = incident(y0, y1).astype(np.float64)
                mean *= response[y0:y1]
            if dark is not None:
                d = dark[y0:y1].astype(np.float64) * dark_k
                mean = d if mean is None else mean + d
            if mean is not None:
                np.maximum(mean, 0.0, out=mean)
                e = rng.poisson(mean).astype(np.float32)
            else:
                e = np.zeros((y1 - y0, nx), dtype=np.float32)
            if cosmic is not None:
                sel = (cosmic[0] >= y0) & (cosmic[0] < y1)
                np.add.at(e, (cosmic[0][sel] - y0, cosmic[1][sel]), cosmic[2][sel])
            np.minimum(e, full_well, out=e)
            adu = e * inv_gain
            adu += bias_cols[None, :]
            if rn_adu > 0:
                adu += rn_adu * rng.standard_normal((y1 - y0, nx), dtype=np.float32)
            np.rint(adu, out=adu)
            np.clip(adu, 0.0, 65535.0, out=adu)
            out[y0:y1] = adu.astype(np.uint16)

        n_blocks = (ny + BLOCK_ROWS - 1) // BLOCK_ROWS
        if self.threads > 1:
            with ThreadPoolExecutor(self.threads) as pool:
                list(pool.map(block, range(n_blocks)))
        else:
            for b in range(n_blocks):
                block(b)
        return out

"""A small sky with flat-topped (saturated) stars, rotating and drifting, with its truth.

The main :class:`~livestack.sim.camera.Simulator` models a full 16-bit camera; this one
isolates what issue 9 measured on a real night: a 12-bit (or 16-bit) camera whose
brightest stars clip at the white level over 3x3 to 7x7 px while the field drifts and
rotates. It is small and fast so tests and ``bench/bench_saturation.py`` can stack many
frames.

Model (ADU): ``raw = clip(rint(sky + stars + N(0, sigma)), 0, level)`` with Gaussian
stars sampled at pixel centres. Frame ``i`` maps to the reference by
``ref = R(rotation_deg_per_frame * i) (p - c) + c + drift_px_per_frame * i`` (``c`` the
image centre), so frame 0 is the reference. Every random draw comes from
``numpy.random.default_rng((seed, i))``: any frame in any order, deterministically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
from numpy.typing import NDArray

from livestack.pipeline.session import PipelineConfig, StackSession
from livestack.pipeline.types import FrameInfo, Transform

#: Profiles are compared from this distance (px) to the saturated core on: nearer pixels
#: interpolate clipped neighbours with a large weight, which no stack can undo.
PROFILE_GAP_PX = 1.5
#: FWHM / sigma of a Gaussian.
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class SaturatedSkyConfig:
    """Geometry, photometry and motion of the saturated-star sky.

    Attributes
    ----------
    shape : tuple of int
        ``(ny, nx)`` of every frame (px).
    level_adu : float
        White level: raw values clip here (4095 for 12-bit, 65535 for 16-bit).
    sky_adu : float
        Sky background (ADU).
    noise_adu : float
        Per-pixel Gaussian noise sigma (ADU).
    fwhm_px : float
        Star FWHM (px).
    peak_over_level : tuple of float
        True peak / white level of the bright (saturated) stars: 2, 6, 20 and 60 give
        plateaus about 3, 4, 5 and 6 px across at FWHM 2.6 px.
    n_faint : int
        Unsaturated stars (peaks 3 % to 40 % of the range above the sky), for detection.
    rotation_deg_per_frame : float
    drift_px_per_frame : tuple of float
        ``(dx, dy)`` of the field per frame (reference px).
    exposure_s : float
    """

    shape: tuple[int, int] = (160, 200)
    level_adu: float = 4095.0
    sky_adu: float = 364.0
    noise_adu: float = 12.0
    fwhm_px: float = 2.6
    peak_over_level: tuple[float, ...] = (2.0, 6.0, 20.0, 60.0)
    n_faint: int = 60
    rotation_deg_per_frame: float = 0.04
    drift_px_per_frame: tuple[float, float] = (1.9, 1.1)
    exposure_s: float = 60.0


class SaturatedSky:
    """Frames of :class:`SaturatedSkyConfig`'s sky and their truth.

    Parameters
    ----------
    config : SaturatedSkyConfig
    seed : int
        Fixes the star field and every frame's noise.
    """

    def __init__(self, config: SaturatedSkyConfig = SaturatedSkyConfig(), seed: int = 1
                 ) -> None:
        self.config = config
        self.seed = seed
        ny, nx = config.shape
        rng = np.random.default_rng((seed, 0xFACE))
        n_bright = len(config.peak_over_level)
        # Bright stars on a ring around the centre: they stay inside every frame of a
        # modest drift and are far enough apart not to touch.
        angles = np.linspace(0.0, 2.0 * math.pi, n_bright, endpoint=False) + 0.3
        radius = 0.25 * min(ny, nx)
        bright = np.stack([nx / 2 + radius * np.cos(angles) + rng.uniform(-0.5, 0.5, n_bright),
                           ny / 2 + radius * np.sin(angles) + rng.uniform(-0.5, 0.5, n_bright)],
                          axis=1)
        faint = np.stack([rng.uniform(8, nx - 8, config.n_faint),
                          rng.uniform(8, ny - 8, config.n_faint)], axis=1)
        # Keep faint stars away from the bright ones (their profiles are the test's truth).
        far = np.min(np.hypot(*(faint[:, None, :] - bright[None, :, :]).transpose(2, 0, 1)),
                     axis=1) > 12.0
        faint = faint[far]
        span = config.level_adu - config.sky_adu
        faint_peak = span * rng.uniform(0.03, 0.4, len(faint))
        #: Reference-grid star positions ``(n, 2)`` (x, y), bright stars first.
        self.xy_ref = np.concatenate([bright, faint])
        #: True peaks above the sky (ADU), unclipped.
        self.peak_adu = np.concatenate([span * np.asarray(config.peak_over_level), faint_peak])
        self.n_bright = n_bright

    def transform(self, index: int) -> Transform:
        """Frame ``index`` -> reference pixel mapping (frame 0: identity)."""
        cfg = self.config
        ny, nx = cfg.shape
        cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
        theta = math.radians(cfg.rotation_deg_per_frame * index)
        c, s = math.cos(theta), math.sin(theta)
        dx = cfg.drift_px_per_frame[0] * index
        dy = cfg.drift_px_per_frame[1] * index
        return Transform(np.array([[c, -s, cx - c * cx + s * cy + dx],
                                   [s, c, cy - s * cx - c * cy + dy]]),
                         "similarity", 0, 0.0, "truth")

    def _render(self, xy: NDArray[np.float64], peaks: NDArray[np.float64]
                ) -> NDArray[np.float64]:
        cfg = self.config
        ny, nx = cfg.shape
        sigma = cfg.fwhm_px / _FWHM_PER_SIGMA
        image = np.full((ny, nx), cfg.sky_adu, dtype=np.float64)
        half = math.ceil(sigma * 6.0)
        for (x, y), peak in zip(xy, peaks, strict=True):
            x0, x1 = max(0, math.floor(x) - half), min(nx, math.floor(x) + half + 2)
            y0, y1 = max(0, math.floor(y) - half), min(ny, math.floor(y) + half + 2)
            if x0 >= x1 or y0 >= y1:
                continue
            gx = np.exp(-0.5 * ((np.arange(x0, x1) - x) / sigma) ** 2)
            gy = np.exp(-0.5 * ((np.arange(y0, y1) - y) / sigma) ** 2)
            image[y0:y1, x0:x1] += peak * np.outer(gy, gx)
        return image

    def truth(self) -> NDArray[np.float64]:
        """The noiseless, unclipped sky on the reference grid (ADU), ``(ny, nx)`` float64."""
        return self._render(self.xy_ref, self.peak_adu)

    def frame(self, index: int, clip: bool = True) -> NDArray[np.float32]:
        """Raw frame ``index``: integer ADU in float32, clipped to ``[0, level_adu]``.

        ``clip=False`` gives the same frame (same noise) as an ideal camera that never
        saturates: stacking those is the truth the saturated stack is compared with.
        """
        cfg = self.config
        xy = self.transform(index).inverse().apply(self.xy_ref)
        rng = np.random.default_rng((self.seed, index))
        image = self._render(xy, self.peak_adu) + rng.normal(0.0, cfg.noise_adu, cfg.shape)
        return np.clip(np.rint(image), 0.0, cfg.level_adu if clip else np.inf
                       ).astype(np.float32)

    def info(self, index: int, *, with_level: bool = True) -> FrameInfo:
        """The frame's header facts; ``saturation_adu`` from BITPIX 16 (``with_level``).

        A 12-bit level is then only found from the data (the 12-bit heuristic), as for
        a real 12-bit camera writing 16-bit FITS.
        """
        start = datetime(2024, 3, 1, 22, 0, tzinfo=timezone.utc) + timedelta(
            seconds=index * (self.config.exposure_s + 2.0))
        return FrameInfo(
            path=f"sat_{index:03d}.fits", image_type="light", shape=self.config.shape,
            exposure_s=self.config.exposure_s, date_obs=start,
            saturation_adu=65535.0 if with_level else None,
            saturation_source="BITPIX" if with_level else "")

    def saturated_core(self, star: int) -> NDArray[np.bool_]:
        """Reference pixels where bright star ``star``'s truth reaches the white level."""
        image = self._render(self.xy_ref[star:star + 1], self.peak_adu[star:star + 1])
        return image >= self.config.level_adu


@dataclass(frozen=True)
class StarReport:
    """How one bright (saturated) star came out of a stack.

    Attributes
    ----------
    core_px : int
        Reference pixels of the star's saturated core (truth >= level).
    holes : int
        Pixels within 4 px of the core (core excluded) below ``sky - 5 sigma``.
    min_sigma : float
        Lowest of those pixels, in stack sigmas from the sky (negative: below).
    peak_adu : float
        The stack's maximum within 4 px of the core.
    profile_error : float
        Largest ``|stack - truth|`` over the star's unsaturated profile, as a fraction of
        the range (white level - sky): pixels within 8 px of the centre, more than
        :data:`PROFILE_GAP_PX` from the core, whose truth is below 60 % of the range
        (never saturated in any frame) and above sky + 3 noise sigma. NaN when there is
        no such pixel. Frames from a camera that never saturates
        (:meth:`SaturatedSky.frame` with ``clip=False``) give the interpolation's own
        error on the same pixels, the baseline.
    """

    core_px: int
    holes: int
    min_sigma: float
    peak_adu: float
    profile_error: float


def stack_sky(image: NDArray[np.floating], sky: SaturatedSky) -> tuple[float, float]:
    """Sky level and robust sigma (ADU) of a stack, from pixels far from every star."""
    truth = sky.truth()
    cfg = sky.config
    quiet = (truth < cfg.sky_adu + 0.05 * cfg.noise_adu) & np.isfinite(image)
    values = np.asarray(image, dtype=np.float64)[quiet]
    median = float(np.median(values))
    sigma = 1.4826 * float(np.median(np.abs(values - median)))
    return median, sigma


def star_reports(image: NDArray[np.floating], sky: SaturatedSky) -> list[StarReport]:
    """One :class:`StarReport` per bright star of ``sky`` in the stack ``image``."""
    cfg = sky.config
    truth = sky.truth()
    level, sigma = stack_sky(image, sky)
    ny, nx = cfg.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    data = np.asarray(image, dtype=np.float64)
    reports = []
    for star in range(sky.n_bright):
        core = sky.saturated_core(star)
        cy, cx = np.nonzero(core)
        x0, y0 = sky.xy_ref[star]
        near = np.hypot(xx - x0, yy - y0) < 12.0
        # Distance to the nearest core pixel, on the star's neighbourhood only.
        dist = np.full((ny, nx), np.inf)
        dist[near] = np.min(np.hypot(xx[near][:, None] - cx[None, :],
                                     yy[near][:, None] - cy[None, :]), axis=1)
        ring = (dist <= 4.0) & ~core & np.isfinite(data)
        below = (data[ring] - level) / sigma
        profile = (near & (np.hypot(xx - x0, yy - y0) <= 8.0) & (dist > PROFILE_GAP_PX)
                   & (truth > cfg.sky_adu + 3.0 * cfg.noise_adu)
                   & (truth < cfg.sky_adu + 0.6 * (cfg.level_adu - cfg.sky_adu))
                   & np.isfinite(data))
        error = np.abs(data[profile] - truth[profile]) / (cfg.level_adu - cfg.sky_adu)
        within = (dist <= 4.0) & np.isfinite(data)
        reports.append(StarReport(
            core_px=int(core.sum()), holes=int(np.sum(below < -5.0)),
            min_sigma=float(below.min()) if below.size else math.nan,
            peak_adu=float(data[within].max()),
            profile_error=float(error.max()) if error.size else math.nan))
    return reports


def live_stack(sky: SaturatedSky, n_frames: int, config: Any = None, *, clip: bool = True
               ) -> Any:
    """Stack frames ``0 .. n_frames - 1`` of ``sky`` with the live pipeline.

    Frames are aligned with their true transforms (given as stored transforms), so the
    result shows interpolation, normalisation and rejection, not registration error.

    Parameters
    ----------
    sky : SaturatedSky
    n_frames : int
    config : PipelineConfig, optional
        Default: ``PipelineConfig()``.
    clip : bool
        False: frames from a camera that never saturates (the baseline).

    Returns
    -------
    StackSession
        With every frame processed (``session.product()`` is the stack).

    Raises
    ------
    RuntimeError
        A frame was not accepted (the sky is built so that none should be rejected).
    """

    session = StackSession("saturated", config if config is not None else PipelineConfig())
    for index in range(n_frames):
        outcome = session.process(sky.frame(index, clip), sky.info(index), None,
                                  stored_transform=sky.transform(index) if index else None)
        if outcome.verdict != "accepted":
            raise RuntimeError(f"frame {index}: {outcome.verdict}: {outcome.message}")
    return session

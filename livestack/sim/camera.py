"""A simulated astronomical camera looking at the simulated sky, with known truth.

:class:`Simulator` renders light, bias, dark, flat and dark-flat frames as a
16-bit camera would write them, deterministically from ``(seed, index)`` in any
order, together with the truth a test needs: the exact frame -> reference
transform, the true star positions and fluxes, masks of transients, and the
noiseless calibration signals.

Signal chain of a light frame (electrons unless stated)::

    incident = stars (Moffat, pixel-integrated, cloud-dimmed) + trails
               + sky (level + linear gradient, + cloud glow)       [x Bayer weights]
    mean     = incident * response  +  dark_rate(T) * exposure     [response = true_flat()]
    e        = min(Poisson(mean) + cosmic rays, full_well)
    ADU      = rint(e / gain + bias + column pattern + N(0, read_noise) / gain), clipped to 0..65535

``dark_rate(T)`` (base dark current, hot pixels, amp glow) doubles every 6.3 C.
Motion: frame ``i`` maps to the reference by
``ref = R(theta_i) (p - c) + c + drift * i + dither_i (+ flip offset)``, with ``c``
the image centre and ``theta_i = rotation_deg_per_frame * i (+ 180 after the
meridian flip)``. Frame 0 is the reference pointing (no dither) unless flipped.
A positive drift therefore moves the field of view by ``+drift`` per frame, so the
stars move by ``-drift`` in frame pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from functools import cached_property

import numpy as np
from numpy.typing import NDArray

from livestack.errors import ConfigError
from livestack.pipeline.types import Transform
from livestack.sim import sky
from livestack.sim.sensor import DARK_DOUBLING_C as DARK_DOUBLING_C
from livestack.sim.sensor import CosmicHits, Sensor
from livestack.sim.sensor import dark_scale as _dark_scale
from livestack.sim.sky import (
    CELL_PX,
    MAX_STAMP_PX,
    CloudField,
    MoffatPSF,
    StarCatalogue,
    stream_rng,
    zigzag,
)

BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
_CHANNEL = {"R": 0, "G": 1, "B": 2}

#: Sky tint (R, G, B) of a light-polluted sky, normalised like star colours.
SKY_TINT_RGB = np.array([1.2, 1.0, 0.75]) / ((1.2 + 2.0 * 1.0 + 0.75) / 4.0)

IMAGETYP_LIGHT = "Light Frame"
IMAGETYP_DARK = "Dark Frame"
IMAGETYP_BIAS = "Bias Frame"
IMAGETYP_FLAT = "Flat Field"
IMAGETYP_DARKFLAT = "Dark Flat"

_MJD_EPOCH = datetime(1858, 11, 17, tzinfo=timezone.utc)


@dataclass(frozen=True)
class SimConfig:
    """Everything the simulated sky and camera depend on (frozen; validated on creation).

    Fluxes and rates are in electrons; ``gain_e_per_adu`` converts to ADU. Star
    fluxes follow a power law truncated to ``[faintest_flux_e, brightest_flux_e]``
    with ``N(>F) ~ F**-flux_powerlaw_index``; ``n_stars`` is the mean number of
    star centres per frame area (the catalogue is unbounded). ``fwhm_px`` is the
    minor-axis FWHM of the PSF before pixel integration; the major axis is
    ``fwhm_px * elongation`` along ``elongation_angle_deg`` (fixed in frame
    coordinates). ``amp_glow_e_per_s`` is the glow at the top-right corner and,
    like ``dark_e_per_s_at_0c``, is given at 0 C. Hot pixels have 5-100 e/s at
    0 C, cold pixels 5-50 % response. ``cloud_transparency`` is the mean
    transmission in cloud frames. The fields after ``cadence_s`` are additions:
    column fixed-pattern of the bias, and the flat exposure and level.

    Raises
    ------
    ConfigError
        When a value is out of range, naming the field.
    """

    width: int = 1024
    height: int = 768
    # stars
    n_stars: int = 600
    flux_powerlaw_index: float = 1.5
    brightest_flux_e: float = 4e6
    faintest_flux_e: float = 300.0
    fwhm_px: float = 2.5
    moffat_beta: float = 3.5
    elongation: float = 1.0
    elongation_angle_deg: float = 0.0
    # sky
    sky_e_per_s: float = 15.0
    gradient_fraction: float = 0.2
    gradient_angle_deg: float = 30.0
    # camera
    exposure_s: float = 60.0
    gain_e_per_adu: float = 1.0
    bias_adu: float = 500.0
    read_noise_e: float = 3.5
    full_well_e: float = 50000.0
    ccd_temp_c: float = -10.0
    dark_e_per_s_at_0c: float = 0.1
    hot_pixel_fraction: float = 2e-4
    cold_pixel_fraction: float = 5e-5
    amp_glow_e_per_s: float = 0.5
    vignetting: float = 0.25
    n_dust_donuts: int = 2
    # transients
    cosmic_rays_per_frame: float = 5.0
    satellite_frames: tuple[int, ...] = ()
    aircraft_frames: tuple[int, ...] = ()
    cloud_frames: tuple[int, ...] = ()
    cloud_transparency: float = 0.4
    # motion
    drift_px_per_frame: tuple[float, float] = (0.8, 0.5)
    dither_px: float = 0.0
    rotation_deg_per_frame: float = 0.0
    meridian_flip_at: int | None = None
    # colour
    bayer_pattern: str | None = None
    # header facts
    object_name: str = "M 42"
    filter_name: str = "L"
    ra_deg: float = 83.82
    dec_deg: float = -5.39
    pixel_size_um: float = 3.76
    focal_length_mm: float = 400.0
    binning: int = 1
    gain_setting: int = 100
    start_time_utc: str = "2026-01-15T21:00:00"
    cadence_s: float | None = None
    # additions (not in the original API sketch)
    bias_pattern_adu: float = 1.0
    flat_exposure_s: float = 2.0
    flat_level_fraction: float = 0.5

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"SimConfig.{name}: must be {rule}, got "
                                  f"{getattr(self, name)!r}")

        need(self.width >= 16, "width", ">= 16")
        need(self.height >= 16, "height", ">= 16")
        need(self.n_stars >= 0, "n_stars", ">= 0")
        need(self.flux_powerlaw_index > 0, "flux_powerlaw_index", "> 0")
        need(self.faintest_flux_e > 0, "faintest_flux_e", "> 0")
        need(self.brightest_flux_e >= self.faintest_flux_e, "brightest_flux_e",
             ">= faintest_flux_e")
        need(self.fwhm_px >= 0.5, "fwhm_px", ">= 0.5")
        need(self.moffat_beta > 1.0, "moffat_beta", "> 1")
        need(self.elongation >= 1.0, "elongation", ">= 1")
        need(self.sky_e_per_s >= 0, "sky_e_per_s", ">= 0")
        need(0 <= self.gradient_fraction <= 1.5, "gradient_fraction", "in [0, 1.5]")
        need(self.exposure_s > 0, "exposure_s", "> 0")
        need(self.gain_e_per_adu > 0, "gain_e_per_adu", "> 0")
        need(0 <= self.bias_adu < 65535, "bias_adu", "in [0, 65535)")
        need(self.read_noise_e >= 0, "read_noise_e", ">= 0")
        need(self.full_well_e > 0, "full_well_e", "> 0")
        need(self.dark_e_per_s_at_0c >= 0, "dark_e_per_s_at_0c", ">= 0")
        need(0 <= self.hot_pixel_fraction <= 0.01, "hot_pixel_fraction", "in [0, 0.01]")
        need(0 <= self.cold_pixel_fraction <= 0.01, "cold_pixel_fraction", "in [0, 0.01]")
        need(self.amp_glow_e_per_s >= 0, "amp_glow_e_per_s", ">= 0")
        need(0 <= self.vignetting < 1, "vignetting", "in [0, 1)")
        need(self.n_dust_donuts >= 0, "n_dust_donuts", ">= 0")
        need(self.cosmic_rays_per_frame >= 0, "cosmic_rays_per_frame", ">= 0")
        need(0 < self.cloud_transparency <= 1, "cloud_transparency", "in (0, 1]")
        need(len(self.drift_px_per_frame) == 2, "drift_px_per_frame", "a pair (dx, dy)")
        need(self.dither_px >= 0, "dither_px", ">= 0")
        need(self.meridian_flip_at is None or self.meridian_flip_at >= 0, "meridian_flip_at",
             "None or >= 0")
        need(self.bayer_pattern is None or self.bayer_pattern in BAYER_PATTERNS,
             "bayer_pattern", f"None or one of {', '.join(BAYER_PATTERNS)}")
        need(self.binning >= 1, "binning", ">= 1")
        need(self.pixel_size_um > 0, "pixel_size_um", "> 0")
        need(self.focal_length_mm > 0, "focal_length_mm", "> 0")
        need(self.cadence_s is None or self.cadence_s > 0, "cadence_s", "None or > 0")
        need(self.bias_pattern_adu >= 0, "bias_pattern_adu", ">= 0")
        need(self.flat_exposure_s > 0, "flat_exposure_s", "> 0")
        need(0 < self.flat_level_fraction < 1, "flat_level_fraction", "in (0, 1)")
        for name in ("satellite_frames", "aircraft_frames", "cloud_frames"):
            need(all(int(i) >= 0 for i in getattr(self, name)), name, "frame indices >= 0")
        try:
            datetime.fromisoformat(self.start_time_utc)
        except ValueError:
            need(False, "start_time_utc", "an ISO date-time such as 2026-01-15T21:00:00")

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of every frame."""
        return (self.height, self.width)

    @property
    def cadence(self) -> float:
        """Seconds between the starts of consecutive lights (default exposure + 5 s)."""
        return self.exposure_s + 5.0 if self.cadence_s is None else float(self.cadence_s)

    @property
    def pixel_scale_arcsec(self) -> float:
        """Arcseconds per (binned) pixel."""
        return 206.264806 * self.pixel_size_um * self.binning / self.focal_length_mm

    def as_dict(self) -> dict[str, object]:
        """All fields as a plain dict (tuples kept)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class FrameTruth:
    """What the simulator knows about a light frame.

    Attributes
    ----------
    transform : Transform
        Frame pixel -> reference pixel (``method="truth"``), exactly as rendered.
    stars_xy : ndarray, shape (n, 2), float64
        True star centres in FRAME pixels, only stars whose centre is inside the
        frame (``-0.5 <= x < nx - 0.5``, same for y).
    stars_flux_e : ndarray, shape (n,), float64
        Total electrons of each star in this frame after clouds, before the
        pixel-response (flat) map, i.e. what a perfectly calibrated frame holds
        (times the gain). For colour, the Bayer-cell-weighted total.
    transparency : float
        Mean transmission over the frame (1.0 for clear sky).
    trail_mask : ndarray (ny, nx) bool, or None
        Pixels receiving >= 1 % of a satellite/aircraft trail's peak; None if
        the frame has no trail.
    cosmic_mask : ndarray (ny, nx) bool, or None
        Pixels hit by cosmic rays; None if none.
    stars_ref_xy : ndarray, shape (n, 2), float64
        The same stars' catalogue positions in REFERENCE pixels (addition).
    stars_rgb : ndarray, shape (n, 3), float64
        The same stars' channel weights (addition; all ones for grey stars).
    index : int
        The light frame's index (addition).
    """

    transform: Transform
    stars_xy: NDArray[np.float64]
    stars_flux_e: NDArray[np.float64]
    transparency: float
    trail_mask: NDArray[np.bool_] | None
    cosmic_mask: NDArray[np.bool_] | None
    stars_ref_xy: NDArray[np.float64] | None = None
    stars_rgb: NDArray[np.float64] | None = None
    index: int = 0


@dataclass(frozen=True)
class SimFrame:
    """One simulated frame as the camera writes it.

    Attributes
    ----------
    data : ndarray, shape (ny, nx), uint16
        Raw pixel values in ADU (CFA mosaic for colour).
    header : dict
        FITS cards in order, structural cards first (SIMPLE, BITPIX, NAXIS...).
    truth : FrameTruth or None
        None for calibration frames.
    """

    data: NDArray[np.uint16]
    header: dict[str, object]
    truth: FrameTruth | None


@dataclass(frozen=True)
class _Scene:
    """Light-frame ingredients shared by :meth:`Simulator.light` and noiseless renders."""

    transform: Transform
    stars_img: NDArray[np.float32]     # incident e: stars + trails (Bayer-weighted)
    cloud: CloudField | None
    truth: FrameTruth


class Simulator:
    """Deterministic synthetic sky + camera.

    Parameters
    ----------
    config : SimConfig
    seed : int
        Seed (>= 0); every frame is a pure function of ``(config, seed, index)``.
    stars : StarCatalogue, optional
        Replace the random catalogue with these stars (reference pixels), e.g. a
        single red star for a Bayer test.
    threads : int
        Worker threads for the noise generation (results do not depend on it).

    Attributes
    ----------
    hot_pixels, cold_pixels : ndarray, shape (k, 2), int64
        ``(y, x)`` of the hot and cold pixels (fixed per seed).
    hot_pixel_rates_e_per_s : ndarray, shape (k,), float64
        Dark current of each hot pixel at 0 C.

    Raises
    ------
    ConfigError
        When ``seed`` is negative.
    """

    def __init__(self, config: SimConfig, seed: int, *, stars: StarCatalogue | None = None,
                 threads: int = 1) -> None:
        if int(seed) < 0:
            raise ConfigError(f"Simulator seed: must be >= 0, got {seed}")
        self.config = config
        self.seed = int(seed)
        self.threads = max(1, int(threads))
        self._user_stars = stars
        self._cells: dict[tuple[int, int], StarCatalogue] = {}
        self.psf = MoffatPSF(config.fwhm_px, config.moffat_beta, config.elongation,
                             config.elongation_angle_deg)
        if config.bayer_pattern is None:
            self.cfa = np.zeros((2, 2), dtype=np.int64)
        else:
            self.cfa = np.array([_CHANNEL[c] for c in config.bayer_pattern],
                                dtype=np.int64).reshape(2, 2)
        self.sensor = Sensor(config, self.seed, threads=self.threads)
        self.hot_pixels: NDArray[np.int64] = self.sensor.hot_pixels
        self.cold_pixels: NDArray[np.int64] = self.sensor.cold_pixels
        self.hot_pixel_rates_e_per_s: NDArray[np.float64] = self.sensor.hot_pixel_rates_e_per_s

    # ------------------------------------------------------------------ sensor (sensor.py)

    @property
    def is_colour(self) -> bool:
        """True for a Bayer (one-shot colour) camera."""
        return self.config.bayer_pattern is not None

    @property
    def dust_donuts(self) -> list[tuple[float, float, float, float]]:
        """Dust shadows as ``(x, y, outer_radius_px, depth)`` (:attr:`Sensor.dust_donuts`)."""
        return self.sensor.dust_donuts

    dark_scale = staticmethod(_dark_scale)

    def true_master_dark(self, exposure_s: float, ccd_temp_c: float) -> NDArray[np.float32]:
        """Noiseless dark signal including bias, ADU (:meth:`Sensor.true_master_dark`)."""
        return self.sensor.true_master_dark(exposure_s, ccd_temp_c)

    def true_master_bias(self) -> NDArray[np.float32]:
        """Noiseless bias (ADU), ``(ny, nx)`` float32."""
        return self.sensor.true_master_dark(0.0, self.config.ccd_temp_c)

    def true_flat(self) -> NDArray[np.float32]:
        """Normalised flat (median 1): vignetting, dust donuts and cold pixels.

        Returns
        -------
        ndarray, shape (ny, nx), float32
            A copy of the pixel response. Flats are lit by a white panel, so for a
            colour camera this is also the per-channel flat.
        """
        return self.sensor.response.copy()

    # ------------------------------------------------------------------ geometry

    def transform(self, index: int) -> Transform:
        """Frame ``index`` pixel -> reference pixel (``method="truth"``).

        Raises
        ------
        ValueError
            When ``index`` is negative.
        """
        if index < 0:
            raise ValueError(f"frame index must be >= 0, got {index}")
        cfg = self.config
        ny, nx = cfg.shape
        centre = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
        theta = cfg.rotation_deg_per_frame * index
        shift = np.array(cfg.drift_px_per_frame, dtype=np.float64) * index
        if cfg.dither_px > 0 and index > 0:
            shift = shift + stream_rng(self.seed, sky.STREAM_DITHER, index).uniform(
                -cfg.dither_px, cfg.dither_px, 2)
        if cfg.meridian_flip_at is not None and index >= cfg.meridian_flip_at:
            theta += 180.0
            shift = shift + self.flip_offset_px
        rad = math.radians(theta)
        c, s = math.cos(rad), math.sin(rad)
        # Snap float noise so that 180 degrees is exactly [[-1, 0], [0, -1]].
        c = round(c) if abs(c - round(c)) < 1e-14 else c
        s = round(s) if abs(s - round(s)) < 1e-14 else s
        rot = np.array([[c, -s], [s, c]], dtype=np.float64)
        t = centre + shift - rot @ centre
        model = "translation" if (c == 1.0 and s == 0.0) else "similarity"
        return Transform(np.column_stack([rot, t]), model, 0, 0.0, "truth")

    @cached_property
    def flip_offset_px(self) -> NDArray[np.float64]:
        """Extra pointing offset (reference px) after the meridian flip, 3-8 px."""
        rng = stream_rng(self.seed, sky.STREAM_FLIP)
        length = rng.uniform(3.0, 8.0)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        return np.array([length * math.cos(angle), length * math.sin(angle)])

    def catalogue(self, xmin: float, ymin: float, xmax: float, ymax: float) -> StarCatalogue:
        """Stars with reference positions inside ``[xmin, xmax) x [ymin, ymax)``.

        Returns
        -------
        StarCatalogue
            Fixed per seed (or the user catalogue), in reference pixels.
        """
        if self._user_stars is not None:
            cat = self._user_stars
        else:
            cfg = self.config
            density = cfg.n_stars / float(cfg.width * cfg.height)
            parts = []
            for cy in range(math.floor((ymin + 0.5) / CELL_PX),
                            math.floor((ymax + 0.5) / CELL_PX) + 1):
                for cx in range(math.floor((xmin + 0.5) / CELL_PX),
                                math.floor((xmax + 0.5) / CELL_PX) + 1):
                    cell = self._cells.get((cx, cy))
                    if cell is None:
                        cell = sky.catalogue_cell(self.seed, cx, cy, density,
                                                  cfg.faintest_flux_e, cfg.brightest_flux_e,
                                                  cfg.flux_powerlaw_index)
                        self._cells[(cx, cy)] = cell
                    parts.append(cell)
            cat = StarCatalogue(np.concatenate([p.xy for p in parts]).reshape(-1, 2),
                                np.concatenate([p.flux_e for p in parts]),
                                np.concatenate([p.rgb for p in parts]).reshape(-1, 3))
        x, y = cat.xy[:, 0], cat.xy[:, 1]
        return cat.select((x >= xmin) & (x < xmax) & (y >= ymin) & (y < ymax))

    # ------------------------------------------------------------------ rendering

    def _flux_columns(self, flux: NDArray[np.float64],
                      rgb: NDArray[np.float64]) -> NDArray[np.float64]:
        """Per-channel electrons: one column for mono, three for colour."""
        if self.is_colour:
            return np.ascontiguousarray(flux[:, None] * rgb)
        return np.ascontiguousarray(flux[:, None])

    def _scene(self, index: int, transients: bool = True) -> _Scene:
        """Stars, trails and truth of light frame ``index`` (no noise, no sky)."""
        cfg = self.config
        ny, nx = cfg.shape
        tf = self.transform(index)
        corners = np.array([[-0.5, -0.5], [nx - 0.5, -0.5], [-0.5, ny - 0.5],
                            [nx - 0.5, ny - 0.5]])
        ref_corners = tf.apply(corners)
        margin = MAX_STAMP_PX + 2.0
        cat = self.catalogue(ref_corners[:, 0].min() - margin, ref_corners[:, 1].min() - margin,
                             ref_corners[:, 0].max() + margin, ref_corners[:, 1].max() + margin)
        xy = tf.inverse().apply(cat.xy)
        near = ((xy[:, 0] > -margin) & (xy[:, 0] < nx - 1 + margin)
                & (xy[:, 1] > -margin) & (xy[:, 1] < ny - 1 + margin))
        cat, xy = cat.select(near), xy[near]
        cloud = None
        flux = cat.flux_e
        transparency = 1.0
        if transients and index in cfg.cloud_frames:
            cloud = CloudField.random(stream_rng(self.seed, sky.STREAM_CLOUD, index),
                                      cfg.cloud_transparency, cfg.shape)
            flux = flux * cloud.at(xy)
            transparency = cloud.frame_mean(cfg.shape)
        img = np.zeros((ny, nx), dtype=np.float32)
        sky.render_stars(img, xy, self._flux_columns(flux, cat.rgb), self.cfa, self.psf)
        trail_mask = None
        trails: list[sky.Trail] = []
        if transients and index in cfg.satellite_frames:
            trails.append(sky.satellite_trail(stream_rng(self.seed, sky.STREAM_SATELLITE, index),
                                              cfg.shape))
        if transients and index in cfg.aircraft_frames:
            trails.extend(sky.aircraft_trails(stream_rng(self.seed, sky.STREAM_AIRCRAFT, index),
                                              cfg.shape))
        if trails:
            trail_mask = np.zeros((ny, nx), dtype=np.bool_)
            for trail in trails:
                sky.render_trail(img, trail_mask, trail)
        inside = ((xy[:, 0] >= -0.5) & (xy[:, 0] < nx - 0.5)
                  & (xy[:, 1] >= -0.5) & (xy[:, 1] < ny - 0.5))
        truth = FrameTruth(transform=tf, stars_xy=np.ascontiguousarray(xy[inside]),
                           stars_flux_e=np.ascontiguousarray(flux[inside]),
                           transparency=transparency, trail_mask=trail_mask, cosmic_mask=None,
                           stars_ref_xy=np.ascontiguousarray(cat.xy[inside]),
                           stars_rgb=np.ascontiguousarray(cat.rgb[inside]), index=index)
        return _Scene(tf, img, cloud, truth)

    @cached_property
    def _tint_rows(self) -> NDArray[np.float32]:
        """Sky tint of each pixel of an even and an odd row, shape (2, nx)."""
        nx = self.config.width
        rows = np.ones((2, nx), dtype=np.float32)
        if self.is_colour:
            for parity in (0, 1):
                rows[parity, 0::2] = SKY_TINT_RGB[self.cfa[parity, 0]]
                rows[parity, 1::2] = SKY_TINT_RGB[self.cfa[parity, 1]]
        return rows

    def _sky_block(self, cloud: CloudField | None, y0: int, y1: int) -> NDArray[np.float32]:
        """Incident sky electrons of rows ``[y0, y1)`` (gradient, cloud glow, tint)."""
        cfg = self.config
        level = cfg.sky_e_per_s * cfg.exposure_s
        block = sky.sky_plane(level, cfg.gradient_fraction, cfg.gradient_angle_deg, cfg.shape,
                              y0, y1)
        if cloud is not None:
            # Clouds scatter ground light back: half the level where fully opaque.
            block += np.float32(0.5 * level) * (1.0 - cloud.grid(cfg.width, y0, y1))
        if self.is_colour:
            block *= self._tint_rows[np.arange(y0, y1) % 2]
        return block

    def _cosmic(self, index_keys: tuple[int, ...], mean_count: float) -> CosmicHits | None:
        hits = sky.cosmic_hits(stream_rng(self.seed, sky.STREAM_COSMIC, *index_keys),
                               self.config.shape, mean_count)
        return hits if len(hits[0]) else None

    # ------------------------------------------------------------------ public frames

    def light(self, index: int) -> SimFrame:
        """Light frame ``index`` (deterministic in ``(seed, index)``, any order).

        Returns
        -------
        SimFrame
            uint16 data, FITS cards and :class:`FrameTruth`.

        Raises
        ------
        ValueError
            When ``index`` is negative.
        """
        cfg = self.config
        scene = self._scene(index)
        cosmic = self._cosmic((0, index), cfg.cosmic_rays_per_frame)

        def incident(y0: int, y1: int) -> NDArray[np.float32]:
            return scene.stars_img[y0:y1] + self._sky_block(scene.cloud, y0, y1)

        data = self.sensor.readout((sky.STREAM_LIGHT_NOISE, index), cfg.exposure_s, cfg.ccd_temp_c,
                             incident, cosmic)
        cosmic_mask = None
        if cosmic is not None:
            cosmic_mask = np.zeros(cfg.shape, dtype=np.bool_)
            cosmic_mask[cosmic[0], cosmic[1]] = True
        truth = FrameTruth(scene.truth.transform, scene.truth.stars_xy, scene.truth.stars_flux_e,
                           scene.truth.transparency, scene.truth.trail_mask, cosmic_mask,
                           scene.truth.stars_ref_xy, scene.truth.stars_rgb, index)
        start = self._start + timedelta(seconds=index * cfg.cadence)
        return SimFrame(data, self.header(IMAGETYP_LIGHT, cfg.exposure_s, start, index=index),
                        truth)

    def bias(self, index: int) -> SimFrame:
        """Bias frame ``index``: 0 s, bias + column pattern + read noise."""
        self._check_index(index)
        cfg = self.config
        data = self.sensor.readout((sky.STREAM_BIAS_NOISE, index), 0.0, cfg.ccd_temp_c, None, None)
        start = self._start + timedelta(hours=11, seconds=index * 2.0)
        return SimFrame(data, self.header(IMAGETYP_BIAS, 0.0, start, index=index), None)

    def dark(self, index: int, exposure_s: float | None = None,
             ccd_temp_c: float | None = None) -> SimFrame:
        """Dark frame ``index`` (default: the lights' exposure and temperature).

        Dark current, amp glow and hot pixels scale linearly with exposure and
        double every 6.3 C; cosmic rays arrive at the lights' rate per second.

        Raises
        ------
        ValueError
            When ``index`` or ``exposure_s`` is negative.
        """
        self._check_index(index)
        cfg = self.config
        exp_s = cfg.exposure_s if exposure_s is None else float(exposure_s)
        temp = cfg.ccd_temp_c if ccd_temp_c is None else float(ccd_temp_c)
        if exp_s < 0:
            raise ValueError(f"dark exposure must be >= 0 s, got {exp_s}")
        keys = (round(exp_s * 1000), zigzag(round(temp * 1000)), index)
        cosmic = self._cosmic((1, *keys), cfg.cosmic_rays_per_frame * exp_s / cfg.exposure_s)
        data = self.sensor.readout((sky.STREAM_DARK_NOISE, *keys), exp_s, temp, None, cosmic)
        start = self._start + timedelta(hours=11, minutes=10,
                                        seconds=index * (exp_s + 5.0))
        return SimFrame(data, self.header(IMAGETYP_DARK, exp_s, start, ccd_temp_c=temp,
                                          index=index), None)

    def flat(self, index: int) -> SimFrame:
        """Flat frame ``index``: a white panel at ~``flat_level_fraction`` of full well.

        Same vignetting, dust and cold pixels as the lights; ``flat_exposure_s``
        of dark current; no cosmic rays.
        """
        self._check_index(index)
        cfg = self.config
        level = np.float32(cfg.flat_level_fraction * cfg.full_well_e)

        def incident(y0: int, y1: int) -> NDArray[np.float32]:
            return np.full((y1 - y0, cfg.width), level, dtype=np.float32)

        data = self.sensor.readout((sky.STREAM_FLAT_NOISE, index), cfg.flat_exposure_s,
                             cfg.ccd_temp_c, incident, None)
        start = self._start - timedelta(hours=1) + timedelta(
            seconds=index * (cfg.flat_exposure_s + 3.0))
        return SimFrame(data, self.header(IMAGETYP_FLAT, cfg.flat_exposure_s, start,
                                          index=index), None)

    def dark_flat(self, index: int) -> SimFrame:
        """Dark flat ``index``: a dark at the flats' exposure and the lights' temperature."""
        self._check_index(index)
        cfg = self.config
        data = self.sensor.readout((sky.STREAM_DARKFLAT_NOISE, index), cfg.flat_exposure_s,
                             cfg.ccd_temp_c, None, None)
        start = self._start + timedelta(hours=12, seconds=index * (cfg.flat_exposure_s + 3.0))
        return SimFrame(data, self.header(IMAGETYP_DARKFLAT, cfg.flat_exposure_s, start,
                                          index=index), None)

    def noiseless_reference(self) -> NDArray[np.float32]:
        """The reference pointing as a perfectly calibrated frame would show it.

        Stars plus sky (with gradient), clear sky, no transients, no noise, in ADU,
        at the identity transform and the lights' exposure.

        Returns
        -------
        ndarray, float32
            ``(ny, nx)`` for mono; ``(3, ny, nx)`` (R, G, B planes, not mosaicked)
            for colour.
        """
        cfg = self.config
        ny, nx = cfg.shape
        margin = MAX_STAMP_PX + 2.0
        cat = self.catalogue(-0.5 - margin, -0.5 - margin, nx - 0.5 + margin, ny - 0.5 + margin)
        level = cfg.sky_e_per_s * cfg.exposure_s
        sky_img = sky.sky_plane(level, cfg.gradient_fraction, cfg.gradient_angle_deg, cfg.shape)
        inv_gain = np.float32(1.0 / cfg.gain_e_per_adu)
        if not self.is_colour:
            img = np.zeros((ny, nx), dtype=np.float32)
            sky.render_stars(img, cat.xy, self._flux_columns(cat.flux_e, cat.rgb), self.cfa,
                             self.psf)
            return np.ascontiguousarray((img + sky_img) * inv_gain, dtype=np.float32)
        planes = np.zeros((3, ny, nx), dtype=np.float32)
        for c in range(3):
            sky.render_stars(planes[c], cat.xy, np.ascontiguousarray(
                (cat.flux_e * cat.rgb[:, c])[:, None]), np.zeros((2, 2), dtype=np.int64),
                self.psf)
            planes[c] += sky_img * np.float32(SKY_TINT_RGB[c])
        return np.ascontiguousarray(planes * inv_gain, dtype=np.float32)

    def noiseless_light(self, index: int, transients: bool = True) -> NDArray[np.float32]:
        """Light ``index`` as a perfectly calibrated frame would show it, no noise (ADU).

        Parameters
        ----------
        index : int
        transients : bool
            Include clouds and trails (cosmic rays are never included).

        Returns
        -------
        ndarray, shape (ny, nx), float32
            Mosaicked (CFA) for colour, like the raw frame.
        """
        cfg = self.config
        scene = self._scene(index, transients)
        img = scene.stars_img + self._sky_block(scene.cloud, 0, cfg.height)
        return np.ascontiguousarray(img * np.float32(1.0 / cfg.gain_e_per_adu),
                                    dtype=np.float32)

    def truth(self, index: int) -> FrameTruth:
        """Truth of light ``index`` without rendering noise (cosmic_mask is None)."""
        return self._scene(index).truth

    # ------------------------------------------------------------------ headers

    @staticmethod
    def _check_index(index: int) -> None:
        if index < 0:
            raise ValueError(f"frame index must be >= 0, got {index}")

    @cached_property
    def _start(self) -> datetime:
        start = datetime.fromisoformat(self.config.start_time_utc)
        if start.tzinfo is None:
            return start.replace(tzinfo=timezone.utc)
        return start.astimezone(timezone.utc)

    def header(self, image_type: str, exposure_s: float, start: datetime,
               ccd_temp_c: float | None = None, index: int = 0) -> dict[str, object]:
        """FITS cards as N.I.N.A. writes them (structural cards first).

        Parameters
        ----------
        image_type : str
            IMAGETYP value, e.g. ``"Light Frame"``.
        exposure_s : float
        start : datetime
            Exposure start (timezone-aware).
        ccd_temp_c : float, optional
            Sensor temperature (default: the configured one).
        index : int
            Frame index, recorded in SIMINDEX.

        Returns
        -------
        dict
            Keyword -> value (bool, int, float or str).
        """
        cfg = self.config
        temp = cfg.ccd_temp_c if ccd_temp_c is None else ccd_temp_c
        start = start.astimezone(timezone.utc)
        ms = round(start.microsecond / 1000.0)
        start = start.replace(microsecond=0) + timedelta(milliseconds=ms)
        date_obs = start.strftime("%Y-%m-%dT%H:%M:%S") + f".{start.microsecond // 1000:03d}"
        mjd = (start - _MJD_EPOCH).total_seconds() / 86400.0
        hdr: dict[str, object] = {
            "SIMPLE": True, "BITPIX": 16, "NAXIS": 2, "NAXIS1": cfg.width, "NAXIS2": cfg.height,
            "EXTEND": True, "BZERO": 32768, "BSCALE": 1,
            "IMAGETYP": image_type,
            "EXPOSURE": float(exposure_s), "EXPTIME": float(exposure_s),
            "DATE-OBS": date_obs, "MJD-OBS": round(mjd, 8),
            "XBINNING": cfg.binning, "YBINNING": cfg.binning,
            "GAIN": cfg.gain_setting, "OFFSET": round(cfg.bias_adu / 10.0),
            "EGAIN": float(cfg.gain_e_per_adu),
            "XPIXSZ": float(cfg.pixel_size_um * cfg.binning),
            "YPIXSZ": float(cfg.pixel_size_um * cfg.binning),
            "INSTRUME": "livestack simulator",
            "SET-TEMP": float(cfg.ccd_temp_c), "CCD-TEMP": float(temp),
            "FOCALLEN": float(cfg.focal_length_mm),
        }
        if image_type in (IMAGETYP_LIGHT, IMAGETYP_FLAT):
            hdr["FILTER"] = cfg.filter_name
        if image_type == IMAGETYP_LIGHT:
            hdr["OBJECT"] = cfg.object_name
            hdr["RA"] = float(cfg.ra_deg)
            hdr["DEC"] = float(cfg.dec_deg)
            hdr["OBJCTRA"] = _sexagesimal(cfg.ra_deg / 15.0, signed=False)
            hdr["OBJCTDEC"] = _sexagesimal(cfg.dec_deg, signed=True)
        if cfg.bayer_pattern is not None:
            hdr["BAYERPAT"] = cfg.bayer_pattern
            hdr["XBAYROFF"] = 0
            hdr["YBAYROFF"] = 0
            hdr["ROWORDER"] = "TOP-DOWN"
        hdr["SWCREATE"] = "livestack.sim"
        hdr["SIMSEED"] = self.seed
        hdr["SIMINDEX"] = int(index)
        return hdr


def _sexagesimal(value: float, signed: bool) -> str:
    """Format hours or degrees as ``'HH MM SS.ss'`` / ``'+DD MM SS.s'``."""
    sign = "-" if value < 0 else "+"
    total = abs(value) * 3600.0
    whole, sec = divmod(round(total, 2), 60.0)
    deg, minutes = divmod(int(whole), 60)
    text = f"{deg:02d} {minutes:02d} {sec:05.2f}"
    return sign + text if signed else text

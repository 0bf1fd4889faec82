"""Star detection and frame quality metrics.

Small frames are detected by sep on a (usually) binned copy. Large frames (>=
``auto_bin_min_mpix``) are detected on a 4x4-binned copy by a peak pass
(``kernels_binning.peak_score_kernel``: local maxima above the threshold, scored by their
3x3 flux), which keeps only the brightest few hundred candidates, all that registration
and the metrics refine; sep.extract labels and deblends every object instead, ~1 s on a
26 MP field of 8000 stars (issue 16, ``bench/bench_detect_register.py``). Their sky
(sep.Background) is measured on an 8x8 grid subsampled from the 4x4 copy and resampled,
and the automatic binning probes the star size on the 30 brightest 4x4 detections before
choosing 4x4, 2x2 or none. Everything that needs precision then happens on small
full-resolution stamps around the candidates (``kernels_detect``, parallel over stars).
Before that, both paths drop the fragments of satellite and aircraft trails from the
catalogue (:func:`livestack.pipeline.trails.find_trails`: elongated detections on one
narrow straight line, oriented along it), so that neither registration nor the metrics
see them, however many of them there are; then:

* a Gaussian-windowed centroid (the same fixed point as sep.winpos / SExtractor XWIN)
  after subtracting the local sky from sep's background map, so registration reaches a
  few hundredths of a pixel whatever the binning;
* windowed second moments, deconvolved from the window, for each star's FWHM and
  elongation, and cuts for hot pixels (one sharp pixel) and saturated (flat-topped) stars;
* in :func:`measure`, an elliptical, pixel-integrated Moffat fit (batched
  Levenberg-Marquardt in numpy) of the brightest isolated stars, whose median gives the
  frame's FWHM and elongation (FWHM 2-5 px stars within ~1 %, and undersampled stars do
  not look elongated).

All coordinates are full-resolution pixels, centre of pixel [0, 0] at (0, 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from livestack.pipeline.ranges import rng
from livestack.pipeline.types import FrameMetrics, StarList

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: sep error messages that mean "too many pixels/objects above threshold": we then raise
#: the threshold instead of failing.
_SEP_OVERFLOW_MESSAGES = ("pixel buffer full", "deblending overflow", "object buffer full")


@dataclass(frozen=True)
class DetectConfig:
    """Star detection settings.

    Attributes
    ----------
    threshold_sigma : float
        Detection threshold in units of the (binned) sky noise.
    bin_factor : int or None
        Bin the frame ``n x n`` (mean of finite pixels) before sep. None = automatic:
        frames below ``auto_bin_min_mpix`` are not binned; larger ones get the largest of
        4 or 2 that keeps the binned FWHM >= ``min_binned_fwhm_px``.
    max_stars : int
        Keep at most this many stars (brightest first).
    min_area_px : int
        sep's minimum number of connected pixels (binned pixels).
    pixel_scale_arcsec : float or None
        Arcseconds per full-resolution pixel, for ``FrameMetrics.fwhm_arcsec``.
    saturation_adu : float or None
        Stars with a pixel at or above this level are dropped. None = drop stars with a
        flat top (>= 5 pixels within 1 % of their peak), which only saturation produces.
    max_fit_stars : int
        Number of bright isolated stars fitted with a Moffat profile in :func:`measure`.
    auto_bin_min_mpix : float
        Frames with fewer megapixels are never binned automatically and are detected by
        sep.extract; larger ones by the peak pass, with their sky on an 8x8 grid.
    min_binned_fwhm_px : float
        Smallest FWHM (binned pixels) the automatic binning accepts.
    """

    threshold_sigma: float = field(default=5.0, metadata=rng(0.0, 1000.0, lo_open=True))
    bin_factor: int | None = field(default=None, metadata=rng(1, 16))
    max_stars: int = field(default=400, metadata=rng(1, 100_000))
    min_area_px: int = field(default=3, metadata=rng(1, 10_000))
    pixel_scale_arcsec: float | None = field(default=None,
                                               metadata=rng(0.0, 3600.0, lo_open=True))
    saturation_adu: float | None = field(default=None, metadata=rng(0.0, None, lo_open=True))
    max_fit_stars: int = field(default=30, metadata=rng(1, 10_000))
    auto_bin_min_mpix: float = field(default=8.0, metadata=rng(0.0, 100_000.0))
    min_binned_fwhm_px: float = field(default=0.6, metadata=rng(0.0, 100.0, lo_open=True))

    def __post_init__(self) -> None:
        if not self.threshold_sigma > 0:
            raise ValueError(f"threshold_sigma must be > 0, got {self.threshold_sigma}")
        if self.bin_factor is not None and self.bin_factor < 1:
            raise ValueError(f"bin_factor must be >= 1 or None, got {self.bin_factor}")
        if self.max_stars < 1 or self.min_area_px < 1 or self.max_fit_stars < 1:
            raise ValueError("max_stars, min_area_px and max_fit_stars must be >= 1")
        if self.pixel_scale_arcsec is not None and not self.pixel_scale_arcsec > 0:
            raise ValueError(f"pixel_scale_arcsec must be > 0, got {self.pixel_scale_arcsec}")
        if not self.min_binned_fwhm_px > 0:
            raise ValueError(f"min_binned_fwhm_px must be > 0, got {self.min_binned_fwhm_px}")


@dataclass(frozen=True)
class _Detection:
    """Internal result of :func:`_detect`: stars plus what :func:`measure` reuses."""

    stars: StarList
    background_adu: float
    noise_adu: float
    local_sky: NDArray[np.float64]  # (n,) sky level at each star (ADU)
    isolated: NDArray[np.bool_]  # (n,) no other candidate within the fit stamp
    bin_factor: int


def detect_stars(image: NDArray[np.float32],
                 config: DetectConfig = DetectConfig()) -> tuple[StarList, float, float]:
    """Detect stars and refine their centroids at full resolution.

    Parameters
    ----------
    image : ndarray, shape (ny, nx), float32
        Calibrated frame (luminance for colour). Non-finite pixels are ignored.
    config : DetectConfig

    Returns
    -------
    stars : StarList
        Brightest first, full-resolution coordinates; hot pixels, saturated stars,
        deblended pairs, satellite/aircraft trail fragments (and stars a trail crosses,
        :mod:`livestack.pipeline.trails`) and streak fragments are excluded.
    background_adu : float
        Global sky median in ADU (NaN when the frame has no finite pixel).
    noise_adu : float
        Global sky noise (sigma) per full-resolution pixel in ADU (NaN likewise).

    Raises
    ------
    ValueError
        If ``image`` is not 2-D. sep failures (buffer/deblend overflow) are handled by
        raising the threshold and never propagate.
    """
    det = _detect(image, config)
    return det.stars, det.background_adu, det.noise_adu


def measure(image: NDArray[np.float32],
            config: DetectConfig = DetectConfig()) -> tuple[StarList, FrameMetrics]:
    """Detect stars and compute the frame's quality metrics.

    Parameters
    ----------
    image : ndarray, shape (ny, nx), float32
        Calibrated frame (luminance for colour). Non-finite pixels are ignored.
    config : DetectConfig

    Returns
    -------
    stars : StarList
        As :func:`detect_stars`; the fitted stars carry their Moffat FWHM/elongation.
    metrics : FrameMetrics
        ``fwhm_px`` and ``elongation`` are medians over Moffat fits of the brightest
        isolated stars (NaN without stars); ``snr`` is the median of the 20 brightest
        stars' flux over the noise in an aperture of radius FWHM (0.0 without stars).

    Raises
    ------
    ValueError
        If ``image`` is not 2-D.
    """
    return _measure(image, config)


def _measure(image: NDArray[np.float32], config: DetectConfig,
             legacy: bool = False) -> tuple[StarList, FrameMetrics]:
    """:func:`measure`; ``legacy`` runs the detection of :func:`_detect`'s old path."""
    arr = _as_image(image)
    det = _detect(arr, config, legacy)
    stars = det.stars
    fwhm = float("nan")
    elong = float("nan")
    if len(stars) > 0:
        fit_fwhm, fit_elong, fit_idx = _fit_bright_stars(arr, det, config.max_fit_stars)
        if fit_idx.size:
            fwhm = float(np.median(fit_fwhm))
            elong = float(np.median(fit_elong))
            fwhm_all = stars.fwhm_px.copy()
            elong_all = stars.elongation.copy()
            fwhm_all[fit_idx] = fit_fwhm
            elong_all[fit_idx] = fit_elong
            stars = StarList(stars.xy, stars.flux, fwhm_all, elong_all)
        else:  # no star good enough to fit: fall back to the moments
            fwhm = float(np.median(stars.fwhm_px))
            elong = float(np.median(stars.elongation))
    snr = 0.0
    if len(stars) > 0 and det.noise_adu > 0 and math.isfinite(fwhm):
        area = math.pi * max(fwhm, 1.0) ** 2
        snr = float(np.median(stars.flux[:20]) / (det.noise_adu * math.sqrt(area)))
    fwhm_arcsec = None
    if config.pixel_scale_arcsec is not None and math.isfinite(fwhm):
        fwhm_arcsec = fwhm * config.pixel_scale_arcsec
    metrics = FrameMetrics(
        star_count=len(stars),
        fwhm_px=fwhm,
        fwhm_arcsec=fwhm_arcsec,
        elongation=elong,
        background_adu=det.background_adu,
        noise_adu=det.noise_adu,
        snr=snr,
    )
    return stars, metrics


# --------------------------------------------------------------------------- detection


def _as_image(image: NDArray[np.float32]) -> NDArray[np.float32]:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"detect: image must be 2-D (luminance), got shape {arr.shape}")
    # sep needs native-endian C-contiguous float32; astype/ascontiguousarray copy only if needed.
    return np.ascontiguousarray(arr, dtype=np.float32)


def _empty_stars() -> StarList:
    return StarList(np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0))


def _bin_image(img: NDArray[np.float32], factor: int) -> NDArray[np.float32]:
    """Mean of finite pixels over ``factor x factor`` blocks (NaN where none)."""
    from livestack.pipeline import kernels_binning as kb  # numba only when binning

    ny, nx = img.shape
    out = np.empty((ny // factor, nx // factor), dtype=np.float32)
    kb.bin_mean_kernel(img, factor, out)
    return out


@dataclass(frozen=True)
class _Sky:
    """The sky of a frame, measured by sep on a binned copy."""

    factor: int  # binning of the grid ``back`` lives on
    back: NDArray[np.float32]  # sky level map (ADU)
    global_back: float  # median sky (ADU)
    noise_full: float  # sky sigma per full-resolution pixel (ADU)


#: Large frames are detected on this binning first (the probe of :func:`_detect`).
_DETECT_FACTOR = 4
#: The sky of a large frame is measured on a grid binned this much (sep.Background costs
#: ~60 ms on a 2x2-binned 26 MP frame, ~25 ms on a 4x4 one, ~6 ms on an 8x8 one; the
#: mesh stays 256 full-resolution pixels wide, so the sky map is the same surface).
_SKY_FACTOR = 8
#: Mesh size of the sky map in full-resolution pixels on large frames.
_SKY_MESH_PX = 256


def _measure_sky(binned: NDArray[np.float32], factor: int, mesh_px: int | None = None,
                 noise_factor: int | None = None) -> _Sky | None:
    """sep.Background on a binned frame (NaN-safe); None if nothing is finite.

    ``mesh_px`` fixes the mesh in full-resolution pixels; None = a quarter of the
    shorter side, between 16 and 64 binned pixels. ``noise_factor`` is the binning of
    each of ``binned``'s pixels when that is not ``factor`` (a subsampled grid).
    """
    import sep

    finite = np.isfinite(binned)
    n_finite = int(np.count_nonzero(finite))
    if n_finite == 0:
        return None
    mask = None
    data = binned
    if n_finite < binned.size:
        mask = ~finite
        # sep must never see NaN, even masked.
        data = np.where(finite, binned, np.float32(np.median(binned[finite])))
    data = np.ascontiguousarray(data, dtype=np.float32)
    if mesh_px is None:
        box = int(max(16, min(64, min(data.shape) // 4)))
    else:
        box = int(max(8, min(mesh_px // factor, min(data.shape) // 4)))
    try:
        bkg = sep.Background(data, mask=mask, bw=box, bh=box, fw=3, fh=3)
    except ValueError as exc:  # e.g. frame smaller than one mesh
        raise ValueError(f"detect: sep.Background failed: {exc}") from exc
    # The mean of n^2 pixels has sigma / n.
    n = factor if noise_factor is None else noise_factor
    return _Sky(factor, bkg.back(), float(bkg.globalback), float(bkg.globalrms) * n)


def _large_frame_sky(img: NDArray[np.float32]) -> tuple[NDArray[np.float32], _Sky | None]:
    """The 4x4-binned frame (what a large frame is detected on) and its sky, measured on
    every other pixel of it: an 8x8 grid, 1/4 of sep.Background's work.

    The grid is subsampled, not binned 8x8: each of its pixels is still a 4x4 mean, so the
    noise (and the faint stars' share of each pixel, which on a dense field raises any
    clipped sigma) is that of the 4x4 frame, and so is the frame's noise figure; an 8x8
    binning would read 50 % more noise on a field of 8000 stars. The grid's pixel ``j``
    sits 2 full-resolution pixels off the 8x8 centre convention, negligible on a sky
    map meshed at 256 px.
    """
    coarse = _bin_image(img, _DETECT_FACTOR)
    step = _SKY_FACTOR // _DETECT_FACTOR
    grid = np.ascontiguousarray(coarse[::step, ::step])
    return coarse, _measure_sky(grid, _SKY_FACTOR, _SKY_MESH_PX, _DETECT_FACTOR)


def _detect(image: NDArray[np.float32], config: DetectConfig,
            legacy: bool = False) -> _Detection:
    """Detection; ``legacy`` keeps the path before issue 16 on large frames (the sky on
    the 4x4 grid and sep.extract), which the benches time as their baseline."""
    img = _as_image(image)
    ny, nx = img.shape
    nan = float("nan")
    if ny < 16 or nx < 16:
        return _Detection(_empty_stars(), nan, nan, np.zeros(0), np.zeros(0, bool), 1)
    large = _is_large(img, config)
    coarse: NDArray[np.float32] | None = None
    sky: _Sky | None = None
    if large and legacy:
        coarse = _bin_image(img, _DETECT_FACTOR)
        sky = _measure_sky(coarse, _DETECT_FACTOR)
    elif large:
        coarse, sky = _large_frame_sky(img)
    peaks = large and not legacy
    if config.bin_factor is not None:
        factor = int(config.bin_factor)
        if factor == _DETECT_FACTOR:
            return _detect_at(img, config, factor, coarse, sky, peaks=peaks)
        return _detect_at(img, config, factor, None, sky, peaks=peaks)
    if not large:
        return _detect_at(img, config, 1)
    # Large frame: probe the star size on the 4x4 detection's brightest stars, then finish
    # at 4x4 or redo finer if the stars are too small for it (binned FWHM < ~1.2 px).
    cands = _candidates(img, config, _DETECT_FACTOR, coarse, sky, peaks)
    if isinstance(cands, _Detection):
        return cands
    probe = _refine_candidates(img, config, _DETECT_FACTOR, cands[0], cands[1], limit=30)
    if len(probe.stars) == 0:
        return probe
    fwhm = float(np.median(probe.stars.fwhm_px))
    if fwhm / _DETECT_FACTOR >= config.min_binned_fwhm_px:
        return _refine_candidates(img, config, _DETECT_FACTOR, cands[0], cands[1], None)
    finer = 2 if fwhm / 2 >= config.min_binned_fwhm_px else 1
    return _detect_at(img, config, finer, None, sky, peaks=peaks)


def _is_large(img: NDArray[np.float32], config: DetectConfig) -> bool:
    """Frames this large take the binned sky and the peak pass instead of sep.extract."""
    return bool(img.shape[0] * img.shape[1] >= config.auto_bin_min_mpix * 1e6)


def _detect_at(img: NDArray[np.float32], config: DetectConfig, factor: int,
               binned: NDArray[np.float32] | None = None, sky: _Sky | None = None,
               limit: int | None = None, peaks: bool = False) -> _Detection:
    """Detect on the frame binned by ``factor`` and refine at full resolution.

    ``binned``/``sky`` may be passed when already computed (``sky`` may live on a coarser
    grid); ``limit`` refines only that many of the brightest candidates (a quick probe);
    ``peaks`` takes the peak pass instead of sep.extract.
    """
    cands = _candidates(img, config, factor, binned, sky, peaks)
    if isinstance(cands, _Detection):
        return cands
    return _refine_candidates(img, config, factor, cands[0], cands[1], limit)


def _candidates(img: NDArray[np.float32], config: DetectConfig, factor: int,
                binned: NDArray[np.float32] | None,
                sky: _Sky | None, peaks: bool = False) -> _Detection | tuple[Any, _Sky]:
    """sep's catalogue on the binned frame (junk-cut, brightest first) and the sky, or an
    empty detection when there is nothing to refine. ``peaks`` takes the peak pass
    (:func:`_peak_candidates`) instead of sep.extract."""
    import sep

    from livestack.pipeline import kernels_binning as kb

    nan = float("nan")
    if binned is None:
        binned = _bin_image(img, factor) if factor > 1 else img
    if sky is None:
        sky = _measure_sky(binned, factor)
    if sky is None:  # no finite pixel
        return _Detection(_empty_stars(), nan, nan, np.zeros(0), np.zeros(0, bool), factor)
    rms = sky.noise_full / factor
    if not (math.isfinite(rms) and rms > 0):
        return _Detection(_empty_stars(), sky.global_back, max(sky.noise_full, 0.0),
                          np.zeros(0), np.zeros(0, bool), factor)
    if peaks:
        return _peak_candidates(binned, config, factor, sky, rms)
    data = np.empty(binned.shape, dtype=np.float32)
    kb.subtract_sky_kernel(binned, sky.back, factor, sky.factor, data)
    finite = np.isfinite(data)
    mask = None
    if not finite.all():
        mask = ~finite
        data[mask] = 0.0
    objects = _extract(sep, data, config, rms, mask)
    none = _Detection(_empty_stars(), sky.global_back, sky.noise_full, np.zeros(0),
                      np.zeros(0, bool), factor)
    if objects is None or len(objects) == 0:
        return none

    # Catalogue-level junk cuts: deblended pairs, edge-truncated objects, trail fragments
    # (before the relative streak cut, whose median they could otherwise set).
    ok = (objects["flag"] & (sep.OBJ_MERGED | sep.OBJ_TRUNC)) == 0
    ab = objects["a"] / np.maximum(objects["b"], 1e-6)
    ok &= ~_on_trail(objects["x"], objects["y"], objects["theta"], ab, factor)
    if not ok.any():
        return none
    ok &= ab < max(3.0, 2.0 * float(np.median(ab[ok])))
    objects = objects[ok]
    if len(objects) == 0:
        return none
    order = np.argsort(-objects["flux"], kind="stable")
    return objects[order[: config.max_stars + max(config.max_stars // 4, 25)]], sky


#: The peak pass keeps this many times the candidates it needs before the shape cut, so
#: that streak fragments (many peaks along a satellite trail) cannot crowd out the stars.
_PEAK_OVERSELECT = 3
#: Half-size (binned px) of the stamps the peak pass measures shapes on.
_PEAK_STAMP_R = 2


def _peak_candidates(binned: NDArray[np.float32], config: DetectConfig, factor: int,
                     sky: _Sky, rms: float) -> _Detection | tuple[Any, _Sky]:
    """The dense threshold pass for large frames: local maxima of the binned frame.

    Where :func:`_candidates` runs sep.extract (connected components and deblending of
    every object above the threshold: ~120 ms for 5000 stars at 26 MP binned 4x4), this
    marks peaks in one streaming kernel pass and keeps only the brightest few hundred,
    which is all that registration and the metrics refine. Returns the same catalogue
    fields sep gives (``x``, ``y``, ``flux``, ``a``, ``b`` in binned pixels), brightest
    first, after the same trail test and streak cut (``a / b`` against the field's median).
    """
    from livestack.pipeline import kernels_binning as kb  # numba only when detecting

    none = _Detection(_empty_stars(), sky.global_back, sky.noise_full, np.zeros(0),
                      np.zeros(0, bool), factor)
    src = np.ascontiguousarray(binned, dtype=np.float32)
    score = np.empty(src.shape, dtype=np.float32)
    kb.peak_score_kernel(src, np.ascontiguousarray(sky.back, dtype=np.float32), factor,
                         sky.factor, float(config.threshold_sigma) * rms,
                         min(int(config.min_area_px), 9), score)
    flat = score.ravel()
    idx = kb.peak_indices(score)
    if idx.size == 0:
        return none
    need = config.max_stars + max(config.max_stars // 4, 25)
    take = min(idx.size, _PEAK_OVERSELECT * need)
    if take < idx.size:
        idx = idx[np.argpartition(-flat[idx], take - 1)[:take]]
    idx = idx[np.argsort(-flat[idx], kind="stable")]
    nyb, nxb = src.shape
    py, px = np.divmod(idx, nxb)
    r = _PEAK_STAMP_R
    off = np.arange(-r, r + 1)
    gy = np.clip(py[:, None, None] + off[None, :, None], 0, nyb - 1)
    gx = np.clip(px[:, None, None] + off[None, None, :], 0, nxb - 1)
    # Local sky from the (smooth) sky map at the nearest node; shapes need no more.
    c = sky.factor
    nys, nxs = sky.back.shape
    sy = np.clip(np.rint((py * factor + (factor - 1) / 2.0 - (c - 1) / 2.0) / c).astype(np.intp),
                 0, nys - 1)
    sx = np.clip(np.rint((px * factor + (factor - 1) / 2.0 - (c - 1) / 2.0) / c).astype(np.intp),
                 0, nxs - 1)
    st = src[gy, gx].astype(np.float64) - sky.back[sy, sx].astype(np.float64)[:, None, None]
    st = np.where(np.isfinite(st), np.maximum(st, 0.0), 0.0)
    # Barycentre in the 3x3 core (the peak pass's position), moments over the 5x5 stamp.
    core = st[:, r - 1:r + 2, r - 1:r + 2]
    s0 = np.maximum(core.sum(axis=(1, 2)), 1e-12)
    cx = px + (core.sum(axis=1) @ np.array([-1.0, 0.0, 1.0])) / s0
    cy = py + (core.sum(axis=2) @ np.array([-1.0, 0.0, 1.0])) / s0
    dx = (gx - cx[:, None, None])
    dy = (gy - cy[:, None, None])
    m0 = np.maximum(st.sum(axis=(1, 2)), 1e-12)
    # The pixel box (1/12 per axis) keeps an undersampled star from looking like a line.
    mxx = (st * dx * dx).sum(axis=(1, 2)) / m0 + 1.0 / 12.0
    myy = (st * dy * dy).sum(axis=(1, 2)) / m0 + 1.0 / 12.0
    mxy = (st * dx * dy).sum(axis=(1, 2)) / m0
    half_tr = 0.5 * (mxx + myy)
    disc = np.sqrt(np.maximum(0.25 * (mxx - myy) ** 2 + mxy**2, 0.0))
    a = np.sqrt(np.maximum(half_tr + disc, 1e-12))
    b = np.sqrt(np.maximum(half_tr - disc, 1e-12))
    ab = a / b
    ok = ~_on_trail(cx, cy, 0.5 * np.arctan2(2.0 * mxy, mxx - myy), ab, factor)
    if not ok.any():
        return none
    ok &= ab < max(3.0, 2.0 * float(np.median(ab[ok])))
    # sep's a, b (the size guess of _refine_candidates) carry no pixel box.
    a = np.sqrt(np.maximum(half_tr + disc - 1.0 / 12.0, 1e-6))
    b = np.sqrt(np.maximum(half_tr - disc - 1.0 / 12.0, 1e-6))
    objects = np.zeros(int(np.count_nonzero(ok)),
                       dtype=[("x", "f8"), ("y", "f8"), ("flux", "f8"), ("a", "f8"),
                              ("b", "f8")])
    if len(objects) == 0:
        return none
    objects["x"] = cx[ok]
    objects["y"] = cy[ok]
    objects["flux"] = flat[idx[ok]]
    objects["a"] = a[ok]
    objects["b"] = b[ok]
    return objects[:need], sky


#: Half-width (binned px, at least ``_TRAIL_BAND_MIN_PX`` full-resolution px) of the band
#: around a trail in which detections are its fragments: the binned centroids of a 1-2 px
#: wide trail scatter by a fraction of a binned pixel across it.
_TRAIL_BAND_BINNED = 2.0
_TRAIL_BAND_MIN_PX = 4.0


def _on_trail(x: NDArray[np.float64], y: NDArray[np.float64], theta: NDArray[np.float64],
              ab: NDArray[np.float64], factor: int) -> NDArray[np.bool_]:
    """Catalogue entries (binned px ``x``, ``y``; orientation ``theta`` in radians; axis
    ratio ``ab``) that lie on a satellite or aircraft trail (:func:`trails.find_trails`)."""
    from livestack.pipeline.trails import find_trails

    half = (factor - 1) / 2.0
    xy = np.column_stack([np.asarray(x, dtype=np.float64) * factor + half,
                          np.asarray(y, dtype=np.float64) * factor + half])
    band = max(_TRAIL_BAND_BINNED * factor, _TRAIL_BAND_MIN_PX)
    on_trail, _lines = find_trails(xy, np.asarray(theta, dtype=np.float64),
                                   np.asarray(ab, dtype=np.float64), band)
    return on_trail


def _refine_candidates(img: NDArray[np.float32], config: DetectConfig, factor: int,
                       objects: Any, sky: _Sky, limit: int | None) -> _Detection:
    """Refine sep's candidates on full-resolution stamps into the final star list."""
    if limit is not None:
        objects = objects[:limit]
    # Full-resolution refinement on stamps.
    half = (factor - 1) / 2.0
    x0 = objects["x"] * factor + half
    y0 = objects["y"] * factor + half
    nyc, nxc = sky.back.shape
    c = sky.factor
    xc = np.clip(np.rint((x0 - (c - 1) / 2.0) / c).astype(np.intp), 0, nxc - 1)
    yc = np.clip(np.rint((y0 - (c - 1) / 2.0) / c).astype(np.intp), 0, nyc - 1)
    local_sky = sky.back[yc, xc].astype(np.float64)
    # Size guess from sep's second moments (binned px -> full-res px, box response removed).
    sig_b = np.sqrt(np.maximum(objects["a"] * objects["b"], 1e-6))
    sig_full = np.sqrt(np.maximum((sig_b * factor) ** 2 - (factor**2 - 1) / 12.0, 0.16))
    sigma_guess = float(np.clip(np.median(sig_full[:50]), 0.5, 8.0))
    refined = _refine(img, x0, y0, local_sky, sigma_guess, factor, config.saturation_adu)
    keep = refined["keep"]
    xy = refined["xy"][keep]
    flux = refined["flux"][keep]
    fwhm = refined["fwhm"][keep]
    elong = refined["elong"][keep]
    local_sky = local_sky[keep]
    order = np.argsort(-flux, kind="stable")[: config.max_stars]
    xy, flux, fwhm, elong = xy[order], flux[order], fwhm[order], elong[order]
    local_sky = local_sky[order]
    isolated = _isolated(xy, 2.5 * float(refined["radius"]))
    stars = StarList(np.ascontiguousarray(xy, dtype=np.float64), flux.astype(np.float64),
                     fwhm.astype(np.float64), elong.astype(np.float64))
    return _Detection(stars, sky.global_back, sky.noise_full, local_sky, isolated, factor)


def _extract(sep_mod: Any, data: NDArray[np.float32], config: DetectConfig, rms: float,
             mask: NDArray[np.bool_] | None) -> Any:
    """sep.extract, raising the threshold on buffer/deblend overflows (never raises them)."""
    thresh = float(config.threshold_sigma)
    for _attempt in range(6):
        try:
            return sep_mod.extract(data, thresh, err=rms, mask=mask, minarea=config.min_area_px,
                                   deblend_cont=0.005)
        # sep raises plain Exception for its internal limits; anything else is re-raised.
        except Exception as exc:
            if not any(msg in str(exc) for msg in _SEP_OVERFLOW_MESSAGES):
                raise
            thresh *= 2.0
    return None


def _isolated(xy: NDArray[np.float64], radius: float) -> NDArray[np.bool_]:
    """True for stars with no other star closer than ``radius`` px."""
    n = xy.shape[0]
    if n < 2:
        return np.ones(n, dtype=bool)
    from scipy.spatial import cKDTree

    tree = cKDTree(xy)
    dist, _ = tree.query(xy, k=2)
    return np.asarray(dist[:, 1] > radius)


# --------------------------------------------------------------------------- stamps


def _stamps(img: NDArray[np.float32], cx: NDArray[np.intp], cy: NDArray[np.intp],
            radius: int) -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.float64],
                                  NDArray[np.float64]]:
    """Cut ``(2r+1)^2`` stamps centred on integer pixels; out-of-image/non-finite -> invalid.

    Returns stamps (n, m, m) float64 (0.0 where invalid), valid mask, and the pixel
    x and y coordinate grids (n, m, m).
    """
    ny, nx = img.shape
    off = np.arange(-radius, radius + 1)
    gx = cx[:, None, None] + off[None, None, :]
    gy = cy[:, None, None] + off[None, :, None]
    inside = (gx >= 0) & (gx < nx) & (gy >= 0) & (gy < ny)
    vals = img[np.clip(gy, 0, ny - 1), np.clip(gx, 0, nx - 1)].astype(np.float64)
    valid = inside & np.isfinite(vals)
    vals = np.where(valid, vals, 0.0)
    gxf = np.broadcast_to(gx, vals.shape).astype(np.float64)
    gyf = np.broadcast_to(gy, vals.shape).astype(np.float64)
    return vals, valid, gxf, gyf


def _refine(img: NDArray[np.float32], x0: NDArray[np.float64], y0: NDArray[np.float64],
            sky: NDArray[np.float64], sigma_guess: float, factor: int,
            saturation_adu: float | None) -> dict[str, NDArray]:
    """Windowed centroids, per-star shapes, flux and junk cuts on full-res stamps.

    The per-star work is :func:`kernels_detect.refine_stars_kernel` (numba, parallel over
    stars); the window is then matched to the stars' median size and the stars refined
    again from where they are, as the numpy oracle in ``tests/oracles.py`` does.
    """
    from livestack.pipeline import kernels_detect as kd  # numba only when detecting

    n = x0.size
    sig_w = max(sigma_guess, 0.7)
    radius = math.ceil(max(4.0 * sig_w + 0.5 * factor, 4.0))
    cx = np.rint(x0).astype(np.intp)
    cy = np.rint(y0).astype(np.intp)
    sat = float("nan") if saturation_adu is None else float(saturation_adu)
    sky64 = np.ascontiguousarray(sky, dtype=np.float64)
    out = {name: np.empty(n, dtype=np.float64) for name in ("x", "y", "fwhm", "elong", "flux")}
    flags = {name: np.empty(n, dtype=np.bool_) for name in ("conv", "hot", "sat", "centre")}

    def run(radius: int, x_start: NDArray[np.float64], y_start: NDArray[np.float64],
            sigma: float, recentre: int) -> None:
        kd.refine_stars_kernel(img, cx, cy, sky64, radius,
                               np.ascontiguousarray(x_start, dtype=np.float64),
                               np.ascontiguousarray(y_start, dtype=np.float64), sigma,
                               recentre, sat, out["x"], out["y"], flags["conv"], out["fwhm"],
                               out["elong"], out["flux"], flags["hot"], flags["sat"],
                               flags["centre"])

    # Re-centre on the light near the guess with a wide window (binning leaves up to
    # factor/2 px of error), then iterate the windowed centroid.
    run(radius, x0, y0, sig_w, 3)
    # Match the window to the stars (sep's size guess from a binned frame is rough): a
    # window near the star's own sigma is the least noisy and the deconvolution is most
    # accurate for non-Gaussian (Moffat) profiles.
    typical = out["fwhm"][flags["conv"] & np.isfinite(out["fwhm"])]
    if typical.size >= 3:
        sig_star = float(np.clip(np.median(typical) / _FWHM_PER_SIGMA, 0.7, 8.0))
        if not 0.8 < sig_star / sig_w < 1.25:
            if sig_star > sig_w:  # the stamps must hold the wider window
                radius = math.ceil(max(4.0 * sig_star + 0.5 * factor, 4.0))
            sig_w = sig_star
            run(radius, out["x"].copy(), out["y"].copy(), sig_w, 0)
    xc, yc, conv = out["x"], out["y"], flags["conv"]
    fwhm, elong, flux = out["fwhm"], out["elong"], out["flux"]

    # Junk cuts.
    edge = 3.0 * sig_w
    ny, nx = img.shape
    inside = (xc >= edge) & (yc >= edge) & (xc <= nx - 1 - edge) & (yc <= ny - 1 - edge)
    moved = np.hypot(xc - x0, yc - y0) <= 0.5 * factor + 2.0 * sig_w
    keep = (conv & ~flags["hot"] & ~flags["sat"] & inside & moved & (flux > 0)
            & np.isfinite(xc) & np.isfinite(yc) & flags["centre"])
    # Unresolved pairs (merged at the binned scale) look much more elongated than the
    # field's typical star; relative, so a uniformly trailed frame keeps its stars.
    if np.count_nonzero(keep) >= 5:
        typical_el = float(np.median(elong[keep]))
        keep &= elong <= max(1.3 * typical_el, typical_el + 0.25)
    return {"xy": np.column_stack([xc, yc]), "flux": flux, "fwhm": fwhm, "elong": elong,
            "keep": keep, "radius": np.float64(radius)}


# --------------------------------------------------------------------------- Moffat fit


def _fit_bright_stars(img: NDArray[np.float32], det: _Detection,
                      max_fit: int) -> tuple[NDArray[np.float64], NDArray[np.float64],
                                             NDArray[np.intp]]:
    """Fit elliptical Moffat profiles to the brightest isolated stars.

    Returns the FWHM (px, pixel box removed), elongation and index (into ``det.stars``)
    of each successful fit.
    """
    stars = det.stars
    cand = np.flatnonzero(det.isolated)
    if cand.size == 0:
        cand = np.arange(len(stars))
    cand = cand[:max_fit]
    if cand.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, np.intp)
    fwhm0 = float(np.median(stars.fwhm_px[cand]))
    radius = math.ceil(np.clip(2.0 * fwhm0, 4.0, 15.0))
    xy = stars.xy[cand]
    cx = np.rint(xy[:, 0]).astype(np.intp)
    cy = np.rint(xy[:, 1]).astype(np.intp)
    st, valid, gx, gy = _stamps(img, cx, cy, radius)
    st = st - det.local_sky[cand][:, None, None]
    # Diverging trial steps may overflow; they are rejected by the cost comparison.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        fwhm, elong, ok = _fit_moffat(st, valid, gx, gy, xy[:, 0], xy[:, 1], fwhm0)
    return fwhm[ok], elong[ok], cand[ok]


def _fit_moffat(st: NDArray[np.float64], valid: NDArray[np.bool_], gx: NDArray[np.float64],
                gy: NDArray[np.float64], x0: NDArray[np.float64], y0: NDArray[np.float64],
                fwhm0: float, n_iter: int = 10,
                oversample: int = 2) -> tuple[NDArray[np.float64], NDArray[np.float64],
                                              NDArray[np.bool_]]:
    """Batched Levenberg-Marquardt fit of a pixel-integrated elliptical Moffat profile.

    Model: ``B + A * mean_over_pixel[(1 + q11 dx^2 + 2 q12 dx dy + q22 dy^2)^-beta]`` with
    the pixel integral taken by ``oversample**2``-point Gauss-Legendre quadrature, so
    undersampled stars (FWHM ~1-2 px) keep their true size and roundness. Returns FWHM
    (geometric mean of the
    principal FWHMs of the continuous profile), elongation (major/minor FWHM ratio) and a
    success flag per star.
    """
    n = st.shape[0]
    vmask = valid.reshape(n, -1).astype(np.float64)
    data = st.reshape(n, -1)
    # Gauss-Legendre nodes on [-0.5, 0.5]: 2 per axis integrate cubics exactly, better
    # than 3 midpoints (FWHM within 1 % down to 1.2 px).
    sub, sub_w = np.polynomial.legendre.leggauss(oversample)
    sub = 0.5 * sub
    sub_x = np.tile(sub, oversample)
    sub_y = np.repeat(sub, oversample)
    quad_w = np.outer(sub_w, sub_w).ravel() / 4.0  # sums to 1

    def pixel_mean(a: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.asarray(a @ quad_w)
    px = gx.reshape(n, -1)[:, :, None] + sub_x  # (n, P, S)
    py = gy.reshape(n, -1)[:, :, None] + sub_y
    beta0 = 3.0
    alpha0 = max(fwhm0, 1.0) / (2.0 * math.sqrt(2.0 ** (1.0 / beta0) - 1.0))
    # p = [A, x0, y0, B, q11, q12, q22, beta]
    p = np.zeros((n, 8))
    p[:, 0] = np.maximum(data.max(axis=1), 1e-6)
    p[:, 1] = x0
    p[:, 2] = y0
    p[:, 4] = 1.0 / alpha0**2
    p[:, 6] = 1.0 / alpha0**2
    p[:, 7] = beta0
    lam = np.full(n, 1e-2)

    def col(par: NDArray[np.float64], k: int) -> NDArray[np.float64]:
        return par[:, k][:, None, None]

    def profile(par: NDArray[np.float64]) -> tuple[NDArray[np.float64], ...]:
        dx = px - col(par, 1)
        dy = py - col(par, 2)
        d = 1.0 + col(par, 4) * dx * dx + 2.0 * col(par, 5) * dx * dy + col(par, 6) * dy * dy
        d = np.maximum(d, 1e-9)
        logd = np.log(d)
        m = np.exp(-col(par, 7) * logd)
        return par[:, 3:4] + par[:, 0:1] * pixel_mean(m), m, d, logd, dx, dy

    def jacobian(par: NDArray[np.float64], m: NDArray[np.float64], d: NDArray[np.float64],
                 logd: NDArray[np.float64], dx: NDArray[np.float64],
                 dy: NDArray[np.float64]) -> NDArray[np.float64]:
        # Rows are parameters so the normal equations are plain batched matmuls.
        jac = np.empty((n, 8, px.shape[1]))
        g = -col(par, 0) * col(par, 7) * m / d  # dI/dD per sub-sample
        jac[:, 0] = pixel_mean(m)
        jac[:, 1] = pixel_mean(g * -(2.0 * col(par, 4) * dx + 2.0 * col(par, 5) * dy))
        jac[:, 2] = pixel_mean(g * -(2.0 * col(par, 5) * dx + 2.0 * col(par, 6) * dy))
        jac[:, 3] = 1.0
        jac[:, 4] = pixel_mean(g * dx * dx)
        jac[:, 5] = pixel_mean(g * 2.0 * dx * dy)
        jac[:, 6] = pixel_mean(g * dy * dy)
        jac[:, 7] = pixel_mean(-col(par, 0) * logd * m)
        return jac * vmask[:, None, :]

    f, *parts = profile(p)
    jac = jacobian(p, *parts)
    c = np.sum(vmask * (data - f) ** 2, axis=1)
    eye = np.eye(8)
    for _ in range(n_iter):
        r = vmask * (data - f)
        jtj = jac @ jac.transpose(0, 2, 1)
        jtr = (jac @ r[:, :, None])[:, :, 0]
        diag = np.einsum("nii->ni", jtj)
        a = jtj + lam[:, None, None] * (diag[:, :, None] * eye + 1e-12 * eye)
        try:
            delta = np.linalg.solve(a, jtr[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            break
        trial = p + delta
        trial[:, 7] = np.clip(trial[:, 7], 1.01, 20.0)
        det_q = trial[:, 4] * trial[:, 6] - trial[:, 5] ** 2
        shape_ok = (trial[:, 4] > 0) & (trial[:, 6] > 0) & (det_q > 0) & (trial[:, 0] > 0)
        f_new, *parts_new = profile(trial)
        c_new = np.sum(vmask * (data - f_new) ** 2, axis=1)
        better = shape_ok & np.isfinite(c_new) & (c_new < c)
        gain = np.where(better, (c - c_new) / np.maximum(c, 1e-300), 0.0)
        p = np.where(better[:, None], trial, p)
        c = np.where(better, c_new, c)
        lam = np.clip(np.where(better, lam * 0.3, lam * 10.0), 1e-9, 1e9)
        if np.all((gain < 1e-7) & (better | (lam > 1e3))):
            break
        if not better.any():
            continue  # p, f and the Jacobian are those of the last step
        # The profile at the new p is the trial's where it was better and the old one
        # elsewhere (per star, elementwise): select it instead of evaluating it again.
        if better.all():
            f, parts = f_new, parts_new
        else:
            f = np.where(better[:, None], f_new, f)
            parts = [np.where(better[:, None, None], new, old)
                     for new, old in zip(parts_new, parts, strict=True)]
        jac = jacobian(p, *parts)
    q11, q12, q22, beta = p[:, 4], p[:, 5], p[:, 6], p[:, 7]
    tr = q11 + q22
    disc = np.sqrt(np.maximum((q11 - q22) ** 2 / 4.0 + q12**2, 0.0))
    lmax = tr / 2.0 + disc
    lmin = tr / 2.0 - disc
    k = 2.0 ** (1.0 / beta) - 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        f_major = 2.0 * np.sqrt(k / lmin)
        f_minor = 2.0 * np.sqrt(k / lmax)
    fwhm = np.sqrt(f_major * f_minor)
    elong = f_major / f_minor
    moved = np.hypot(p[:, 1] - x0, p[:, 2] - y0)
    ok = (lmin > 0) & np.isfinite(fwhm) & (fwhm > 0.5) & (fwhm < 50.0) & (moved < 2.0)
    ok &= (beta > 1.05) & (beta < 19.9)
    return fwhm, elong, ok

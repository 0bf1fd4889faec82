"""Frame statistics, normalisation onto the reference and frame weights.

Estimators (on a strided subsample of finite footprint pixels, per channel)
--------------------------------------------------------------------------
* ``location``: median.
* ``scale``: ``1.4826 * MAD`` about the median (the dispersion of the frame's values,
  gradients and stars included; robust, so stars barely move it). Not IKSS.
* ``noise_adu``: ``1.4826 * MAD / sqrt(2)`` of differences between pixels 3 columns apart.
  Differencing removes gradients and nebulosity; the 3-pixel lag skips the short-range
  correlation that interpolation (warping) introduces between neighbours, so the result is
  the per-pixel noise of the frame as given, which is what outlier rejection needs.

Normalisation (``normalised = (x - location) * scale + reference_location``)
----------------------------------------------------------------------------
* ``additive_scaling``: scale = ref_scale / scale (Siril's default for light frames).
* ``multiplicative``: ``x * ref_location / location``.
* ``additive``: scale = 1.
* ``none``: identity.

Weights (normalised so that the reference frame has weight 1)
-------------------------------------------------------------
* ``noise``: ``(ref_noise / (noise * scale))^2``: inverse variance of the normalised noise.
  Note that with ``additive_scaling`` on a star-poor sky the scale tracks the noise, so
  these weights come out close to 1: the scaling has already equalised the frames.
* ``stars``: ``star_count / reference_star_count``.
* ``fwhm``: ``(reference_fwhm / fwhm)^2``.
* ``none``: 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from livestack.pipeline.kernels_normalize import affine_masked, plane_stats
from livestack.pipeline.types import Normalization, OutputMap

_MAD_TO_SIGMA = 1.4826
_NOISE_LAG_PX = 3
#: Weights are clipped to this range so that one odd frame cannot dominate or vanish.
_WEIGHT_RANGE = (1e-3, 1e3)

_METHODS = ("additive_scaling", "multiplicative", "additive", "none")
_WEIGHTS = ("noise", "stars", "fwhm", "none")


@dataclass(frozen=True)
class NormalizeConfig:
    """How frames are normalised and weighted.

    Attributes
    ----------
    method : str
        ``"additive_scaling"``, ``"multiplicative"``, ``"additive"`` or ``"none"``.
    weights : str
        ``"noise"`` (inverse noise variance), ``"stars"``, ``"fwhm"`` or ``"none"``.
    """

    method: str = "additive_scaling"
    weights: str = "noise"

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        if self.weights not in _WEIGHTS:
            raise ValueError(f"weights must be one of {_WEIGHTS}, got {self.weights!r}")


@dataclass(frozen=True)
class FrameStats:
    """Robust statistics of one frame (per channel for colour: ndarray (3,)).

    Attributes
    ----------
    location : float or ndarray (3,)
        Median in ADU.
    scale : float or ndarray (3,)
        ``1.4826 * MAD`` in ADU.
    noise_adu : float or ndarray (3,)
        Per-pixel background sigma in ADU (from 3-px lag differences).
    """

    location: float | NDArray[np.float64]
    scale: float | NDArray[np.float64]
    noise_adu: float | NDArray[np.float64]


def _planes_stats(planes: NDArray[np.float32], mask: NDArray[np.bool_] | None,
                  step: int) -> NDArray[np.float64]:
    """Location, scale and noise of each of ``planes`` (nc, ny, nx): ndarray (nc, 3).

    The medians are numpy's of the same strided samples, bit for bit; they run in
    :func:`~livestack.pipeline.kernels_normalize.plane_stats`, the sample and the lag
    differences of each plane in parallel (``np.median`` took 13 ms on one core at 26 MP).
    """
    nc, ny, nx = planes.shape
    if mask is not None and mask.shape != (ny, nx):
        raise ValueError(f"footprint shape {mask.shape} differs from the image's {(ny, nx)}")
    # Lag differences along rows: columns 0, step, ... paired with lag, lag + step, ...
    n_lag = min(len(range(0, nx - _NOISE_LAG_PX, step)), len(range(_NOISE_LAG_PX, nx, step)))
    medians = np.full(2 * nc, np.nan)
    mads = np.full(2 * nc, np.nan)
    counts = np.zeros(2 * nc, dtype=np.int64)
    use_mask = mask is not None
    mask_u8 = mask.view(np.uint8) if mask is not None else np.zeros((1, 1), np.uint8)
    plane_stats(planes, mask_u8, use_mask, step, _NOISE_LAG_PX, max(n_lag, 0), medians, mads,
                counts)
    out = np.full((nc, 3), np.nan)
    for c in range(nc):
        if counts[2 * c] == 0:
            continue  # no valid pixel: NaN for all three
        out[c, 0] = medians[2 * c]
        out[c, 1] = _MAD_TO_SIGMA * mads[2 * c]
        if counts[2 * c + 1]:
            out[c, 2] = _MAD_TO_SIGMA * mads[2 * c + 1] / math.sqrt(2.0)
    return out


def frame_stats(image: NDArray[np.float32], footprint: NDArray[np.bool_] | None = None,
                sample_step: int = 4, max_samples: int = 262_144) -> FrameStats:
    """Robust location, scale and noise of a frame.

    Parameters
    ----------
    image : ndarray, shape (ny, nx) or (3, ny, nx), float32
        NaN/inf pixels are ignored.
    footprint : ndarray (ny, nx) bool, optional
        Only these pixels are used (e.g. the warped frame's coverage).
    sample_step : int
        Take every ``sample_step``-th row and column (>= 1): 1/16 of the pixels by default.
    max_samples : int
        The stride grows beyond ``sample_step`` so that at most about this many pixels per
        channel are used (the default gives a 0.3 % MAD precision; a 26 MP frame is then
        sampled every 10th row and column).

    Returns
    -------
    FrameStats
        Floats for mono, ndarray (3,) float64 for colour; NaN when no valid pixel.

    Raises
    ------
    ValueError
        On a bad shape (of the image or the footprint) or ``sample_step < 1``.
    """
    if sample_step < 1:
        raise ValueError(f"sample_step must be >= 1, got {sample_step}")
    arr = np.asarray(image)
    npix = arr.shape[-1] * arr.shape[-2] if arr.ndim >= 2 else 0
    sample_step = max(sample_step, math.ceil(math.sqrt(npix / max(max_samples, 1))))
    if arr.ndim == 2:
        loc, scale, noise = _planes_stats(_float32(arr)[None], footprint, sample_step)[0]
        return FrameStats(float(loc), float(scale), float(noise))
    if arr.ndim == 3 and arr.shape[0] == 3:
        per = _planes_stats(_float32(arr), footprint, sample_step)
        return FrameStats(per[:, 0].copy(), per[:, 1].copy(), per[:, 2].copy())
    raise ValueError(f"image must be (ny, nx) or (3, ny, nx), got shape {arr.shape}")


def _float32(arr: NDArray[np.floating]) -> NDArray[np.float32]:
    """The array as float32: itself when it is (any strides: the kernel takes views)."""
    return arr if arr.dtype == np.float32 else arr.astype(np.float32)


def _ratio(numerator: float | None, denominator: float | None) -> float:
    if numerator is None or denominator is None:
        return 1.0
    num, den = float(numerator), float(denominator)
    if not (math.isfinite(num) and math.isfinite(den)) or num <= 0 or den <= 0:
        return 1.0
    return num / den


def normalization(frame: FrameStats, reference: FrameStats,
                  config: NormalizeConfig = NormalizeConfig(), *,
                  star_count: int | None = None, fwhm_px: float | None = None,
                  noise_adu: float | NDArray[np.float64] | None = None,
                  reference_star_count: int | None = None,
                  reference_fwhm_px: float | None = None,
                  reference_noise_adu: float | NDArray[np.float64] | None = None,
                  signal_scale: float | None = None,
                  ) -> Normalization:
    """Compute the normalisation and weight of a frame relative to the reference.

    Parameters
    ----------
    frame, reference : FrameStats
        Statistics of the (warped) frame and of the reference frame.
    config : NormalizeConfig
    star_count, reference_star_count : int, optional
        For ``weights="stars"``.
    fwhm_px, reference_fwhm_px : float, optional
        For ``weights="fwhm"``.
    noise_adu, reference_noise_adu : float or ndarray (3,), optional
        Noise to weight with (default: ``frame.noise_adu`` and ``reference.noise_adu``).
        Must be measured the same way for the frame and the reference.

    Returns
    -------
    Normalization
        ``scale`` and ``location`` per channel for colour; ``weight`` a float in
        [1e-3, 1e3]. A weight that cannot be computed (missing or non-finite inputs)
        falls back to 1.0 rather than failing the frame.
    """
    loc = np.asarray(frame.location, dtype=np.float64)
    ref_loc = np.asarray(reference.location, dtype=np.float64)
    method = config.method
    # A zero or NaN scale/location (a blank or NaN-riddled frame) gives inf/NaN here, which
    # the np.where below replaces by 1.0: no numpy RuntimeWarning on stderr for it.
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "additive_scaling" and signal_scale is not None and math.isfinite(
                signal_scale) and signal_scale > 0:
            scale = np.full_like(loc, float(signal_scale))
        elif method == "additive_scaling":
            scale = np.asarray(reference.scale, dtype=np.float64) / np.asarray(
                frame.scale, dtype=np.float64)
        elif method == "multiplicative":
            scale = ref_loc / loc
        else:
            scale = np.ones_like(loc)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    if method == "none":
        loc = np.zeros_like(loc)
        ref_loc = np.zeros_like(ref_loc)
    loc = np.where(np.isfinite(loc), loc, 0.0)
    ref_loc = np.where(np.isfinite(ref_loc), ref_loc, 0.0)

    weights = config.weights
    if weights == "noise":
        noise = np.asarray(frame.noise_adu if noise_adu is None else noise_adu,
                           dtype=np.float64)
        ref_noise = np.asarray(reference.noise_adu if reference_noise_adu is None
                               else reference_noise_adu, dtype=np.float64)
        # Inverse variance of the normalised noise, averaged over channels.
        weight = _ratio(float(np.mean(ref_noise ** 2)), float(np.mean((noise * scale) ** 2)))
    elif weights == "stars":
        weight = _ratio(star_count, reference_star_count)
    elif weights == "fwhm":
        weight = _ratio(reference_fwhm_px, fwhm_px) ** 2
    else:
        weight = 1.0
    weight = min(max(weight, _WEIGHT_RANGE[0]), _WEIGHT_RANGE[1])

    def out(value: NDArray[np.float64]) -> float | NDArray[np.float64]:
        return float(value) if value.ndim == 0 else value

    return Normalization(location=out(loc), scale=out(scale), reference_location=out(ref_loc),
                         weight=float(weight))


def star_flux_scale(frame_xy: NDArray[np.float64], frame_flux: NDArray[np.float64],
                    reference_xy: NDArray[np.float64], reference_flux: NDArray[np.float64],
                    match_radius_px: float = 1.5, min_matches: int = 5) -> float | None:
    """Photometric scale of a frame: reference/frame flux ratio of matched stars.

    Parameters
    ----------
    frame_xy : ndarray, shape (n, 2), float64
        Frame star centroids already mapped to reference pixel coordinates.
    frame_flux, reference_flux : ndarray, shape (n,) and (m,), float64
        Background-subtracted star fluxes in ADU.
    reference_xy : ndarray, shape (m, 2), float64
        Reference star centroids.
    match_radius_px : float
        Largest distance, in pixels, for a pair.
    min_matches : int
        Fewer pairs than this give None (the caller falls back to the dispersion ratio).

    Returns
    -------
    float or None
        The scale that brings the frame's star fluxes onto the reference's (ratio of the
        summed fluxes of the pairs whose ratio is within 3 MAD of the median), or None.
    """

    if len(frame_xy) < min_matches or len(reference_xy) < min_matches:
        return None
    distance, index = cKDTree(reference_xy).query(frame_xy, distance_upper_bound=match_radius_px)
    paired = np.isfinite(distance)
    num = reference_flux[index[paired]]
    den = frame_flux[paired]
    good = (num > 0) & (den > 0) & np.isfinite(num) & np.isfinite(den)
    if int(good.sum()) < min_matches:
        return None
    num, den = num[good], den[good]
    # Drop pairs whose ratio is an outlier (variable star, cosmic ray, blend), then take the
    # ratio of summed fluxes: bright stars have the best SNR and dominate, unlike a median
    # of per-star ratios, which faint stars make noisy.
    ratios = num / den
    median = float(np.median(ratios))
    spread = 1.4826 * float(np.median(np.abs(ratios - median)))
    keep = np.abs(ratios - median) <= 3.0 * spread + 1e-6 * median
    if int(keep.sum()) < min_matches:
        return None
    ratio = float(num[keep].sum() / den[keep].sum())
    return ratio if 0.05 < ratio < 20.0 else None


def aperture_flux(image: NDArray[np.float32], xy: NDArray[np.float64], radius_px: float,
                  annulus_px: tuple[float, float], min_snr: float = 0.0
                  ) -> NDArray[np.float64]:
    """Flux of each star in a circular aperture of a fixed radius, minus its local sky.

    Why a fixed radius: the detector's flux (:mod:`livestack.pipeline.detect`) is summed
    within 3 window sigmas, and the window follows each frame's seeing, so the same star
    measures brighter in a blurred frame (real stars have wings and the sky is not exact):
    on the Seestar M94 frames a 3.1 px FWHM frame measured 1.16 x the 2.3 px reference's
    flux where a fixed aperture gives 0.97 (``bench/bench_snr_factors.py``). Photometry
    for the scale must use one aperture for the frame and the reference.

    Parameters
    ----------
    image : ndarray, shape (ny, nx), float32
        The frame (ADU), e.g. its luminance; NaN allowed.
    xy : ndarray, shape (n, 2), float64
        Star centroids (px, centre of pixel [0, 0] at (0, 0)).
    radius_px : float
        Aperture radius (px), > 0.
    annulus_px : tuple of float
        Inner and outer radius (px) of the sky annulus; the sky is its median.
    min_snr : float
        Stars whose flux is below ``min_snr`` times the sky noise in the aperture
        (the annulus' robust sigma times the square root of the aperture's pixel count)
        are not measured: a large aperture on a faint star is mostly sky noise.

    Returns
    -------
    ndarray, shape (n,), float64
        Aperture sum minus sky times the aperture's pixel count (ADU); NaN for a star whose
        annulus leaves the image, holds a non-finite pixel in the aperture or is below
        ``min_snr``.

    Raises
    ------
    ValueError
        If ``image`` is not 2-D, the radius is not positive or the annulus is not outside
        the aperture.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    inner, outer = float(annulus_px[0]), float(annulus_px[1])
    if not (radius_px > 0 and radius_px <= inner < outer):
        raise ValueError(f"need 0 < radius <= annulus inner < outer, got {radius_px}, "
                         f"{annulus_px}")
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    out = np.full(pts.shape[0], np.nan)
    half = math.ceil(outer)
    ny, nx = img.shape
    finite = np.all(np.isfinite(pts), axis=1)
    centre = np.zeros((pts.shape[0], 2), dtype=np.int64)
    centre[finite] = np.rint(pts[finite]).astype(np.int64)
    usable = (finite & (centre[:, 0] >= half) & (centre[:, 1] >= half)
              & (centre[:, 0] + half < nx) & (centre[:, 1] + half < ny))
    idx = np.flatnonzero(usable)
    if idx.size == 0:
        return out
    # Stamps of up to _STAMP_CHUNK stars at once (n, m, m): a Python loop over 400 stars
    # cost ~70 ms per frame, and all of 5000 stars at once would take ~100 MB per array.
    for first in range(0, idx.size, _STAMP_CHUNK):
        part = idx[first:first + _STAMP_CHUNK]
        out[part] = _stamp_flux(img, pts[part], centre[part], half, radius_px, inner, outer,
                                min_snr)
    return out


#: Stars per batch of stamps in :func:`aperture_flux` (bounds its temporaries).
_STAMP_CHUNK = 256


def _stamp_flux(img: NDArray[np.float32], pts: NDArray[np.float64],
                centre: NDArray[np.int64], half: int, radius_px: float, inner: float,
                outer: float, min_snr: float) -> NDArray[np.float64]:
    """:func:`aperture_flux` of stars whose ``(2 half + 1)``-px stamps lie inside ``img``.

    ``pts`` (n, 2) float64 centroids and ``centre`` (n, 2) int64 their rounded pixels;
    returns (n,) float64 fluxes (ADU), NaN where :func:`aperture_flux` documents it.
    """
    n = pts.shape[0]
    offsets = np.arange(-half, half + 1)
    rows = centre[:, 1][:, None, None] + offsets[None, :, None]
    cols = centre[:, 0][:, None, None] + offsets[None, None, :]
    cut = np.asarray(img[rows, cols], dtype=np.float64)
    dx = offsets[None, None, :] + (centre[:, 0] - pts[:, 0])[:, None, None]
    dy = offsets[None, :, None] + (centre[:, 1] - pts[:, 1])[:, None, None]
    inside = np.hypot(dx, dy) <= radius_px
    # The annulus around the rounded centre (one mask for all stars; the sky does not need
    # the sub-pixel centre), so the medians run on a dense array: nanmedian over masked
    # stamps cost 40 ms per 400 stars.
    r_int = np.hypot(offsets[None, :], offsets[:, None])
    ring = cut[:, (r_int >= inner) & (r_int < outer)]
    sky = np.median(ring, axis=1)
    sky_sigma = 1.4826 * np.median(np.abs(ring - sky[:, None]), axis=1)
    finite = np.isfinite(ring)
    # Rings with a NaN pixel: the median of their finite pixels. A ring without any stays
    # NaN (that star is not measured, as documented); nanmedian would warn on it.
    holed = ~finite.all(axis=1) & finite.any(axis=1)
    if holed.any():
        sub = ring[holed]
        sky[holed] = np.nanmedian(sub, axis=1)
        sky_sigma[holed] = 1.4826 * np.nanmedian(np.abs(sub - sky[holed][:, None]), axis=1)
    total = np.where(inside, cut, 0.0).reshape(n, -1).sum(axis=1)
    npix = inside.reshape(n, -1).sum(axis=1)
    flux = total - sky * npix
    faint = flux < min_snr * sky_sigma * np.sqrt(npix)
    return np.where(faint, np.nan, flux)


def normalized_noise(stats: FrameStats, norm: Normalization) -> float | NDArray[np.float64]:
    """Noise of the frame after :func:`apply_normalization` (``noise * scale``), in ADU.

    Returns a float for mono and ndarray (3,) for colour: the ``noise_adu`` to pass to
    :meth:`livestack.pipeline.accumulate.RunningStack.add`.
    """
    noise = np.asarray(stats.noise_adu, dtype=np.float64) * np.abs(
        np.asarray(norm.scale, dtype=np.float64))
    return float(noise) if noise.ndim == 0 else noise


def affine_terms(norm: Normalization, n_planes: int
                 ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The normalisation as ``x * gain + offset`` per plane, in float32.

    Parameters
    ----------
    norm : Normalization
    n_planes : int
        1 (mono) or 3 (colour).

    Returns
    -------
    gains, offsets : ndarray, shape (n_planes,), float32
        ``scale`` and ``reference_location - location * scale`` (computed in float64).
    """
    scale = np.broadcast_to(np.asarray(norm.scale, dtype=np.float64), (n_planes,))
    loc = np.broadcast_to(np.asarray(norm.location, dtype=np.float64), (n_planes,))
    ref = np.broadcast_to(np.asarray(norm.reference_location, dtype=np.float64), (n_planes,))
    return scale.astype(np.float32), (ref - loc * scale).astype(np.float32)


def output_map(norm: Normalization, n_planes: int,
               level_adu: NDArray[np.float64] | None) -> OutputMap:
    """The warp's output map for a frame (:class:`~livestack.pipeline.types.OutputMap`):
    :func:`apply_normalization`'s numbers and the stack's saturation level.

    Parameters
    ----------
    norm : Normalization
    n_planes : int
        1 (mono) or 3 (colour).
    level_adu : ndarray, shape (n_planes,), float64, or None
        The stack's level after this frame
        (:meth:`~livestack.pipeline.saturation.StackSaturation.level_after`); None: the
        frame's level is unknown, nothing is clipped or saturated.

    Returns
    -------
    OutputMap
    """
    gains, offsets = affine_terms(norm, n_planes)
    if level_adu is None:
        ceilings = np.full(n_planes, np.inf, dtype=np.float32)
    else:
        ceilings = np.broadcast_to(np.asarray(level_adu, dtype=np.float64),
                                   (n_planes,)).astype(np.float32)
    return OutputMap(gains, offsets, ceilings, saturate=level_adu is not None)


def apply_normalization(image: NDArray[np.float32], footprint: NDArray[np.bool_] | None,
                        norm: Normalization,
                        out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
    """Return ``(image - location) * scale + reference_location`` as a new float32 array.

    Parameters
    ----------
    image : ndarray, shape (ny, nx) or (3, ny, nx), float32
    footprint : ndarray (ny, nx) bool or None
        Pixels outside it (and non-finite pixels) are set to 0.0.
    norm : Normalization
    out : ndarray, optional
        float32 array of the image's shape to write into; may be ``image`` itself (the
        per-frame path normalises the warped frame in place). One fused pass (numba).

    Returns
    -------
    ndarray, same shape as ``image``, float32 (C-contiguous).

    Raises
    ------
    ValueError
        If the image is not 2-D or ``(3, ny, nx)``, or ``out`` does not fit.
    """

    arr = np.ascontiguousarray(image, dtype=np.float32)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[0] != 3):
        raise ValueError(f"image must be (ny, nx) or (3, ny, nx), got shape {arr.shape}")
    ny, nx = arr.shape[-2], arr.shape[-1]
    planes = arr.reshape((-1, ny, nx))
    n_planes = 1 if arr.ndim == 2 else 3
    gains, offsets = affine_terms(norm, n_planes)
    if footprint is None:
        mask = np.ones((ny, nx), dtype=np.uint8)
    else:
        mask = np.ascontiguousarray(footprint, dtype=np.bool_).view(np.uint8)
    if out is None:
        out = np.empty_like(arr)
    elif out.shape != arr.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {arr.shape}")
    affine_masked(planes, mask, gains, offsets, out.reshape(planes.shape))
    return out

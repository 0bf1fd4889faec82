"""Exact batch integration of registered frames, one tile at a time.

:func:`combine_tile` takes every frame's samples for one rectangular tile of the
reference grid (already calibrated, registered and normalised), rejects outliers
along the frame axis and combines what is left. Each tile is an independent pure
computation whose inputs are all named in the call, so tiles can run in any order,
in any process, and the result does not depend on how the image was cut into tiles.

This is the kernel module of ``livestack integrate``: it imports numba. The per-pixel
work runs in one compiled kernel (``parallel=True`` over the tile's rows) because the
rejection loops are data dependent and a numpy version would sort and re-sort whole
``(n, ty, tx)`` cubes once per iteration.

Rejection algorithms (``IntegrateConfig.reject``)
-------------------------------------------------
For one pixel let ``x_1..x_n`` be the valid samples (``valid`` true and finite).
Rejection is strict: a sample exactly on a bound is kept.

``none``
    Keep every valid sample.
``sigma``
    Iterative kappa-sigma clipping around the median: with ``m`` the median and
    ``s`` the population standard deviation (ddof = 0) of the samples still kept,
    reject ``x < m - low*s`` and ``x > m + high*s``; repeat until an iteration
    rejects nothing. This is ``astropy.stats.sigma_clip(sigma_lower=low,
    sigma_upper=high, cenfunc='median', stdfunc='std', maxiters=None)``, and Siril's
    "Sigma Clipping" ("reject pixels whose distance from the median is farther than
    sigma_low/sigma_high in sigma units"; Siril documentation, Average stacking with
    rejection).
``winsorized``
    Winsorized sigma clipping as described by J. Conejero for PixInsight's
    ImageIntegration (PixInsight forum, "Image Integration - Question about Winsorized
    Sigma Clipping", 2010, after Huber & Ronchetti, *Robust Statistics*, 2nd ed., 2009),
    the algorithm Siril also uses. With the samples still kept: start from
    ``m = median``, ``s = std`` (ddof = 0); repeat: clamp the samples to
    ``[m - 1.5 s, m + 1.5 s]``, take the clamped set's mean ``m1`` and standard
    deviation ``s1`` and set ``s2 = 1.134 * s1`` (1.134 undoes the variance a 1.5-sigma
    clamp removes from a normal distribution); ``m, s = m1, s2``; stop once
    ``|s2 - s_previous| <= 0.0005 * s_previous``. Then reject ``x < m - low*s`` and
    ``x > m + high*s``. Repeat the whole procedure on the samples left until nothing
    is rejected or fewer than 3 samples remain.
``linear-fit``
    Linear fit clipping (J. Conejero, PixInsight 1.6.1 ImageIntegration, also in
    Siril): sort the kept samples ascending, fit the straight line ``y = a + b*i``
    to ``(i, y_i)`` (``i`` = rank 0..k-1) by least squares, let ``s`` be the mean
    absolute deviation of the samples from the line, reject ``y_i < a + b*i - low*s``
    and ``y_i > a + b*i + high*s``; repeat until nothing is rejected or fewer than 3
    samples remain. A fit rather than a centre makes the method robust to the sky
    level drifting through the night.
``percentile``
    One step (Siril "Percentile Clipping", PixInsight "Percentile clipping"): with
    ``m`` the median of the valid samples, reject ``x < m - low*|m|`` and
    ``x > m + high*|m|``; ``low``/``high`` are fractions of the median (e.g. 0.2).
``minmax``
    Reject the ``int(low)`` lowest and ``int(high)`` highest samples (PixInsight
    "Min/Max"); ``low``/``high`` are counts. The counts are capped so that at least
    one sample remains; ties are broken by frame order (stable sort).

Combination (``IntegrateConfig.combine``) of the kept samples: ``mean`` is the
weighted mean ``sum(w_i x_i) / sum(w_i)`` with the per-frame weights; ``median``,
``max`` and ``min`` ignore the weights. Pixels with no kept sample are NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

from livestack.pipeline.types import Normalization

COMBINE_METHODS: tuple[str, ...] = ("mean", "median", "max", "min")
REJECT_METHODS: tuple[str, ...] = ("winsorized", "sigma", "linear-fit", "percentile", "minmax",
                                   "none")
WEIGHT_METHODS: tuple[str, ...] = ("noise", "fwhm", "stars", "none")

#: Huber's clamp half-width in sigma used by winsorized clipping.
WINSOR_CLAMP_SIGMA = 1.5
#: Correction of a 1.5-sigma winsorized standard deviation back to a normal sigma.
WINSOR_SIGMA_CORRECTION = 1.134
#: Relative change of sigma below which the winsorization loop has converged.
WINSOR_TOLERANCE = 0.0005
#: Safety cap on winsorization iterations (convergence takes ~5-15 in practice).
WINSOR_MAX_ITER = 100
#: Iterative methods (winsorized, linear-fit) stop with fewer kept samples than this.
MIN_SAMPLES_ITERATIVE = 3
#: Sort keys built, sorted and combined per chunk of pixels (fits in the L3 cache).
KEY_CHUNK_BYTES = 8 * 2**20

_REJECT_CODES = {name: i for i, name in enumerate(REJECT_METHODS)}
_COMBINE_CODES = {name: i for i, name in enumerate(COMBINE_METHODS)}
# Kernel codes (must match the tuples above).
_R_WINSORIZED, _R_SIGMA, _R_LINEAR, _R_PERCENTILE, _R_MINMAX, _R_NONE = range(6)
_C_MEAN, _C_MEDIAN, _C_MAX, _C_MIN = range(4)


@dataclass(frozen=True)
class IntegrateConfig:
    """How registered frames are combined.

    Attributes
    ----------
    combine : str
        ``"mean"`` (weighted), ``"median"``, ``"max"`` (star trails, meteors) or ``"min"``.
    reject : str
        ``"winsorized"``, ``"sigma"``, ``"linear-fit"``, ``"percentile"``, ``"minmax"``
        or ``"none"``; see the module docstring for the definitions.
    low, high : float
        Rejection limits: sigmas for winsorized/sigma/linear-fit, fractions of the
        median for percentile, numbers of samples for minmax.
    weights : str
        Frame weights for the mean: ``"noise"`` (inverse noise variance), ``"fwhm"``,
        ``"stars"`` or ``"none"`` (all 1). Applied by the caller that computes the
        per-frame weights; ``combine_tile`` takes the weights as numbers.
    std_map : bool
        Also return the per-pixel standard deviation of the kept samples.

    Raises
    ------
    ValueError
        On an unknown method name or a negative/non-finite limit.
    """

    combine: str = "mean"
    reject: str = "winsorized"
    low: float = 3.0
    high: float = 3.0
    weights: str = "noise"
    std_map: bool = False

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_METHODS:
            raise ValueError(f"combine must be one of {', '.join(COMBINE_METHODS)}; "
                             f"got {self.combine!r}")
        if self.reject not in REJECT_METHODS:
            raise ValueError(f"reject must be one of {', '.join(REJECT_METHODS)}; "
                             f"got {self.reject!r}")
        if self.weights not in WEIGHT_METHODS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_METHODS)}; "
                             f"got {self.weights!r}")
        for name, value in (("low", self.low), ("high", self.high)):
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class TileResult:
    """The combined tile and its per-pixel maps.

    Attributes
    ----------
    image : ndarray, shape (ty, tx), float32
        Combined value; NaN where no sample was kept.
    weight : ndarray, shape (ty, tx), float32
        Sum of the kept samples' frame weights.
    count : ndarray, shape (ty, tx), uint16
        Number of kept samples.
    rejected_low, rejected_high : ndarray, shape (ty, tx), uint16
        Number of valid samples rejected as too low / too high.
    std : ndarray, shape (ty, tx), float32, or None
        Weighted standard deviation of the kept samples with the frame weights as
        reliability weights, ``sqrt(sum w (x - m)^2 / (V1 - V2/V1))`` (``V1 = sum w``,
        ``V2 = sum w^2``; ddof = 1 for equal weights); NaN with fewer than two samples.
        None unless ``IntegrateConfig.std_map``.
    """

    image: NDArray[np.float32]
    weight: NDArray[np.float32]
    count: NDArray[np.uint16]
    rejected_low: NDArray[np.uint16]
    rejected_high: NDArray[np.uint16]
    std: NDArray[np.float32] | None


def combine_tile(samples: NDArray[np.float32], valid: NDArray[np.bool_],
                 weights: NDArray[np.float64], config: IntegrateConfig) -> TileResult:
    """Reject outliers along the frame axis of one tile and combine the rest.

    Parameters
    ----------
    samples : ndarray, shape (n_frames, ty, tx), float32
        Calibrated, registered, normalised pixels of every frame (ADU).
    valid : ndarray, shape (n_frames, ty, tx), bool
        True where the frame covers the pixel. Non-finite samples are treated as
        invalid whatever ``valid`` says.
    weights : ndarray, shape (n_frames,), float64
        Per-frame weights (finite, >= 0) for the weighted mean.
    config : IntegrateConfig
        Combination and rejection settings.

    Returns
    -------
    TileResult
        Image and maps of shape ``(ty, tx)``.

    Raises
    ------
    ValueError
        If the shapes disagree, ``samples`` is not 3-D, there are 65536 frames or
        more, or a weight is negative or not finite.
    """
    samples = np.asarray(samples)
    if samples.ndim != 3:
        raise ValueError(f"samples must be (n_frames, ty, tx), got shape {samples.shape}")
    valid = np.asarray(valid, dtype=np.bool_)
    if valid.shape != samples.shape:
        raise ValueError(f"valid has shape {valid.shape}, samples {samples.shape}")
    data = np.where(valid, samples, np.float32(np.nan)).astype(np.float32, copy=False)
    return combine_masked_tile(data, weights, config)


def combine_masked_tile(data: NDArray[np.float32], weights: NDArray[np.float64],
                        config: IntegrateConfig) -> TileResult:
    """Like :func:`combine_tile` for samples whose missing values are already NaN.

    This is the form the integration engine uses: its scratch file stores NaN
    outside each frame's footprint, so no separate mask has to be read or kept.

    Parameters
    ----------
    data : ndarray, shape (n_frames, ty, tx), float32
        Samples; every non-finite value (NaN, +-inf) counts as missing.
    weights : ndarray, shape (n_frames,), float64
        Per-frame weights (finite, >= 0).
    config : IntegrateConfig

    Returns
    -------
    TileResult

    Raises
    ------
    ValueError
        As :func:`combine_tile`.
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"samples must be (n_frames, ty, tx), got shape {data.shape}")
    w = np.ascontiguousarray(weights, dtype=np.float64)
    n, ty, tx = data.shape
    if w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    if not (np.all(np.isfinite(w)) and np.all(w >= 0.0)):
        raise ValueError("weights must be finite and >= 0")
    if n >= 65536:
        raise ValueError(f"at most 65535 frames per integration, got {n}")

    image = np.empty((ty, tx), dtype=np.float32)
    weight = np.empty((ty, tx), dtype=np.float32)
    count = np.empty((ty, tx), dtype=np.uint16)
    rlow = np.empty((ty, tx), dtype=np.uint16)
    rhigh = np.empty((ty, tx), dtype=np.uint16)
    std = np.empty((ty, tx) if config.std_map else (0, 0), dtype=np.float32)
    if n > 0 and ty > 0 and tx > 0:
        # One sort key per sample: the value's order-preserving bits (high word) and the
        # frame index (low word). numpy's SIMD sort of these contiguous uint64 rows is
        # ~10x faster than sorting inside the kernel, and it yields each sorted sample's
        # frame (for its weight) with ties broken by frame order. Pixels go through in
        # chunks whose keys stay in cache between building, sorting and combining.
        npix = ty * tx
        bits = data.reshape(n, npix).view(np.uint32)
        chunk = max(1, min(npix, KEY_CHUNK_BYTES // (8 * n)))
        keys = np.empty((chunk, n), dtype=np.uint64)
        outs = (image.reshape(npix), weight.reshape(npix), count.reshape(npix),
                rlow.reshape(npix), rhigh.reshape(npix), std.reshape(-1))
        for p0 in range(0, npix, chunk):
            part = keys[: min(chunk, npix - p0)]
            _build_keys(bits, p0, part)
            part.sort(axis=-1)
            _combine_kernel(part, p0, w, _REJECT_CODES[config.reject],
                            _COMBINE_CODES[config.combine], float(config.low),
                            float(config.high), bool(config.std_map), *outs)
    else:
        image.fill(np.nan)
        weight.fill(0.0)
        count.fill(0)
        rlow.fill(0)
        rhigh.fill(0)
        std.fill(np.nan)
    return TileResult(image, weight, count, rlow, rhigh, std if config.std_map else None)


def normalized_planes(image: NDArray[np.float32], footprint: NDArray[np.bool_],
                      norm: Normalization, out: NDArray[np.float32] | None = None
                      ) -> NDArray[np.float32]:
    """Normalise a registered frame and mark what it does not cover as missing.

    The same numbers as :func:`livestack.pipeline.normalize.apply_normalization`
    (``x * float32(scale) + float32(reference_location - location * scale)``, in float32)
    but NaN instead of 0.0 outside the footprint or where the result is not finite, in
    one parallel pass instead of several full-frame numpy temporaries.

    Parameters
    ----------
    image : ndarray, shape (ny, nx) or (3, ny, nx), float32
    footprint : ndarray, shape (ny, nx), bool
    norm : Normalization
    out : ndarray, shape (n_channels, ny, nx), float32, optional
        Written in place and returned (saves a full-frame allocation per frame).

    Returns
    -------
    ndarray, shape (n_channels, ny, nx), float32
        ``n_channels`` is 1 for mono.

    Raises
    ------
    ValueError
        If the image is not 2-D or ``(3, ny, nx)``, or the footprint's or ``out``'s
        shape differs.
    """
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        planes = arr[np.newaxis]
        gains = np.array([np.float32(norm.scale)], dtype=np.float32)
        offsets = np.array([np.float32(float(norm.reference_location)
                                       - float(norm.location) * float(norm.scale))],
                           dtype=np.float32)
    elif arr.ndim == 3 and arr.shape[0] == 3:
        planes = arr
        scale = np.broadcast_to(np.asarray(norm.scale, dtype=np.float64), (3,))
        loc = np.broadcast_to(np.asarray(norm.location, dtype=np.float64), (3,))
        ref = np.broadcast_to(np.asarray(norm.reference_location, dtype=np.float64), (3,))
        gains = scale.astype(np.float32)
        offsets = (ref - loc * scale).astype(np.float32)
    else:
        raise ValueError(f"image must be (ny, nx) or (3, ny, nx), got shape {arr.shape}")
    foot = np.ascontiguousarray(footprint, dtype=np.bool_)
    if foot.shape != planes.shape[1:]:
        raise ValueError(f"footprint {foot.shape} does not match image {arr.shape}")
    if out is None:
        out = np.empty(planes.shape, dtype=np.float32)
    elif out.shape != planes.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {planes.shape}, got {out.shape}")
    _normalize_kernel(np.ascontiguousarray(planes), foot, gains, offsets, out)
    return out


# ----------------------------------------------------------------------------- kernels
# The rejection helpers work on ``s[:m]``: one pixel's valid samples sorted ascending
# (float64). Methods whose verdict depends only on a sample's value (none, sigma,
# winsorized, percentile) keep a contiguous range ``s[a:b]``; rank-based methods
# (linear-fit, minmax) set a keep flag per sorted position.
@njit(cache=True, nogil=True, fastmath=False)
def _median_sorted(s: NDArray[np.float64], a: int, b: int) -> float:
    """Median of the sorted slice ``s[a:b]`` (mean of the two middle values if even)."""
    k = b - a
    mid = a + k // 2
    if k % 2 == 1:
        return float(s[mid])
    return 0.5 * (s[mid - 1] + s[mid])


@njit(cache=True, nogil=True, fastmath=False)
def _std(s: NDArray[np.float64], a: int, b: int, ddof: int) -> float:
    """Standard deviation of ``s[a:b]`` (two passes, like numpy)."""
    k = b - a
    total = 0.0
    for i in range(a, b):
        total += s[i]
    mean = total / k
    acc = 0.0
    for i in range(a, b):
        d = s[i] - mean
        acc += d * d
    return math.sqrt(acc / (k - ddof))


@njit(cache=True, nogil=True, fastmath=False)
def _weighted_std(x: NDArray[np.float64], w: NDArray[np.float64], k: int, wsum: float) -> float:
    """Unbiased weighted standard deviation of ``x[:k]`` (reliability weights ``w[:k]``).

    ``sqrt(sum w (x - m)^2 / (V1 - V2 / V1))`` with ``m`` the weighted mean,
    ``V1 = sum w``, ``V2 = sum w^2``; the sample standard deviation (ddof = 1) for equal
    weights. NaN when fewer than two samples carry weight.
    """
    if k < 2 or wsum <= 0.0:
        return np.nan
    mean = 0.0
    v2 = 0.0
    for i in range(k):
        mean += w[i] * x[i]
        v2 += w[i] * w[i]
    mean /= wsum
    denom = wsum - v2 / wsum
    if denom <= 0.0:
        return np.nan
    acc = 0.0
    for i in range(k):
        d = x[i] - mean
        acc += w[i] * d * d
    return math.sqrt(acc / denom)


@njit(cache=True, nogil=True, fastmath=False)
def _lower_bound(s: NDArray[np.float64], a: int, b: int, value: float) -> int:
    """First index in [a, b) with ``s[i] >= value`` (b if none)."""
    while a < b:
        mid = (a + b) // 2
        if s[mid] < value:
            a = mid + 1
        else:
            b = mid
    return a


@njit(cache=True, nogil=True, fastmath=False)
def _upper_bound(s: NDArray[np.float64], a: int, b: int, value: float) -> int:
    """First index in [a, b) with ``s[i] > value`` (b if none)."""
    while a < b:
        mid = (a + b) // 2
        if s[mid] <= value:
            a = mid + 1
        else:
            b = mid
    return a


@njit(cache=True, nogil=True, fastmath=False)
def _sigma_range(s: NDArray[np.float64], m: int, low: float, high: float) -> tuple[int, int]:
    """Kept range of ``s[:m]`` after iterative median/std clipping (astropy's sigma_clip)."""
    a = 0
    b = m
    while b > a:
        med = _median_sorted(s, a, b)
        sd = _std(s, a, b, 0)
        na = _lower_bound(s, a, b, med - low * sd)
        nb = _upper_bound(s, na, b, med + high * sd)
        if na == a and nb == b:
            break
        a = na
        b = nb
    return a, b


@njit(cache=True, nogil=True, fastmath=False)
def _winsorized_range(s: NDArray[np.float64], m: int, low: float, high: float,
                      p1: NDArray[np.float64], p2: NDArray[np.float64]) -> tuple[int, int]:
    """Kept range of ``s[:m]`` after winsorized sigma clipping (Huber/Conejero).

    ``p1``/``p2`` (length >= m + 1) receive prefix sums of ``s - shift`` and its
    square, so each winsorization step costs two binary searches instead of a pass.
    """
    a = 0
    b = m
    if m < MIN_SAMPLES_ITERATIVE:
        return a, b
    shift = _median_sorted(s, 0, m)  # keeps the sums small: no cancellation
    p1[0] = 0.0
    p2[0] = 0.0
    for i in range(m):
        d = s[i] - shift
        p1[i + 1] = p1[i] + d
        p2[i + 1] = p2[i] + d * d
    while b - a >= MIN_SAMPLES_ITERATIVE:
        k = b - a
        centre = _median_sorted(s, a, b)
        mean_d = (p1[b] - p1[a]) / k
        sigma = math.sqrt(max((p2[b] - p2[a]) / k - mean_d * mean_d, 0.0))
        if sigma <= 0.0:
            break
        i0 = a
        i1 = b
        for _ in range(WINSOR_MAX_ITER):
            t0 = centre - WINSOR_CLAMP_SIGMA * sigma
            t1 = centre + WINSOR_CLAMP_SIGMA * sigma
            # s[a:i0] < t0 are raised to t0, s[i1:b] > t1 lowered to t1; the clamps move
            # little between iterations, so walk from the previous indices
            while i0 > a and s[i0 - 1] >= t0:
                i0 -= 1
            while i0 < b and s[i0] < t0:
                i0 += 1
            if i1 < i0:
                i1 = i0
            while i1 > i0 and s[i1 - 1] > t1:
                i1 -= 1
            while i1 < b and s[i1] <= t1:
                i1 += 1
            d0 = t0 - shift
            d1 = t1 - shift
            total = (i0 - a) * d0 + (p1[i1] - p1[i0]) + (b - i1) * d1
            total2 = (i0 - a) * d0 * d0 + (p2[i1] - p2[i0]) + (b - i1) * d1 * d1
            mean_d = total / k
            var = max(total2 / k - mean_d * mean_d, 0.0)
            s2 = WINSOR_SIGMA_CORRECTION * math.sqrt(var)
            converged = abs(s2 - sigma) <= WINSOR_TOLERANCE * sigma
            centre = mean_d + shift
            sigma = s2
            if converged or sigma <= 0.0:
                break
        na = _lower_bound(s, a, b, centre - low * sigma)
        nb = _upper_bound(s, na, b, centre + high * sigma)
        if na == a and nb == b:
            break
        a = na
        b = nb
    return a, b


@njit(cache=True, nogil=True, fastmath=False)
def _linear_fit_keep(s: NDArray[np.float64], m: int, low: float, high: float,
                     keep: NDArray[np.bool_], idx: NDArray[np.int64]) -> tuple[int, int]:
    """Linear fit clipping of sorted ``s[:m]``; sets ``keep[:m]``; returns (n_low, n_high)."""
    for i in range(m):
        keep[i] = True
        idx[i] = i  # sorted positions still kept (ascending, so still sorted by value)
    k = m
    n_low = 0
    n_high = 0
    while k >= MIN_SAMPLES_ITERATIVE:
        xm = 0.5 * (k - 1)
        ym = 0.0
        for i in range(k):
            ym += s[idx[i]]
        ym /= k
        sxx = 0.0
        sxy = 0.0
        for i in range(k):
            dx = i - xm
            sxx += dx * dx
            sxy += dx * (s[idx[i]] - ym)
        slope = sxy / sxx
        intercept = ym - slope * xm
        dev = 0.0
        for i in range(k):
            dev += abs(s[idx[i]] - (intercept + slope * i))
        sigma = dev / k
        if sigma <= 0.0:
            break
        j = 0
        for i in range(k):
            fit = intercept + slope * i
            v = s[idx[i]]
            if v < fit - low * sigma:
                keep[idx[i]] = False
                n_low += 1
            elif v > fit + high * sigma:
                keep[idx[i]] = False
                n_high += 1
            else:
                idx[j] = idx[i]
                j += 1
        if j == k:
            break
        k = j
    return n_low, n_high


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def _normalize_kernel(planes: NDArray[np.float32], footprint: NDArray[np.bool_],
                      gains: NDArray[np.float32], offsets: NDArray[np.float32],
                      out: NDArray[np.float32]) -> None:
    """``out = planes * gain + offset`` per channel (float32), NaN off the footprint."""
    nc, ny, nx = planes.shape
    for y in prange(ny):
        for c in range(nc):
            g = gains[c]
            o = offsets[c]
            for x in range(nx):
                v = planes[c, y, x] * g
                v = v + o
                if footprint[y, x] and math.isfinite(v):
                    out[c, y, x] = v
                else:
                    out[c, y, x] = np.nan


#: High word of the sort key of a missing (non-finite) sample: sorts after every value.
_MISSING_KEY = np.uint64(0xFFFFFFFF)
#: Pixels per parallel work item of the kernels.
_PIXEL_BLOCK = 256


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def _build_keys(bits: NDArray[np.uint32], p0: int, keys: NDArray[np.uint64]) -> None:
    """Sort keys of pixels ``p0 .. p0 + len(keys)``.

    ``keys[p, i] = order(bits[i, p0 + p]) << 32 | i``, where ``order`` maps float32
    bit patterns to unsigned integers in the same order as the values (negative
    floats: all bits flipped; positive: sign bit set); -0.0 is folded onto +0.0 and
    non-finite values map to 0xFFFFFFFF.
    """
    count, n = keys.shape
    for blk in prange((count + _PIXEL_BLOCK - 1) // _PIXEL_BLOCK):
        # frame-innermost: contiguous writes; the strided reads of neighbouring pixels
        # share cache lines (measured 3.7x faster than the pixel-innermost order)
        for p in range(blk * _PIXEL_BLOCK, min(count, (blk + 1) * _PIXEL_BLOCK)):
            for i in range(n):
                b = np.uint64(bits[i, p0 + p])
                if (b & np.uint64(0x7F800000)) == np.uint64(0x7F800000):
                    hi = _MISSING_KEY
                elif b == np.uint64(0x80000000):
                    hi = np.uint64(0x80000000)
                elif b & np.uint64(0x80000000):
                    hi = (~b) & np.uint64(0xFFFFFFFF)
                else:
                    hi = b | np.uint64(0x80000000)
                keys[p, i] = (hi << np.uint64(32)) | np.uint64(i)


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def _combine_kernel(keys: NDArray[np.uint64], p0: int, weights: NDArray[np.float64],
                    reject: int, combine: int, low: float, high: float, want_std: bool,
                    out_image: NDArray[np.float32], out_weight: NDArray[np.float32],
                    out_count: NDArray[np.uint16], out_rlow: NDArray[np.uint16],
                    out_rhigh: NDArray[np.uint16], out_std: NDArray[np.float32]) -> None:
    """Per-pixel rejection + combination of pixels ``p0 .. p0 + len(keys)``.

    ``keys[p]`` is pixel ``p0 + p``'s sorted key row from :func:`_build_keys`: the
    frames in ascending order of value, missing samples last. Outputs are flat.
    """
    count, n = keys.shape
    for blk in prange((count + _PIXEL_BLOCK - 1) // _PIXEL_BLOCK):
        s = np.empty(n, dtype=np.float64)
        frame = np.empty(n, dtype=np.int64)
        kept = np.empty(n, dtype=np.float64)
        kept_w = np.empty(n, dtype=np.float64)
        p1 = np.empty(n + 1, dtype=np.float64)
        p2 = np.empty(n + 1, dtype=np.float64)
        keep = np.empty(n, dtype=np.bool_)
        idx = np.empty(n, dtype=np.int64)
        bit_u = np.empty(1, dtype=np.uint32)
        bit_f = bit_u.view(np.float32)  # decodes a key's value bits
        for p in range(blk * _PIXEL_BLOCK, min(count, (blk + 1) * _PIXEL_BLOCK)):
            q = p0 + p
            m = 0
            for i in range(n):
                key = keys[p, i]
                hi = key >> np.uint64(32)
                if hi == _MISSING_KEY:
                    break
                frame[m] = np.int64(key & np.uint64(0xFFFFFFFF))
                if hi & np.uint64(0x80000000):
                    bit_u[0] = np.uint32(hi & np.uint64(0x7FFFFFFF))
                else:
                    bit_u[0] = np.uint32((~hi) & np.uint64(0xFFFFFFFF))
                s[m] = bit_f[0]
                m += 1
            if m == 0:
                out_image[q] = np.nan
                out_weight[q] = 0.0
                out_count[q] = 0
                out_rlow[q] = 0
                out_rhigh[q] = 0
                if want_std:
                    out_std[q] = np.nan
                continue
            n_low = 0
            n_high = 0
            if reject == _R_LINEAR or reject == _R_MINMAX:
                if reject == _R_LINEAR:
                    n_low, n_high = _linear_fit_keep(s, m, low, high, keep, idx)
                else:
                    n_low = min(int(low), m - 1)
                    n_high = min(int(high), m - 1 - n_low)
                    for i in range(m):
                        keep[i] = n_low <= i < m - n_high
            else:
                a = 0
                b = m
                if reject == _R_SIGMA:
                    a, b = _sigma_range(s, m, low, high)
                elif reject == _R_WINSORIZED:
                    a, b = _winsorized_range(s, m, low, high, p1, p2)
                elif reject == _R_PERCENTILE:
                    med = _median_sorted(s, 0, m)
                    a = _lower_bound(s, 0, m, med - low * abs(med))
                    b = _upper_bound(s, a, m, med + high * abs(med))
                n_low = a
                n_high = m - b
                for i in range(m):
                    keep[i] = a <= i < b
            k = 0
            wsum = 0.0
            wx = 0.0
            for i in range(m):
                if keep[i]:
                    wt = weights[frame[i]]
                    wsum += wt
                    wx += wt * s[i]
                    kept[k] = s[i]
                    kept_w[k] = wt
                    k += 1
            out_count[q] = k
            out_rlow[q] = n_low
            out_rhigh[q] = n_high
            out_weight[q] = wsum
            if k == 0:
                out_image[q] = np.nan
            elif combine == _C_MEAN:
                out_image[q] = wx / wsum if wsum > 0.0 else np.nan
            elif combine == _C_MEDIAN:
                out_image[q] = _median_sorted(kept, 0, k)
            elif combine == _C_MAX:
                out_image[q] = kept[k - 1]
            else:
                out_image[q] = kept[0]
            if want_std:
                out_std[q] = _weighted_std(kept, kept_w, k, wsum)


__all__ = [
    "COMBINE_METHODS",
    "REJECT_METHODS",
    "WEIGHT_METHODS",
    "IntegrateConfig",
    "TileResult",
    "combine_masked_tile",
    "combine_tile",
    "normalized_planes",
]

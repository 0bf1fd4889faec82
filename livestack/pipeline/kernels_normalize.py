"""Numba kernel that applies a frame's normalisation (gain and offset per plane) in one pass."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numpy.typing import NDArray


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def affine_masked(src: NDArray[np.float32], footprint: NDArray[np.uint8],
                  gains: NDArray[np.float32], offsets: NDArray[np.float32],
                  out: NDArray[np.float32]) -> None:  # pragma: no cover - compiled
    """``out[c] = src[c] * gains[c] + offsets[c]`` inside the footprint, 0.0 elsewhere.

    One pass over ``(nc, ny, nx)`` float32 planes; non-finite results become 0.0 and are
    outside the footprint by construction. ``footprint`` is ``(ny, nx)`` uint8 (a bool
    view). The multiply and add round separately (no fused multiply-add), so results are
    bit-identical to numpy's ``x * g`` then ``+= o``.
    """
    nc, ny, nx = src.shape
    for task in prange(nc * ny):
        c = task // ny
        y = task - c * ny
        g = gains[c]
        o = offsets[c]
        for x in range(nx):
            v = src[c, y, x] * g
            v = v + o
            if footprint[y, x] != 0 and math.isfinite(v):
                out[c, y, x] = v
            else:
                out[c, y, x] = np.float32(0.0)


# --------------------------------------------------------------------------- frame_stats

#: Histogram bins of one radix pass of :func:`_kth_key` (16 of a key's 32 bits).
_RADIX_BINS = 1 << 16


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _sort_key(bits: np.uint32) -> np.uint32:  # pragma: no cover - compiled
    """An unsigned key whose order is the float32's (negatives flipped, positives offset)."""
    if bits & np.uint32(0x80000000):
        return ~bits
    return bits | np.uint32(0x80000000)


@njit(cache=True, nogil=True, fastmath=False)
def _kth_key(bits: NDArray[np.uint32], n: int, k: int,
             hist: NDArray[np.int64]) -> np.uint32:  # pragma: no cover - compiled
    """The sort key of the ``k``-th smallest (0-based) of ``bits[:n]`` (float32 bit patterns).

    Two radix passes of 16 bits over the values (a histogram of the key's high half,
    then of the low half among the values in the chosen high bin): exact, no partial
    sort, about 1 ms for 260 000 values.
    """
    hist[:] = 0
    for i in range(n):
        hist[_sort_key(bits[i]) >> 16] += 1
    high, below = _bin_of_rank(hist, k)
    hist[:] = 0
    for i in range(n):
        key = _sort_key(bits[i])
        if (key >> 16) == high:
            hist[key & np.uint32(0xFFFF)] += 1
    low, _ = _bin_of_rank(hist, k - below)
    return np.uint32((high << 16) | low)


@njit(cache=True, nogil=True)
def _bin_of_rank(hist: NDArray[np.int64], rank: int) -> tuple[int, int]:  # pragma: no cover
    """The bin holding the ``rank``-th smallest (0-based) value counted in ``hist``, and how
    many values lie in the bins below it."""
    below = 0
    for b in range(_RADIX_BINS):
        if below + hist[b] > rank:
            return b, below
        below += hist[b]
    return 0, below


@njit(cache=True, nogil=True, fastmath=False)
def _median(values: NDArray[np.float32], n: int,
            hist: NDArray[np.int64]) -> np.float32:  # pragma: no cover - compiled
    """``np.median(values[:n])`` of finite float32 values, bit for bit (n >= 1), except
    the sign of a zero median when the values hold both -0.0 and +0.0 (the key orders -0.0
    below +0.0; numpy's sign then depends on its partition; the values compare equal).

    For an even ``n`` numpy averages the two middle values in float32 (their float32 sum,
    halved); so does this.
    """
    bits = values.view(np.uint32)
    pick = np.empty(2, dtype=np.uint32)
    pick[1] = _kth_key(bits, n, n // 2, hist)
    if n % 2 == 1:
        pick[0] = pick[1]
    else:
        pick[0] = _kth_key(bits, n, n // 2 - 1, hist)
    for j in range(2):  # back from sort keys to float32 bit patterns
        key = pick[j]
        pick[j] = key & np.uint32(0x7FFFFFFF) if key & np.uint32(0x80000000) else ~key
    both = pick.view(np.float32)
    if n % 2 == 1:
        return both[1]
    total = both[0] + both[1]  # float32 + float32: rounded to float32, as numpy's mean
    return total / np.float32(2.0)


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def plane_stats(planes: NDArray[np.float32], mask: NDArray[np.uint8], use_mask: bool,
                step: int, lag: int, n_lag: int, medians: NDArray[np.float64],
                mads: NDArray[np.float64],
                counts: NDArray[np.int64]) -> None:  # pragma: no cover - compiled
    """Medians and median absolute deviations of a strided sample of each plane.

    Two tasks per plane run in parallel: task ``2c`` takes the finite (and, with
    ``use_mask``, masked-in) pixels of plane ``c`` on the grid ``[::step, ::step]``; task
    ``2c + 1`` the differences ``p[y, x] - p[y, x + lag]`` for ``y`` in ``[::step]`` and
    ``x = 0, step, ..., (n_lag - 1) * step`` whose two pixels are both finite (and masked
    in). Each task writes, at its index, the median of its values, the median of their
    absolute deviation from that median, and how many values it had (0: the first two
    are left as they are). The values and medians are float32 as in numpy: the results
    equal ``np.median`` of the same samples bit for bit.

    ``planes`` is ``(nc, ny, nx)`` float32, ``mask`` ``(ny, nx)`` uint8 (a bool view; any
    shape when ``use_mask`` is False).
    """
    nc, ny, nx = planes.shape
    n_rows = (ny + step - 1) // step
    n_cols = (nx + step - 1) // step
    for task in prange(2 * nc):
        c = task // 2
        diffs = task % 2 == 1
        buf = np.empty(n_rows * max(n_cols, n_lag), dtype=np.float32)
        n = 0
        for r in range(n_rows):
            y = r * step
            if diffs:
                for j in range(n_lag):
                    x = j * step
                    a = planes[c, y, x]
                    b = planes[c, y, x + lag]
                    if not (math.isfinite(a) and math.isfinite(b)):
                        continue
                    if use_mask and (mask[y, x] == 0 or mask[y, x + lag] == 0):
                        continue
                    buf[n] = a - b
                    n += 1
            else:
                for x in range(0, nx, step):
                    v = planes[c, y, x]
                    if math.isfinite(v) and (not use_mask or mask[y, x] != 0):
                        buf[n] = v
                        n += 1
        counts[task] = n
        if n == 0:
            continue
        hist = np.empty(_RADIX_BINS, dtype=np.int64)
        med = _median(buf, n, hist)
        for i in range(n):
            buf[i] = abs(buf[i] - med)
        medians[task] = med
        mads[task] = _median(buf, n, hist)

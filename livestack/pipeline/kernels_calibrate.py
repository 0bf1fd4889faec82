"""Numba kernels for calibration: bias/dark subtraction, flat division, defect repair.

FITS decoding lives in :mod:`livestack.storage.kernels_fits`, debayering in
:mod:`.kernels_demosaic`, master combining in :mod:`.kernels_masters` and hot-pixel
search in :mod:`.kernels_cosmetic`.

Each kernel is small and writes into a caller-allocated output without touching
its inputs, except :func:`calibrate_inplace`, which overwrites the frame it is
given. They are compiled on first use (``cache=True`` keeps the machine code on
disk) and run rows in parallel (``prange``), so a 26 MP frame is touched once
instead of once per numpy temporary. ``bench/bench_read_calibrate.py``
measures them against the plain numpy versions.

Conventions: images are ``[y, x]`` C-contiguous; CFA colour codes are
0 = R, 1 = G, 2 = B in a ``(2, 2)`` int8 map indexed ``[y & 1, x & 1]``.
Masks are passed as ``uint8`` views of bool arrays: with numba 0.68 a
conditional store into a bool array made a scan loop ~10x slower than the
same store into uint8 (measured: 112 ms vs 13 ms at 26 MP).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from livestack.pipeline.kernels_common import median_small, ring_values

# Pixels whose flat value is at or below this are not divided (they would blow
# up); such pixels belong in the defect map (find_defects marks them cold).
FLAT_MIN = 1e-3


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _calibrated_at(raw: np.ndarray, sub: np.ndarray, flat: np.ndarray, use_sub: bool,
                   use_flat: bool, y: int, x: int) -> float:
    v = raw[y, x]
    if use_sub:
        v = v - sub[y, x]
    if use_flat:
        f = flat[y, x]
        if f > FLAT_MIN:
            v = v / f
    return v


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _ring_median(src: np.ndarray, sub: np.ndarray, flat: np.ndarray, use_sub: bool,
                 use_flat: bool, defects: np.ndarray, y: int, x: int, step: int,
                 buf: np.ndarray) -> float:
    """Median of the calibrated, finite, non-defect pixels ``step`` away; NaN if none."""
    ny, nx = src.shape
    n = 0
    for dy in range(-step, step + 1, step):
        yy = y + dy
        if yy < 0 or yy >= ny:
            continue
        for dx in range(-step, step + 1, step):
            xx = x + dx
            if (dy == 0 and dx == 0) or xx < 0 or xx >= nx or defects[yy, xx]:
                continue
            w = _calibrated_at(src, sub, flat, use_sub, use_flat, yy, xx)
            if np.isfinite(w):
                buf[n] = w
                n += 1
    if n > 0:
        return median_small(buf, n)
    return np.nan


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def calibrate_fused(raw: np.ndarray, sub: np.ndarray, flat: np.ndarray, defects: np.ndarray,
                    defect_ptr: np.ndarray, defect_cols: np.ndarray, use_sub: bool,
                    use_flat: bool, use_defects: bool, step: int, out: np.ndarray) -> int:
    """``out = (raw - sub) / flat`` with defect pixels replaced, in one pass.

    A defect pixel becomes the median of its calibrated same-colour neighbours
    (the 8 pixels ``step`` away: 1 for mono, 2 for CFA data) that are not
    defects themselves and are finite. Neighbour values are calibrated on the
    fly, so no intermediate image exists. Defects are given both as a map (to
    skip defective neighbours) and row-compressed (``defect_cols[defect_ptr[y]:
    defect_ptr[y + 1]]`` are the defect columns of row ``y``), so rows are
    never scanned for them.

    Parameters
    ----------
    raw : ndarray, shape (ny, nx), float32
    sub, flat : ndarray, float32
        ``(ny, nx)`` when used, else any dummy array.
    defects : ndarray, uint8
        ``(ny, nx)`` defect map (a bool map viewed as uint8) when used, else
        any dummy array.
    defect_ptr : ndarray, shape (ny + 1,), int64
    defect_cols : ndarray, shape (n_defects,), int64
    use_sub, use_flat, use_defects : bool
        Which corrections to apply.
    step : int
        Same-colour neighbour distance in pixels.
    out : ndarray, shape (ny, nx), float32
        Output, written in full.

    Returns
    -------
    int
        Number of defect pixels left NaN because none of their neighbours was
        usable (the caller widens the search for those).
    """
    ny, nx = raw.shape
    unresolved = np.zeros(ny, np.int64)
    for y in prange(ny):
        for x in range(nx):
            out[y, x] = _calibrated_at(raw, sub, flat, use_sub, use_flat, y, x)
        if use_defects:
            buf = np.empty(8, np.float32)
            for k in range(defect_ptr[y], defect_ptr[y + 1]):
                x = defect_cols[k]
                v = _ring_median(raw, sub, flat, use_sub, use_flat, defects, y, x, step, buf)
                out[y, x] = v
                if np.isnan(v):
                    unresolved[y] += 1
    return int(unresolved.sum())


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def _defects_from_neighbours(data: np.ndarray, sub: np.ndarray, flat: np.ndarray,
                             defects: np.ndarray, defect_ptr: np.ndarray,
                             defect_cols: np.ndarray, step: int) -> int:
    """In place, the in-place kernels' second pass: each defect becomes the median of its
    ring of calibrated neighbours, read from ``data`` (a defect is never a neighbour, so
    no pixel this pass writes is read by it). Returns the defects left NaN."""
    ny = data.shape[0]
    unresolved = np.zeros(ny, np.int64)
    for y in prange(ny):
        buf = np.empty(8, np.float32)
        for k in range(defect_ptr[y], defect_ptr[y + 1]):
            x = defect_cols[k]
            # data is calibrated by now: its neighbours are read as they are.
            v = _ring_median(data, sub, flat, False, False, defects, y, x, step, buf)
            data[y, x] = v
            if np.isnan(v):
                unresolved[y] += 1
    return int(unresolved.sum())


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def calibrate_inplace(data: np.ndarray, sub: np.ndarray, flat: np.ndarray, defects: np.ndarray,
                      defect_ptr: np.ndarray, defect_cols: np.ndarray, use_sub: bool,
                      use_flat: bool, use_defects: bool, step: int) -> int:
    """:func:`calibrate_fused` writing into ``data`` itself (no second frame in memory).

    Two passes make it safe in place: every pixel is calibrated first (pixel-local), then
    each defect becomes the median of its calibrated neighbours, read from ``data``. A
    defect is never anyone's neighbour, so the second pass only reads pixels it never
    writes. The result is bit-identical to :func:`calibrate_fused`.

    Parameters
    ----------
    data : ndarray, shape (ny, nx), float32
        The raw frame on entry, the calibrated frame on return.
    sub, flat, defects, defect_ptr, defect_cols, use_sub, use_flat, use_defects, step
        As for :func:`calibrate_fused`.

    Returns
    -------
    int
        Number of defect pixels left NaN (no usable neighbour).
    """
    ny, nx = data.shape
    for y in prange(ny):
        for x in range(nx):
            data[y, x] = _calibrated_at(data, sub, flat, use_sub, use_flat, y, x)
    if not use_defects:
        return 0
    return _defects_from_neighbours(data, sub, flat, defects, defect_ptr, defect_cols, step)


#: Bit of a scan code (:func:`calibrate_inplace_scan`): the raw value is >= its row's
#: finite maximum (the row has a finite pixel). Bits 0-2 are the levels.
CODE_ROW_MAX = 64
#: Bit of a scan code: the raw value is +inf (at or above every level).
CODE_POS_INF = 128
#: Smallest int32: the order key of "no finite pixel" (below every finite float's key).
NO_KEY = -2147483648
#: Rows per band of :func:`calibrate_inplace_scan` (each band keeps its running maximum).
SCAN_BAND_ROWS = 128
_POS_INF_BITS = 0x7F800000


@njit(cache=True, nogil=True, fastmath=False)
def _scan_row(bits: np.ndarray, row: np.ndarray, l0: np.float32, l1: np.float32,
              l2: np.float32, running: int, y: int, codes: np.ndarray, row_key: np.ndarray,
              row_count: np.ndarray, above: np.ndarray, dense: np.ndarray) -> int:
    """The saturation facts of raw row ``y`` (see :func:`calibrate_inplace_scan`); returns
    the band's running maximum key after the row."""
    nx = row.shape[0]
    # One vectorisable pass: the finite maximum as an integer key that sorts like the
    # floats (as kernels_saturation.max_and_count), the +infs, the counts at the levels
    # (NaN levels count nothing).
    k = np.int32(NO_KEY)
    n_inf = 0
    n0 = 0
    n1 = 0
    n2 = 0
    for x in range(nx):
        b = bits[x]
        key = b ^ ((b >> 31) & np.int32(0x7FFFFFFF))
        finite = (b & np.int32(_POS_INF_BITS)) != np.int32(_POS_INF_BITS)
        k = max(k, key if finite else np.int32(NO_KEY))
        n_inf += b == np.int32(_POS_INF_BITS)
        v = row[x]
        n0 += v >= l0
        n1 += v >= l1
        n2 += v >= l2
    # A row whose maximum is below the band's running maximum cannot hold the frame's
    # maximum: only the others (a few per band) need its count and their pixels' codes.
    # (-0.0 too: max_and_count counts a -0.0 row maximum when the frame's is +0.0.)
    top = k != NO_KEY and (k >= running or k == -1)
    c = 0
    if top:
        for x in range(nx):
            b = bits[x]
            key = b ^ ((b >> 31) & np.int32(0x7FFFFFFF))
            c += (key == k) | ((k == 0) & (key == -1))
    row_key[y] = k
    row_count[y] = c
    above[y, 0] = n0
    above[y, 1] = n1
    above[y, 2] = n2
    if n0 + n1 + n2 + n_inf > 0 or top:
        dense[y] = 1
        out = codes[y]
        row_max = row[0]  # replaced below when the row has a finite pixel
        if k != NO_KEY:
            kb = np.empty(1, np.int32)
            kb[0] = k ^ ((k >> 31) & np.int32(0x7FFFFFFF))
            row_max = kb.view(np.float32)[0]
        for x in range(nx):
            v = row[x]
            code = 0
            if v >= l0:
                code |= 1
            if v >= l1:
                code |= 2
            if v >= l2:
                code |= 4
            if k != NO_KEY and v >= row_max:
                code |= CODE_ROW_MAX
            if bits[x] == np.int32(_POS_INF_BITS):
                code |= CODE_POS_INF
            out[x] = code
    else:
        dense[y] = 0
    return max(running, k)


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def calibrate_inplace_scan(data: np.ndarray, sub: np.ndarray, flat: np.ndarray,
                           defects: np.ndarray, defect_ptr: np.ndarray,
                           defect_cols: np.ndarray, use_sub: bool, use_flat: bool,
                           use_defects: bool, step: int, levels: np.ndarray,
                           codes: np.ndarray, row_key: np.ndarray, row_count: np.ndarray,
                           above: np.ndarray, dense: np.ndarray, sample: np.ndarray,
                           sample_step: int) -> int:
    """:func:`calibrate_inplace`, reading each raw row's saturation facts first.

    The raw frame is gone once calibrated in place, so what the saturation mask, the
    level and the calibration offset need from it is taken row by row just before the
    row is calibrated (the row is then in cache: no second pass over the raw frame from
    memory).

    Parameters
    ----------
    data, sub, flat, defects, defect_ptr, defect_cols, use_sub, use_flat, use_defects, step
        As for :func:`calibrate_inplace`; ``data`` is calibrated in place.
    levels : ndarray, shape (3,), float32
        The candidate levels (NaN for an unused slot).
    codes : ndarray, shape (ny, nx), uint8
        Written only in the rows marked ``dense``: bit ``j`` for ``raw >= levels[j]``,
        :data:`CODE_ROW_MAX` for ``raw >=`` the row's finite maximum, and
        :data:`CODE_POS_INF` for ``raw == +inf``.
    row_key, row_count : ndarray, shape (ny,), int32 / int64
        Written: each row's maximum as an order key (:data:`NO_KEY` when no pixel is
        finite) and how many pixels equal it (+0.0 and -0.0 alike); the count only in the
        rows that can hold the frame's maximum (see ``dense``), 0 elsewhere.
    above : ndarray, shape (ny, 3), int64
        Written: the number of pixels ``>= levels[j]`` in each row.
    dense : ndarray, shape (ny,), uint8
        Written: 1 where ``codes`` was written: a pixel at or above a level, a +inf, or a
        maximum at or above the running maximum of the rows before it in its band of
        :data:`SCAN_BAND_ROWS` (so every row that holds the frame's maximum is dense and
        counted), or a maximum of -0.0.
    sample : ndarray, shape (ceil(ny / sample_step), ceil(nx / sample_step)), float64
        Written: ``raw[::sample_step, ::sample_step]``.
    sample_step : int

    Returns
    -------
    int
        Number of defect pixels left NaN (no usable neighbour).
    """
    ny, nx = data.shape
    bits = data.view(np.int32)
    l0 = np.float32(levels[0])
    l1 = np.float32(levels[1])
    l2 = np.float32(levels[2])
    n_bands = (ny + SCAN_BAND_ROWS - 1) // SCAN_BAND_ROWS
    for band in prange(n_bands):
        running = NO_KEY
        for y in range(band * SCAN_BAND_ROWS, min(ny, (band + 1) * SCAN_BAND_ROWS)):
            running = _scan_row(bits[y], data[y], l0, l1, l2, running, y, codes, row_key,
                                row_count, above, dense)
            if y % sample_step == 0:
                srow = sample[y // sample_step]
                for i in range(srow.shape[0]):
                    srow[i] = data[y, i * sample_step]
            for x in range(nx):
                data[y, x] = _calibrated_at(data, sub, flat, use_sub, use_flat, y, x)
    if not use_defects:
        return 0
    return _defects_from_neighbours(data, sub, flat, defects, defect_ptr, defect_cols, step)


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def ring_median(image: np.ndarray, step: int, out: np.ndarray) -> None:
    """Median of the 8 pixels ``step`` away (the same-colour ring for step 2).

    The centre is excluded, so a hot or dead pixel (or a cluster up to
    ``step`` px wide) does not enter its own ring. Out-of-bounds
    and non-finite neighbours are skipped; NaN where none is left.

    Parameters
    ----------
    image : ndarray, shape (ny, nx), float32
    step : int
    out : ndarray, shape (ny, nx), float32
    """
    ny, nx = image.shape
    for y in prange(ny):
        buf = np.empty(8, np.float32)
        for x in range(nx):
            n = ring_values(image, y, x, step, buf)
            out[y, x] = median_small(buf, n) if n > 0 else np.nan











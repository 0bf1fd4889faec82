"""numba kernels behind :mod:`livestack.pipeline.saturation`.

* :func:`max_and_count`: a frame's maximum and how many pixels hold it (one pass).
* :func:`saturated_mask`: ``raw >= level`` without isolated (hot) pixels.
* :func:`steep_flags`: which input pixels lie within the Lanczos3 support of a steep step
  or a saturated pixel (seeds, then a separable box dilation).
* :func:`clamp_warped`: the post-warp clamp of the flagged output pixels to their
  bilinear cell's range, and the warped saturation mask.

All kernels are parallel over rows, write only their own rows, and read NaN safely
(a comparison with NaN is False, so NaN never seeds a flag or a clamp).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

if TYPE_CHECKING:
    from livestack.pipeline.types import Allocator

#: Smallest int32: the order key of "no finite pixel" (below every finite float's key).
_NO_KEY = -2147483648
#: The bits of float32 -inf as an int32.
_NEG_INF_BITS = -8388608


@njit(cache=True, nogil=True, parallel=True)
def max_and_count(raw: NDArray[np.float32]) -> tuple[float, int]:  # pragma: no cover - numba
    """Finite maximum of ``raw`` (ny, nx) and the number of pixels equal to it.

    Returns ``(-inf, 0)`` when no pixel is finite.

    Each row's maximum is taken over an integer key of the float bits that sorts like the
    floats (sign-magnitude flipped to two's complement; NaN and inf get the lowest key):
    an integer max reduction vectorises, a float one with NaN checks did not (26 MP:
    10 ms instead of 25 ms of CPU). The row, still in cache, is then counted.
    """
    ny, nx = raw.shape
    bits = raw.view(np.int32)
    max_bits = np.empty(ny, dtype=np.int32)
    row_count = np.zeros(ny, dtype=np.int64)
    for y in prange(ny):
        k = np.int32(_NO_KEY)
        for x in range(nx):
            b = bits[y, x]
            key = b ^ ((b >> 31) & np.int32(0x7FFFFFFF))
            finite = (b & np.int32(0x7F800000)) != np.int32(0x7F800000)
            k = max(k, key if finite else np.int32(_NO_KEY))
        if k == _NO_KEY:  # no finite pixel in the row: -inf, count 0
            max_bits[y] = _NEG_INF_BITS
            continue
        # Pixels equal to the maximum as floats: the same key, or -0.0 when it is +0.0.
        c = 0
        for x in range(nx):
            b = bits[y, x]
            key = b ^ ((b >> 31) & np.int32(0x7FFFFFFF))
            c += (key == k) | ((k == 0) & (key == -1))
        max_bits[y] = k ^ ((k >> 31) & np.int32(0x7FFFFFFF))  # the key is its own inverse
        row_count[y] = c
    row_max = max_bits.view(np.float32)
    best = -np.inf
    for y in range(ny):
        best = max(best, row_max[y])
    total = 0
    for y in range(ny):
        if row_max[y] == best:
            total += row_count[y]
    if not math.isfinite(best):
        return -np.inf, 0
    return best, total


@njit(cache=True, nogil=True, parallel=True)
def _clear_isolated(mask: NDArray[Any], above: NDArray[np.int64],
                    off: Any) -> int:  # pragma: no cover - numba
    """In place: a set pixel with no set 8-neighbour becomes ``off``; returns the set
    pixels left. Only rows with ``above[y] > 0`` can hold set pixels. ``mask`` is bool
    (``off`` False) or a bool mask's memory as uint8 (``off`` 0).

    A cleared pixel can never be the neighbour of a set one, so clearing it changes no
    other pixel's test: the rows run in parallel.
    """
    ny, nx = mask.shape
    counts = np.zeros(ny, dtype=np.int64)
    for y in prange(ny):
        n = 0
        if above[y] == 0:
            continue
        for x in range(nx):
            if not mask[y, x]:
                continue
            alone = True
            for yy in range(max(0, y - 1), min(ny, y + 2)):
                for xx in range(max(0, x - 1), min(nx, x + 2)):
                    if (yy != y or xx != x) and mask[yy, xx]:
                        alone = False
            if alone:
                mask[y, x] = off
            else:
                n += 1
        counts[y] = n
    return int(counts.sum())


@njit(cache=True, nogil=True, parallel=True)
def saturated_mask(raw: NDArray[np.float32], level: float,
                   mask: NDArray[np.bool_]) -> int:  # pragma: no cover - numba
    """``mask = raw >= level`` without isolated pixels; return the number left.

    When no pixel reaches ``level`` the mask is not written (0 is returned).

    An isolated pixel (no saturated 8-neighbour) is cleared in place: it can never be
    the neighbour of a saturated pixel, so clearing it changes no other pixel's test.
    """
    ny, nx = raw.shape
    above = np.zeros(ny, dtype=np.int64)
    for y in prange(ny):  # read-only first: most frames have no saturated pixel
        n = 0
        for x in range(nx):
            n += raw[y, x] >= level
        above[y] = n
    if above.sum() == 0:
        return 0
    for y in prange(ny):
        if above[y] == 0:
            mask[y, :] = False
        else:
            for x in range(nx):
                mask[y, x] = raw[y, x] >= level
    return _clear_isolated(mask, above, False)


@njit(cache=True, nogil=True, parallel=True)
def _seeds(src: NDArray[np.float32], sat: NDArray[np.bool_], threshold: float,
           seeds: NDArray[np.uint8], counts: NDArray[np.int64]) -> None:  # pragma: no cover
    """Seed map (2 saturated, 1 steep, 0 neither) and the number of seeds per row.

    Branch-free inner loop over the row's interior (LLVM vectorises it); the first and
    last column take the same test with their one horizontal neighbour.
    """
    nc, ny, nx = src.shape
    has_sat = sat.shape[0] == ny
    thr = np.float32(threshold)
    for y in prange(ny):
        ym = max(y - 1, 0)
        yp = min(y + 1, ny - 1)
        out = seeds[y]
        out[:] = 0
        for c in range(nc):
            r0 = src[c, y]
            rm = src[c, ym]
            rp = src[c, yp]
            for x in range(1, nx - 1):
                v = r0[x]
                m = max(max(abs(r0[x + 1] - v), abs(r0[x - 1] - v)),
                        max(abs(rm[x] - v), abs(rp[x] - v)))
                out[x] |= m > thr
            if nx > 1:
                v = r0[0]
                m = max(max(abs(r0[1] - v), abs(rm[0] - v)), abs(rp[0] - v))
                out[0] |= m > thr
                v = r0[nx - 1]
                m = max(max(abs(r0[nx - 2] - v), abs(rm[nx - 1] - v)), abs(rp[nx - 1] - v))
                out[nx - 1] |= m > thr
        if has_sat:
            srow = sat[y]
            for x in range(nx):
                if srow[x]:
                    out[x] = 2
        n = 0
        for x in range(nx):
            n += out[x] != 0
        counts[y] = n


@njit(cache=True, nogil=True, parallel=True)
def _seed_columns(seeds: NDArray[np.uint8], offsets: NDArray[np.int64],
                  columns: NDArray[np.int32]) -> None:  # pragma: no cover - numba
    ny, nx = seeds.shape
    for y in prange(ny):
        k = offsets[y]
        if offsets[y + 1] == k:
            continue  # no seed in this row
        for x in range(nx):
            if seeds[y, x]:
                columns[k] = x
                k += 1


#: Side (px) of the source tiles whose "any flag" bit lets the clamp skip whole runs.
TILE_PX = 32


@njit(cache=True, nogil=True)
def _tiles(seeds: NDArray[np.uint8], offsets: NDArray[np.int64], columns: NDArray[np.int32],
           radius: int, tiles: NDArray[np.uint8]) -> None:  # pragma: no cover - numba
    """Mark the :data:`TILE_PX` tiles that any seed's dilation box touches (sparse)."""
    ny, nx = seeds.shape
    nty, ntx = tiles.shape
    tiles[:, :] = 0
    for y in range(ny):
        ty0 = max(0, y - radius) // TILE_PX
        ty1 = min(ny - 1, y + radius) // TILE_PX
        for k in range(offsets[y], offsets[y + 1]):
            x = columns[k]
            tx0 = max(0, x - radius) // TILE_PX
            tx1 = min(nx - 1, x + radius) // TILE_PX
            for ty in range(ty0, min(ty1, nty - 1) + 1):
                for tx in range(tx0, min(tx1, ntx - 1) + 1):
                    tiles[ty, tx] = 1


@njit(cache=True, nogil=True, parallel=True)
def _dilate(seeds: NDArray[np.uint8], offsets: NDArray[np.int64],
            columns: NDArray[np.int32], radius: int,
            flags: NDArray[np.uint8]) -> None:  # pragma: no cover - numba
    """Box dilation gathered per output row (race-free), taking the larger seed value."""
    ny, nx = seeds.shape
    for y in prange(ny):
        row = flags[y]
        row[:] = 0
        for yy in range(max(0, y - radius), min(ny, y + radius + 1)):
            for k in range(offsets[yy], offsets[yy + 1]):
                x = columns[k]
                value = seeds[yy, x]
                for xx in range(max(0, x - radius), min(nx, x + radius + 1)):
                    if row[xx] < value:
                        row[xx] = value


def steep_flags(src: NDArray[np.float32], sat: NDArray[np.bool_], threshold: float,
                radius: int, flags: NDArray[np.uint8], empty: Allocator | None = None
                ) -> NDArray[np.uint8]:
    """Flag the pixels within ``radius`` (box) of a steep step or a saturated pixel.

    Seeds are found in one dense pass; the dilation then only visits the seeds (stars'
    edges and cores: a few percent of a frame at most), gathered per output row.

    Parameters
    ----------
    src : ndarray, shape (nc, ny, nx), float32
        The frame's planes (ADU).
    sat : ndarray, shape (ny, nx) bool, or shape (0, 0)
        Saturated pixels; empty when none.
    threshold : float
        A pixel is steep when it differs from one of its 4 neighbours by more than this
        (ADU) in any plane.
    radius : int
        Box half-size of the dilation (3 covers Lanczos3's taps).
    flags : ndarray, shape (ny, nx), uint8
        Written: 2 within ``radius`` of a saturated pixel, else 1 within ``radius`` of a
        steep pixel, else 0.
    empty : Allocator, optional
        Where the ``(ny, nx)`` uint8 seed map comes from (default ``np.empty``; a caller's
        buffer pool saves fresh pages per frame).

    Returns
    -------
    ndarray, shape (ceil(ny / TILE_PX), ceil(nx / TILE_PX)), uint8
        1 for the tiles that hold a flagged pixel (for :func:`clamp_warped`).
    """
    ny, nx = src.shape[1:]
    seeds = (empty or np.empty)(src.shape[1:], np.uint8)  # every pixel is written
    counts = np.empty(ny, dtype=np.int64)
    _seeds(src, sat, threshold, seeds, counts)
    offsets = np.zeros(ny + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    columns = np.empty(int(offsets[-1]), dtype=np.int32)
    _seed_columns(seeds, offsets, columns)
    _dilate(seeds, offsets, columns, radius, flags)
    tiles = np.empty(((ny + TILE_PX - 1) // TILE_PX, (nx + TILE_PX - 1) // TILE_PX),
                     dtype=np.uint8)
    _tiles(seeds, offsets, columns, radius, tiles)
    return tiles


@njit(cache=True, nogil=True, parallel=True)
def clamp_warped(out: NDArray[np.float32], foot: NDArray[np.bool_], src: NDArray[np.float32],
                 flags: NDArray[np.uint8], tiles: NDArray[np.uint8], sat: NDArray[np.bool_],
                 inv: NDArray[np.float64], sat_out: NDArray[np.bool_],
                 gains: NDArray[np.float32], offsets: NDArray[np.float32],
                 ceilings: NDArray[np.float32],
                 saturate: bool) -> int:  # pragma: no cover - numba
    """Clamp flagged output pixels to their bilinear cell's range; warp the mask.

    For an output pixel in the footprint whose source cell (the 2x2 input pixels around
    ``inv @ (x, y, 1)``) is flagged, each plane is raised to at least the cell's minimum:
    Lanczos ringing cannot dig below the local sky, while peaks keep Lanczos3's
    sharpness. With flag 2 (a saturated pixel within the kernel's reach) it is also
    lowered to at most the cell's maximum: no overshoot past a plateau. Measured on
    ``livestack.sim.saturated`` stars, this keeps the profiles outside the core as close
    to the truth as Lanczos3 on unsaturated data, where a bilinear fallback near
    saturated pixels doubled the error. ``sat_out`` is the saturation of the nearest
    input pixel.

    Parameters
    ----------
    out : ndarray, shape (nc, ny_out, nx_out), float32
        The warped planes, modified in place.
    foot : ndarray, shape (ny_out, nx_out), bool
    src : ndarray, shape (nc, ny, nx), float32
        The planes that were warped.
    flags : ndarray, shape (ny, nx), uint8
        From :func:`steep_flags`.
    tiles : ndarray, uint8
        :func:`steep_flags`' return value: runs of :data:`TILE_PX` output pixels whose
        source cells lie in unflagged tiles are skipped without a per-pixel test.
    sat : ndarray, shape (ny, nx) bool, or shape (0, 0)
        Saturated input pixels; empty when none.
    inv : ndarray, shape (2, 3), float64
        Output pixel -> input pixel coordinates.
    sat_out : ndarray, shape (ny_out, nx_out) bool, or shape (0, 0) when ``sat`` is empty
        Written: True where the nearest input pixel is saturated (False outside the
        footprint).
    gains, offsets, ceilings : ndarray, shape (nc,) float32, or shape (0,)
        When given, ``out`` holds the warp's samples already mapped by them
        (:class:`~livestack.pipeline.types.OutputMap`, gains > 0): the cell's bounds are
        mapped the same way (an order-preserving map commutes with the min and max, so
        the result is the mapped clamp bit for bit) and each clamped sample is then
        capped at the ceiling again (a clamp may raise it past the warp's cap).
    saturate : bool
        With the map: samples whose nearest input pixel is saturated become the ceiling.

    Returns
    -------
    int
        Number of output values changed (all planes).
    """
    ny_out, nx_out = out.shape[1:]
    changed = np.zeros(ny_out, dtype=np.int64)
    m00, m10 = inv[0, 0], inv[1, 0]
    nty, ntx = tiles.shape
    has_sat_out = sat_out.shape[0] == ny_out
    no_row = np.zeros(0, dtype=np.bool_)
    for y in prange(ny_out):
        n = 0
        if has_sat_out:
            sat_out[y, :] = False
        u0 = inv[0, 1] * y + inv[0, 2]
        v0 = inv[1, 1] * y + inv[1, 2]
        frow = foot[y]
        for xs in range(0, nx_out, TILE_PX):
            xe = min(nx_out, xs + TILE_PX)
            # Source cells of this run: a segment; its bounding box's tiles decide.
            ua = m00 * xs + u0
            ub = m00 * (xe - 1) + u0
            va = m10 * xs + v0
            vb = m10 * (xe - 1) + v0
            tx0 = max(0, math.floor(min(ua, ub)) // TILE_PX)
            tx1 = min(ntx - 1, math.floor(max(ua, ub)) // TILE_PX)
            ty0 = max(0, math.floor(min(va, vb)) // TILE_PX)
            ty1 = min(nty - 1, math.floor(max(va, vb)) // TILE_PX)
            hit = False
            for ty in range(ty0, ty1 + 1):
                for tx in range(tx0, tx1 + 1):
                    if tiles[ty, tx]:
                        hit = True
            if hit:
                n += _clamp_run(out, frow, src, flags, sat,
                                sat_out[y] if has_sat_out else no_row, m00, m10,
                                u0, v0, y, xs, xe, gains, offsets, ceilings, saturate)
        changed[y] = n
    return int(changed.sum())


@njit(cache=True, nogil=True)
def _clamp_run(out: NDArray[np.float32], frow: NDArray[np.bool_], src: NDArray[np.float32],
               flags: NDArray[np.uint8], sat: NDArray[np.bool_], srow: NDArray[np.bool_],
               m00: float, m10: float, u0: float, v0: float, y: int, xs: int,
               xe: int, gains: NDArray[np.float32], offsets: NDArray[np.float32],
               ceilings: NDArray[np.float32],
               saturate: bool) -> int:  # pragma: no cover - numba
    """The per-pixel clamp of output pixels ``xs .. xe - 1`` of row ``y``."""
    nc = out.shape[0]
    ny, nx = flags.shape
    has_sat = sat.shape[0] == ny
    mapped = gains.shape[0] > 0
    n = 0
    for x in range(xs, xe):
        u = m00 * x + u0
        v = m10 * x + v0
        fu = math.floor(u)
        fv = math.floor(v)
        if fu < 0 or fv < 0 or fu >= nx or fv >= ny or not frow[x]:
            continue
        flag = flags[fv, fu]
        if flag == 0:
            continue
        if has_sat and flag == 2:  # a saturated nearest pixel implies flag 2 here
            ru = math.floor(u + 0.5)
            rv = math.floor(v + 0.5)
            if 0 <= ru < nx and 0 <= rv < ny:
                srow[x] = sat[rv, ru]
        u1 = min(fu + 1, nx - 1)
        v1 = min(fv + 1, ny - 1)
        for c in range(nc):
            a = src[c, fv, fu]
            b = src[c, fv, u1]
            d = src[c, v1, fu]
            e = src[c, v1, u1]
            val = out[c, y, x]
            lo = min(min(a, b), min(d, e))
            hi = max(max(a, b), max(d, e))
            if mapped:
                # Two roundings (no fused multiply-add), as the warp mapped ``val``.
                lo = lo * gains[c]
                lo = lo + offsets[c]
                hi = hi * gains[c]
                hi = hi + offsets[c]
            new = max(val, lo)
            if flag == 2:
                new = min(new, hi)
            if mapped:
                top = ceilings[c]
                if new > top or (saturate and len(srow) > 0 and srow[x]):
                    new = top
            if new != val:
                out[c, y, x] = new
                n += 1
    return n


@njit(cache=True, nogil=True, parallel=True)
def apply_level(planes: NDArray[np.float32], foot: NDArray[np.bool_],
                saturated: NDArray[np.bool_],
                levels: NDArray[np.float32]) -> None:  # pragma: no cover - numba
    """In the footprint: saturated samples become the level, all are clipped to it.

    Parameters
    ----------
    planes : ndarray, shape (nc, ny, nx), float32
        Normalised samples, modified in place.
    foot : ndarray, shape (ny, nx), bool
    saturated : ndarray, shape (ny, nx) bool, or shape (0, 0)
        Warped saturation mask; empty when none.
    levels : ndarray, shape (nc,), float32
        The stack's level per plane.
    """
    nc, ny, nx = planes.shape
    has_sat = saturated.shape[0] == ny
    for y in prange(ny):
        for c in range(nc):
            level = levels[c]
            row = planes[c, y]
            for x in range(nx):
                if foot[y, x]:
                    if (has_sat and saturated[y, x]) or row[x] > level:
                        row[x] = level


@njit(cache=True, nogil=True, parallel=True)
def mask_from_codes(codes: NDArray[np.uint8], dense: NDArray[np.uint8], code_bits: int,
                    max_rows: NDArray[np.uint8],
                    max_bits: int) -> int:  # pragma: no cover - numba
    """The saturation mask from the calibration's raw scan, isolated pixels cleared.

    ``kernels_calibrate.calibrate_inplace_scan`` left per-pixel codes in the ``dense``
    rows of ``codes``; the mask (written over ``codes``, 0 or 1) is then
    :func:`saturated_mask`'s: the pixels of the dense rows whose code has one of
    ``code_bits`` (or of ``max_bits`` in the rows marked in ``max_rows``); an isolated
    pixel (no saturated 8-neighbour) is cleared.

    Parameters
    ----------
    codes : ndarray, shape (ny, nx), uint8
        The scan's codes (a bool mask's memory viewed as uint8); rewritten as the mask.
    dense : ndarray, shape (ny,), uint8
    code_bits : int
        Code bits that make a pixel saturated.
    max_rows : ndarray, shape (ny,), uint8
        1 for the rows whose maximum is saturated (the level is the frame's maximum).
    max_bits : int
        Code bits that make a pixel of those rows saturated.

    Returns
    -------
    int
        Saturated pixels left (0: no pixel at all).
    """
    ny, nx = codes.shape
    above = np.zeros(ny, dtype=np.int64)
    for y in prange(ny):
        row = codes[y]
        n = 0
        if dense[y]:
            bits = code_bits | max_bits if max_rows[y] else code_bits
            for x in range(nx):
                v = np.uint8(1) if row[x] & bits else np.uint8(0)
                row[x] = v
                n += v
        else:
            row[:] = 0
        above[y] = n
    if above.sum() == 0:
        return 0
    return _clear_isolated(codes, above, np.uint8(0))


@njit(cache=True, nogil=True, parallel=True)
def map_level(planes: NDArray[np.float32], foot: NDArray[np.bool_],
              gains: NDArray[np.float32], offsets: NDArray[np.float32],
              ceilings: NDArray[np.float32]) -> None:  # pragma: no cover - numba
    """In place, one pass: a warp's samples mapped as the two-pass kernel maps them on
    its output write (:class:`~livestack.pipeline.types.OutputMap`), for the kernels
    that do not (shift, 2-D, identity).

    In the footprint ``v = s * gain``, ``v + offset`` (two roundings, as
    :func:`livestack.pipeline.kernels_normalize.affine_masked`), 0.0 if not finite, then
    at most the ceiling; 0.0 outside it.

    Parameters
    ----------
    planes : ndarray, shape (nc, ny, nx), float32
        Modified in place.
    foot : ndarray, shape (ny, nx), bool
    gains, offsets, ceilings : ndarray, shape (nc,), float32
    """
    nc, ny, nx = planes.shape
    for task in prange(nc * ny):
        c = task // ny
        y = task - c * ny
        g = gains[c]
        o = offsets[c]
        top = ceilings[c]
        row = planes[c, y]
        frow = foot[y]
        for x in range(nx):
            v = row[x] * g
            v = v + o
            v = v if math.isfinite(v) else np.float32(0.0)
            v = top if v > top else v
            row[x] = v if frow[x] else np.float32(0.0)

"""Two-pass (Catmull-Smith) separable warp for small rotations: the numba kernels.

The inverse map of :func:`livestack.pipeline.warp.warp` is affine,
``u = a x + b y + c`` and ``v = d x + e y + f`` (output pixel -> input pixel). With
``e != 0`` it factors into two 1-D resamplings:

1. *horizontal*: each input row ``Y`` is resampled at the columns
   ``U(x, Y) = alpha x + beta Y + gamma`` with ``alpha = a - b d / e``, ``beta = b / e``,
   ``gamma = c - b f / e`` (the ``u`` of the point on row ``Y`` that maps to column ``x``),
   giving ``tmp[Y, x]``;
2. *vertical*: each output column ``x`` is resampled along ``tmp[:, x]`` at
   ``V(x, y) = d x + e y + f``.

The result interpolates along a sheared grid, so it is not bit-identical to the 2-D kernel
of :mod:`.kernels_warp`, but for the near-identity transforms of a stack (a few degrees of
rotation, scale ~1) it is as accurate against the truth (``tests/pipeline/test_warp.py``,
``bench/bench_warp.py``). The point is speed: both passes are unit-stride 1-D loops whose
weights come from polynomials like the 2-D kernel's (Lanczos3: a degree-4 fit, within
1.5e-7 of the exact weights), computed per pixel without branches or tuples in memory,
so LLVM vectorises them (the 2-D kernel's 36 taps with 2-D loads compile to scalar code).

Runs: over ``x`` the integer part of ``U`` advances by exactly 1 per pixel inside a run
(``alpha`` is near 1), and ``floor(V)`` is constant inside a run (``d`` is near 0), so each
run's loads are unit stride from a fixed base. Runs are cut analytically (as the 2-D kernel
does), outside the hot loops.

Tiles: the output is processed in tiles of ``tile_rows`` x ``tile_cols`` pixels, one
``prange`` task per row of tiles with one small scratch buffer (the input rows a tile needs,
``e * tile_rows + |d| * tile_cols + taps`` of ``tile_cols`` floats), so no full-frame
intermediate is ever allocated.

Footprint: an output pixel is valid when every input sample its value depends on (6 x 6 for
Lanczos3, through both passes) is inside and finite. Samples outside the input are NaN in
the horizontal pass, and NaN propagates through both sums (all weights of a non-integer
phase are non-zero), so ``isfinite`` of the result is the footprint test. Invalid pixels
are 0.0 in every plane.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange, uint64
from numpy.typing import NDArray

from livestack.pipeline.kernels_warp import (
    BICUBIC,
    FIRST_TAP,
    LANCZOS3,
    MITCHELL,
    N_TAPS,
    _cell_end,
    _interval,
    _w_bicubic,
    _weights,
    lanczos3_p4,
)
from livestack.pipeline.types import OutputMap

_Z32 = np.float32(0.0)
_NAN32 = np.float32(np.nan)
#: Vector runs are rounded up to a multiple of this many pixels (the width of the
#: vectorised loop's epilogue), so LLVM's scalar remainder loop never runs: the extra
#: lanes write scratch that the next run or the padding absorbs.
_LANES = 8
#: Largest |sin| / cos of the rotation the two-pass kernel takes (tan 5 deg).
_MAX_SHEAR = 0.0875
#: Smallest |sin| / cos of the rotation at which the two-pass kernel pays (tan 0.15 deg):
#: below it the 2-D kernel's runs are so long (> 380 px) that it is as fast on a mono
#: frame (26 MP, 1 thread, CPU: 0.1 deg 2.9 ns/px both, 0.5 deg 4.5 vs 3.6, 2 deg 9.3 vs
#: 4.1; ``bench/bench_warp.py --two-pass-only``).
_MIN_SHEAR = 0.0026
#: Scratch padding (pixels) past a tile's last column for those extra lanes.
_PAD = 16


#: Mitchell-Netravali's coefficients (B = C = 1/3) in float32.
_MI3 = np.float32(21.0 / 18.0)
_MI0 = np.float32(16.0 / 18.0)
_MO0 = np.float32(1.0 / 18.0)
_MO1 = np.float32(7.0 / 18.0)
_THIRD = np.float32(1.0 / 3.0)


@njit(cache=True, nogil=True, fastmath={"contract"}, inline="always")
def _mitchell32(p: np.float32) -> tuple[np.float32, ...]:
    """Mitchell-Netravali weights at ``p = frac - 0.5``: :func:`kernels_warp._w_mitchell`'s
    eleven multiply-adds in float32 (within 3e-7 of its float64 ones, a float32 rounding
    or two): half the vector lanes of float64 made them most of a colour frame's two-pass
    time (26 MP, 3 planes, 0.5 deg: 27 % less CPU)."""
    f = p + np.float32(0.5)
    g = np.float32(1.0) - f
    ff = f * f
    gg = g * g
    w0 = gg * (_MO0 - _MO1 * f)
    w1 = (_MI3 * f - np.float32(2.0)) * ff + _MI0
    w2 = (_MI3 * g - np.float32(2.0)) * gg + _MI0
    w3 = ff * (_MO1 * f - _THIRD)
    return (w0, w1, w2, w3, _Z32, _Z32)


@njit(cache=True, nogil=True, fastmath={"contract"}, inline="always")
def _weights32(kind: int, p: np.float32) -> tuple[np.float32, ...]:
    """Weights at ``p = frac - 0.5`` (float32), branch-free, for the vectorised runs.

    Lanczos3 is the degree-4 fit (:func:`kernels_warp.lanczos3_p4`, within 1.5e-7 of the
    exact weights, about a float32 rounding; the 2-D kernel's degree 5 costs this kernel
    ~10 % more time, 26 MP at 0.5 deg) without the exact-delta branch; bicubic is Keys'
    cubic, mitchell Mitchell-Netravali's (B = C = 1/3) in float32 (:func:`_mitchell32`).
    """
    if kind == LANCZOS3:
        return lanczos3_p4(p)
    if kind == MITCHELL:
        return _mitchell32(p)
    return _w_bicubic(np.float64(p) + 0.5)


def _make_runs(kind: int) -> Any:
    """Build the 1-D run kernels of one interpolation kind (bicubic, lanczos3, mitchell).

    Only plain ints are captured: numba keys its on-disk cache of a closure on the
    pickled captured values, and a captured dispatcher pickles differently per process
    (the kernel would be compiled again in every process). So the kernels that call
    these reach them through the module-level ``_*_kind`` dispatchers, not as closure
    variables.
    """
    nt = N_TAPS[kind]
    first = FIRST_TAP[kind]

    @njit(cache=True, nogil=True, fastmath={"contract"})
    def hrun(dst: NDArray[np.float32], row: NDArray[np.float32], n: int, base: int,
             p0: np.float32, sp: np.float32) -> None:
        # dst[k] = sum_i w_i(p0 + sp*k) row[base + k + i] for k < n: unit-stride loads,
        # the phase in float32 (p = frac - 0.5) and the weights per pixel in registers.
        # Unsigned indices: no negative-index wraparound code, which would block
        # vectorisation (the driver keeps them inside ``row``).
        ub = uint64(base)
        for k in range(n):
            uk = uint64(k)
            w = _weights32(kind, p0 + sp * np.float32(k))
            acc = _Z32
            for i in range(nt):
                acc += w[i] * row[ub + uk + uint64(i)]
            dst[uk] = acc

    @njit(cache=True, nogil=True, fastmath={"contract"})
    def vrun(srow: NDArray[np.float32], tmp: NDArray[np.float32], ch: int, n: int, r0: int,
             c0: int, p0: np.float32, sp: np.float32) -> None:
        # srow[ch, c0 + k] = sum_j w_j(p0 + sp*k) tmp[ch, r0 + j, c0 + k] for k < n (raw
        # sums; the footprint and the zeroing come after, in their own loop). Whole arrays
        # and offsets, not slices: a slice per run costs its reference counting, and the
        # runs are short (1 / sin(angle) pixels).
        uch = uint64(ch)
        ur = uint64(r0)
        uc = uint64(c0)
        for k in range(n):
            uk = uint64(k)
            w = _weights32(kind, p0 + sp * np.float32(k))
            acc = _Z32
            for j in range(nt):
                acc += w[j] * tmp[uch, ur + uint64(j), uc + uk]
            srow[uch, uc + uk] = acc

    @njit(cache=True, nogil=True, fastmath={"contract"})
    def hedge(row: NDArray[np.float32], u: float) -> np.float32:
        # One sample near or beyond the row's ends: exact taps, zero-weight taps ignored,
        # NaN when a tap with a non-zero weight is outside.
        nx_in = row.shape[0]
        if not (u > -8.0 and u < nx_in + 8.0):
            return _NAN32
        fu = math.floor(u)
        w = _weights(kind, u - fu)
        iu = int(fu) + first
        acc = _Z32
        for i in range(nt):
            if w[i] != 0.0:
                if iu + i < 0 or iu + i >= nx_in:
                    return _NAN32
                acc += w[i] * row[iu + i]
        return acc

    return hrun, vrun, hedge


_hrun_lanczos3, _vrun_lanczos3, _hedge_lanczos3 = _make_runs(LANCZOS3)
_hrun_bicubic, _vrun_bicubic, _hedge_bicubic = _make_runs(BICUBIC)
_hrun_mitchell, _vrun_mitchell, _hedge_mitchell = _make_runs(MITCHELL)


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _hrun_kind(kind: int, dst: NDArray[np.float32], row: NDArray[np.float32], n: int,
               base: int, p0: np.float32, sp: np.float32) -> None:
    if kind == LANCZOS3:
        _hrun_lanczos3(dst, row, n, base, p0, sp)
    elif kind == MITCHELL:
        _hrun_mitchell(dst, row, n, base, p0, sp)
    else:
        _hrun_bicubic(dst, row, n, base, p0, sp)


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _vrun_kind(kind: int, srow: NDArray[np.float32], tmp: NDArray[np.float32], ch: int, n: int,
               r0: int, c0: int, p0: np.float32, sp: np.float32) -> None:
    if kind == LANCZOS3:
        _vrun_lanczos3(srow, tmp, ch, n, r0, c0, p0, sp)
    elif kind == MITCHELL:
        _vrun_mitchell(srow, tmp, ch, n, r0, c0, p0, sp)
    else:
        _vrun_bicubic(srow, tmp, ch, n, r0, c0, p0, sp)


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _hedge_kind(kind: int, row: NDArray[np.float32], u: float) -> np.float32:
    if kind == LANCZOS3:
        return _hedge_lanczos3(row, u)
    if kind == MITCHELL:
        return _hedge_mitchell(row, u)
    return _hedge_bicubic(row, u)


@njit(cache=True, nogil=True, fastmath=False)
def _hpass(kind: int, tmp_row: NDArray[np.float32], row: NDArray[np.float32], x0: int,
           x1: int, alpha: float, cu: float) -> None:
    """``tmp_row[x - x0]`` = ``row`` resampled at ``U = alpha*x + cu``, x in [x0, x1)."""
    nt = N_TAPS[kind]
    first = FIRST_TAP[kind]
    nx_in = row.shape[0]
    sx = alpha - 1.0
    # Columns whose taps, and those of the run's extra lanes, are all inside (one
    # cell of margin against rounding in the analytic bounds); the rest take the
    # exact scalar path.
    a, b = _interval(alpha, cu + alpha * x0, -first + 1.0,
                     nx_in - nt - first - _LANES - 1e-9, x1 - x0)
    xs = x0 + a
    xe = x0 + b
    if xe <= xs:
        xs = x1
        xe = x1
    x = xs
    while x < xe:
        u = alpha * x + cu
        fu = math.floor(u)
        end = _cell_end(sx, cu, x, fu - x, xe)
        n = end - x
        _hrun_kind(kind, tmp_row[x - x0:], row, (n + _LANES - 1) // _LANES * _LANES,
             int(fu) + first, np.float32(u - fu - 0.5), np.float32(sx))
        x = end
    # After the runs: their extra lanes may have written past xe.
    for x in range(x0, xs):
        tmp_row[x - x0] = _hedge_kind(kind, row, alpha * x + cu)
    for x in range(xe, x1):
        tmp_row[x - x0] = _hedge_kind(kind, row, alpha * x + cu)



def _make_two_pass(kind: int) -> Any:
    """Build the parallel two-pass kernel of one kind (captures plain ints only)."""
    nt = N_TAPS[kind]
    first = FIRST_TAP[kind]

    @njit(cache=True, nogil=True, fastmath=False, parallel=True)
    def two_pass(src: NDArray[np.float32], inv: NDArray[np.float64], out: NDArray[np.float32],
                 foot: NDArray[np.bool_], tile_rows: int, tile_cols: int,
                 gains: NDArray[np.float32], offsets: NDArray[np.float32],
                 ceilings: NDArray[np.float32]) -> None:
        nc, ny_in = src.shape[0], src.shape[1]
        ny_out = out.shape[1]
        nx_out = out.shape[2]
        a, b, c = inv[0, 0], inv[0, 1], inv[0, 2]
        d, e, f = inv[1, 0], inv[1, 1], inv[1, 2]
        alpha = a - b * d / e
        beta = b / e
        gamma = c - b * f / e
        inv_d = 1.0 / d if d != 0.0 else 0.0
        ncols = min(tile_cols, nx_out)
        # Input rows one tile needs: the span of V over the tile, the taps, and one row of
        # margin on each side against rounding.
        max_rows = math.ceil(abs(e) * (tile_rows - 1) + abs(d) * (ncols - 1)) + nt + 4
        n_tx = (nx_out + tile_cols - 1) // tile_cols
        n_ty = (ny_out + tile_rows - 1) // tile_rows
        for ty in prange(n_ty):
            tmp = np.empty((nc, max_rows, ncols + _PAD), dtype=np.float32)
            srow = np.empty((nc, ncols + _PAD), dtype=np.float32)
            y0 = ty * tile_rows
            y1 = min(ny_out, y0 + tile_rows)
            for tx in range(n_tx):
                x0 = tx * tile_cols
                x1 = min(nx_out, x0 + tile_cols)
                v00 = d * x0 + e * y0 + f
                v01 = d * (x1 - 1) + e * y0 + f
                v10 = d * x0 + e * (y1 - 1) + f
                v11 = d * (x1 - 1) + e * (y1 - 1) + f
                vmin = min(min(v00, v01), min(v10, v11))
                vmax = max(max(v00, v01), max(v10, v11))
                # Clamp far-off tiles (their pixels are all outside anyway).
                vmin = min(max(vmin, -16.0), ny_in + 16.0)
                vmax = min(max(vmax, -16.0), ny_in + 16.0)
                r_lo = math.floor(vmin) + first - 1
                nrows = min(max_rows, math.floor(vmax) + first + nt + 1 - r_lo)
                for ch in range(nc):
                    plane = src[ch]
                    for k in range(nrows):
                        yy = r_lo + k
                        if yy < 0 or yy >= ny_in:
                            tmp[ch, k, :x1 - x0] = np.nan
                        else:
                            _hpass(kind, tmp[ch, k], plane[yy], x0, x1, alpha, beta * yy + gamma)
                for y in range(y0, y1):
                    cv = e * y + f
                    for ch in range(nc):
                        x = x0
                        while x < x1:
                            v = d * x + cv
                            fv = math.floor(v)
                            # End of the run of constant floor(V): where d*x + cv leaves
                            # [fv, fv + 1). A boundary off by one pixel (rounding) only
                            # moves a phase a hair outside [0, 1), which the weights'
                            # polynomial takes smoothly; the rows stay those of fv.
                            if d > 0.0:
                                t_end = (fv + 1.0 - cv) * inv_d
                                end = math.ceil(min(t_end, x1 + 0.0))
                            elif d < 0.0:
                                t_end = (fv - cv) * inv_d
                                end = math.floor(min(t_end, x1 + 0.0)) + 1
                            else:
                                end = x1
                            end = min(max(end, x + 1), x1)
                            r0 = fv + first - r_lo
                            if r0 < 0 or r0 + nt > nrows:  # V off the input: never valid
                                srow[ch, x - x0:end - x0] = np.nan
                            else:
                                _vrun_kind(kind, srow, tmp, ch, (end - x + _LANES - 1) // _LANES
                                     * _LANES, r0, x - x0, np.float32(v - fv - 0.5),
                                     np.float32(d))
                            x = end
                    _finish_row(out, foot, srow, y, x0, x1 - x0, gains, offsets, ceilings)

    return two_pass


@njit(cache=True, nogil=True, fastmath=False)
def _finish_row(out: NDArray[np.float32], foot: NDArray[np.bool_], srow: NDArray[np.float32],
                y: int, x0: int, n: int, gains: NDArray[np.float32],
                offsets: NDArray[np.float32], ceilings: NDArray[np.float32]) -> None:
    """Copy a row of raw sums out to ``out[:, y, x0:x0 + n]`` and ``foot[y, x0:x0 + n]``:
    0.0 and outside the footprint where any plane is not finite; with ``gains`` (shape
    (nc,), else shape (0,)) each sample in the footprint is mapped on the way
    (:class:`~livestack.pipeline.types.OutputMap`: ``v = s * gain``, ``v + offset``
    rounded apart, as ``fastmath=False`` keeps them; 0.0 if not finite; then at most the
    ceiling), which saves the normalisation's and the level clip's two passes over the
    frame. Whole arrays and offsets, not slices: a slice of a row of a 3-D array has no
    known layout, and its loops would not vectorise."""
    nc = srow.shape[0]
    mapped = gains.shape[0] > 0
    uy = uint64(y)
    ux = uint64(x0)
    if nc == 1:
        if mapped:
            g = gains[0]
            o = offsets[0]
            top = ceilings[0]
            for k in range(n):
                uk = uint64(k)
                val = srow[0, uk]
                ok = math.isfinite(val)
                v = val * g
                v = v + o
                v = v if math.isfinite(v) else _Z32
                v = top if v > top else v
                out[0, uy, ux + uk] = v if ok else _Z32
                foot[uy, ux + uk] = ok
            return
        for k in range(n):
            uk = uint64(k)
            val = srow[0, uk]
            ok = math.isfinite(val)
            out[0, uy, ux + uk] = val if ok else _Z32
            foot[uy, ux + uk] = ok
        return
    for k in range(n):
        uk = uint64(k)
        ok = True
        for ch in range(nc):
            ok = ok and math.isfinite(srow[ch, uk])
        foot[uy, ux + uk] = ok
    for ch in range(nc):
        uch = uint64(ch)
        g = gains[ch] if mapped else _Z32
        o = offsets[ch] if mapped else _Z32
        top = ceilings[ch] if mapped else _Z32
        for k in range(n):
            uk = uint64(k)
            v = srow[uch, uk]
            if mapped:
                v = v * g
                v = v + o
                v = v if math.isfinite(v) else _Z32
                v = top if v > top else v
            out[uch, uy, ux + uk] = v if foot[uy, ux + uk] else _Z32


#: Kind -> kernel; each compiles (or loads from numba's cache) on its first call.
_TWO_PASS = {BICUBIC: _make_two_pass(BICUBIC), LANCZOS3: _make_two_pass(LANCZOS3),
             MITCHELL: _make_two_pass(MITCHELL)}

#: Two-pass kinds.
TWO_PASS_KINDS = frozenset(_TWO_PASS)


def two_pass_suits(inv: NDArray[np.float64]) -> bool:
    """Whether the two-pass kernel applies to the inverse map ``inv`` (shape (2, 3)).

    It needs ``e`` well away from 0, ``alpha`` near 1 (one run of the horizontal pass
    advances one input column per output column) and a small shear: the sheared grid's
    interpolation error grows with the angle. Up to 2 degrees its pixel RMS error against
    the truth is within 0.1 % of the 2-D kernel's, at 5.5 degrees 1 % worse
    (``tests/pipeline/test_warp.py``), so it takes rotations up to about 5 degrees (every
    stack's frame-to-frame case) at scales 0.67-2; the 2-D kernel does the rest.
    """
    a, b = float(inv[0, 0]), float(inv[0, 1])
    d, e = float(inv[1, 0]), float(inv[1, 1])
    if not 0.5 < e < 1.5:
        return False
    alpha = a - b * d / e
    return 0.5 < alpha < 1.5 and abs(d) <= _MAX_SHEAR * e and abs(b) <= _MAX_SHEAR * abs(a)


def two_pass_pays(inv: NDArray[np.float64]) -> bool:
    """Whether the two-pass kernel suits ``inv`` and is faster than the 2-D kernel there.

    The 2-D kernel cuts each output row into runs of about 1 / sin(angle) pixels; below
    ~0.15 degrees they are long enough for it to match the two-pass kernel.
    """
    if not two_pass_suits(inv):
        return False
    return max(abs(float(inv[1, 0])), abs(float(inv[0, 1]))) >= _MIN_SHEAR * abs(float(inv[1, 1]))


def warp_two_pass_kernel(src: NDArray[np.float32], inv: NDArray[np.float64], kind: int,
                         out: NDArray[np.float32], foot: NDArray[np.bool_],
                         tile_rows: int = 128, tile_cols: int = 256,
                         post: OutputMap | None = None) -> None:
    """Affine resampling by two 1-D passes: ``out[c, y, x] ~ src[c](inv @ (x, y, 1))``.

    Parameters
    ----------
    src : ndarray, shape (nc, ny_in, nx_in), float32
        C-contiguous planes.
    inv : ndarray, shape (2, 3), float64
        Output (reference) pixel -> input pixel coordinates; must satisfy
        :func:`two_pass_suits`.
    kind : int
        ``BICUBIC``, ``LANCZOS3`` or ``MITCHELL``.
    out : ndarray, shape (nc, ny_out, nx_out), float32
        Written in place; 0.0 outside the footprint.
    foot : ndarray, shape (ny_out, nx_out), bool
        Written in place.
    tile_rows, tile_cols : int
        Output tile size (pixels); one parallel task per row of tiles.
    post : OutputMap, optional
        Applied to each sample as it is written (its gain, offset and ceiling; not its
        ``saturate``, which needs the clamp's mask).

    Raises
    ------
    ValueError
        A kind without a two-pass kernel, or a transform it does not suit.
    """
    if kind not in _TWO_PASS:
        raise ValueError(f"no two-pass kernel for kind {kind}")
    if not two_pass_suits(inv):
        raise ValueError("transform outside the two-pass kernel's range")
    if post is None:
        gains = offsets = ceilings = np.zeros(0, dtype=np.float32)
    else:
        gains, offsets, ceilings = post.arrays(src.shape[0])
    _TWO_PASS[kind](src, inv, out, foot, int(tile_rows), int(tile_cols), gains, offsets,
                    ceilings)


"""numba kernels behind :mod:`livestack.pipeline.warp` (binning for detection and phase
correlation lives in :mod:`.kernels_binning`).

The warp kernels work on ``(nc, ny, nx)`` float32 stacks of planes (mono is ``nc == 1``):
every plane gets the same geometry and the planes share one footprint.

Interpolation kernels (``kind`` codes)
--------------------------------------
0 nearest, 1 bilinear, 2 bicubic (Keys, a = -0.5), 3 lanczos3 (normalised to unit sum),
4 mitchell (Mitchell-Netravali, B = C = 1/3).

Tap rule: a tap whose weight is exactly 0.0 is ignored, so an integer source
coordinate needs only its own pixel (an identity warp copies the input, edge pixels
included; Mitchell excepted, see below). Every other tap must be inside the input and
finite, otherwise the output pixel leaves the footprint and is set to 0.0.

Mitchell-Netravali is the one kernel here that does not interpolate: at an integer
position its weights are (1/18, 8/9, 1/18, 0), so even an identity or integer shift
smooths by them and needs the pixel's two neighbours. That is deliberate: its blur is the
same at every sub-pixel phase (a second moment of exactly 1/9 px^2), so every frame of a
stack, the reference included, gets the same PSF, and its noise gain (mean sum of
squared weights 0.681 in 1-D, against bilinear's 0.667 and Lanczos3's 0.893) buys star
SNR at two thirds of bilinear's added blur (``bench/bench_demosaic_siril.py``).

Coordinates are float64 throughout (no fixed-point quantisation); weights and sums are
float32. The hot loops use ``fastmath={"contract"}`` and nothing else: it only lets LLVM
fuse multiply-adds (one rounding instead of two); there is no reassociation and no
NaN/inf assumption, so non-finite inputs are still detected exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange, uint64
from numpy.typing import NDArray

NEAREST = 0
BILINEAR = 1
BICUBIC = 2
LANCZOS3 = 3
MITCHELL = 4

#: Number of taps per axis for each kernel code.
N_TAPS = (1, 2, 4, 6, 4)

_KEYS_A = -0.5
_PI = math.pi


def _fit_lanczos3(degree: int = 5) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Even/odd polynomial fit of the normalised Lanczos3 weights.

    With ``p = frac - 0.5`` and ``z = p**2``, tap ``k`` (k = 0..5, at offset k - 2) has
    ``w_k = E_k(z) + p O_k(z)`` and by mirror symmetry ``w_{5-k} = E_k(z) - p O_k(z)``.
    Degree 5 in ``z`` reproduces the exact weights to 7e-9 (checked in the tests);
    degree 4 (the two-pass kernel's, five multiply-adds fewer per pixel and pass) to
    1.5e-7, about one float32 rounding of the central weights.
    """
    # Chebyshev nodes on (-0.5, 0.5), endpoints and 0 excluded (removable 0/0 there).
    p = 0.5 * np.cos(np.linspace(0.0, np.pi, 802)[1:-1])
    p = p[np.abs(p) > 1e-9]
    taps = np.arange(-2, 4)
    d = (p + 0.5)[:, None] - taps[None, :]
    w = 3.0 * np.sin(np.pi * d) * np.sin(np.pi * d / 3.0) / (np.pi * np.pi * d * d)
    w /= w.sum(axis=1, keepdims=True)
    z = p * p
    e = np.empty((3, degree + 1))
    o = np.empty((3, degree + 1))
    for k in range(3):
        e[k] = np.polynomial.polynomial.polyfit(z, 0.5 * (w[:, k] + w[:, 5 - k]), degree)
        o[k] = np.polynomial.polynomial.polyfit(z, 0.5 * (w[:, k] - w[:, 5 - k]) / p, degree)
    return e, o


_LANCZOS_E, _LANCZOS_O = _fit_lanczos3()
# float32 coefficient tuples (numba freezes global tuples into constants)
_LZ_E0 = tuple(np.float32(c) for c in _LANCZOS_E[0])
_LZ_E1 = tuple(np.float32(c) for c in _LANCZOS_E[1])
_LZ_O0 = tuple(np.float32(c) for c in _LANCZOS_O[0])
_LZ_O1 = tuple(np.float32(c) for c in _LANCZOS_O[1])
_LZ_O2 = tuple(np.float32(c) for c in _LANCZOS_O[2])
_LANCZOS4_E, _LANCZOS4_O = _fit_lanczos3(4)
_L4_E0 = tuple(np.float32(c) for c in _LANCZOS4_E[0])
_L4_E1 = tuple(np.float32(c) for c in _LANCZOS4_E[1])
_L4_O0 = tuple(np.float32(c) for c in _LANCZOS4_O[0])
_L4_O1 = tuple(np.float32(c) for c in _LANCZOS4_O[1])
_L4_O2 = tuple(np.float32(c) for c in _LANCZOS4_O[2])


@njit(cache=True, nogil=True, fastmath=False)
def kernel_weights(kind: int, frac: float, w: NDArray[np.float64]) -> int:
    """Exact (closed-form) 1-D weights of one fractional position; return the first tap offset.

    Reference implementation used by the tests to check :func:`row_weights`. The taps sit
    at ``floor(coord) + offset + k`` for ``k in range(N_TAPS[kind])``;
    ``frac = coord - floor(coord)`` in ``[0, 1)``. ``w`` must hold at least 6 values.
    For ``kind == NEAREST`` the offset is 0 or 1 (round half up).
    """
    if kind == NEAREST:
        w[0] = 1.0
        return 1 if frac >= 0.5 else 0
    if kind == BILINEAR:
        w[0] = 1.0 - frac
        w[1] = frac
        return 0
    if kind == MITCHELL:
        for k in range(4):
            d = abs(frac - (k - 1))
            if d < 1.0:
                w[k] = (21.0 * d * d * d - 36.0 * d * d + 16.0) / 18.0
            elif d < 2.0:
                w[k] = (2.0 - d) * (2.0 - d) * (8.0 - 7.0 * d) / 18.0
            else:
                w[k] = 0.0
        return -1
    if kind == BICUBIC:
        a = _KEYS_A
        for k in range(4):
            d = abs(frac - (k - 1))
            if d <= 1.0:
                w[k] = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
            elif d < 2.0:
                w[k] = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
            else:
                w[k] = 0.0
        return -1
    # Lanczos3: L(d) = 3 sin(pi d) sin(pi d / 3) / (pi d)^2 for |d| < 3.
    if frac == 0.0:
        for k in range(6):
            w[k] = 0.0
        w[2] = 1.0
        return -2
    total = 0.0
    for k in range(6):
        d = frac - (k - 2)
        val = 3.0 * math.sin(_PI * d) * math.sin(_PI * d / 3.0) / (_PI * _PI * d * d)
        w[k] = val
        total += val
    for k in range(6):
        w[k] /= total
    return -2


# ----------------------------------------------------------------------------- weights
# Each function maps a fractional position (float64, [0, 1]) to six float32 weights (the
# unused trailing ones are 0). They are inlined into the kernels so LLVM can vectorise
# the per-pixel weight computation.

_Z32 = np.float32(0.0)
_ONE32 = np.float32(1.0)
# Mitchell-Netravali's coefficients over 18: inner d^3 and d^0, outer (8 - 7 d) / 18.
_M_IN3 = 21.0 / 18.0
_M_IN0 = 16.0 / 18.0
_M_OUT0 = 1.0 / 18.0
_M_OUT1 = 7.0 / 18.0


@njit(cache=True, nogil=True, fastmath={"contract"}, inline="always")
def _w_nearest(f: float) -> tuple[np.float32, ...]:
    return (_ONE32, _Z32, _Z32, _Z32, _Z32, _Z32)


@njit(cache=True, nogil=True, fastmath={"contract"}, inline="always")
def _w_bilinear(f: float) -> tuple[np.float32, ...]:
    g = np.float32(f)
    return (_ONE32 - g, g, _Z32, _Z32, _Z32, _Z32)


@njit(cache=True, nogil=True, fastmath={"contract"}, inline="always")
def _w_bicubic(f: float) -> tuple[np.float32, ...]:
    a = _KEYS_A
    d0 = f + 1.0
    d2 = 1.0 - f
    d3 = 2.0 - f
    w0 = ((a * d0 - 5.0 * a) * d0 + 8.0 * a) * d0 - 4.0 * a
    w1 = ((a + 2.0) * f - (a + 3.0)) * f * f + 1.0
    w2 = ((a + 2.0) * d2 - (a + 3.0)) * d2 * d2 + 1.0
    w3 = ((a * d3 - 5.0 * a) * d3 + 8.0 * a) * d3 - 4.0 * a
    return (np.float32(w0), np.float32(w1), np.float32(w2), np.float32(w3), _Z32, _Z32)


@njit(cache=True, nogil=True, fastmath={"contract"}, inline="always")
def _w_mitchell(f: float) -> tuple[np.float32, ...]:
    # Mitchell-Netravali (B = C = 1/3) at distances 1 + f, f, 1 - f, 2 - f: the inner
    # piece (21 d^3 - 36 d^2 + 16) / 18, the outer one factored as (2 - d)^2 (8 - 7 d) / 18
    # so that the tap at distance 2 (f = 0) is exactly 0.0 and is ignored by the tap rule.
    # Eleven multiply-adds (bicubic's Keys form takes about fifteen).
    g = 1.0 - f
    ff = f * f
    gg = g * g
    w0 = gg * (_M_OUT0 - _M_OUT1 * f)
    w1 = (_M_IN3 * f - 2.0) * ff + _M_IN0
    w2 = (_M_IN3 * g - 2.0) * gg + _M_IN0
    w3 = ff * (_M_OUT1 * f - 1.0 / 3.0)
    return (np.float32(w0), np.float32(w1), np.float32(w2), np.float32(w3), _Z32, _Z32)


@njit(cache=True, nogil=True, fastmath={"contract"}, inline="always")
def _lanczos3_p(p: np.float32) -> tuple[np.float32, ...]:
    """Lanczos3 weights at ``p = frac - 0.5`` (float32): the even/odd polynomial fit."""
    z = p * p
    a0 = ((((_LZ_E0[5] * z + _LZ_E0[4]) * z + _LZ_E0[3]) * z + _LZ_E0[2]) * z
          + _LZ_E0[1]) * z + _LZ_E0[0]
    a1 = ((((_LZ_E1[5] * z + _LZ_E1[4]) * z + _LZ_E1[3]) * z + _LZ_E1[2]) * z
          + _LZ_E1[1]) * z + _LZ_E1[0]
    b0 = p * (((((_LZ_O0[5] * z + _LZ_O0[4]) * z + _LZ_O0[3]) * z + _LZ_O0[2]) * z
               + _LZ_O0[1]) * z + _LZ_O0[0])
    b1 = p * (((((_LZ_O1[5] * z + _LZ_O1[4]) * z + _LZ_O1[3]) * z + _LZ_O1[2]) * z
               + _LZ_O1[1]) * z + _LZ_O1[0])
    b2 = p * (((((_LZ_O2[5] * z + _LZ_O2[4]) * z + _LZ_O2[3]) * z + _LZ_O2[2]) * z
               + _LZ_O2[1]) * z + _LZ_O2[0])
    a2 = np.float32(0.5) - a0 - a1  # exact unit sum
    return (a0 + b0, a1 + b1, a2 + b2, a2 - b2, a1 - b1, a0 - b0)


@njit(cache=True, nogil=True, fastmath={"contract"}, inline="always")
def lanczos3_p4(p: np.float32) -> tuple[np.float32, ...]:
    """Lanczos3 weights at ``p = frac - 0.5`` (float32) from the degree-4 fit (error
    1.5e-7; :func:`_lanczos3_p`'s degree 5 is 7e-9): the two-pass kernel's per-pixel
    weights, where the five multiply-adds fewer are ~10 % of its time. The unit sum stays
    exact (``a2``), so a flat field stays flat."""
    z = p * p
    a0 = (((_L4_E0[4] * z + _L4_E0[3]) * z + _L4_E0[2]) * z + _L4_E0[1]) * z + _L4_E0[0]
    a1 = (((_L4_E1[4] * z + _L4_E1[3]) * z + _L4_E1[2]) * z + _L4_E1[1]) * z + _L4_E1[0]
    b0 = p * ((((_L4_O0[4] * z + _L4_O0[3]) * z + _L4_O0[2]) * z + _L4_O0[1]) * z
              + _L4_O0[0])
    b1 = p * ((((_L4_O1[4] * z + _L4_O1[3]) * z + _L4_O1[2]) * z + _L4_O1[1]) * z
              + _L4_O1[0])
    b2 = p * ((((_L4_O2[4] * z + _L4_O2[3]) * z + _L4_O2[2]) * z + _L4_O2[1]) * z
              + _L4_O2[0])
    a2 = np.float32(0.5) - a0 - a1  # exact unit sum
    return (a0 + b0, a1 + b1, a2 + b2, a2 - b2, a1 - b1, a0 - b0)


@njit(cache=True, nogil=True, fastmath={"contract"}, inline="always")
def _w_lanczos3(f: float) -> tuple[np.float32, ...]:
    if f == 0.0:  # integer position: the exact delta (zero taps are then ignored)
        return (_Z32, _Z32, _ONE32, _Z32, _Z32, _Z32)
    return _lanczos3_p(np.float32(f - 0.5))


@njit(cache=True, nogil=True, fastmath={"contract"}, inline="always")
def _weights(kind: int, f: float) -> tuple[np.float32, ...]:
    """The weights of ``kind`` (a compile-time constant in the callers, so LLVM keeps
    only one branch)."""
    if kind == LANCZOS3:
        return _w_lanczos3(f)
    if kind == MITCHELL:
        return _w_mitchell(f)
    if kind == BICUBIC:
        return _w_bicubic(f)
    if kind == BILINEAR:
        return _w_bilinear(f)
    return _w_nearest(f)


#: Offset of the first tap from floor(coordinate) (nearest: from floor(coordinate + 0.5)).
FIRST_TAP = (0, 0, -1, -2, -1)


@njit(cache=True, nogil=True, fastmath=False)
def row_weights(kind: int, frac: NDArray[np.float64], w: NDArray[np.float32],
                n: int) -> None:
    """Weights ``w[k, x]`` of fractional positions ``frac[x]`` (x < n), as the kernels use them.

    Bilinear, bicubic and Mitchell are their exact polynomials; Lanczos3 is the even/odd polynomial
    fit of the normalised kernel (max error 7e-9, below float32 resolution) with
    ``frac == 0`` giving the exact delta.
    """
    for x in range(n):
        t = _weights(kind, frac[x])
        for k in range(6):
            w[k, x] = t[k]


# ----------------------------------------------------------------------------- affine


def _make_affine_row(kind: int) -> Any:
    """Build the per-row kernel of one interpolation kind (tap count fixed at compile time).

    Inside a *run* of output pixels the source cell advances by a constant integer
    ``step`` per pixel (+1 for small rotations, -1 near 180 deg, 0 near +-90 deg) and the
    source row of the first tap is fixed, so the fractional positions are linear in the
    pixel index and every load has a known stride: LLVM vectorises the loop over pixels,
    with the weights computed per pixel. Indices are unsigned so numba emits no
    negative-index wraparound (which would block vectorisation); the row driver guarantees
    they are inside the input.
    """
    # Only plain ints are captured: numba keys its on-disk cache of a closure on the
    # pickled captured values, and a captured dispatcher pickles differently per process.
    nt = N_TAPS[kind]
    first = FIRST_TAP[kind]

    @njit(cache=True, nogil=True, fastmath={"contract"})
    def run(orow: NDArray[np.float32], frow: NDArray[np.bool_], plane: NDArray[np.float32],
            n: int, r0: int, c0: int, step: int, fx0: float, sx: float, fy0: float,
            sy: float, first_plane: bool) -> None:
        # orow[k] = sum_j wy_j sum_i wx_i plane[r0 + j, c0 + step*k + i] with
        # wx = w(fx0 + sx*k), wy = w(fy0 + sy*k); NaN/inf results leave the footprint.
        ur = uint64(r0)
        uc = uint64(c0)
        if step == 1:
            for k in range(n):
                uk = uint64(k)
                wx = _weights(kind, fx0 + sx * k)
                wy = _weights(kind, fy0 + sy * k)
                acc = _Z32
                for j in range(nt):
                    part = _Z32
                    for i in range(nt):
                        part += wx[i] * plane[ur + uint64(j), uc + uk + uint64(i)]
                    acc += wy[j] * part
                ok = math.isfinite(acc)
                orow[uk] = acc if ok else _Z32
                frow[uk] = ok if first_plane else (ok and frow[uk])
        elif step == -1:
            for k in range(n):
                uk = uint64(k)
                wx = _weights(kind, fx0 + sx * k)
                wy = _weights(kind, fy0 + sy * k)
                acc = _Z32
                for j in range(nt):
                    part = _Z32
                    for i in range(nt):
                        part += wx[i] * plane[ur + uint64(j), uc + uint64(i) - uk]
                    acc += wy[j] * part
                ok = math.isfinite(acc)
                orow[uk] = acc if ok else _Z32
                frow[uk] = ok if first_plane else (ok and frow[uk])
        else:
            for k in range(n):
                uk = uint64(k)
                col = uint64(c0 + step * k)
                wx = _weights(kind, fx0 + sx * k)
                wy = _weights(kind, fy0 + sy * k)
                acc = _Z32
                for j in range(nt):
                    part = _Z32
                    for i in range(nt):
                        part += wx[i] * plane[ur + uint64(j), col + uint64(i)]
                    acc += wy[j] * part
                ok = math.isfinite(acc)
                orow[uk] = acc if ok else _Z32
                frow[uk] = ok if first_plane else (ok and frow[uk])

    @njit(cache=True, nogil=True, fastmath={"contract"})
    def edge(out: NDArray[np.float32], foot: NDArray[np.bool_], src: NDArray[np.float32],
             y: int, x: int, u: float, v: float) -> None:
        # One pixel near or beyond the input's edge: exact cell, zero-weight taps ignored.
        # (u, v) are cell coordinates: the source position, + 0.5 for nearest.
        nc, ny_in, nx_in = src.shape
        ok = u > -8.0 and u < nx_in + 8.0 and v > -8.0 and v < ny_in + 8.0
        if ok:
            fu = math.floor(u)
            fv = math.floor(v)
            wx = _weights(kind, u - fu)
            wy = _weights(kind, v - fv)
            iu = int(fu) + first
            iv = int(fv) + first
            for j in range(nt):
                if wy[j] != 0.0 and (iv + j < 0 or iv + j >= ny_in):
                    ok = False
            for i in range(nt):
                if wx[i] != 0.0 and (iu + i < 0 or iu + i >= nx_in):
                    ok = False
        if ok:
            for c in range(nc):
                acc = _Z32
                for j in range(nt):
                    if wy[j] == 0.0:
                        continue
                    part = _Z32
                    for i in range(nt):
                        if wx[i] != 0.0:
                            part += wx[i] * src[c, iv + j, iu + i]
                    acc += wy[j] * part
                out[c, y, x] = acc
                if not math.isfinite(acc):
                    ok = False
        foot[y, x] = ok
        if not ok:
            for c in range(nc):
                out[c, y, x] = _Z32

    return run, edge


_run_nearest, _edge_nearest = _make_affine_row(NEAREST)
_run_bilinear, _edge_bilinear = _make_affine_row(BILINEAR)
_run_bicubic, _edge_bicubic = _make_affine_row(BICUBIC)
_run_lanczos3, _edge_lanczos3 = _make_affine_row(LANCZOS3)
_run_mitchell, _edge_mitchell = _make_affine_row(MITCHELL)


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _run_kind(kind: int, orow: NDArray[np.float32], frow: NDArray[np.bool_],
              plane: NDArray[np.float32], n: int, r0: int, c0: int, step: int, fx0: float,
              sx: float, fy0: float, sy: float, first_plane: bool) -> None:
    if kind == LANCZOS3:
        _run_lanczos3(orow, frow, plane, n, r0, c0, step, fx0, sx, fy0, sy, first_plane)
    elif kind == MITCHELL:
        _run_mitchell(orow, frow, plane, n, r0, c0, step, fx0, sx, fy0, sy, first_plane)
    elif kind == BICUBIC:
        _run_bicubic(orow, frow, plane, n, r0, c0, step, fx0, sx, fy0, sy, first_plane)
    elif kind == BILINEAR:
        _run_bilinear(orow, frow, plane, n, r0, c0, step, fx0, sx, fy0, sy, first_plane)
    else:
        _run_nearest(orow, frow, plane, n, r0, c0, step, fx0, sx, fy0, sy, first_plane)


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _edge_kind(kind: int, out: NDArray[np.float32], foot: NDArray[np.bool_],
               src: NDArray[np.float32], y: int, x: int, u: float, v: float) -> None:
    if kind == LANCZOS3:
        _edge_lanczos3(out, foot, src, y, x, u, v)
    elif kind == MITCHELL:
        _edge_mitchell(out, foot, src, y, x, u, v)
    elif kind == BICUBIC:
        _edge_bicubic(out, foot, src, y, x, u, v)
    elif kind == BILINEAR:
        _edge_bilinear(out, foot, src, y, x, u, v)
    else:
        _edge_nearest(out, foot, src, y, x, u, v)


@njit(cache=True, nogil=True, fastmath=False)
def _interval(slope: float, offset: float, lo: float, hi: float, n: int) -> tuple[int, int]:
    """Integers ``x`` in ``[0, n)`` with ``lo <= slope*x + offset <= hi``, as ``[a, b)``.

    An empty range (``lo > hi``: an input narrower than the kernel's safe interior) gives
    ``(0, 0)``; the swap below is for a negative slope only, and would otherwise turn it
    into a non-empty interval of out-of-bounds taps.
    """
    if lo > hi:
        return 0, 0
    if slope == 0.0:
        return (0, n) if lo <= offset <= hi else (0, 0)
    x1 = (lo - offset) / slope
    x2 = (hi - offset) / slope
    if x1 > x2:
        x1, x2 = x2, x1
    # Clamp before the int conversions (a tiny slope gives huge bounds).
    x1 = min(max(x1, -1.0), n + 1.0)
    x2 = min(max(x2, -1.0), n + 1.0)
    a = max(0.0, math.ceil(x1))
    b = min(float(n), math.floor(x2) + 1.0)
    if b <= a:
        return 0, 0
    return int(a), int(b)


@njit(cache=True, nogil=True, fastmath=False)
def _cell_end(slope: float, offset: float, x: int, cell: float, limit: int) -> int:
    """First integer ``x' > x`` with ``floor(slope*x' + offset) != cell``, at most ``limit``."""
    if slope > 0.0:
        t = (cell + 1.0 - offset) / slope  # first x' with slope*x' + offset >= cell + 1
        up = True
    elif slope < 0.0:
        t = (cell - offset) / slope  # slope*x' + offset < cell for x' > t
        up = False
    else:
        return limit
    # Clamp before the int conversion (tiny slopes give huge t).
    t = min(max(t, float(x)), float(limit))
    end = math.ceil(t) if up else math.floor(t) + 1
    return min(max(end, x + 1), limit)


def _make_affine(kind: int) -> Any:
    """Build the parallel affine kernel of one interpolation kind (see warp_affine_kernel).

    One compiled kernel per kind, so a process only compiles the kind it uses.
    """
    nt = N_TAPS[kind]
    first = FIRST_TAP[kind]
    half = 0.5 if kind == NEAREST else 0.0  # nearest: cell = floor(u + 0.5)

    @njit(cache=True, nogil=True, fastmath=False, parallel=True)
    def affine(src: NDArray[np.float32], inv: NDArray[np.float64], out: NDArray[np.float32],
               foot: NDArray[np.bool_]) -> None:
        nc, ny_in, nx_in = src.shape
        ny_out = out.shape[1]
        nx_out = out.shape[2]
        m00, m01, m02 = inv[0, 0], inv[0, 1], inv[0, 2] + half
        m10, m11, m12 = inv[1, 0], inv[1, 1], inv[1, 2] + half
        step = 1 if m00 > 0.5 else (-1 if m00 < -0.5 else 0)
        sx = m00 - step
        # Cell range whose taps are all inside, shrunk by one cell on each side for safety
        # against rounding in the analytic run boundaries.
        u_lo = -first + 1.0
        u_hi = nx_in - nt - first - 1.0
        v_lo = -first + 1.0
        v_hi = ny_in - nt - first - 1.0
        block = 8
        nblocks = (ny_out + block - 1) // block
        for b in prange(nblocks):
            for y in range(b * block, min(ny_out, (b + 1) * block)):
                cu = m01 * y + m02
                cv = m11 * y + m12
                a_u, b_u = _interval(m00, cu, u_lo, u_hi + 1.0 - 1e-9, nx_out)
                a_v, b_v = _interval(m10, cv, v_lo, v_hi + 1.0 - 1e-9, nx_out)
                xs = max(a_u, a_v)
                xe = min(b_u, b_v)
                if xe <= xs:
                    xs = nx_out
                    xe = nx_out
                for x in range(xs):
                    _edge_kind(kind, out, foot, src, y, x, m00 * x + cu, m10 * x + cv)
                for x in range(xe, nx_out):
                    _edge_kind(kind, out, foot, src, y, x, m00 * x + cu, m10 * x + cv)
                x = xs
                while x < xe:
                    u = m00 * x + cu
                    v = m10 * x + cv
                    fu = math.floor(u)
                    fv = math.floor(v)
                    end = _cell_end(m10, cv, x, fv, xe)
                    end = min(end, _cell_end(sx, cu, x, fu - step * x, xe))
                    for c in range(nc):
                        _run_kind(kind, out[c, y, x:end], foot[y, x:end], src[c], end - x,
                                  int(fv) + first, int(fu) + first, step, u - fu, sx, v - fv,
                                  m10, c == 0)
                    x = end
                if nc > 1:  # a pixel invalid in any plane is 0.0 in all of them
                    for x in range(xs, xe):
                        if not foot[y, x]:
                            for c in range(nc):
                                out[c, y, x] = _Z32

    return affine


#: One parallel kernel per kind; creating them is cheap, each compiles on its first call.
_AFFINE = tuple(_make_affine(k) for k in (NEAREST, BILINEAR, BICUBIC, LANCZOS3, MITCHELL))


def warp_affine_kernel(src: NDArray[np.float32], inv: NDArray[np.float64], kind: int,
                       out: NDArray[np.float32], foot: NDArray[np.bool_]) -> None:
    """General affine resampling: ``out[c, y, x] = src[c](inv @ (x, y, 1))``.

    For each output row, the pixels whose whole kernel is inside the input (with a 1 px
    safety margin) are cut analytically into runs of constant source row and constant
    column step, each summed by the vectorised run kernel; the few pixels near the
    input's edge take the exact scalar path, which ignores zero-weight taps. Each kind
    has its own compiled kernel (compiled, or loaded from numba's cache, on first use).

    Parameters
    ----------
    src : ndarray, shape (nc, ny_in, nx_in), float32
    inv : ndarray, shape (2, 3), float64
        Output (reference) pixel -> input pixel coordinates.
    kind : int
        Kernel code (see module docstring).
    out : ndarray, shape (nc, ny_out, nx_out), float32
        Written in place; 0.0 outside the footprint.
    foot : ndarray, shape (ny_out, nx_out), bool
        Written in place.
    """
    _AFFINE[kind](src, inv, out, foot)


def _make_shift_passes(nt: int) -> tuple[Any, Any]:
    """Build the horizontal and vertical 1-D passes of the translation path for ``nt`` taps."""

    @njit(cache=True, nogil=True, fastmath={"contract"})
    def hpass(dst: NDArray[np.float32], row: NDArray[np.float32], w: NDArray[np.float32],
              x_lo: int, x_hi: int, off: int) -> None:
        # dst[x] = sum_i w[i] * row[x + off + i] for x in [x_lo, x_hi); the caller
        # guarantees x_lo + off >= 0 and x_hi - 1 + off + nt <= len(row).
        base = uint64(x_lo + off)
        ulo = uint64(x_lo)
        for k in range(x_hi - x_lo):
            uk = uint64(k)
            acc = np.float32(0.0)
            for i in range(nt):
                acc += w[i] * row[base + uk + uint64(i)]
            dst[ulo + uk] = acc

    @njit(cache=True, nogil=True, fastmath={"contract"})
    def vpass(dst: NDArray[np.float32], frow: NDArray[np.bool_], tmp: NDArray[np.float32],
              k0: int, w: NDArray[np.float32], first_plane: bool) -> None:
        # dst[x] = sum_j w[j] * tmp[k0 + j, x]; non-finite -> 0.0 and out of the footprint
        uk0 = uint64(k0)
        for x in range(dst.shape[0]):
            ux = uint64(x)
            acc = _Z32
            for j in range(nt):
                acc += w[j] * tmp[uk0 + uint64(j), ux]
            ok = math.isfinite(acc)
            dst[ux] = acc if ok else _Z32
            frow[ux] = ok if first_plane else (ok and frow[ux])

    return hpass, vpass


_hpass1, _vpass1 = _make_shift_passes(1)
_hpass2, _vpass2 = _make_shift_passes(2)
_hpass3, _vpass3 = _make_shift_passes(3)  # Mitchell at an integer offset
_hpass4, _vpass4 = _make_shift_passes(4)
_hpass6, _vpass6 = _make_shift_passes(6)


@njit(cache=True, nogil=True, fastmath=False)
def _hpass(dst: NDArray[np.float32], row: NDArray[np.float32], w: NDArray[np.float32],
           x_lo: int, x_hi: int, off: int) -> None:
    """Dispatch the horizontal pass on the tap count."""
    nt = w.shape[0]
    if nt == 6:
        _hpass6(dst, row, w, x_lo, x_hi, off)
    elif nt == 4:
        _hpass4(dst, row, w, x_lo, x_hi, off)
    elif nt == 3:
        _hpass3(dst, row, w, x_lo, x_hi, off)
    elif nt == 2:
        _hpass2(dst, row, w, x_lo, x_hi, off)
    else:
        _hpass1(dst, row, w, x_lo, x_hi, off)


@njit(cache=True, nogil=True, fastmath=False)
def _vpass(dst: NDArray[np.float32], frow: NDArray[np.bool_], tmp: NDArray[np.float32],
           k0: int, w: NDArray[np.float32], first_plane: bool) -> None:
    """Dispatch the vertical pass on the tap count."""
    nt = w.shape[0]
    if nt == 6:
        _vpass6(dst, frow, tmp, k0, w, first_plane)
    elif nt == 4:
        _vpass4(dst, frow, tmp, k0, w, first_plane)
    elif nt == 3:
        _vpass3(dst, frow, tmp, k0, w, first_plane)
    elif nt == 2:
        _vpass2(dst, frow, tmp, k0, w, first_plane)
    else:
        _vpass1(dst, frow, tmp, k0, w, first_plane)


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def warp_shift_kernel(src: NDArray[np.float32], ix0: int, wx: NDArray[np.float32], iy0: int,
                      wy: NDArray[np.float32], out: NDArray[np.float32],
                      foot: NDArray[np.bool_], block_rows: int) -> None:
    """Pure-translation resampling by two separable 1-D passes.

    ``out[c, y, x] = sum_j wy[j] sum_i wx[i] src[c, y + iy0 + j, x + ix0 + i]``. Every tap
    must be inside and finite (callers drop zero-weight taps: an integer offset is a
    single tap of weight 1). Output rows are processed in blocks of ``block_rows`` so the
    horizontal pass's scratch rows stay in cache.

    Parameters
    ----------
    src : ndarray, shape (nc, ny_in, nx_in), float32
    ix0, iy0 : int
        Input offset of the first tap for output pixel (0, 0).
    wx, wy : ndarray, float32, 1, 2, 3, 4 or 6 taps
        1-D weights (the same for every output pixel of a pure translation).
    out : ndarray, shape (nc, ny_out, nx_out), float32
    foot : ndarray, shape (ny_out, nx_out), bool
    block_rows : int
    """
    nc, ny_in, nx_in = src.shape
    ny_out = out.shape[1]
    nx_out = out.shape[2]
    ntx = wx.shape[0]
    nty = wy.shape[0]
    # Output columns whose horizontal taps are all inside.
    x_lo = min(nx_out, max(0, -ix0))
    x_hi = max(x_lo, min(nx_out, nx_in - ix0 - ntx + 1))
    nblocks = (ny_out + block_rows - 1) // block_rows
    for b in prange(nblocks):
        y_start = b * block_rows
        y_stop = min(ny_out, y_start + block_rows)
        nrows = y_stop - y_start + nty - 1
        tmp = np.empty((nrows, nx_out), dtype=np.float32)
        for c in range(nc):
            # Horizontal pass; NaN marks "outside" and propagates through the sums.
            for k in range(nrows):
                r = y_start + iy0 + k
                if r < 0 or r >= ny_in:
                    tmp[k, :] = np.nan
                    continue
                tmp[k, :x_lo] = np.nan
                tmp[k, x_hi:] = np.nan
                _hpass(tmp[k], src[c, r], wx, x_lo, x_hi, ix0)
            for y in range(y_start, y_stop):
                _vpass(out[c, y], foot[y], tmp, y - y_start, wy, c == 0)
        if nc > 1:  # a pixel invalid in any plane is 0.0 in all of them
            for y in range(y_start, y_stop):
                for x in range(nx_out):
                    if not foot[y, x]:
                        for c in range(nc):
                            out[c, y, x] = _Z32





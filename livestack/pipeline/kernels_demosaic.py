"""Numba kernels for resolution-keeping demosaicing: RCD and Malvar-He-Cutler.

Both leave a thin border of ``BORDER`` pixels with the bilinear result
(:func:`debayer_bilinear`, below, which handles the edge by averaging only in-bounds
samples): :func:`malvar` overwrites every pixel further in of an ``out`` that the caller
has filled with bilinear, and :func:`rcd` writes every pixel itself. Native colours are
never changed.

Conventions as in ``kernels_calibrate``: images ``[y, x]``, C-contiguous; colour codes
0 = R, 1 = G, 2 = B in a ``(2, 2)`` int8 map indexed ``[y & 1, x & 1]``. Rows (or row
bands) run in parallel (``prange``).

RCD (Ratio Corrected Demosaicing, L. Sanz Rodriguez, 2017), written from its published
description:

1. Vertical/horizontal discrimination ``VH = V / (V + H)`` at every pixel, where V (H)
   is the sum over the pixel and its two vertical (horizontal) neighbours of the square
   of a 7-tap high-pass filter ``[1, -3, -1, 6, -1, -3, 1]`` run along that axis on the
   raw mosaic. Strong vertical detail (V large) pushes the interpolation horizontal.
2. A 3x3 ``[1 2 1; 2 4 2; 1 2 1] / 4`` low-pass of the mosaic at the R and B sites: a
   local luminance with R, G and B in the CFA's 1:2:1 proportions.
3. Green at R/B sites: each of the four green neighbours is scaled by the ratio of the
   low-pass at the centre to the low-pass two pixels away on that side (the "ratio
   correction": colour ratios vary slowly), the N/S and W/E estimates are each blended
   with inverse-gradient weights, and the two axes are blended with VH (or with the mean
   VH of the diagonal neighbours when that is more decisive).
4. R at B and B at R: green plus the colour difference along the two diagonals, blended
   like step 3 with a diagonal discrimination ``PQ`` built from the same high-pass on
   the diagonals. By default (``green_diagonals``) PQ sums that high-pass at the site's
   four green neighbours, whose diagonals hold green pixels only, rather than (as
   published) at the site and its diagonal neighbours, whose diagonals alternate R and
   B: the colour difference and noise of those no longer steer the direction on flat
   sky (R at B sites scatter 5 % less on a noisy flat, stars keep their width).
   R and B at G sites: green plus the colour difference of the cardinal
   neighbours (native on one axis, step-4 values on the other), blended with VH.

All the arithmetic is in float64 and works on the ADU values as they are (the
algorithm is scale-free: its small regularisers ``eps`` are scaled by the frame's
typical level). The low-pass in the ratio is floored at zero so that a calibrated
background near zero cannot make the ratio blow up: it then stays within [0, 2].
:func:`rcd` runs the four steps in one sweep over row bands (its docstring says how);
``tests/oracles_demosaic.py`` keeps the four-pass version it replaced as its oracle.

Malvar-He-Cutler (2004) is the linear "gradient-corrected bilinear" interpolation: the
bilinear estimate plus a fixed fraction of the native colour's Laplacian, as four 5x5
filters with the published coefficients.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: Pixels this far from any edge are computed by the kernels; the rest stay bilinear.
BORDER = 5


# Rows of the band-local ring buffers of :func:`rcd`, powers of two so that a row's slot is
# ``y & (size - 1)``. Each is the smallest that holds every row a later stage still reads
# when the earliest stage writes row t (see the lags in :func:`_rcd_band`).
_COLOUR_RING = 16  # bilinear/RCD colour rows t-10..t (the last stage reads t-10..t-4)
_TABLE_RING = 8  # VH rows t-8..t-1, PQ rows t-5..t-1, low-pass rows t-4..t
_HPF_RING = 4  # squared high-pass rows t-2..t
#: Rows each band computes beyond its own at either end (the stages reach 7 rows ahead).
HALO_ROWS = 7


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def rcd(cfa: np.ndarray, cmap: np.ndarray, eps: float, out: np.ndarray, band_rows: int,
        green_diagonals: bool = True) -> None:
    """RCD demosaic in one sweep over the frame, row bands in parallel.

    Each band of ``band_rows`` output rows runs all the RCD steps (module docstring) as a
    pipeline over its rows: when row ``t`` enters (bilinear colours, low-pass and squared
    high-passes of row ``t``), VH/PQ are finished at ``t - 1``, green at ``t - 2``, R/B at
    R/B sites at ``t - 4`` and R/B at G sites at ``t - 7``, which then goes to ``out``. The
    intermediate rows live in small band-local ring buffers (a few rows of the frame's
    width), so the frame is read once and ``out`` written once, instead of four passes over
    full-frame tables. A band recomputes :data:`HALO_ROWS` rows beyond each of its edges
    and writes only its own rows, so bands are independent. The arithmetic is that of the
    four-pass implementation, operation for operation (``tests/oracles_demosaic.py``
    checks that the results are bit-identical).

    Parameters
    ----------
    cfa : ndarray, shape (ny, nx), float32
        Finite mosaic, both sides larger than ``2 * BORDER``.
    cmap : ndarray, shape (2, 2), int8
    eps : float
        Regulariser (ADU); the directional statistics are floored at ``eps ** 2``.
    out : ndarray, shape (3, ny, nx), float32
        Output, every pixel written: RCD at least ``BORDER`` px from the edges, bilinear
        (:func:`debayer_bilinear`) in the border.
    band_rows : int
        Output rows per parallel task (>= 1).
    green_diagonals : bool
        Where the diagonal discrimination ``PQ`` of an R/B site is measured (module
        docstring, step 4): True (the default) sums the squared diagonal high-passes at
        its four green neighbours, whose diagonals hold green pixels only; False uses the
        published statistic, at the site itself and its two diagonal neighbours, whose
        diagonals alternate R and B.
    """
    ny = cfa.shape[0]
    n_bands = (ny + band_rows - 1) // band_rows
    for b in prange(n_bands):
        y0 = b * band_rows
        _rcd_band(cfa, cmap, eps, out, y0, min(y0 + band_rows, ny), green_diagonals)


@njit(cache=True, nogil=True, fastmath=False)
def _rcd_band(cfa: np.ndarray, cmap: np.ndarray, eps: float, out: np.ndarray,
              y0: int, y1: int, green_diagonals: bool) -> None:
    """Rows ``y0 .. y1 - 1`` of :func:`rcd` (reads rows ``y0 - 9 .. y1 + 8`` of ``cfa``)."""
    ny, nx = cfa.shape
    colour = np.empty((3, _COLOUR_RING, nx), dtype=np.float32)
    vh = np.empty((_TABLE_RING, nx), dtype=np.float32)
    pq = np.empty((_TABLE_RING, nx), dtype=np.float32)
    lpf = np.empty((_TABLE_RING, nx), dtype=np.float32)
    hpf = np.zeros((4, _HPF_RING, nx))  # v, h, p (main diagonal), q (anti-diagonal)
    epssq = eps * eps
    for t in range(y0 - HALO_ROWS, y1 + HALO_ROWS):
        # Each stage starts as early as the rows the band's own output needs require.
        if 0 <= t < ny:
            _bilinear_row(cfa, cmap, t, colour, t & (_COLOUR_RING - 1))
            if 1 <= t <= ny - 2:
                _lowpass_row(cfa, cmap, t, lpf[t & (_TABLE_RING - 1)])
            if 3 <= t <= ny - 4:
                _hpf_row(cfa, cmap, t, hpf, t & (_HPF_RING - 1), green_diagonals)
        y = t - 1
        if y >= y0 - 6 and 4 <= y <= ny - 5:
            _directions_row(cmap, hpf, y, epssq, vh[y & (_TABLE_RING - 1)],
                            pq[y & (_TABLE_RING - 1)], green_diagonals)
        y = t - 2
        if y >= y0 - 5 and BORDER <= y < ny - BORDER:
            _green_row(cfa, cmap, vh, lpf, eps, y, colour)
        y = t - 4
        if y >= y0 - 3 and BORDER <= y < ny - BORDER:
            _diagonal_row(cmap, pq, eps, y, colour)
        y = t - 7
        if y < y0:
            continue
        if BORDER <= y < ny - BORDER:
            _green_sites_row(cmap, vh, eps, y, colour)
        r = y & (_COLOUR_RING - 1)
        for k in range(3):
            for x in range(nx):
                out[k, y, x] = colour[k, r, x]


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _hpf_sq(cfa: np.ndarray, y: int, x: int, dy: int, dx: int) -> float:
    """Square of the 7-tap high-pass ``[1, -3, -1, 6, -1, -3, 1]`` along ``(dy, dx)``."""
    v = (np.float64(cfa[y - 3 * dy, x - 3 * dx]) + np.float64(cfa[y + 3 * dy, x + 3 * dx])
         - np.float64(cfa[y - dy, x - dx]) - np.float64(cfa[y + dy, x + dx])
         - 3.0 * (np.float64(cfa[y - 2 * dy, x - 2 * dx])
                  + np.float64(cfa[y + 2 * dy, x + 2 * dx]))
         + 6.0 * np.float64(cfa[y, x]))
    return v * v


@njit(cache=True, nogil=True, fastmath=False)
def _hpf_row(cfa: np.ndarray, cmap: np.ndarray, y: int, hpf: np.ndarray, slot: int,
             green_diagonals: bool) -> None:
    """Squared high-passes of row ``y`` (3 <= y <= ny - 4): vertical and horizontal at
    columns 3..nx-4, the two diagonals at the sites PQ reads: the green ones
    (``green_diagonals``) or the R/B ones."""
    nx = cfa.shape[1]
    for x in range(3, nx - 3):
        hpf[0, slot, x] = _hpf_sq(cfa, y, x, 1, 0)
        hpf[1, slot, x] = _hpf_sq(cfa, y, x, 0, 1)
    # Column 3 is a site of the wanted kind when (cmap[y & 1, 1] == 1) == green_diagonals.
    for x in range(3 if (cmap[y & 1, 1] == 1) == green_diagonals else 4, nx - 3, 2):
        hpf[2, slot, x] = _hpf_sq(cfa, y, x, 1, 1)
        hpf[3, slot, x] = _hpf_sq(cfa, y, x, 1, -1)


@njit(cache=True, nogil=True, fastmath=False)
def _directions_row(cmap: np.ndarray, hpf: np.ndarray, y: int, epssq: float,
                    vh: np.ndarray, pq: np.ndarray, green_diagonals: bool) -> None:
    """RCD step 1, ``VH = V / (V + H)`` at columns 4..nx-5 of row ``y``, each statistic the
    sum of the squared high-pass over the pixel and its two neighbours along the filter's
    axis, and the diagonal ``PQ = P / (P + Q)`` at its R/B sites: with
    ``green_diagonals`` the sums over the four green neighbours (up, down, left, right),
    else over the site and its two neighbours along each diagonal."""
    nx = vh.shape[0]
    up, mid, down = (y - 1) & (_HPF_RING - 1), y & (_HPF_RING - 1), (y + 1) & (_HPF_RING - 1)
    for x in range(4, nx - 4):
        a = max(hpf[0, up, x] + hpf[0, mid, x] + hpf[0, down, x], epssq)
        c = max(hpf[1, mid, x + 1] + hpf[1, mid, x] + hpf[1, mid, x - 1], epssq)
        vh[x] = np.float32(a / (a + c))
    first = 4 if cmap[y & 1, 0] != 1 else 5
    if green_diagonals:
        # A green pixel's diagonals hold green pixels only, so its high-pass sees the
        # structure alone; along an R/B site's diagonal R and B alternate, and their
        # colour difference and noise pull PQ towards one diagonal where the sky is flat
        # (on the Seestar frames: 0.7-1.6 % less star SNR, stars equally sharp).
        for x in range(first, nx - 4, 2):
            a = max(hpf[2, up, x] + hpf[2, down, x] + hpf[2, mid, x - 1] + hpf[2, mid, x + 1],
                    epssq)
            c = max(hpf[3, up, x] + hpf[3, down, x] + hpf[3, mid, x - 1] + hpf[3, mid, x + 1],
                    epssq)
            pq[x] = np.float32(a / (a + c))
        return
    for x in range(first, nx - 4, 2):
        a = max(hpf[2, up, x - 1] + hpf[2, mid, x] + hpf[2, down, x + 1], epssq)
        c = max(hpf[3, up, x + 1] + hpf[3, mid, x] + hpf[3, down, x - 1], epssq)
        pq[x] = np.float32(a / (a + c))


@njit(cache=True, nogil=True, fastmath=False)
def _lowpass_row(cfa: np.ndarray, cmap: np.ndarray, y: int, lpf: np.ndarray) -> None:
    """RCD step 2 on row ``y``: ``[1 2 1; 2 4 2; 1 2 1] / 4`` of the mosaic at the R/B
    sites of columns 1..nx-2, floored at 0."""
    nx = cfa.shape[1]
    for x in range(1, nx - 1):
        if cmap[y & 1, x & 1] == 1:
            continue
        s = (np.float64(cfa[y, x])
             + 0.5 * (np.float64(cfa[y - 1, x]) + np.float64(cfa[y + 1, x])
                      + np.float64(cfa[y, x - 1]) + np.float64(cfa[y, x + 1]))
             + 0.25 * (np.float64(cfa[y - 1, x - 1]) + np.float64(cfa[y - 1, x + 1])
                       + np.float64(cfa[y + 1, x - 1]) + np.float64(cfa[y + 1, x + 1])))
        lpf[x] = np.float32(max(s, 0.0))


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _refined(table: np.ndarray, y: int, x: int) -> float:
    """The centre value or the mean of the 4 diagonal neighbours, whichever is further
    from 0.5 (the more decisive direction); ``table`` is a ring of ``_TABLE_RING`` rows."""
    up, mid, down = (y - 1) & (_TABLE_RING - 1), y & (_TABLE_RING - 1), (y + 1) & (_TABLE_RING - 1)
    centre = np.float64(table[mid, x])
    around = 0.25 * (np.float64(table[up, x - 1]) + np.float64(table[up, x + 1])
                     + np.float64(table[down, x - 1]) + np.float64(table[down, x + 1]))
    return around if abs(0.5 - centre) < abs(0.5 - around) else centre


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _ratio(a32: np.float32, b32: np.float32, eps: float) -> float:
    """Ratio correction ``1 + (a - b) / (a + b)`` of the low-pass ``a`` at the centre
    against ``b`` two pixels away."""
    a = np.float64(a32)
    b = np.float64(b32)
    return 1.0 + (a - b) / (eps + a + b)


@njit(cache=True, nogil=True, fastmath=False)
def _green_row(cfa: np.ndarray, cmap: np.ndarray, vh: np.ndarray, lpf: np.ndarray,
               eps: float, y: int, colour: np.ndarray) -> None:
    """RCD step 3 on row ``y``: green at its R/B sites at least ``BORDER`` px from the
    edges, written to the colour ring."""
    nx = cfa.shape[1]
    g = colour[1, y & (_COLOUR_RING - 1)]
    l_up, l_mid = lpf[(y - 2) & (_TABLE_RING - 1)], lpf[y & (_TABLE_RING - 1)]
    l_down = lpf[(y + 2) & (_TABLE_RING - 1)]
    # Stepping over the R/B sites only keeps the inner loop free of branches.
    first = BORDER if cmap[y & 1, BORDER & 1] != 1 else BORDER + 1
    for x in range(first, nx - BORDER, 2):
        c0 = np.float64(cfa[y, x])
        gn = np.float64(cfa[y - 1, x])
        gs = np.float64(cfa[y + 1, x])
        gw = np.float64(cfa[y, x - 1])
        ge = np.float64(cfa[y, x + 1])
        n_grad = (eps + abs(gn - gs) + abs(c0 - np.float64(cfa[y - 2, x]))
                  + abs(gn - np.float64(cfa[y - 3, x]))
                  + abs(np.float64(cfa[y - 2, x]) - np.float64(cfa[y - 4, x])))
        s_grad = (eps + abs(gn - gs) + abs(c0 - np.float64(cfa[y + 2, x]))
                  + abs(gs - np.float64(cfa[y + 3, x]))
                  + abs(np.float64(cfa[y + 2, x]) - np.float64(cfa[y + 4, x])))
        w_grad = (eps + abs(gw - ge) + abs(c0 - np.float64(cfa[y, x - 2]))
                  + abs(gw - np.float64(cfa[y, x - 3]))
                  + abs(np.float64(cfa[y, x - 2]) - np.float64(cfa[y, x - 4])))
        e_grad = (eps + abs(gw - ge) + abs(c0 - np.float64(cfa[y, x + 2]))
                  + abs(ge - np.float64(cfa[y, x + 3]))
                  + abs(np.float64(cfa[y, x + 2]) - np.float64(cfa[y, x + 4])))
        n_est = gn * _ratio(l_mid[x], l_up[x], eps)
        s_est = gs * _ratio(l_mid[x], l_down[x], eps)
        w_est = gw * _ratio(l_mid[x], l_mid[x - 2], eps)
        e_est = ge * _ratio(l_mid[x], l_mid[x + 2], eps)
        # The side with the smaller gradient gets the larger weight.
        v_est = (s_grad * n_est + n_grad * s_est) / (n_grad + s_grad)
        h_est = (e_grad * w_est + w_grad * e_est) / (e_grad + w_grad)
        w_h = _refined(vh, y, x)
        g[x] = np.float32(w_h * h_est + (1.0 - w_h) * v_est)


@njit(cache=True, nogil=True, fastmath=False)
def _diagonal_row(cmap: np.ndarray, pq: np.ndarray, eps: float, y: int,
                  colour: np.ndarray) -> None:
    """RCD step 4.1 on row ``y``: R at B sites and B at R sites from the diagonal colour
    differences (green of rows ``y - 2 .. y + 2`` complete in the colour ring)."""
    nx = colour.shape[2]
    mask = _COLOUR_RING - 1
    first = BORDER if cmap[y & 1, BORDER & 1] != 1 else BORDER + 1
    c = 2 - cmap[y & 1, first & 1]
    col_m3, col_m1 = colour[c, (y - 3) & mask], colour[c, (y - 1) & mask]
    col_0, col_p1 = colour[c, y & mask], colour[c, (y + 1) & mask]
    col_p3 = colour[c, (y + 3) & mask]
    g_m2, g_m1, g_0 = colour[1, (y - 2) & mask], colour[1, (y - 1) & mask], colour[1, y & mask]
    g_p1, g_p2 = colour[1, (y + 1) & mask], colour[1, (y + 2) & mask]
    for x in range(first, nx - BORDER, 2):
        cnw = np.float64(col_m1[x - 1])
        cne = np.float64(col_m1[x + 1])
        csw = np.float64(col_p1[x - 1])
        cse = np.float64(col_p1[x + 1])
        g0 = np.float64(g_0[x])
        nw_grad = (eps + abs(cnw - cse) + abs(cnw - np.float64(col_m3[x - 3]))
                   + abs(g0 - np.float64(g_m2[x - 2])))
        ne_grad = (eps + abs(cne - csw) + abs(cne - np.float64(col_m3[x + 3]))
                   + abs(g0 - np.float64(g_m2[x + 2])))
        sw_grad = (eps + abs(csw - cne) + abs(csw - np.float64(col_p3[x - 3]))
                   + abs(g0 - np.float64(g_p2[x - 2])))
        se_grad = (eps + abs(cse - cnw) + abs(cse - np.float64(col_p3[x + 3]))
                   + abs(g0 - np.float64(g_p2[x + 2])))
        nw_est = cnw - np.float64(g_m1[x - 1])
        ne_est = cne - np.float64(g_m1[x + 1])
        sw_est = csw - np.float64(g_p1[x - 1])
        se_est = cse - np.float64(g_p1[x + 1])
        p_est = (nw_grad * se_est + se_grad * nw_est) / (nw_grad + se_grad)
        q_est = (ne_grad * sw_est + sw_grad * ne_est) / (ne_grad + sw_grad)
        w_q = _refined(pq, y, x)
        col_0[x] = np.float32(g0 + w_q * q_est + (1.0 - w_q) * p_est)


@njit(cache=True, nogil=True, fastmath=False)
def _green_sites_row(cmap: np.ndarray, vh: np.ndarray, eps: float, y: int,
                     colour: np.ndarray) -> None:
    """RCD step 4.2 on row ``y``: R and B at its G sites from the cardinal colour
    differences (R and B of rows ``y - 3 .. y + 3`` complete at R/B sites)."""
    nx = colour.shape[2]
    mask = _COLOUR_RING - 1
    g_m2, g_m1, g_0 = colour[1, (y - 2) & mask], colour[1, (y - 1) & mask], colour[1, y & mask]
    g_p1, g_p2 = colour[1, (y + 1) & mask], colour[1, (y + 2) & mask]
    first = BORDER if cmap[y & 1, BORDER & 1] == 1 else BORDER + 1
    for x in range(first, nx - BORDER, 2):
        g0 = np.float64(g_0[x])
        w_h = _refined(vh, y, x)
        gn2 = abs(g0 - np.float64(g_m2[x]))
        gs2 = abs(g0 - np.float64(g_p2[x]))
        gw2 = abs(g0 - np.float64(g_0[x - 2]))
        ge2 = abs(g0 - np.float64(g_0[x + 2]))
        for c in (0, 2):
            col_m3, col_m1 = colour[c, (y - 3) & mask], colour[c, (y - 1) & mask]
            col_0, col_p1 = colour[c, y & mask], colour[c, (y + 1) & mask]
            col_p3 = colour[c, (y + 3) & mask]
            cn = np.float64(col_m1[x])
            cs = np.float64(col_p1[x])
            cw = np.float64(col_0[x - 1])
            ce = np.float64(col_0[x + 1])
            n_grad = eps + gn2 + abs(cn - cs) + abs(cn - np.float64(col_m3[x]))
            s_grad = eps + gs2 + abs(cs - cn) + abs(cs - np.float64(col_p3[x]))
            w_grad = eps + gw2 + abs(cw - ce) + abs(cw - np.float64(col_0[x - 3]))
            e_grad = eps + ge2 + abs(ce - cw) + abs(ce - np.float64(col_0[x + 3]))
            n_est = cn - np.float64(g_m1[x])
            s_est = cs - np.float64(g_p1[x])
            w_est = cw - np.float64(g_0[x - 1])
            e_est = ce - np.float64(g_0[x + 1])
            v_est = (s_grad * n_est + n_grad * s_est) / (n_grad + s_grad)
            h_est = (e_grad * w_est + w_grad * e_est) / (e_grad + w_grad)
            col_0[x] = np.float32(g0 + w_h * h_est + (1.0 - w_h) * v_est)


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def malvar(cfa: np.ndarray, cmap: np.ndarray, out: np.ndarray) -> None:
    """Malvar-He-Cutler gradient-corrected bilinear demosaic (5x5 linear filters).

    Parameters
    ----------
    cfa : ndarray, shape (ny, nx), float32
    cmap : ndarray, shape (2, 2), int8
    out : ndarray, shape (3, ny, nx), float32
        Written at pixels at least ``BORDER`` from the edges (native colours copied).
    """
    ny, nx = cfa.shape
    for y in prange(BORDER, ny - BORDER):
        for x in range(BORDER, nx - BORDER):
            native = cmap[y & 1, x & 1]
            c0 = np.float64(cfa[y, x])
            cross1 = (np.float64(cfa[y - 1, x]) + np.float64(cfa[y + 1, x])
                      + np.float64(cfa[y, x - 1]) + np.float64(cfa[y, x + 1]))
            cross2 = (np.float64(cfa[y - 2, x]) + np.float64(cfa[y + 2, x])
                      + np.float64(cfa[y, x - 2]) + np.float64(cfa[y, x + 2]))
            diag = (np.float64(cfa[y - 1, x - 1]) + np.float64(cfa[y - 1, x + 1])
                    + np.float64(cfa[y + 1, x - 1]) + np.float64(cfa[y + 1, x + 1]))
            out[native, y, x] = cfa[y, x]
            if native != 1:
                # G at R/B: 4 C + 2 (4 greens) - (C two away) ; R at B / B at R:
                # 6 C + 2 (4 diagonals) - 3/2 (C two away).
                out[1, y, x] = np.float32((4.0 * c0 + 2.0 * cross1 - cross2) / 8.0)
                out[2 - native, y, x] = np.float32((6.0 * c0 + 2.0 * diag - 1.5 * cross2) / 8.0)
                continue
            horiz1 = np.float64(cfa[y, x - 1]) + np.float64(cfa[y, x + 1])
            vert1 = np.float64(cfa[y - 1, x]) + np.float64(cfa[y + 1, x])
            horiz2 = np.float64(cfa[y, x - 2]) + np.float64(cfa[y, x + 2])
            vert2 = np.float64(cfa[y - 2, x]) + np.float64(cfa[y + 2, x])
            # Colour whose neighbours are left/right: 5 G + 4 (its 2) - (G diagonals)
            # - (G two away along the row) + 1/2 (G two away along the column).
            along_row = (5.0 * c0 + 4.0 * horiz1 - diag - horiz2 + 0.5 * vert2) / 8.0
            along_col = (5.0 * c0 + 4.0 * vert1 - diag - vert2 + 0.5 * horiz2) / 8.0
            row_colour = cmap[y & 1, (x + 1) & 1]
            out[row_colour, y, x] = np.float32(along_row)
            out[2 - row_colour, y, x] = np.float32(along_col)


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def count_nonfinite(cfa: np.ndarray) -> int:
    """Number of NaN/inf pixels of ``cfa`` (shape (ny, nx), float32)."""
    ny, nx = cfa.shape
    per_row = np.zeros(ny, dtype=np.int64)
    for y in prange(ny):
        n = 0
        for x in range(nx):
            if not np.isfinite(cfa[y, x]):
                n += 1
        per_row[y] = n
    return int(per_row.sum())


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def fill_nonfinite(source: np.ndarray, fallback: float, cfa: np.ndarray) -> None:
    """Copy of ``source`` with each NaN/inf replaced by the mean of its finite same-colour
    neighbours two pixels away along the rows and columns (``fallback`` when none is).

    RCD reads up to 4-6 pixels around each pixel, so one NaN would otherwise spread over
    a ~19-px diamond; the caller puts NaN back where the bilinear result has it.

    Parameters
    ----------
    source : ndarray, shape (ny, nx), float32
    fallback : float
        Value for a pixel with no finite same-colour neighbour.
    cfa : ndarray, shape (ny, nx), float32
        Output.
    """
    ny, nx = source.shape
    for y in prange(ny):
        for x in range(nx):
            v = source[y, x]
            if np.isfinite(v):
                cfa[y, x] = v
                continue
            s = 0.0
            n = 0
            for k in range(4):
                yy = y + (-2, 2, 0, 0)[k]
                xx = x + (0, 0, -2, 2)[k]
                if 0 <= yy < ny and 0 <= xx < nx and np.isfinite(source[yy, xx]):
                    s += np.float64(source[yy, xx])
                    n += 1
            cfa[y, x] = np.float32(s / n) if n > 0 else np.float32(fallback)


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _debayer_pixel(cfa: np.ndarray, cmap: np.ndarray, dst: np.ndarray, y: int, r: int,
                   x: int) -> None:
    """General case (any position, border included): mean of each colour in the 3x3 window
    of CFA pixel (y, x), written to ``dst[:, r, x]``."""
    ny, nx = cfa.shape
    c = cmap[y & 1, x & 1]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    n0 = 0
    n1 = 0
    n2 = 0
    for yy in range(max(y - 1, 0), min(y + 2, ny)):
        for xx in range(max(x - 1, 0), min(x + 2, nx)):
            k = cmap[yy & 1, xx & 1]
            v = np.float64(cfa[yy, xx])
            if k == 0:
                s0 += v
                n0 += 1
            elif k == 1:
                s1 += v
                n1 += 1
            else:
                s2 += v
                n2 += 1
    dst[0, r, x] = np.float32(s0 / n0) if n0 > 0 else np.nan
    dst[1, r, x] = np.float32(s1 / n1) if n1 > 0 else np.nan
    dst[2, r, x] = np.float32(s2 / n2) if n2 > 0 else np.nan
    dst[c, r, x] = cfa[y, x]


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def debayer_bilinear(cfa: np.ndarray, cmap: np.ndarray, out: np.ndarray) -> None:
    """Bilinear demosaic: each missing colour is the mean of that colour in the 3x3 window.

    At a pixel of native colour c, channel c is copied exactly. For the other
    channels the same-colour pixels of the 3x3 window are exactly the nearest
    ones (4 edge neighbours for G; 2 edge or 4 diagonal neighbours for R and
    B), so their mean is the classic bilinear interpolation. At the image
    border only in-bounds samples are averaged. Interior pixels take an
    explicit fast path with the same result.

    Parameters
    ----------
    cfa : ndarray, shape (ny, nx), float32
    cmap : ndarray, shape (2, 2), int8
        Colour code of ``cfa[y, x]`` is ``cmap[y & 1, x & 1]``.
    out : ndarray, shape (3, ny, nx), float32
    """
    for y in prange(cfa.shape[0]):
        _bilinear_row(cfa, cmap, y, out, y)


@njit(cache=True, nogil=True, fastmath=False)
def _bilinear_row(cfa: np.ndarray, cmap: np.ndarray, y: int, dst: np.ndarray, r: int) -> None:
    """Row ``y`` of :func:`debayer_bilinear`, written to ``dst[:, r, :]`` (also the first
    stage of :func:`rcd`, whose border keeps these values)."""
    ny, nx = cfa.shape
    if y == 0 or y == ny - 1 or nx < 3:
        for x in range(nx):
            _debayer_pixel(cfa, cmap, dst, y, r, x)
        return
    _debayer_pixel(cfa, cmap, dst, y, r, 0)
    for x in range(1, nx - 1):
        c = cmap[y & 1, x & 1]
        if c == 1:
            # Green site: one colour left/right, the other above/below.
            horiz = 0.5 * (np.float64(cfa[y, x - 1]) + np.float64(cfa[y, x + 1]))
            vert = 0.5 * (np.float64(cfa[y - 1, x]) + np.float64(cfa[y + 1, x]))
            dst[1, r, x] = cfa[y, x]
            if cmap[y & 1, (x + 1) & 1] == 0:
                dst[0, r, x] = np.float32(horiz)
                dst[2, r, x] = np.float32(vert)
            else:
                dst[2, r, x] = np.float32(horiz)
                dst[0, r, x] = np.float32(vert)
        else:
            # Red or blue site: green on the 4 edges, the other colour on the diagonals.
            green = 0.25 * (np.float64(cfa[y - 1, x]) + np.float64(cfa[y + 1, x])
                            + np.float64(cfa[y, x - 1]) + np.float64(cfa[y, x + 1]))
            diag = 0.25 * (np.float64(cfa[y - 1, x - 1]) + np.float64(cfa[y - 1, x + 1])
                           + np.float64(cfa[y + 1, x - 1]) + np.float64(cfa[y + 1, x + 1]))
            dst[1, r, x] = np.float32(green)
            dst[c, r, x] = cfa[y, x]
            dst[2 - c, r, x] = np.float32(diag)
    _debayer_pixel(cfa, cmap, dst, y, r, nx - 1)

"""Numba kernels for resolution-keeping demosaicing: RCD and Malvar-He-Cutler.

Both write into a ``(3, ny, nx)`` float32 ``out`` that the caller has already filled
with the bilinear result (:func:`debayer_bilinear`, below): the kernels
overwrite every pixel at least ``BORDER`` pixels from the edge, so the thin border
keeps the bilinear values (which handle the edge by averaging only in-bounds
samples). Native colours are never changed.

Conventions as in ``kernels_calibrate``: images ``[y, x]``, C-contiguous; colour codes
0 = R, 1 = G, 2 = B in a ``(2, 2)`` int8 map indexed ``[y & 1, x & 1]``. Every pass runs
rows in parallel (``prange``) and reads only what an earlier pass finished.

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
   the diagonals. R and B at G sites: green plus the colour difference of the cardinal
   neighbours (native on one axis, step-4 values on the other), blended with VH.

All the arithmetic is in float64 and works on the ADU values as they are (the
algorithm is scale-free: its small regularisers ``eps`` are scaled by the frame's
typical level). The low-pass in the ratio is floored at zero so that a calibrated
background near zero cannot make the ratio blow up: it then stays within [0, 2].

Malvar-He-Cutler (2004) is the linear "gradient-corrected bilinear" interpolation: the
bilinear estimate plus a fixed fraction of the native colour's Laplacian, as four 5x5
filters with the published coefficients.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: Pixels this far from any edge are computed by the kernels; the rest stay bilinear.
BORDER = 5


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _hpf_sq(cfa: np.ndarray, y: int, x: int, dy: int, dx: int) -> float:
    """Square of the 7-tap high-pass ``[1, -3, -1, 6, -1, -3, 1]`` along ``(dy, dx)``."""
    v = (np.float64(cfa[y - 3 * dy, x - 3 * dx]) + np.float64(cfa[y + 3 * dy, x + 3 * dx])
         - np.float64(cfa[y - dy, x - dx]) - np.float64(cfa[y + dy, x + dx])
         - 3.0 * (np.float64(cfa[y - 2 * dy, x - 2 * dx])
                  + np.float64(cfa[y + 2 * dy, x + 2 * dx]))
         + 6.0 * np.float64(cfa[y, x]))
    return v * v


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def rcd_directions(cfa: np.ndarray, cmap: np.ndarray, epssq: float, table: np.ndarray,
                   diagonal: bool) -> None:
    """RCD step 1 (``VH = V / (V + H)`` at every pixel) or 4.0 (``PQ = P / (P + Q)`` at
    R/B sites, P along the main diagonal), at rows and columns 4..n-5.

    Rows are processed in blocks, one per task; each block keeps the squared high-pass
    of three consecutive rows in ring buffers, so each filter runs once per pixel rather
    than three times.

    Parameters
    ----------
    cfa : ndarray, shape (ny, nx), float32
    cmap : ndarray, shape (2, 2), int8
    epssq : float
        Floor of each directional statistic (squared ADU).
    table : ndarray, shape (ny, nx), float32
        Output (VH, or PQ at R/B sites only).
    diagonal : bool
        False: VH (first axis vertical, second horizontal); True: PQ (the diagonals).
    """
    ny, nx = cfa.shape
    if ny < 9 or nx < 9:
        return
    d = 1 if diagonal else 0
    block = 64
    n_blocks = (ny - 8 + block - 1) // block
    for b in prange(n_blocks):
        y_start = 4 + b * block
        y_stop = min(y_start + block, ny - 4)
        first = np.zeros((3, nx))  # along (1, d): vertical or main diagonal
        second = np.zeros((3, nx))  # along (d, 1 - 2d): horizontal or anti-diagonal
        for y in range(y_start - 1, y_stop + 1):
            row = y % 3
            # PQ is read only at R/B sites, whose diagonal neighbours are R/B sites too.
            h_start, h_step = 3, 1
            if diagonal:
                h_start, h_step = (3 if cmap[y & 1, 1] != 1 else 4), 2
            for x in range(h_start, nx - 3, h_step):
                first[row, x] = _hpf_sq(cfa, y, x, 1, d)
                second[row, x] = _hpf_sq(cfa, y, x, d, 1 - 2 * d)
            yc = y - 1  # the row whose three neighbours are now all in the buffers
            if yc < y_start:
                continue
            up, mid, down = first[(yc - 1) % 3], first[yc % 3], first[(yc + 1) % 3]
            s_up, s_mid, s_down = second[(yc - d) % 3], second[yc % 3], second[(yc + d) % 3]
            start, step = 4, 1
            if diagonal:
                start, step = (4 if cmap[yc & 1, 0] != 1 else 5), 2
            for x in range(start, nx - 4, step):
                a = max(up[x - d] + mid[x] + down[x + d], epssq)
                c = max(s_up[x + 1] + s_mid[x] + s_down[x - 1], epssq)
                table[yc, x] = np.float32(a / (a + c))


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def rcd_lowpass(cfa: np.ndarray, cmap: np.ndarray, lpf: np.ndarray) -> None:
    """RCD step 2: ``[1 2 1; 2 4 2; 1 2 1] / 4`` of the mosaic at R/B sites, floored at 0.

    Parameters
    ----------
    cfa : ndarray, shape (ny, nx), float32
    cmap : ndarray, shape (2, 2), int8
    lpf : ndarray, shape (ny, nx), float32
        Output, written at R/B sites of rows and columns 1..n-2.
    """
    ny, nx = cfa.shape
    for y in prange(1, ny - 1):
        for x in range(1, nx - 1):
            if cmap[y & 1, x & 1] == 1:
                continue
            s = (np.float64(cfa[y, x])
                 + 0.5 * (np.float64(cfa[y - 1, x]) + np.float64(cfa[y + 1, x])
                          + np.float64(cfa[y, x - 1]) + np.float64(cfa[y, x + 1]))
                 + 0.25 * (np.float64(cfa[y - 1, x - 1]) + np.float64(cfa[y - 1, x + 1])
                           + np.float64(cfa[y + 1, x - 1]) + np.float64(cfa[y + 1, x + 1])))
            lpf[y, x] = np.float32(max(s, 0.0))


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _refined(table: np.ndarray, y: int, x: int) -> float:
    """The centre value or the mean of the 4 diagonal neighbours, whichever is further
    from 0.5 (the more decisive direction)."""
    centre = np.float64(table[y, x])
    around = 0.25 * (np.float64(table[y - 1, x - 1]) + np.float64(table[y - 1, x + 1])
                     + np.float64(table[y + 1, x - 1]) + np.float64(table[y + 1, x + 1]))
    return around if abs(0.5 - centre) < abs(0.5 - around) else centre


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _ratio(lpf: np.ndarray, y: int, x: int, y2: int, x2: int, eps: float) -> float:
    """Ratio correction ``1 + (a - b) / (a + b)`` of the low-pass at (y, x) vs (y2, x2)."""
    a = np.float64(lpf[y, x])
    b = np.float64(lpf[y2, x2])
    return 1.0 + (a - b) / (eps + a + b)


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def rcd_green(cfa: np.ndarray, cmap: np.ndarray, vh: np.ndarray, lpf: np.ndarray,
              eps: float, out: np.ndarray) -> None:
    """RCD step 3: green at R/B sites at least ``BORDER`` pixels from the edges.

    Parameters
    ----------
    cfa : ndarray, shape (ny, nx), float32
    cmap : ndarray, shape (2, 2), int8
    vh, lpf : ndarray, shape (ny, nx), float32
        From :func:`rcd_directions` and :func:`rcd_lowpass`.
    eps : float
        Gradient regulariser (ADU).
    out : ndarray, shape (3, ny, nx), float32
        Plane 1 is written at R/B sites.
    """
    ny, nx = cfa.shape
    for y in prange(BORDER, ny - BORDER):
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
            n_est = gn * _ratio(lpf, y, x, y - 2, x, eps)
            s_est = gs * _ratio(lpf, y, x, y + 2, x, eps)
            w_est = gw * _ratio(lpf, y, x, y, x - 2, eps)
            e_est = ge * _ratio(lpf, y, x, y, x + 2, eps)
            # The side with the smaller gradient gets the larger weight.
            v_est = (s_grad * n_est + n_grad * s_est) / (n_grad + s_grad)
            h_est = (e_grad * w_est + w_grad * e_est) / (e_grad + w_grad)
            w_h = _refined(vh, y, x)
            out[1, y, x] = np.float32(w_h * h_est + (1.0 - w_h) * v_est)


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def rcd_red_blue_diagonal(cmap: np.ndarray, pq: np.ndarray, eps: float,
                          out: np.ndarray) -> None:
    """RCD step 4.1: R at B sites and B at R sites, from the diagonal colour differences.

    Parameters
    ----------
    cmap : ndarray, shape (2, 2), int8
    pq : ndarray, shape (ny, nx), float32
        From :func:`rcd_directions`.
    eps : float
        Gradient regulariser (ADU).
    out : ndarray, shape (3, ny, nx), float32
        Green complete (:func:`rcd_green`); the missing R or B is written.
    """
    ny, nx = out.shape[1], out.shape[2]
    g = out[1]
    for y in prange(BORDER, ny - BORDER):
        first = BORDER if cmap[y & 1, BORDER & 1] != 1 else BORDER + 1
        c = 2 - cmap[y & 1, first & 1]
        col = out[c]
        for x in range(first, nx - BORDER, 2):
            cnw = np.float64(col[y - 1, x - 1])
            cne = np.float64(col[y - 1, x + 1])
            csw = np.float64(col[y + 1, x - 1])
            cse = np.float64(col[y + 1, x + 1])
            g0 = np.float64(g[y, x])
            nw_grad = (eps + abs(cnw - cse) + abs(cnw - np.float64(col[y - 3, x - 3]))
                       + abs(g0 - np.float64(g[y - 2, x - 2])))
            ne_grad = (eps + abs(cne - csw) + abs(cne - np.float64(col[y - 3, x + 3]))
                       + abs(g0 - np.float64(g[y - 2, x + 2])))
            sw_grad = (eps + abs(csw - cne) + abs(csw - np.float64(col[y + 3, x - 3]))
                       + abs(g0 - np.float64(g[y + 2, x - 2])))
            se_grad = (eps + abs(cse - cnw) + abs(cse - np.float64(col[y + 3, x + 3]))
                       + abs(g0 - np.float64(g[y + 2, x + 2])))
            nw_est = cnw - np.float64(g[y - 1, x - 1])
            ne_est = cne - np.float64(g[y - 1, x + 1])
            sw_est = csw - np.float64(g[y + 1, x - 1])
            se_est = cse - np.float64(g[y + 1, x + 1])
            p_est = (nw_grad * se_est + se_grad * nw_est) / (nw_grad + se_grad)
            q_est = (ne_grad * sw_est + sw_grad * ne_est) / (ne_grad + sw_grad)
            w_q = _refined(pq, y, x)
            col[y, x] = np.float32(g0 + w_q * q_est + (1.0 - w_q) * p_est)


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def rcd_red_blue_green_sites(cmap: np.ndarray, vh: np.ndarray, eps: float,
                             out: np.ndarray) -> None:
    """RCD step 4.2: R and B at G sites, from the cardinal colour differences.

    Parameters
    ----------
    cmap : ndarray, shape (2, 2), int8
    vh : ndarray, shape (ny, nx), float32
        From :func:`rcd_directions`.
    eps : float
        Gradient regulariser (ADU).
    out : ndarray, shape (3, ny, nx), float32
        R and B complete at R/B sites (:func:`rcd_red_blue_diagonal`); R and B are
        written at G sites.
    """
    ny, nx = out.shape[1], out.shape[2]
    g = out[1]
    red = out[0]
    blue = out[2]
    for y in prange(BORDER, ny - BORDER):
        first = BORDER if cmap[y & 1, BORDER & 1] == 1 else BORDER + 1
        for x in range(first, nx - BORDER, 2):
            g0 = np.float64(g[y, x])
            w_h = _refined(vh, y, x)
            gn2 = abs(g0 - np.float64(g[y - 2, x]))
            gs2 = abs(g0 - np.float64(g[y + 2, x]))
            gw2 = abs(g0 - np.float64(g[y, x - 2]))
            ge2 = abs(g0 - np.float64(g[y, x + 2]))
            for c in range(2):
                col = red if c == 0 else blue
                cn = np.float64(col[y - 1, x])
                cs = np.float64(col[y + 1, x])
                cw = np.float64(col[y, x - 1])
                ce = np.float64(col[y, x + 1])
                n_grad = eps + gn2 + abs(cn - cs) + abs(cn - np.float64(col[y - 3, x]))
                s_grad = eps + gs2 + abs(cs - cn) + abs(cs - np.float64(col[y + 3, x]))
                w_grad = eps + gw2 + abs(cw - ce) + abs(cw - np.float64(col[y, x - 3]))
                e_grad = eps + ge2 + abs(ce - cw) + abs(ce - np.float64(col[y, x + 3]))
                n_est = cn - np.float64(g[y - 1, x])
                s_est = cs - np.float64(g[y + 1, x])
                w_est = cw - np.float64(g[y, x - 1])
                e_est = ce - np.float64(g[y, x + 1])
                v_est = (s_grad * n_est + n_grad * s_est) / (n_grad + s_grad)
                h_est = (e_grad * w_est + w_grad * e_est) / (e_grad + w_grad)
                col[y, x] = np.float32(g0 + w_h * h_est + (1.0 - w_h) * v_est)


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
def _debayer_pixel(cfa: np.ndarray, cmap: np.ndarray, out: np.ndarray, y: int, x: int) -> None:
    """General case (any position, border included): mean of each colour in the 3x3 window."""
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
    out[0, y, x] = np.float32(s0 / n0) if n0 > 0 else np.nan
    out[1, y, x] = np.float32(s1 / n1) if n1 > 0 else np.nan
    out[2, y, x] = np.float32(s2 / n2) if n2 > 0 else np.nan
    out[c, y, x] = cfa[y, x]


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
    ny, nx = cfa.shape
    for y in prange(ny):
        if y == 0 or y == ny - 1 or nx < 3:
            for x in range(nx):
                _debayer_pixel(cfa, cmap, out, y, x)
            continue
        _debayer_pixel(cfa, cmap, out, y, 0)
        for x in range(1, nx - 1):
            c = cmap[y & 1, x & 1]
            if c == 1:
                # Green site: one colour left/right, the other above/below.
                horiz = 0.5 * (np.float64(cfa[y, x - 1]) + np.float64(cfa[y, x + 1]))
                vert = 0.5 * (np.float64(cfa[y - 1, x]) + np.float64(cfa[y + 1, x]))
                out[1, y, x] = cfa[y, x]
                if cmap[y & 1, (x + 1) & 1] == 0:
                    out[0, y, x] = np.float32(horiz)
                    out[2, y, x] = np.float32(vert)
                else:
                    out[2, y, x] = np.float32(horiz)
                    out[0, y, x] = np.float32(vert)
            else:
                # Red or blue site: green on the 4 edges, the other colour on the diagonals.
                green = 0.25 * (np.float64(cfa[y - 1, x]) + np.float64(cfa[y + 1, x])
                                + np.float64(cfa[y, x - 1]) + np.float64(cfa[y, x + 1]))
                diag = 0.25 * (np.float64(cfa[y - 1, x - 1]) + np.float64(cfa[y - 1, x + 1])
                               + np.float64(cfa[y + 1, x - 1]) + np.float64(cfa[y + 1, x + 1]))
                out[1, y, x] = np.float32(green)
                out[c, y, x] = cfa[y, x]
                out[2 - c, y, x] = np.float32(diag)
        _debayer_pixel(cfa, cmap, out, y, nx - 1)

"""The multi-pass RCD that the fused kernel replaced: the oracle of the fused kernel.

``rcd_multipass`` runs RCD as four separate numba passes over the whole frame (directions,
low-pass, green, red/blue), each reading only what an earlier pass wrote to full-frame
buffers. It is the implementation ``livestack.pipeline.kernels_demosaic`` had before the
one-sweep kernel ``rcd``; tests assert that the two agree bit for bit, and ``bench/`` times
the fused kernel against it. The arithmetic is described in ``kernels_demosaic``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

from livestack.pipeline import kernels_demosaic as kd
from livestack.pipeline.debayer import _as_cfa, cfa_color_map, rcd_eps

BORDER = kd.BORDER


def rcd_multipass(cfa: np.ndarray, pattern: str, green_diagonals: bool = True
                  ) -> NDArray[np.float32]:
    """RCD demosaic of a finite CFA frame by the four separate passes.

    Parameters
    ----------
    cfa : ndarray, shape (ny, nx)
        Finite mosaic (ADU), both sides larger than ``2 * BORDER``.
    pattern : str
        Effective Bayer pattern.
    green_diagonals : bool
        PQ from the green neighbours' diagonals (``kernels_demosaic.rcd``).

    Returns
    -------
    ndarray, shape (3, ny, nx), float32
        As ``debayer(cfa, pattern, "rcd", green_diagonals)``.

    Raises
    ------
    ValueError
        If ``cfa`` is not 2-D or ``pattern`` is unknown.
    """
    data = _as_cfa(cfa)
    cmap = cfa_color_map(pattern)
    out = np.empty((3, *data.shape), dtype=np.float32)
    kd.debayer_bilinear(data, cmap, out)
    eps = rcd_eps(data)
    vh = np.empty(data.shape, dtype=np.float32)
    lpf = np.empty(data.shape, dtype=np.float32)
    rcd_directions(data, cmap, eps * eps, vh, False, False)
    rcd_lowpass(data, cmap, lpf)
    rcd_green(data, cmap, vh, lpf, eps, out)
    pq = lpf  # the low-pass is not needed after the green pass
    rcd_directions(data, cmap, eps * eps, pq, True, green_diagonals)
    rcd_red_blue_diagonal(cmap, pq, eps, out)
    rcd_red_blue_green_sites(cmap, vh, eps, out)
    return out


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
                   diagonal: bool, green: bool) -> None:
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
    green : bool
        With ``diagonal``: each statistic summed over the four green neighbours of the
        R/B site (up, down, left, right) instead of the site and its diagonal neighbours.
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
            # PQ is read only at R/B sites: it sums the high-passes of their diagonal
            # neighbours (R/B sites) or, with `green`, of their four green neighbours.
            h_start, h_step = 3, 1
            if diagonal:
                wanted = (cmap[y & 1, 1] == 1) == green  # column 3 is a site to filter
                h_start, h_step = (3 if wanted else 4), 2
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
                if diagonal and green:
                    a = max(up[x] + down[x] + mid[x - 1] + mid[x + 1], epssq)
                    c = max(s_up[x] + s_down[x] + s_mid[x - 1] + s_mid[x + 1], epssq)
                else:
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

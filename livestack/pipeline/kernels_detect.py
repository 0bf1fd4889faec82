"""numba kernel behind :func:`livestack.pipeline.detect._refine`: per-star refinement on
full-resolution stamps.

The numpy version cuts every stamp into ``(n, m, m)`` float64 arrays and iterates batched
``einsum`` products; on a 26 MP frame that is ~30 ms for the ~500 candidates detection
refines, most of it in temporaries. This kernel reads each star's stamp once into a small
buffer and runs the same fixed-point iterations per star, in parallel over stars. The
arithmetic is the numpy version's (float64, separable Gaussian windows), so the results
agree to rounding (checked in ``tests/pipeline/test_detect.py``).

Coordinates: full-resolution pixels, centre of pixel [0, 0] at (0, 0).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@njit(cache=True, nogil=True, fastmath=False)
def _sums(st: NDArray[np.float64], m: int, x0: float, y0: float, x: float, y: float,
          sigma: float, wx: NDArray[np.float64], wy: NDArray[np.float64],
          second: bool) -> tuple[float, float, float, float, float, float]:
    """Gaussian-windowed sums of one stamp: ``w I``, ``w I dx``, ``w I dy`` and, when
    ``second``, ``w I dx^2``, ``w I dy^2``, ``w I dx dy``; ``(x0, y0)`` is the position of
    the stamp's pixel [0, 0]. ``wx``, ``wy`` are scratch of at least ``3 m`` values."""
    inv = 0.5 / (sigma * sigma)
    # Column weights w, w dx, w dx^2 (as the numpy version forms them), then each row is
    # two or three dot products.
    for i in range(m):
        dx = x0 + i - x
        w = math.exp(-dx * dx * inv)
        wx[i] = w
        wx[m + i] = w * dx
        wx[2 * m + i] = w * dx * dx
        dy = y0 + i - y
        wy[i] = math.exp(-dy * dy * inv)
    s0 = 0.0
    sx = 0.0
    sy = 0.0
    sxx = 0.0
    syy = 0.0
    sxy = 0.0
    for j in range(m):
        row0 = 0.0
        row1 = 0.0
        for i in range(m):
            v = st[j, i]
            row0 += v * wx[i]
            row1 += v * wx[m + i]
        dy = y0 + j - y
        s0 += wy[j] * row0
        sx += wy[j] * row1
        sy += (wy[j] * dy) * row0
        if second:
            row2 = 0.0
            for i in range(m):
                row2 += st[j, i] * wx[2 * m + i]
            sxx += wy[j] * row2
            syy += (wy[j] * dy * dy) * row0
            sxy += (wy[j] * dy) * row1
    return s0, sx, sy, sxx, syy, sxy


@njit(cache=True, nogil=True, fastmath=False)
def _shape(st: NDArray[np.float64], m: int, x0: float, y0: float, x: float, y: float,
           sigma: float, wx: NDArray[np.float64],
           wy: NDArray[np.float64]) -> tuple[float, float]:
    """FWHM (px) and elongation from windowed second moments, deconvolved from the
    window and the pixel box (``detect._deconvolved_shape`` for one star)."""
    s0, _sx, _sy, sxx, syy, sxy = _sums(st, m, x0, y0, x, y, sigma, wx, wy, True)
    safe = s0 if s0 > 0 else 1.0
    mxx = sxx / safe
    myy = syy / safe
    mxy = sxy / safe
    det_m = max(mxx * myy - mxy * mxy, 1e-12)
    inv_s2 = 1.0 / (sigma * sigma)
    pxx = myy / det_m - inv_s2
    pyy = mxx / det_m - inv_s2
    pxy = -mxy / det_m
    det_p = pxx * pyy - pxy * pxy
    if det_p > 1e-9 and pxx > 0 and pyy > 0:
        cxx = pyy / det_p
        cyy = pxx / det_p
        cxy = -pxy / det_p
    else:
        cxx = mxx
        cyy = myy
        cxy = mxy
    cxx = max(cxx - 1.0 / 12.0, 1e-4)
    cyy = max(cyy - 1.0 / 12.0, 1e-4)
    tr = cxx + cyy
    disc = math.sqrt(max((cxx - cyy) ** 2 / 4.0 + cxy * cxy, 0.0))
    lam1 = max(tr / 2.0 + disc, 1e-6)
    lam2 = max(tr / 2.0 - disc, 1e-6)
    return _FWHM_PER_SIGMA * (lam1 * lam2) ** 0.25, math.sqrt(lam1 / lam2)


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def refine_stars_kernel(img: NDArray[np.float32], cx: NDArray[np.intp], cy: NDArray[np.intp],
                        sky: NDArray[np.float64], radius: int, x_start: NDArray[np.float64],
                        y_start: NDArray[np.float64], sigma: float, recentre: int,
                        saturation_adu: float, xc: NDArray[np.float64],
                        yc: NDArray[np.float64], conv: NDArray[np.bool_],
                        fwhm: NDArray[np.float64], elong: NDArray[np.float64],
                        flux: NDArray[np.float64], hot: NDArray[np.bool_],
                        saturated: NDArray[np.bool_], centre_ok: NDArray[np.bool_]) -> None:
    """Windowed centroid, shape, aperture flux and junk flags of each star.

    For star ``k``, the stamp is the ``(2 radius + 1)^2`` pixels around the integer
    pixel ``(cx[k], cy[k])`` minus ``sky[k]``; pixels outside the image or not finite are
    invalid (0.0). From ``(x_start, y_start)``: ``recentre`` steps of the plain windowed
    centroid at ``1.5 sigma``, then the SExtractor XWIN fixed point at ``sigma``
    (``x <- x + 2 sum(w I dx) / sum(w I)``, steps clipped to 1 px, at most 16, until a
    step < 1e-4 px; converged when the last step < 0.01 px).

    Parameters
    ----------
    img : ndarray, shape (ny, nx), float32
    cx, cy : ndarray, shape (n,), intp
        Stamp centres.
    sky : ndarray, shape (n,), float64
        Local sky per star (ADU).
    radius : int
    x_start, y_start : ndarray, shape (n,), float64
        Starting positions (px).
    sigma : float
        Window sigma (px).
    recentre : int
        Plain-centroid steps at ``1.5 sigma`` before the fixed point.
    saturation_adu : float
        A star with a valid raw pixel >= this is saturated; NaN = a flat top (>= 5
        valid pixels within 1 % of the peak) is.
    xc, yc, conv, fwhm, elong, flux, hot, saturated, centre_ok : ndarray, shape (n,)
        Written in place: position (px), converged, FWHM (px), elongation, aperture flux
        (radius ``3 sigma``, ADU), one pixel holding > 70 % of the 3x3 core, saturated,
        and the stamp's centre pixel valid.
    """
    ny, nx = img.shape
    n = cx.shape[0]
    m = 2 * radius + 1
    for k in prange(n):
        st = np.empty((m, m), dtype=np.float64)
        raw = np.empty((m, m), dtype=np.float64)
        valid = np.empty((m, m), dtype=np.bool_)
        wx = np.empty(3 * m, dtype=np.float64)
        wy = np.empty(m, dtype=np.float64)
        raw_peak = -np.inf
        peak = -np.inf
        for j in range(m):
            yy = cy[k] - radius + j
            for i in range(m):
                xx = cx[k] - radius + i
                ok = yy >= 0 and yy < ny and xx >= 0 and xx < nx
                v = 0.0
                if ok:
                    v = np.float64(img[yy, xx])
                    ok = math.isfinite(v)
                valid[j, i] = ok
                raw[j, i] = v if ok else 0.0
                st[j, i] = v - sky[k] if ok else 0.0
                if ok and v > raw_peak:
                    raw_peak = v
                if st[j, i] > peak:
                    peak = st[j, i]
        x0 = np.float64(cx[k] - radius)
        y0 = np.float64(cy[k] - radius)
        x = x_start[k]
        y = y_start[k]
        for _ in range(recentre):
            s0, sx, sy, _a, _b, _c = _sums(st, m, x0, y0, x, y, 1.5 * sigma, wx, wy, False)
            if s0 > 0:
                x += sx / s0
                y += sy / s0
        step = np.inf
        for _ in range(16):
            s0, sx, sy, _a, _b, _c = _sums(st, m, x0, y0, x, y, sigma, wx, wy, False)
            if s0 > 0:
                ddx = min(max(2.0 * sx / s0, -1.0), 1.0)
                ddy = min(max(2.0 * sy / s0, -1.0), 1.0)
                x += ddx
                y += ddy
                step = math.hypot(ddx, ddy)
            else:
                step = np.inf
            if step < 1e-4:
                break
        xc[k] = x
        yc[k] = y
        conv[k] = step < 0.01
        fwhm[k], elong[k] = _shape(st, m, x0, y0, x, y, sigma, wx, wy)
        r_ap2 = (3.0 * sigma) ** 2
        total = 0.0
        for j in range(m):
            dy = y0 + j - y
            for i in range(m):
                dx = x0 + i - x
                if valid[j, i] and dx * dx + dy * dy <= r_ap2:
                    total += st[j, i]
        flux[k] = total
        # The 3x3 core around the centroid's pixel, kept inside the stamp.
        ix = min(max(round(x) - cx[k] + radius, 1), m - 2) if math.isfinite(x) else radius
        iy = min(max(round(y) - cy[k] + radius, 1), m - 2) if math.isfinite(y) else radius
        core = 0.0
        for dj in range(-1, 2):
            for di in range(-1, 2):
                core += st[iy + dj, ix + di]
        hot[k] = peak > 0.7 * max(core, 1e-12)
        if math.isnan(saturation_adu):
            near = 0
            level = raw_peak - 0.01 * abs(peak)
            for j in range(m):
                for i in range(m):
                    if valid[j, i] and raw[j, i] >= level:
                        near += 1
            saturated[k] = near >= 5
        else:
            saturated[k] = raw_peak >= saturation_adu
        centre_ok[k] = valid[radius, radius]

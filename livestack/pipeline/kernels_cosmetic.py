"""Numba kernels for cosmetic correction: isolated hot pixels found against their ring.

Conventions as in :mod:`livestack.pipeline.kernels_calibrate`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from livestack.pipeline.kernels_common import median_small, ring_values


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def isolated_hot(image: np.ndarray, level: np.ndarray, noise: np.ndarray, sigma: float,
                 ratio: float, step: int, out: np.ndarray) -> None:
    """Flag pixels far above their same-colour ring and above all adjacent pixels.

    Pixel ``(y, x)`` of colour plane ``p = (y % step, x % step)`` is hot when
    ``v > level[p] + sigma * noise[p]``, ``v - median(ring) > sigma * noise[p]``
    (ring: the 8 pixels ``step`` away) and every adjacent pixel ``a`` (distance
    1, any colour) has ``a - level[a's plane] < ratio * (v - level[p])``.

    Parameters
    ----------
    image : ndarray, shape (ny, nx), float32
    level, noise : ndarray, shape (step, step), float64
        Background level and robust sigma per colour plane.
    sigma, ratio : float
    step : int
        1 for mono, 2 for CFA data.
    out : ndarray, shape (ny, nx), uint8
        A bool map viewed as uint8, all 0 on entry; hot pixels are set to 1.
    """
    ny, nx = image.shape
    for y in prange(ny):
        buf = np.empty(8, np.float32)
        cols = np.empty(nx, np.int64)
        py = y % step
        # One plane's columns at a time: the cut is a loop constant. A tight,
        # branch-free pass collects the candidates, then only those are tested.
        for px in range(step):
            thresh = sigma * noise[py, px]
            cut = level[py, px] + thresh
            m = 0
            for x in range(px, nx, step):
                cols[m] = x
                m += 1 if image[y, x] > cut else 0
            for k in range(m):
                x = cols[k]
                if _is_isolated_hot(image, level, step, ratio, thresh, y, x, image[y, x], buf):
                    out[y, x] = 1


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _is_isolated_hot(image: np.ndarray, level: np.ndarray, step: int, ratio: float,
                     thresh: float, y: int, x: int, v: float, buf: np.ndarray) -> bool:
    """Tests 2 and 3 of :func:`isolated_hot` for a pixel already above its plane's cut."""
    ny, nx = image.shape
    n = ring_values(image, y, x, step, buf)
    if n == 0 or not v - median_small(buf, n) > thresh:
        return False
    limit = ratio * (v - level[y % step, x % step])
    for yy in range(max(y - 1, 0), min(y + 2, ny)):
        for xx in range(max(x - 1, 0), min(x + 2, nx)):
            if yy == y and xx == x:
                continue
            a = image[yy, xx]
            if np.isfinite(a) and not a - level[yy % step, xx % step] < limit:
                return False
    return True

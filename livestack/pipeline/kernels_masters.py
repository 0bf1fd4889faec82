"""Numba kernel for combining calibration frames into a master (clipped mean per pixel)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from livestack.pipeline.kernels_common import median_small


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def clipped_mean_stack(stack: np.ndarray, kappa: float, max_iter: int, out: np.ndarray,
                       rejected: np.ndarray) -> None:
    """Per-pixel iterative kappa-sigma clipped mean along axis 0.

    The first pass centres on the median, later passes on the mean of the kept
    values; sigma is the sample standard deviation of the kept values. It stops
    when nothing more is rejected, after ``max_iter`` passes, or when fewer
    than 3 values remain. Non-finite values are ignored.

    Parameters
    ----------
    stack : ndarray, shape (n, ny, nx), float32
    kappa : float
        Rejection threshold in sigma.
    max_iter : int
    out : ndarray, shape (ny, nx), float32
        Clipped mean (NaN where no finite value).
    rejected : ndarray, shape (ny, nx), int32
        Number of values rejected per pixel.
    """
    n, ny, nx = stack.shape
    for y in prange(ny):
        vals = np.empty(n, np.float64)
        work = np.empty(n, np.float64)
        keep = np.empty(n, np.uint8)
        for x in range(nx):
            m = 0
            for i in range(n):
                v = stack[i, y, x]
                if np.isfinite(v):
                    vals[m] = v
                    keep[m] = 1
                    m += 1
            if m == 0:
                out[y, x] = np.nan
                rejected[y, x] = 0
                continue
            for i in range(m):
                work[i] = vals[i]
            centre = median_small(work, m)
            kept = m
            for it in range(max_iter):
                if kept < 3:
                    break
                s = 0.0
                for i in range(m):
                    if keep[i]:
                        s += vals[i]
                mean = s / kept
                ss = 0.0
                for i in range(m):
                    if keep[i]:
                        d = vals[i] - mean
                        ss += d * d
                sigma = np.sqrt(ss / (kept - 1))
                if it > 0:
                    centre = mean
                limit = kappa * sigma
                changed = 0
                new_kept = 0
                for i in range(m):
                    k = 1 if abs(vals[i] - centre) <= limit else 0
                    if k != keep[i]:
                        changed += 1
                    keep[i] = k
                    new_kept += k
                if new_kept == 0:
                    # Degenerate spread: fall back to every value.
                    for i in range(m):
                        keep[i] = 1
                    new_kept = m
                kept = new_kept
                if changed == 0:
                    break
            s = 0.0
            for i in range(m):
                if keep[i]:
                    s += vals[i]
            out[y, x] = np.float32(s / kept)
            rejected[y, x] = n - kept

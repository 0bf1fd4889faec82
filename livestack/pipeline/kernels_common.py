"""Small numba helpers shared by several kernel modules (inlined where they are used)."""

from __future__ import annotations

import numpy as np
from numba import njit


# Helpers are inlined at numba IR level: a real call per pixel would pass array
# structs and update their reference counts atomically from every thread.
@njit(cache=True, nogil=True, fastmath=False, inline="always")
def median_small(buf: np.ndarray, n: int) -> float:
    """Median of ``buf[:n]`` (sorted in place by insertion sort; n is tiny)."""
    for i in range(1, n):
        v = buf[i]
        j = i - 1
        while j >= 0 and buf[j] > v:
            buf[j + 1] = buf[j]
            j -= 1
        buf[j + 1] = v
    half = n // 2
    if n % 2 == 1:
        return buf[half]
    return 0.5 * (buf[half - 1] + buf[half])


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def ring_values(image: np.ndarray, y: int, x: int, step: int, buf: np.ndarray) -> int:
    """Gather the finite pixels ``step`` away from ``(y, x)`` into ``buf``; return how many.

    The ring is the 8 pixels at offsets ``(-step, 0, step)`` in each axis, the centre
    excluded (the same-colour ring for ``step`` 2 on CFA data); pixels outside the image
    and non-finite ones are skipped. ``buf`` needs room for 8 values.
    """
    ny, nx = image.shape
    n = 0
    for dy in range(-step, step + 1, step):
        yy = y + dy
        if yy < 0 or yy >= ny:
            continue
        for dx in range(-step, step + 1, step):
            xx = x + dx
            if (dy == 0 and dx == 0) or xx < 0 or xx >= nx:
                continue
            v = image[yy, xx]
            if np.isfinite(v):
                buf[n] = v
                n += 1
    return n

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

"""Numba kernel that applies a frame's normalisation (gain and offset per plane) in one pass."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numpy.typing import NDArray


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def affine_masked(src: NDArray[np.float32], footprint: NDArray[np.uint8],
                  gains: NDArray[np.float32], offsets: NDArray[np.float32],
                  out: NDArray[np.float32]) -> None:  # pragma: no cover - compiled
    """``out[c] = src[c] * gains[c] + offsets[c]`` inside the footprint, 0.0 elsewhere.

    One pass over ``(nc, ny, nx)`` float32 planes; non-finite results become 0.0 and are
    outside the footprint by construction. ``footprint`` is ``(ny, nx)`` uint8 (a bool
    view). The multiply and add round separately (no fused multiply-add), so results are
    bit-identical to numpy's ``x * g`` then ``+= o``.
    """
    nc, ny, nx = src.shape
    for task in prange(nc * ny):
        c = task // ny
        y = task - c * ny
        g = gains[c]
        o = offsets[c]
        for x in range(nx):
            v = src[c, y, x] * g
            v = v + o
            if footprint[y, x] != 0 and math.isfinite(v):
                out[c, y, x] = v
            else:
                out[c, y, x] = np.float32(0.0)

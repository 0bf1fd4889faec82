"""Numba kernels that decode big-endian FITS data arrays into native float32.

Each writes into a caller-allocated output and runs rows in parallel (``prange``), so a
26 MP frame is converted in one pass; ``bench/bench_read_calibrate.py`` measures them.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def decode_be_int16(words: np.ndarray, bscale: float, bzero: float, out: np.ndarray) -> None:
    """Decode big-endian int16 FITS pixels into native float32.

    Parameters
    ----------
    words : ndarray, shape (ny, nx), uint16
        The raw payload viewed as *native* uint16 (bytes still big-endian).
    bscale, bzero : float
        FITS scaling: ``physical = bzero + bscale * stored``.
    out : ndarray, shape (ny, nx), float32
        Output, written in full.
    """
    ny, nx = out.shape
    for y in prange(ny):
        for x in range(nx):
            w = np.int64(words[y, x])
            s = ((w & 0xFF) << 8) | (w >> 8)
            if s >= 32768:
                s -= 65536
            out[y, x] = np.float32(s * bscale + bzero)


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def decode_be_int32(words: np.ndarray, bscale: float, bzero: float, out: np.ndarray) -> None:
    """Decode big-endian int32 FITS pixels (viewed as native uint32) into float32."""
    ny, nx = out.shape
    for y in prange(ny):
        for x in range(nx):
            w = np.int64(words[y, x])
            s = (((w & 0xFF) << 24) | ((w & 0xFF00) << 8) | ((w >> 8) & 0xFF00)
                 | ((w >> 24) & 0xFF))
            if s >= 2147483648:
                s -= 4294967296
            out[y, x] = np.float32(s * bscale + bzero)


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def decode_be_float32(words: np.ndarray, out_bits: np.ndarray) -> int:
    """Byte-swap big-endian IEEE float32 words and count the finite pixels.

    Parameters
    ----------
    words : ndarray, shape (ny, nx), uint32
        The raw payload viewed as native uint32.
    out_bits : ndarray, shape (ny, nx), uint32
        The float32 output array viewed as uint32.

    Returns
    -------
    int
        Number of finite pixels (exponent bits not all ones).
    """
    ny, nx = out_bits.shape
    finite = np.zeros(ny, np.int64)
    for y in prange(ny):
        for x in range(nx):
            w = words[y, x]
            s = (((w & np.uint32(0xFF)) << np.uint32(24))
                 | ((w & np.uint32(0xFF00)) << np.uint32(8))
                 | ((w >> np.uint32(8)) & np.uint32(0xFF00))
                 | ((w >> np.uint32(24)) & np.uint32(0xFF)))
            out_bits[y, x] = s
            if (s & np.uint32(0x7F800000)) != np.uint32(0x7F800000):
                finite[y] += 1
    return int(finite.sum())

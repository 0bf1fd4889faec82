"""Preview rendering: downscale, auto screen-transfer stretch, JPEG.

The stretch is PixInsight's automatic screen transfer function (STF) on the block-averaged
image, computed per channel:

* ``c0 = median + shadows_clip_mad * MADN`` (MADN = 1.4826 MAD): the black point;
* ``x' = (x - c0) / (white - c0)`` clipped to [0, 1], ``white`` = the image maximum;
* midtones balance ``m = MTF(target_background, x'(median))`` so that the background
  lands on ``target_background``; output ``MTF(m, x')`` with
  ``MTF(m, x) = (m - 1) x / ((2 m - 1) x - m)``.

Colour: each channel gets its own black point and midtones balance, so a tinted sky
background (light pollution, an OSC sensor's green excess) becomes neutral grey
(``linked=False``). With ``linked=True`` one transfer function (from the channel-averaged
statistics) is applied to all channels, keeping the data's colour balance.

Order of work for speed at 26 MP: block-average FIRST (NaN-aware, integer factor so the
longer side is <= ``max_size_px``; a numba kernel), then statistics on a subsample of the
small image, then the transfer curve. The statistics never see the full frame.
"""

from __future__ import annotations

import io
import math

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from livestack.pipeline.kernels_binning import block_mean

_MADN = 1.4826
#: Statistics use at most about this many pixels per channel (strided subsample).
_STATS_PIXELS = 250_000


def _mtf(m: float, x: NDArray[np.float32]) -> NDArray[np.float32]:
    """Midtones transfer function, in place on ``x`` (values in [0, 1])."""
    # (m - 1) x / ((2m - 1) x - m); m in (0, 1) keeps the denominator negative for x in [0, 1].
    den = x * np.float32(2.0 * m - 1.0)
    den -= np.float32(m)
    x *= np.float32(m - 1.0)
    x /= den
    return x


def _mtf_scalar(m: float, x: float) -> float:
    return (m - 1.0) * x / ((2.0 * m - 1.0) * x - m)


def _downscale(planes: NDArray[np.float32], max_size_px: int) -> NDArray[np.float32]:
    ny, nx = planes.shape[1:]
    factor = max(1, math.ceil(max(ny, nx) / max_size_px))
    if factor == 1:
        return planes.copy()

    return block_mean(planes, factor)


def _channel_stats(plane: NDArray[np.float32]) -> tuple[float, float]:
    """Median and MADN of the finite pixels of a (strided) subsample."""
    step = max(1, int(math.sqrt(plane.size / _STATS_PIXELS)))
    sample = plane[::step, ::step]
    values = sample[np.isfinite(sample)]
    if values.size == 0:
        return math.nan, math.nan
    median = float(np.median(values))
    madn = _MADN * float(np.median(np.abs(values - np.float32(median))))
    return median, madn


def auto_stretch(image: NDArray[np.float32], max_size_px: int = 1600,
                 shadows_clip_mad: float = -2.8, target_background: float = 0.25,
                 linked: bool = False) -> NDArray[np.uint8]:
    """Downscale and auto-stretch a linear image for display.

    Parameters
    ----------
    image : ndarray (ny, nx) or (3, ny, nx), float
        Linear image in ADU; NaN/inf allowed (rendered black).
    max_size_px : int
        Longest side of the output in pixels (>= 1); the image is block-averaged by the
        smallest integer factor that achieves it (never upscaled).
    shadows_clip_mad : float
        Black point in MADN units relative to the median (negative = below).
    target_background : float
        Display level of the background in (0, 1).
    linked : bool
        Colour only: one transfer curve for all channels instead of per channel.

    Returns
    -------
    ndarray (h, w) uint8 for mono, (h, w, 3) uint8 for colour.

    Raises
    ------
    ValueError
        On a bad shape or parameter.
    """
    if max_size_px < 1:
        raise ValueError(f"max_size_px must be >= 1, got {max_size_px}")
    if not 0.0 < target_background < 1.0:
        raise ValueError(f"target_background must be in (0, 1), got {target_background}")
    arr = np.asarray(image)
    if arr.ndim == 2:
        planes = arr.reshape(1, *arr.shape)
    elif arr.ndim == 3 and arr.shape[0] == 3:
        planes = arr
    else:
        raise ValueError(f"image must be (ny, nx) or (3, ny, nx), got shape {arr.shape}")
    if min(planes.shape[1:]) < 1:
        raise ValueError(f"image is empty: shape {arr.shape}")
    small = _downscale(np.ascontiguousarray(planes, dtype=np.float32), max_size_px)
    finite = np.isfinite(small)
    white = float(small[finite].max()) if finite.any() else 1.0

    stats = [_channel_stats(small[c]) for c in range(small.shape[0])]
    if linked:
        med = float(np.nanmean([s[0] for s in stats]))
        madn = float(np.nanmean([s[1] for s in stats]))
        stats = [(med, madn)] * len(stats)

    out: NDArray[np.uint8] = np.zeros(small.shape, dtype=np.uint8)
    for c, (median, madn) in enumerate(stats):
        if not math.isfinite(median):
            continue
        black = median + shadows_clip_mad * madn if madn > 0 else median
        black = min(black, median)
        span = white - black
        if not span > 0:
            continue
        x = small[c] - np.float32(black)
        x *= np.float32(1.0 / span)
        np.clip(x, 0.0, 1.0, out=x)
        bg = (median - black) / span
        if 0.0 < bg < 1.0:
            x = _mtf(_mtf_scalar(target_background, bg), x)
        x *= np.float32(255.0)
        x += np.float32(0.5)
        np.copyto(x, np.float32(0.0), where=~finite[c])
        out[c] = x.astype(np.uint8)
    if small.shape[0] == 1:
        return np.ascontiguousarray(out[0])
    return np.ascontiguousarray(out.transpose(1, 2, 0))


def encode_jpeg(pixels: NDArray[np.uint8], quality: int = 85) -> bytes:
    """Encode a display image as JPEG in memory (Pillow).

    Parameters
    ----------
    pixels : ndarray (h, w) or (h, w, 3), uint8
    quality : int
        JPEG quality 1-95.

    Returns
    -------
    bytes

    Raises
    ------
    ValueError
        On a bad shape, dtype or quality.
    """

    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"pixels must be uint8 (h, w) or (h, w, 3), got {arr.dtype} "
                         f"{arr.shape}")
    if not 1 <= quality <= 95:
        raise ValueError(f"quality must be in 1..95, got {quality}")
    img = Image.fromarray(np.ascontiguousarray(arr))  # uint8 2-D -> "L", (h, w, 3) -> "RGB"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()

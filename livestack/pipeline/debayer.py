"""Bayer (CFA) helpers and demosaicing. Pure: arrays in, arrays out.

A pattern string names the colours of the 2x2 tile at array pixels
``[0, 0], [0, 1], [1, 0], [1, 1]`` (row-major, row 0 = first row of the
array as read), e.g. ``"RGGB"``: R at ``[0, 0]``, G at ``[0, 1]`` and
``[1, 0]``, B at ``[1, 1]``. :func:`livestack.storage.headers.parse_frame_info`
already folds ``XBAYROFF``/``YBAYROFF``/``ROWORDER`` into this effective pattern.

Colour output is ``(3, ny, nx)`` float32, planes R, G, B, co-sited with the
input pixels (plane pixel ``[y, x]`` is the colour at CFA pixel ``[y, x]``).
:func:`debayer` offers RCD (as in Siril), bilinear and Malvar-He-Cutler, and ``auto``
(the default: RCD up to :data:`AUTO_RCD_MAX_PIXELS`, Malvar-He-Cutler above);
``bench/bench_demosaic_siril.py`` compares them with Siril on real frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

BAYER_PATTERNS: tuple[str, ...] = ("RGGB", "BGGR", "GRBG", "GBRG")
#: Demosaic methods of :func:`debayer`.
DEBAYER_METHODS: tuple[str, ...] = ("auto", "rcd", "bilinear", "malvar")
#: The method used when none is configured (chosen by ``bench/bench_demosaic_siril.py``).
DEFAULT_METHOD = "auto"
#: Largest frame (pixels) that ``auto`` demosaics with RCD. RCD costs about 3x
#: Malvar-He-Cutler (``bench/bench_demosaic_siril.py --timing-only``); above 8 MP it would
#: take most of the ~250 ms per-frame budget on 2 cores, so ``auto`` switches to Malvar,
#: whose stars are nearly as sharp.
AUTO_RCD_MAX_PIXELS = 8_000_000
# Must equal kernels_demosaic.BORDER (kept here so that numba loads only when needed).
_BORDER = 5
_CODE = {"R": 0, "G": 1, "B": 2}


@dataclass(frozen=True)
class DebayerConfig:
    """How colour (CFA) frames are demosaiced.

    Attributes
    ----------
    method : str
        ``auto`` (RCD for frames up to 8 MP, Malvar-He-Cutler for larger ones, which keeps
        the per-frame time within budget at 26 MP), ``rcd`` (Ratio Corrected Demosaicing,
        Siril's default; sharpest stars), ``bilinear`` (3x3 mean of the nearest
        same-colour pixels; softest) or ``malvar`` (Malvar-He-Cutler gradient-corrected
        bilinear; about a third of RCD's time). See ``bench/bench_demosaic_siril.py`` for
        the comparison with Siril.
    rcd_green_diagonals : bool
        RCD measures which diagonal to interpolate R at B sites (and B at R sites) along
        on the green pixels around the site, whose diagonals hold one colour only, rather
        than on the site's own diagonals, where R and B alternate and their difference and
        noise steer it. On the 32 Seestar frames the stack's star SNR rises from 0.970 to
        0.984 of Siril's (+1.5 %) with stars as sharp (median FWHM 2.717 -> 2.732 px,
        Siril's 2.954); ``bench/bench_snr_factors.py``. The price: a defect left on the
        mosaic no longer steers that choice, so it reaches about 20 % more R/B samples
        (21 rather than 17 past 5 sigma on a noisy flat); the pipeline corrects isolated
        hot pixels on the mosaic first, and the stack rejects what is left. False
        restores the published RCD.
    """

    method: str = field(default=DEFAULT_METHOD, metadata={"choices": DEBAYER_METHODS})
    rcd_green_diagonals: bool = True

    def __post_init__(self) -> None:
        if self.method not in DEBAYER_METHODS:
            raise ValueError(f"method must be one of {', '.join(DEBAYER_METHODS)}, "
                             f"got {self.method!r}")


def normalize_pattern(pattern: str | None) -> str | None:
    """Return ``pattern`` upper-cased and stripped if it is one of the 4 Bayer patterns.

    Parameters
    ----------
    pattern : str or None

    Returns
    -------
    str or None
        ``"RGGB"``, ``"BGGR"``, ``"GRBG"``, ``"GBRG"``, or None for anything else.
    """
    if pattern is None:
        return None
    text = str(pattern).strip().upper()
    return text if text in BAYER_PATTERNS else None


def _checked(pattern: str) -> str:
    norm = normalize_pattern(pattern)
    if norm is None:
        raise ValueError(f"unknown Bayer pattern {pattern!r}; expected one of {BAYER_PATTERNS}")
    return norm


def shift_pattern(pattern: str, dx: int, dy: int) -> str:
    """Pattern of the array that starts ``(dx, dy)`` pixels into the CFA.

    ``new[y][x] = old[(y + dy) % 2][(x + dx) % 2]``: e.g. ``RGGB`` shifted by
    ``dx=1`` is ``GRBG``. This is what ``XBAYROFF``/``YBAYROFF`` mean.

    Raises
    ------
    ValueError
        If ``pattern`` is not a Bayer pattern.
    """
    p = _checked(pattern)
    tile = [[p[0], p[1]], [p[2], p[3]]]
    return "".join(tile[(y + dy) % 2][(x + dx) % 2] for y in (0, 1) for x in (0, 1))


def flip_pattern_rows(pattern: str, ny: int) -> str:
    """Pattern after flipping the rows of an ``ny``-row image upside down.

    New row ``y`` is old row ``ny - 1 - y``, so for even ``ny`` the two tile
    rows swap (``RGGB`` -> ``GBRG``) and for odd ``ny`` nothing changes.

    Raises
    ------
    ValueError
        If ``pattern`` is not a Bayer pattern.
    """
    p = _checked(pattern)
    return shift_pattern(p, 0, 1) if ny % 2 == 0 else p


def cfa_color_map(pattern: str) -> NDArray[np.int8]:
    """Return the ``(2, 2)`` int8 colour codes (0 R, 1 G, 2 B) of ``pattern``.

    Raises
    ------
    ValueError
        If ``pattern`` is not a Bayer pattern.
    """
    p = _checked(pattern)
    return np.array([[_CODE[p[0]], _CODE[p[1]]], [_CODE[p[2]], _CODE[p[3]]]], dtype=np.int8)


def cfa_channel_masks(pattern: str, shape: tuple[int, int]) -> NDArray[np.int8]:
    """Return an ``(ny, nx)`` int8 map of each pixel's colour code (0 R, 1 G, 2 B)."""
    cmap = cfa_color_map(pattern)
    ny, nx = shape
    return np.tile(cmap, ((ny + 1) // 2, (nx + 1) // 2))[:ny, :nx]


def _as_cfa(cfa: np.ndarray) -> NDArray[np.float32]:
    if cfa.ndim != 2:
        raise ValueError(f"CFA image must be 2-D, got shape {cfa.shape}")
    return np.ascontiguousarray(cfa, dtype=np.float32)


def debayer(cfa: np.ndarray, pattern: str, method: str = DEFAULT_METHOD,
            rcd_green_diagonals: bool = True) -> NDArray[np.float32]:
    """Demosaic a CFA frame (numba kernels, rows in parallel).

    Every method keeps each pixel's native colour exactly.

    * ``"bilinear"``: a missing colour is the mean of that colour's pixels in the 3x3
      window (the nearest ones).
    * ``"rcd"``: Ratio Corrected Demosaicing (Siril's default), edge-directed and
      resolution-keeping; see :mod:`livestack.pipeline.kernels_demosaic`.
    * ``"malvar"``: Malvar-He-Cutler gradient-corrected bilinear (linear 5x5 filters).
    * ``"auto"``: ``rcd`` up to :data:`AUTO_RCD_MAX_PIXELS` pixels, ``malvar`` above
      (:func:`resolve_method`).

    ``rcd`` and ``malvar`` compute pixels at least ``kernels_demosaic.BORDER`` (5) px
    from the edges; the border keeps the bilinear values.

    Parameters
    ----------
    cfa : ndarray, shape (ny, nx)
        Calibrated mosaic; converted to float32.
    pattern : str
        Effective pattern of ``cfa[0:2, 0:2]``.
    method : str
        One of :data:`DEBAYER_METHODS`.
    rcd_green_diagonals : bool
        RCD's diagonal discrimination from the green pixels around each R/B site
        (:attr:`DebayerConfig.rcd_green_diagonals`); False: the published one.

    Returns
    -------
    ndarray, shape (3, ny, nx), float32
        R, G, B planes co-sited with the input.

    Raises
    ------
    ValueError
        If ``cfa`` is not 2-D, ``pattern`` is unknown or ``method`` is not one of
        :data:`DEBAYER_METHODS`.
    """
    # Lazy: numba loads only when a frame is debayered (cold start of mono sessions).
    from numba import get_num_threads

    from livestack.pipeline import kernels_demosaic as kd

    data = _as_cfa(cfa)
    method = resolve_method(method, data.shape)
    cmap = cfa_color_map(pattern)
    out = np.empty((3, *data.shape), dtype=np.float32)
    if method == "bilinear" or min(data.shape) <= 2 * _BORDER:
        kd.debayer_bilinear(data, cmap, out)
        return out
    holes = None
    if kd.count_nonfinite(data):
        # The wide kernels would spread one NaN over up to a 19-px diamond: fill NaN/inf
        # from same-colour neighbours for them, then restore bilinear's 3x3 NaN footprint.
        kd.debayer_bilinear(data, cmap, out)
        holes = ~np.isfinite(out)
        finite = data[np.isfinite(data)]
        filled = np.empty_like(data)
        kd.fill_nonfinite(data, float(np.median(finite)) if finite.size else 0.0, filled)
        data = filled
    if method == "malvar":
        kd.debayer_bilinear(data, cmap, out)  # malvar leaves the border bilinear
        kd.malvar(data, cmap, out)
    else:
        # One band per thread: the fewest halo rows recomputed (numba splits prange
        # statically); rcd writes every pixel, its border bilinear.
        band_rows = -(-data.shape[0] // max(1, get_num_threads()))
        kd.rcd(data, cmap, rcd_eps(data), out, band_rows, rcd_green_diagonals)
    if holes is not None:
        out[holes] = np.nan
    return out


def resolve_method(method: str, shape: tuple[int, ...]) -> str:
    """The demosaic that ``method`` means for a frame of ``shape``.

    ``auto`` is ``rcd`` up to :data:`AUTO_RCD_MAX_PIXELS` pixels and ``malvar`` above,
    where RCD alone would take most of the per-frame budget; other methods are returned
    as they are.

    Parameters
    ----------
    method : str
        One of :data:`DEBAYER_METHODS`.
    shape : tuple of int
        ``(ny, nx)`` of the CFA frame.

    Returns
    -------
    str
        ``"rcd"``, ``"bilinear"`` or ``"malvar"``.

    Raises
    ------
    ValueError
        If ``method`` is not one of :data:`DEBAYER_METHODS`.
    """
    if method not in DEBAYER_METHODS:
        raise ValueError(f"unknown debayer method {method!r}; expected one of {DEBAYER_METHODS}")
    if method != "auto":
        return method
    return "rcd" if int(np.prod(shape)) <= AUTO_RCD_MAX_PIXELS else "malvar"


def rcd_eps(data: NDArray[np.float32]) -> float:
    """RCD's regulariser for ``data``: the published 1e-5 (on data scaled to [0, 1]) times
    the frame's level, so that the result does not depend on the ADU scale.

    Parameters
    ----------
    data : ndarray, shape (ny, nx), float32
        Finite mosaic (ADU).

    Returns
    -------
    float
        ``1e-5`` times the largest absolute value on a 1-in-7 grid (1e-5 if it is 0), ADU.
    """
    level = float(np.max(np.abs(data[::7, ::7])))
    return 1e-5 * (level if level > 0 else 1.0)


def superpixel(cfa: np.ndarray, pattern: str) -> NDArray[np.float32]:
    """2x2 superpixel demosaic: one RGB pixel per CFA tile, G = mean of the two greens.

    Pixel ``[j, i]`` of the result is centred on CFA coordinates
    ``(x, y) = (2i + 0.5, 2j + 0.5)``. An odd last row/column is dropped.

    Parameters
    ----------
    cfa : ndarray, shape (ny, nx)
    pattern : str

    Returns
    -------
    ndarray, shape (3, ny // 2, nx // 2), float32

    Raises
    ------
    ValueError
        If ``cfa`` is not 2-D or ``pattern`` is unknown.
    """
    data = _as_cfa(cfa)
    cmap = cfa_color_map(pattern)
    ny2, nx2 = data.shape[0] // 2, data.shape[1] // 2
    out = np.zeros((3, ny2, nx2), dtype=np.float32)
    for dy in (0, 1):
        for dx in (0, 1):
            k = int(cmap[dy, dx])
            plane = data[dy:2 * ny2:2, dx:2 * nx2:2]
            if k == 1:
                out[1] += 0.5 * plane
            else:
                out[k] = plane
    return out


def luminance(rgb: np.ndarray) -> NDArray[np.float32]:
    """Luminance for star detection: ``(R + 2G + B) / 4``.

    The weights follow the CFA's sampling density (two greens per tile), so
    the noise is that of a 2x2 binned mosaic and no channel dominates.

    Parameters
    ----------
    rgb : ndarray, shape (3, ny, nx)

    Returns
    -------
    ndarray, shape (ny, nx), float32

    Raises
    ------
    ValueError
        If ``rgb`` is not ``(3, ny, nx)``.
    """
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise ValueError(f"expected a (3, ny, nx) colour image, got shape {rgb.shape}")
    out = np.add(rgb[0], rgb[2], dtype=np.float32)
    out += 2.0 * rgb[1]
    out *= 0.25
    return out

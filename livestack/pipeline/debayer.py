"""Bayer (CFA) helpers and demosaicing. Pure: arrays in, arrays out.

A pattern string names the colours of the 2x2 tile at array pixels
``[0, 0], [0, 1], [1, 0], [1, 1]`` (row-major, row 0 = first row of the
array as read), e.g. ``"RGGB"``: R at ``[0, 0]``, G at ``[0, 1]`` and
``[1, 0]``, B at ``[1, 1]``. :func:`livestack.storage.headers.parse_frame_info`
already folds ``XBAYROFF``/``YBAYROFF``/``ROWORDER`` into this effective pattern.

Colour output is ``(3, ny, nx)`` float32, planes R, G, B, co-sited with the
input pixels (plane pixel ``[y, x]`` is the colour at CFA pixel ``[y, x]``).
:func:`debayer` offers RCD (the default, as in Siril), bilinear and Malvar-He-Cutler;
``bench/bench_demosaic_siril.py`` compares them with Siril on real frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

BAYER_PATTERNS: tuple[str, ...] = ("RGGB", "BGGR", "GRBG", "GBRG")
#: Demosaic methods of :func:`debayer`.
DEBAYER_METHODS: tuple[str, ...] = ("rcd", "bilinear", "malvar")
#: The method used when none is configured (chosen by ``bench/bench_demosaic_siril.py``).
DEFAULT_METHOD = "rcd"
# Must equal kernels_demosaic.BORDER (kept here so that numba loads only when needed).
_BORDER = 5
_CODE = {"R": 0, "G": 1, "B": 2}


@dataclass(frozen=True)
class DebayerConfig:
    """How colour (CFA) frames are demosaiced.

    Attributes
    ----------
    method : str
        ``rcd`` (Ratio Corrected Demosaicing, Siril's default; sharpest stars),
        ``bilinear`` (3x3 mean of the nearest same-colour pixels) or ``malvar``
        (Malvar-He-Cutler gradient-corrected bilinear). See
        ``bench/bench_demosaic_siril.py`` for the comparison that chose the default.
    """

    method: str = field(default=DEFAULT_METHOD, metadata={"choices": DEBAYER_METHODS})

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


def debayer(cfa: np.ndarray, pattern: str, method: str = DEFAULT_METHOD) -> NDArray[np.float32]:
    """Demosaic a CFA frame (numba kernels, rows in parallel).

    Every method keeps each pixel's native colour exactly.

    * ``"bilinear"``: a missing colour is the mean of that colour's pixels in the 3x3
      window (the nearest ones).
    * ``"rcd"``: Ratio Corrected Demosaicing (Siril's default), edge-directed and
      resolution-keeping; see :mod:`livestack.pipeline.kernels_demosaic`.
    * ``"malvar"``: Malvar-He-Cutler gradient-corrected bilinear (linear 5x5 filters).

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
    from livestack.pipeline import kernels_demosaic as kd

    if method not in DEBAYER_METHODS:
        raise ValueError(f"unknown debayer method {method!r}; expected one of {DEBAYER_METHODS}")
    data = _as_cfa(cfa)
    cmap = cfa_color_map(pattern)
    out = np.empty((3, *data.shape), dtype=np.float32)
    kd.debayer_bilinear(data, cmap, out)
    if method == "bilinear" or min(data.shape) <= 2 * _BORDER:
        return out
    holes = None
    if kd.count_nonfinite(data):
        # The wide kernels would spread one NaN over up to a 19-px diamond: fill NaN/inf
        # from same-colour neighbours for them, then restore bilinear's 3x3 NaN footprint.
        holes = ~np.isfinite(out)
        finite = data[np.isfinite(data)]
        filled = np.empty_like(data)
        kd.fill_nonfinite(data, float(np.median(finite)) if finite.size else 0.0, filled)
        data = filled
        kd.debayer_bilinear(data, cmap, out)  # the kernels read bilinear values near holes
    if method == "malvar":
        kd.malvar(data, cmap, out)
    else:
        _rcd(data, cmap, out)
    if holes is not None:
        out[holes] = np.nan
    return out


def _rcd(data: NDArray[np.float32], cmap: NDArray[np.int8], out: NDArray[np.float32]) -> None:
    """Run the RCD passes over ``out`` (already bilinear; ``data`` finite) in place."""
    from livestack.pipeline import kernels_demosaic as kd

    # The regularisers of the published algorithm (1e-5, on data scaled to [0, 1]) are
    # scaled by the frame's level so that the result does not depend on the ADU scale.
    level = float(np.max(np.abs(data[::7, ::7])))
    level = level if level > 0 else 1.0
    eps = 1e-5 * level
    # Each pass reads these only where an earlier pass wrote them (see kernels_demosaic).
    vh = np.empty(data.shape, dtype=np.float32)
    lpf = np.empty(data.shape, dtype=np.float32)
    kd.rcd_directions(data, cmap, eps * eps, vh, False)
    kd.rcd_lowpass(data, cmap, lpf)
    kd.rcd_green(data, cmap, vh, lpf, eps, out)
    pq = lpf  # the low-pass is not needed after the green pass: reuse its 4 bytes/pixel
    kd.rcd_directions(data, cmap, eps * eps, pq, True)
    kd.rcd_red_blue_diagonal(cmap, pq, eps, out)
    kd.rcd_red_blue_green_sites(cmap, vh, eps, out)




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

"""Frame readers for every supported format, dispatched by file-name suffix.

:func:`read_frame`, :func:`read_header` and :func:`check_complete` have the signatures
of their FITS counterparts in :mod:`livestack.storage.fitsio` (which still reads plain
and tile-compressed FITS) and return the same ``(image, FrameInfo, header)`` triple for

========================  =========================================  ==================
suffixes                  reader                                     extra
========================  =========================================  ==================
.fits .fit .fts .fz       :mod:`livestack.storage.fitsio`            (core)
.fits.gz .fit.gz .fts.gz  :mod:`.gzfits` (gzip + astropy)            (core)
.cr2 .cr3 .nef .arw .raf  :mod:`.raw` (LibRaw through rawpy)         ``livestack[raw]``
.orf .rw2 .dng
.tif .tiff                :mod:`.raster` (tifffile)                  ``livestack[formats]``
.png .jpg .jpeg           :mod:`.raster` (Pillow)                    (core)
.xisf                     :mod:`.xisfio` (xisf)                      ``livestack[formats]``
========================  =========================================  ==================

Non-FITS readers synthesise a FITS-like header (see :mod:`.common`), so the FrameInfo
is parsed by :func:`livestack.storage.headers.parse_frame_info` like any FITS frame.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
from astropy.io import fits

from livestack.pipeline.types import Allocator, FrameInfo
from livestack.reasons import Reason
from livestack.storage import fitsio
from livestack.storage.fitsio import _open, _stat_size
from livestack.storage.formats.common import ReadOptions, err
from livestack.storage.formats.gzfits import GZ_SUFFIXES, read_gzfits
from livestack.storage.formats.raster import RASTER_SUFFIXES, read_raster
from livestack.storage.formats.raw import RAW_SUFFIXES, read_raw
from livestack.storage.formats.xisfio import XISF_SUFFIXES, read_xisf
from livestack.storage.headers import parse_frame_info

__all__ = ["FRAME_SUFFIXES", "ReadOptions", "check_complete", "frame_format", "is_fits",
           "options_for",
           "read_frame", "read_header"]

_FITS_SUFFIXES: dict[str, str] = {".fits": "fits", ".fit": "fits", ".fts": "fits",
                                  ".fz": "fits.fz"}
# Longest suffix first so ``.fits.gz`` wins over a shorter match.
_BY_SUFFIX: dict[str, str] = dict(sorted(
    {**_FITS_SUFFIXES, **GZ_SUFFIXES, **RAW_SUFFIXES, **RASTER_SUFFIXES,
     **XISF_SUFFIXES}.items(), key=lambda kv: -len(kv[0])))
#: Every accepted frame suffix (lower-case; compare with ``name.lower().endswith``).
FRAME_SUFFIXES: tuple[str, ...] = tuple(_BY_SUFFIX)
_DEFAULT = ReadOptions()


def frame_format(path: Path | str) -> str | None:
    """Format name of a frame file from its suffix (case-insensitive), None if unknown.

    Returns
    -------
    str or None
        ``"fits"``, ``"fits.fz"``, ``"fits.gz"``, ``"dng"``, ``"cr2"``, ``"cr3"``,
        ``"nef"``, ``"arw"``, ``"raf"``, ``"orf"``, ``"rw2"``, ``"tiff"``, ``"png"``,
        ``"jpeg"`` or ``"xisf"``.
    """
    name = os.path.basename(os.fspath(path)).lower()
    for suffix, fmt in _BY_SUFFIX.items():
        if name.endswith(suffix):
            return fmt
    return None


def is_fits(path: Path | str) -> bool:
    """True for plain or tile-compressed FITS (the fast reader in :mod:`fitsio`)."""
    return frame_format(path) in ("fits", "fits.fz")


def _decode(path: Path, fmt: str, options: ReadOptions) -> tuple[np.ndarray, fits.Header]:
    """Pixels and synthesised header of a non-FITS frame (mapping OS errors to reasons)."""

    _stat_size(path)
    # fitsio's opener maps OSErrors the readers let through (vanished, permission) to reasons.
    with _open(path):
        if fmt == "fits.gz":
            return read_gzfits(path)
        if fmt in ("tiff", "png", "jpeg"):
            return read_raster(path, fmt, options)
        if fmt == "xisf":
            return read_xisf(path, options)
        return read_raw(path, fmt, options)


def read_frame(path: Path | str, options: ReadOptions | None = None,
               data: fitsio.FileBytes | None = None, *, empty: Allocator | None = None
               ) -> tuple[np.ndarray, FrameInfo, fits.Header]:
    """Read a frame of any supported format as native float32.

    Parameters
    ----------
    path : Path or str
    options : ReadOptions, optional
        RAW black level handling and the fall-backs for missing metadata.
    data : ndarray (n_bytes,) uint8 or bytes, optional
        The file's whole content, already read: a plain FITS frame is decoded from it
        without reading the file again. The other formats read ``path`` and ignore it.
    empty : Allocator, optional
        Where a plain FITS frame's image comes from (default ``np.empty``; see
        :func:`livestack.storage.fitsio.read_frame`). The other formats ignore it.

    Returns
    -------
    image : ndarray, shape (ny, nx) or (3, ny, nx), float32
        ``(3, ny, nx)`` for RGB raster and XISF frames (``info.channels == 3``).
    info : FrameInfo
    header : astropy.io.fits.Header
        The FITS header, or the one synthesised from the file's metadata.

    Raises
    ------
    FrameReadError
        ``"unknown_format"`` for an unsupported suffix, ``"missing_extra"`` when the
        optional package for the format is not installed, and the readers' reasons
        (``"truncated"``, ``"corrupt"``, ``"unsupported"``, ``"not_2d"``, ...).
    """

    path = Path(path)
    fmt = frame_format(path)
    if fmt is None:
        raise err(Reason.UNKNOWN_FORMAT, path, "unsupported file type (suffix)")
    if fmt in ("fits", "fits.fz"):
        return fitsio.read_frame(path, data, empty=empty)
    image, header = _decode(path, fmt, options or _DEFAULT)
    shape = (int(image.shape[-2]), int(image.shape[-1]))
    info = parse_frame_info(header, str(path), shape)
    if image.ndim == 3:
        # Already debayered: a BAYERPAT kept in its header (PixInsight does) no longer holds.
        info = replace(info, channels=int(image.shape[0]), bayer_pattern=None)
    return image, info, header


def read_header(path: Path | str, options: ReadOptions | None = None
                ) -> tuple[fits.Header, FrameInfo]:
    """Header and FrameInfo of a frame (FITS: header blocks only; others: a full decode).

    Raises
    ------
    FrameReadError
        As :func:`read_frame`.
    """

    path = Path(path)
    if is_fits(path):
        return fitsio.read_header(path)
    _, info, header = read_frame(path, options)
    return header, info


def check_complete(path: Path | str) -> int:
    """Readiness check of a frame before it is read.

    FITS files are checked against the sizes in their header
    (:func:`livestack.storage.fitsio.check_complete`). The other formats have no cheap
    declared size: the watcher's size-stability wait is their readiness test, and a
    file that is still truncated when read fails with reason ``"truncated"``.

    Returns
    -------
    int
        The size in bytes the file must have.

    Raises
    ------
    FrameNotReadyError
        FITS data unit incomplete.
    FrameReadError
        ``"empty_file"``, ``"unreadable"``, ``"vanished"``, ``"not_fits"``.
    """

    path = Path(path)
    if is_fits(path) or frame_format(path) is None:
        return fitsio.check_complete(path)
    return _stat_size(path)


def options_for(raw_black: str, utc_offset_h: float | None, exposure_s: float | None,
                masters: object | None) -> ReadOptions:
    """ReadOptions from the ``formats`` config section and the masters in use.

    Parameters
    ----------
    raw_black : str
        ``"auto"``, ``"subtract"`` or ``"keep"``. ``"auto"`` keeps the RAW black level
        when ``masters`` holds a bias or dark master (it carries the level) and
        subtracts it otherwise.
    utc_offset_h, exposure_s : float or None
        As :class:`ReadOptions`.
    masters : object or None
        A master library (``entries`` with a ``kind``), a wrapper with ``library``,
        or None.
    """
    if raw_black == "auto":
        library = getattr(masters, "library", masters)
        kinds = {getattr(e, "kind", None) for e in getattr(library, "entries", None) or ()}
        raw_black = "keep" if kinds & {"bias", "dark"} else "subtract"
    return ReadOptions(raw_black=raw_black, utc_offset_h=utc_offset_h, exposure_s=exposure_s)

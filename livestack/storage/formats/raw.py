"""Camera RAW frames (CR2, CR3, NEF, ARW, RAF, ORF, RW2, DNG) through LibRaw (``rawpy``).

The raw CFA data are taken as stored, without LibRaw's demosaic or white balance, so
livestack's own calibration, cosmetic correction and debayer run on them exactly as on
a Bayer FITS frame. The per-channel black level is subtracted unless
:attr:`ReadOptions.raw_black` is ``"keep"`` (bias or dark masters carry it); the white
level, minus the subtracted black, becomes ``SATURATE``.

Metadata: exposure, ISO (written as GAIN), make/model and DateTimeOriginal come from
the file's TIFF/EXIF tags (read with ``tifffile`` for the TIFF-structured formats:
DNG, CR2, NEF, ARW, ORF, RW2) or else from LibRaw (exposure, ISO, time). The camera
clock is local time: the offset comes from the file's OffsetTimeOriginal tag when
present, else from ``formats.utc_offset_h``.
"""

from __future__ import annotations

import struct
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from livestack.reasons import Reason
from livestack.storage.formats.common import (
    ReadOptions,
    camera_clock_to_utc,
    err,
    header_for,
    note_once,
    parse_exif_datetime,
)

#: RAW suffixes (lower-case) and their format names.
RAW_SUFFIXES: dict[str, str] = {".cr2": "cr2", ".cr3": "cr3", ".nef": "nef", ".arw": "arw",
                                ".raf": "raf", ".orf": "orf", ".rw2": "rw2", ".dng": "dng"}
MISSING_EXTRA = "reading camera RAW files needs the 'raw' extra: pip install 'livestack[raw]'"


def _tiff_tags(path: Path) -> dict[str, Any]:
    """TIFF IFD0 tags merged with the EXIF sub-IFD (EXIF wins); {} when not TIFF-structured."""
    try:
        import tifffile
    except ImportError:
        return {}
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tags: dict[str, Any] = {tag.name: tag.value for tag in page.tags.values()}
    except (tifffile.TiffFileError, ValueError, KeyError, IndexError, struct.error,
            OSError):
        return {}  # CR3 (ISO BMFF), RAF and damaged files: LibRaw's own fields are used
    exif = tags.get("ExifTag")
    if isinstance(exif, dict):
        tags.update(exif)
    return tags


def _text(exc: BaseException) -> str:
    """LibRaw's message (rawpy passes it as bytes) as plain text."""
    arg = exc.args[0] if exc.args else exc
    return arg.decode("ascii", "replace") if isinstance(arg, bytes) else str(arg)


def _ratio(value: object) -> float | None:
    """A TIFF RATIONAL (tuple) or number as float."""
    try:
        if isinstance(value, tuple) and len(value) == 2:
            return float(value[0]) / float(value[1]) if value[1] else None
        return float(value) if isinstance(value, (int, float)) else None
    except (TypeError, ValueError):
        return None


def _pattern(raw_pattern: np.ndarray | None, color_desc: bytes, path: Path) -> str:
    if raw_pattern is None or raw_pattern.shape != (2, 2):
        shape = None if raw_pattern is None else raw_pattern.shape
        raise err(Reason.UNSUPPORTED_CFA, path, f"CFA is not a 2x2 Bayer pattern (LibRaw pattern "
                  f"shape {shape}): X-Trans and linear RAWs are not supported")
    desc = color_desc.decode("ascii", "replace")
    letters = "".join(desc[int(i)] for i in raw_pattern.ravel())
    if sorted(letters) != ["B", "G", "G", "R"]:
        raise err(Reason.UNSUPPORTED_CFA, path, f"CFA colours {letters!r} are not R, G, G, B")
    return letters


def _subtract_black(image: np.ndarray, raw_pattern: np.ndarray,
                    blacks: list[int]) -> float:
    """Subtract the black of each CFA channel in place; returns the largest black subtracted."""
    top = 0.0
    for dy in range(2):
        for dx in range(2):
            black = float(blacks[int(raw_pattern[dy, dx])])
            if black:
                image[dy::2, dx::2] -= np.float32(black)
            top = max(top, black)
    return top


def read_raw(path: Path, fmt: str, options: ReadOptions) -> tuple[np.ndarray, fits.Header]:
    """Read the CFA data and metadata of a camera RAW file.

    Parameters
    ----------
    path : Path
    fmt : str
        Format name (``"dng"``, ``"cr2"``, ...).
    options : ReadOptions

    Returns
    -------
    image : ndarray, shape (ny, nx), float32
        The visible CFA area in ADU, black-subtracted per channel unless
        ``options.raw_black == "keep"``.
    header : astropy.io.fits.Header
        Synthesised: FRAMEFMT, EXPTIME, DATE-OBS (UTC), BAYERPAT, ROWORDER, INSTRUME,
        GAIN/ISOSPEED (ISO), SATURATE, RAWBLACK, BLACKSUB.

    Raises
    ------
    FrameReadError
        ``"missing_extra"`` (rawpy not installed), ``"unsupported"`` (LibRaw does not
        know the file or camera), ``"truncated"`` (I/O error: the data end early),
        ``"corrupt"`` (other LibRaw errors), ``"unsupported_cfa"`` (X-Trans, linear DNG).
    """
    try:
        import rawpy
    except ImportError:
        raise err(Reason.MISSING_EXTRA, path, MISSING_EXTRA) from None
    try:
        with rawpy.imread(str(path)) as raw:
            visible = raw.raw_image_visible
            if visible is None:
                raise err(Reason.UNSUPPORTED_CFA, path, "no CFA data (a linear or Foveon RAW)")
            pattern = _pattern(raw.raw_pattern, raw.color_desc, path)
            raw_pattern = np.array(raw.raw_pattern)
            blacks = [int(b) for b in raw.black_level_per_channel]
            white = float(raw.white_level)
            other = raw.other
            libraw_iso = float(other.iso_speed)
            libraw_exposure_s = float(other.shutter_speed)
            libraw_time = other.timestamp
            image = visible.astype(np.float32)  # copy out of LibRaw's buffer
    except rawpy.LibRawFileUnsupportedError as exc:
        raise err(Reason.UNSUPPORTED, path, "LibRaw cannot read this file or camera: "
                  f"{_text(exc)}") from exc
    except rawpy.LibRawIOError as exc:
        raise err(Reason.TRUNCATED, path, f"RAW data end early or cannot be read: {_text(exc)}"
                  ) from exc
    except (rawpy.LibRawError, rawpy.NotSupportedError) as exc:
        raise err(Reason.CORRUPT, path, f"LibRaw cannot decode the file: {_text(exc)}") from exc

    subtract = options.raw_black == "subtract"
    black = _subtract_black(image, raw_pattern, blacks) if subtract else 0.0
    tags = _tiff_tags(path)
    exposure_s = _ratio(tags.get("ExposureTime")) or (libraw_exposure_s or None)
    iso_value = tags.get("ISOSpeedRatings", tags.get("PhotographicSensitivity"))
    if isinstance(iso_value, tuple):
        iso_value = iso_value[0] if iso_value else None
    iso = float(iso_value) if isinstance(iso_value, (int, float)) else (libraw_iso or None)
    local = parse_exif_datetime(tags.get("DateTimeOriginal"), tags.get("SubsecTimeOriginal"))
    if local is None and isinstance(libraw_time, datetime) and libraw_time.year > 1970:
        # LibRaw parsed the camera-clock string itself (CR3, RAF): still camera-clock time.
        local = libraw_time.replace(tzinfo=None)
    date_obs = (camera_clock_to_utc(local, tags.get("OffsetTimeOriginal"), options, fmt)
                if local is not None else None)
    if date_obs is None:
        note_once(f"notime-{fmt}", "%s frames: no shot time in the file", fmt.upper())
    make = str(tags.get("Make") or "").strip("\x00 ")
    model = str(tags.get("Model") or "").strip("\x00 ")
    instrument = model if model.startswith(make) else f"{make} {model}".strip()
    header = header_for(fmt, exposure_s=exposure_s, date_obs_utc=date_obs,
                        bayer_pattern=pattern, instrument=instrument, iso=iso,
                        saturate_adu=white - black)
    header["RAWBLACK"] = (max(blacks) if blacks else 0, "[adu] RAW black level (LibRaw)")
    header["BLACKSUB"] = (subtract, "RAW black level subtracted by livestack")
    return image, header

"""TIFF (``tifffile``), PNG and JPEG (Pillow) frames: 8- or 16-bit, mono or RGB.

Mono data are read as they are (a CFA mosaic stays one); RGB is stacked as luminance.
Exposure, ISO, camera and time come from the EXIF tags when the file has them
(ExposureTime, ISOSpeedRatings, Make/Model, DateTimeOriginal + OffsetTimeOriginal);
otherwise the exposure is ``formats.exposure_s`` and the start time is the file's
modification time minus the exposure, and the log says so once. JPEG is accepted with a
warning: 8-bit lossy data limit the depth of the stack.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from livestack.reasons import Reason
from livestack.storage.formats.common import (
    ReadOptions,
    add_container_cards,
    camera_clock_to_utc,
    err,
    header_for,
    mtime_start,
    note_once,
    parse_exif_datetime,
    to_mono_float32,
)

#: Raster suffixes (lower-case) and their format names.
RASTER_SUFFIXES: dict[str, str] = {".tif": "tiff", ".tiff": "tiff", ".png": "png",
                                   ".jpg": "jpeg", ".jpeg": "jpeg"}
MISSING_TIFF = "reading TIFF files needs the 'formats' extra: pip install 'livestack[formats]'"
# EXIF tag numbers (Pillow gives numbers, tifffile gives names).
_EXIF_IFD = 0x8769
_PIL_NAMES = {271: "Make", 272: "Model", 306: "DateTime", 33434: "ExposureTime",
              34855: "ISOSpeedRatings", 36867: "DateTimeOriginal", 36881: "OffsetTimeOriginal",
              37521: "SubsecTimeOriginal"}


def _ratio(value: object) -> float | None:
    try:
        if isinstance(value, tuple) and len(value) == 2:
            return float(value[0]) / float(value[1]) if value[1] else None
        return float(value) if isinstance(value, (int, float)) else None  # incl. IFDRational
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def _header(path: Path, fmt: str, tags: dict[str, Any], options: ReadOptions,
            dtype: np.dtype) -> fits.Header:
    exposure_s = _ratio(tags.get("ExposureTime"))
    if exposure_s is None:
        exposure_s = options.exposure_s
        if exposure_s is None:
            note_once(f"noexp-{fmt}", "%s frames: no exposure in the metadata and no "
                      "formats.exposure_s: exposure recorded as 0 s", fmt.upper(),
                      level=logging.WARNING)
        else:
            note_once(f"cfgexp-{fmt}", "%s frames: no exposure in the metadata; %g s taken "
                      "from formats.exposure_s", fmt.upper(), exposure_s)
    local = parse_exif_datetime(tags.get("DateTimeOriginal"), tags.get("SubsecTimeOriginal"))
    if local is not None:
        date_obs = camera_clock_to_utc(local, tags.get("OffsetTimeOriginal"), options, fmt)
    else:
        date_obs = mtime_start(path, exposure_s or 0.0, fmt)
    iso_value = tags.get("ISOSpeedRatings")
    if isinstance(iso_value, tuple):
        iso_value = iso_value[0] if iso_value else None
    make = str(tags.get("Make") or "").strip("\x00 ")
    model = str(tags.get("Model") or "").strip("\x00 ")
    instrument = model if model.startswith(make) else f"{make} {model}".strip()
    header = header_for(fmt, exposure_s=exposure_s, date_obs_utc=date_obs,
                        instrument=instrument,
                        iso=float(iso_value) if isinstance(iso_value, (int, float)) else None)
    add_container_cards(header, dtype)
    return header


def _read_tiff(path: Path, options: ReadOptions) -> tuple[np.ndarray, fits.Header]:
    try:
        import tifffile
    except ImportError:
        raise err(Reason.MISSING_EXTRA, path, MISSING_TIFF) from None
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tags: dict[str, Any] = {tag.name: tag.value for tag in page.tags.values()}
            arr = page.asarray()
    except tifffile.TiffFileError as exc:
        raise err(Reason.CORRUPT, path, f"not a readable TIFF: {exc}") from exc
    except (ValueError, KeyError, IndexError, struct.error, zlib.error) as exc:
        raise err(Reason.TRUNCATED, path,
                  f"TIFF data cannot be decoded (truncated?): {exc}") from exc
    exif = tags.get("ExifTag")
    if isinstance(exif, dict):
        tags.update(exif)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar RGB
    image = to_mono_float32(arr, path, "tiff")
    return image, _header(path, "tiff", tags, options, arr.dtype)


def _read_pillow(path: Path, fmt: str, options: ReadOptions) -> tuple[np.ndarray, fits.Header]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            exif = im.getexif()
            pil_tags = {**dict(exif), **dict(exif.get_ifd(_EXIF_IFD))}
            if im.mode in ("I;16", "I;16B", "I;16L"):
                arr = np.array(im, dtype=np.uint16)
            elif im.mode in ("1", "L", "RGB", "I", "F"):
                arr = np.array(im)
            else:
                arr = np.array(im.convert("RGB"))
    except UnidentifiedImageError as exc:
        raise err(Reason.CORRUPT, path, f"not a readable {fmt.upper()} image: {exc}") from exc
    except (OSError, SyntaxError, ValueError, zlib.error, struct.error) as exc:
        # Pillow raises OSError("image file is truncated"), SyntaxError for broken PNG chunks.
        raise err(Reason.TRUNCATED, path, f"{fmt.upper()} data cannot be decoded: {exc}") from exc
    if fmt == "jpeg":
        note_once("jpeg-lossy", "JPEG frames: 8-bit lossy data limit the stack's depth and "
                  "add block artefacts; use RAW, TIFF or PNG where possible",
                  level=logging.WARNING)
    tags = {_PIL_NAMES[k]: v for k, v in pil_tags.items() if k in _PIL_NAMES}
    image = to_mono_float32(arr, path, fmt)
    return image, _header(path, fmt, tags, options, arr.dtype)


def read_raster(path: Path, fmt: str, options: ReadOptions) -> tuple[np.ndarray, fits.Header]:
    """Read a TIFF, PNG or JPEG frame.

    Parameters
    ----------
    path : Path
    fmt : str
        ``"tiff"``, ``"png"`` or ``"jpeg"``.
    options : ReadOptions
        ``exposure_s`` and ``utc_offset_h`` fill what the metadata lack.

    Returns
    -------
    image : ndarray, shape (ny, nx), float32
        Pixel values as stored (RGB: mean of the channels).
    header : astropy.io.fits.Header
        Synthesised: FRAMEFMT, EXPTIME, DATE-OBS (UTC), INSTRUME, GAIN (ISO), and BITPIX/BZERO
        of integer samples (their container, as a FITS file would describe it).

    Raises
    ------
    FrameReadError
        ``"missing_extra"`` (TIFF without tifffile), ``"corrupt"`` (not this format),
        ``"truncated"`` (data cannot be decoded), ``"not_2d"``, ``"all_nan"``.
    """
    if fmt == "tiff":
        return _read_tiff(path, options)
    return _read_pillow(path, fmt, options)

"""TIFF (``tifffile``), PNG and JPEG (Pillow) frames: 8- or 16-bit, mono or RGB.

Mono data are read as they are (a CFA mosaic stays one). RGB data (chunky or planar TIFF,
RGB/RGBA PNG and JPEG) are returned channels first, ``(3, ny, nx)``, and stacked in colour
like a debayered frame; alpha is ignored. Pillow reads 16-bit RGB PNG only as 8 bits, so
those files are decoded by ``imagecodecs`` (libpng; the ``formats`` extra), their EXIF
taken from the ``eXIf`` chunk.
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
    to_image_float32,
)

#: Raster suffixes (lower-case) and their format names.
RASTER_SUFFIXES: dict[str, str] = {".tif": "tiff", ".tiff": "tiff", ".png": "png",
                                   ".jpg": "jpeg", ".jpeg": "jpeg"}
MISSING_TIFF = "reading TIFF files needs the 'formats' extra: pip install 'livestack[formats]'"
MISSING_PNG48 = ("reading 16-bit RGB PNG files needs the 'formats' extra: "
                 "pip install 'livestack[formats]'")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types with three colour samples per pixel (RGB, RGB + alpha).
_PNG_RGB_TYPES = (2, 6)
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
            planar = int(page.planarconfig) == 2 and arr.ndim == 3  # SEPARATE: (c, ny, nx)
    except tifffile.TiffFileError as exc:
        raise err(Reason.CORRUPT, path, f"not a readable TIFF: {exc}") from exc
    except (ValueError, KeyError, IndexError, struct.error, zlib.error) as exc:
        raise err(Reason.TRUNCATED, path,
                  f"TIFF data cannot be decoded (truncated?): {exc}") from exc
    exif = tags.get("ExifTag")
    if isinstance(exif, dict):
        tags.update(exif)
    if planar:
        arr = np.moveaxis(arr, 0, -1)  # a view: to_image_float32 copies per plane
    image = to_image_float32(arr, path, "tiff")
    return image, _header(path, "tiff", tags, options, arr.dtype)


def _png_is_16bit_rgb(path: Path) -> bool:
    """True when the PNG header says 16-bit samples of an RGB or RGBA image."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(26)
    except OSError:
        return False  # Pillow's open reports it with its reason
    # Signature (8), IHDR length and type (8), width and height (8), bit depth, colour type.
    return (len(head) == 26 and head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR"
            and head[24] == 16 and head[25] in _PNG_RGB_TYPES)


def _png_exif_tags(blob: bytes) -> dict[int, Any]:
    """EXIF tags (numbers) of a PNG's ``eXIf`` chunk, without decoding the image.

    Pillow's ``getexif`` on a PNG decodes the whole image first (to 8 bits); walking the
    chunk headers costs nothing. A damaged chunk list ends the walk (no tags).
    """
    from PIL import Image  # as in _read_pillow: Pillow loads with the first raster frame

    offset = len(_PNG_SIGNATURE)
    while offset + 8 <= len(blob):
        length, kind = struct.unpack(">I4s", blob[offset:offset + 8])
        if kind == b"eXIf":
            exif = Image.Exif()
            try:
                exif.load(blob[offset + 8:offset + 8 + length])
            except (SyntaxError, ValueError, struct.error, OSError):
                return {}  # an unreadable EXIF block: the file's metadata are missing
            return {**dict(exif), **dict(exif.get_ifd(_EXIF_IFD))}
        if kind == b"IEND":
            break
        offset += 12 + length  # length, type, data, CRC
    return {}


def _read_png48(path: Path) -> tuple[np.ndarray, dict[int, Any]]:
    """A 16-bit RGB(A) PNG as ``(ny, nx, 3 or 4)`` uint16 through imagecodecs (libpng)."""
    try:  # lazy: optional (the formats extra), its absence is a per-frame reason
        import imagecodecs
    except ImportError:
        raise err(Reason.MISSING_EXTRA, path, MISSING_PNG48) from None
    blob = path.read_bytes()
    try:
        arr = np.asarray(imagecodecs.png_decode(blob))
    except imagecodecs.PngError as exc:  # libpng: short stream, bad CRC, bad zlib data
        raise err(Reason.TRUNCATED, path, f"PNG data cannot be decoded: {exc}") from exc
    except ValueError as exc:  # not a PNG after all
        raise err(Reason.CORRUPT, path, f"not a readable PNG image: {exc}") from exc
    return arr, _png_exif_tags(blob)


def _read_pillow(path: Path, fmt: str, options: ReadOptions) -> tuple[np.ndarray, fits.Header]:
    from PIL import Image, UnidentifiedImageError

    if fmt == "png" and _png_is_16bit_rgb(path):
        arr, pil_tags = _read_png48(path)
    else:
        try:
            with Image.open(path) as im:
                im.load()
                exif = im.getexif()
                pil_tags = {**dict(exif), **dict(exif.get_ifd(_EXIF_IFD))}
                if im.mode in ("I;16", "I;16B", "I;16L"):
                    arr = np.array(im, dtype=np.uint16)
                elif im.mode in ("1", "L", "LA", "RGB", "RGBA", "I", "F"):
                    arr = np.array(im)  # alpha (LA, RGBA) is dropped by to_image_float32
                else:
                    arr = np.array(im.convert("RGB"))
        except UnidentifiedImageError as exc:
            raise err(Reason.CORRUPT, path, f"not a readable {fmt.upper()} image: {exc}") from exc
        except (OSError, SyntaxError, ValueError, zlib.error, struct.error) as exc:
            # Pillow: OSError("image file is truncated"), SyntaxError for broken PNG chunks.
            raise err(Reason.TRUNCATED, path, f"{fmt.upper()} data cannot be decoded: {exc}"
                      ) from exc
    if fmt == "jpeg":
        note_once("jpeg-lossy", "JPEG frames: 8-bit lossy data limit the stack's depth and "
                  "add block artefacts; use RAW, TIFF or PNG where possible",
                  level=logging.WARNING)
    tags = {_PIL_NAMES[k]: v for k, v in pil_tags.items() if k in _PIL_NAMES}
    image = to_image_float32(arr, path, fmt)
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
    image : ndarray, shape (ny, nx) or (3, ny, nx), float32
        Pixel values as stored; RGB channels first (stacked in colour).
    header : astropy.io.fits.Header
        Synthesised: FRAMEFMT, EXPTIME, DATE-OBS (UTC), INSTRUME, GAIN (ISO), and BITPIX/BZERO
        of integer samples (their container, as a FITS file would describe it).

    Raises
    ------
    FrameReadError
        ``"missing_extra"`` (TIFF without tifffile, 16-bit RGB PNG without imagecodecs),
        ``"corrupt"`` (not this format),
        ``"truncated"`` (data cannot be decoded), ``"not_2d"``, ``"all_nan"``.
    """
    if fmt == "tiff":
        return _read_tiff(path, options)
    return _read_pillow(path, fmt, options)

"""Shared parts of the non-FITS frame readers: read options, header synthesis, log-once notes.

Every reader returns the pixels as a native float32 2-D array and a synthesised
FITS-like :class:`astropy.io.fits.Header` carrying what the file says (EXPTIME,
DATE-OBS in UTC, BAYERPAT, INSTRUME, GAIN, SATURATE, ...), so that
:func:`livestack.storage.headers.parse_frame_info` builds the same
:class:`~livestack.pipeline.types.FrameInfo` as for a FITS frame.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from astropy.io import fits

from livestack.errors import FrameReadError
from livestack.reasons import Reason

log = logging.getLogger("livestack.formats")

#: ``raw_black`` choices: subtract LibRaw's per-channel black level, or keep it in the data.
RAW_BLACK_CHOICES = ("subtract", "keep")
# Keyword recording the format a frame came in (also a stack.fits provenance column).
FORMAT_KEY = "FRAMEFMT"
_DATE_FMT = "%Y-%m-%dT%H:%M:%S.%f"
_OFFSET_RE = re.compile(r"^\s*([+-])(\d{1,2}):?(\d{2})\s*$")

_noted: set[str] = set()
_noted_lock = threading.Lock()


@dataclass(frozen=True)
class ReadOptions:
    """How non-FITS frames are read (from the ``formats`` config section).

    Attributes
    ----------
    raw_black : str
        ``"subtract"``: the RAW black level is subtracted per CFA channel (no bias
        or dark master carries it); ``"keep"``: the data keep it (bias/dark masters
        remove it, and masters are built from data that keep it).
    utc_offset_h : float or None
        Hours the camera clock is ahead of UTC, used when a file's time has no offset
        tag (RAW DateTimeOriginal, TIFF/PNG/JPEG EXIF). None: the clock is taken as UTC.
    exposure_s : float or None
        Exposure in seconds of TIFF/PNG/JPEG frames whose metadata has none.
    """

    raw_black: str = "subtract"
    utc_offset_h: float | None = None
    exposure_s: float | None = None


def note_once(key: str, message: str, *args: object, level: int = logging.INFO) -> None:
    """Log ``message`` once per process for ``key`` (per-frame notes would flood the log)."""
    with _noted_lock:
        if key in _noted:
            return
        _noted.add(key)
    log.log(level, message, *args)


def err(reason: Reason, path: Path, text: str) -> FrameReadError:
    """A :class:`FrameReadError` for ``path`` whose one-line message names it."""
    return FrameReadError(reason, f"{path}: {text}", path)


def parse_offset(text: object) -> timedelta | None:
    """EXIF ``OffsetTimeOriginal`` (``"+02:00"``) as a timedelta, None if absent or malformed."""
    if not isinstance(text, str):
        return None
    match = _OFFSET_RE.match(text.strip("\x00 "))
    if match is None:
        return None
    sign = -1 if match.group(1) == "-" else 1
    minutes = int(match.group(2)) * 60 + int(match.group(3))
    if minutes > 14 * 60:
        return None
    return timedelta(minutes=sign * minutes)


def parse_exif_datetime(text: object, subsec: object = None) -> datetime | None:
    """EXIF ``"YYYY:MM:DD HH:MM:SS"`` (plus SubSecTime digits) as a naive datetime."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.strptime(text.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    if isinstance(subsec, str) and subsec.strip("\x00 ").isdigit():
        digits = subsec.strip("\x00 ")
        moment += timedelta(seconds=int(digits) / 10 ** len(digits))
    return moment


def camera_clock_to_utc(local: datetime, offset_tag: object, options: ReadOptions,
                        fmt: str) -> datetime:
    """Turn a camera-clock time into UTC, saying once in the log which offset was used.

    Parameters
    ----------
    local : datetime
        Naive camera-clock time (EXIF DateTimeOriginal).
    offset_tag : object
        The file's OffsetTimeOriginal value (string) or None.
    options : ReadOptions
        ``utc_offset_h`` is used when the file has no offset tag.
    fmt : str
        Format name for the log line.

    Returns
    -------
    datetime
        Naive UTC.
    """
    offset = parse_offset(offset_tag)
    if offset is not None:
        note_once(f"offset-tag-{fmt}", "%s frames: camera time offset %s taken from the file's "
                  "OffsetTimeOriginal tag", fmt.upper(), str(offset_tag).strip("\x00 "))
        return local - offset
    if options.utc_offset_h is not None:
        note_once(f"offset-config-{fmt}", "%s frames: no offset tag in the file; camera clock "
                  "taken as UTC%+g h from formats.utc_offset_h", fmt.upper(),
                  options.utc_offset_h)
        return local - timedelta(hours=options.utc_offset_h)
    note_once(f"offset-utc-{fmt}", "%s frames: no offset tag in the file and no "
              "formats.utc_offset_h: camera clock taken as UTC", fmt.upper())
    return local


def mtime_start(path: Path, exposure_s: float, fmt: str) -> datetime:
    """Exposure start from the file's modification time (written at the end of the exposure).

    Raises
    ------
    FrameReadError
        ``"vanished"`` when the file is gone.
    """
    try:
        mtime_s = os.stat(path).st_mtime
    except OSError as exc:
        raise err(Reason.VANISHED, path, f"cannot stat: {exc.strerror or exc}") from exc
    note_once(f"mtime-{fmt}", "%s frames: no time in the file's metadata; start time = file "
              "modification time minus the exposure", fmt.upper())
    end = datetime.fromtimestamp(mtime_s, tz=timezone.utc).replace(tzinfo=None)
    return end - timedelta(seconds=exposure_s)


def header_for(fmt: str, *, exposure_s: float | None, date_obs_utc: datetime | None,
               bayer_pattern: str | None = None, instrument: str = "",
               iso: float | None = None, saturate_adu: float | None = None) -> fits.Header:
    """A FITS-like header with the keywords :func:`parse_frame_info` reads.

    Parameters
    ----------
    fmt : str
        Format name, stored as ``FRAMEFMT``.
    exposure_s : float or None
        EXPTIME in seconds.
    date_obs_utc : datetime or None
        Naive UTC start of the exposure (DATE-OBS).
    bayer_pattern : str or None
        BAYERPAT of array pixels ``[0:2, 0:2]`` (ROWORDER is TOP-DOWN).
    instrument : str
        Camera make and model (INSTRUME).
    iso : float or None
        ISO setting, written as GAIN (and ISOSPEED).
    saturate_adu : float or None
        Saturation level of the returned data in ADU (SATURATE).
    """
    header = fits.Header()
    header[FORMAT_KEY] = (fmt, "format of the original file")
    if exposure_s is not None:
        header["EXPTIME"] = (float(exposure_s), "[s] exposure time")
    if date_obs_utc is not None:
        header["DATE-OBS"] = (date_obs_utc.strftime(_DATE_FMT)[:-3], "UTC start of exposure")
    if bayer_pattern:
        header["BAYERPAT"] = (bayer_pattern, "CFA pattern of pixels [0:2, 0:2]")
        header["ROWORDER"] = ("TOP-DOWN", "row order of the CFA pattern")
    if instrument:
        header["INSTRUME"] = (ascii_text(instrument), "camera")
    if iso is not None and iso > 0:
        header["GAIN"] = (float(iso), "ISO setting")
        header["ISOSPEED"] = (float(iso), "ISO setting")
    if saturate_adu is not None:
        header["SATURATE"] = (float(saturate_adu), "[adu] saturation level of the data")
    return header


def ascii_text(text: str) -> str:
    """Printable ASCII for a FITS string value (non-ASCII and control characters dropped)."""
    return "".join(c for c in text if " " <= c <= "~").strip()


def to_image_float32(arr: np.ndarray, path: Path, fmt: str) -> np.ndarray:
    """A ``(ny, nx)`` or ``(ny, nx, channels)`` array as native float32, channels first.

    Mono stays 2-D (a CFA mosaic stays one). RGB becomes ``(3, ny, nx)``, the layout of a
    debayered frame, so the pipeline stacks it in colour (calibrated per channel, never
    debayered); an alpha channel is dropped, and a grey image with alpha keeps its grey.

    Raises
    ------
    FrameReadError
        ``"not_2d"`` for any other shape (2 channels, more than 4, 1-D, 4-D);
        ``"all_nan"`` when no pixel is finite.
    """
    if arr.ndim == 3 and arr.shape[2] in (1, 2):
        if arr.shape[2] == 2:
            note_once(f"alpha-{fmt}", "%s frames have an alpha channel: it is ignored",
                      fmt.upper())
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        if arr.shape[2] == 4:
            note_once(f"alpha-{fmt}", "%s frames have an alpha channel: it is ignored",
                      fmt.upper())
        note_once(f"rgb-{fmt}", "%s frames are RGB: stacked in colour (per channel)",
                  fmt.upper())
        out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.float32)
        for channel in range(3):  # one strided pass per plane: no float copy of all four
            out[channel] = arr[:, :, channel]
    elif arr.ndim == 2:
        out = np.asarray(arr, dtype=np.float32)
    else:
        raise err(Reason.NOT_2D, path, f"expected a mono or RGB image, got shape {arr.shape}")
    out = np.ascontiguousarray(out)
    if out.dtype.byteorder not in ("=", "|"):
        out = out.astype(out.dtype.newbyteorder("="))
    # Integer samples are always finite; float ones may be all NaN.
    if arr.dtype.kind == "f" and not np.isfinite(out).any():
        raise err(Reason.ALL_NAN, path, "no finite pixel in the image")
    return out


def add_container_cards(header: fits.Header, dtype: np.dtype) -> None:
    """Describe an integer sample type as FITS would (BITPIX, BZERO), in place.

    The container's range is not the camera's white level: a 12- or 14-bit camera writes
    16-bit files. Described as BITPIX/BZERO, the saturation level is found exactly as for a
    FITS frame of the same data (``headers.saturation_level``: the container's maximum,
    narrowed to 12/14 bit from the data), so a TIFF, PNG or XISF frame stacks like its
    FITS original. Floating-point samples get no cards (no level from the container).
    """
    if not np.issubdtype(dtype, np.integer):
        return
    info = np.iinfo(dtype)
    header["BITPIX"] = (int(info.bits), "sample type of the original file")
    if info.min == 0 and info.bits > 8:  # unsigned: FITS stores it offset by BZERO
        header["BZERO"] = (float(2 ** (info.bits - 1)), "unsigned samples")

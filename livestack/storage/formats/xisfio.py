"""XISF frames (PixInsight, KStars) through the ``xisf`` package.

The first image of the file is read; its FITSKeywords become the header (the first
value of each keyword, typed as FITS would: logical, integer, float or string), so
EXPTIME, DATE-OBS, BAYERPAT, GAIN, CCD-TEMP, ... are parsed exactly as in a FITS
frame. When EXPTIME or DATE-OBS are missing, the XISF properties
``Instrument:ExposureTime`` and ``Observation:Time:Start`` fill them.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import ParseError

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError

from livestack.reasons import Reason
from livestack.storage.fitsio import _card_value
from livestack.storage.formats.common import (
    FORMAT_KEY,
    ReadOptions,
    add_container_cards,
    err,
    to_image_float32,
)

XISF_SUFFIXES: dict[str, str] = {".xisf": "xisf"}
MISSING_EXTRA = "reading XISF files needs the 'formats' extra: pip install 'livestack[formats]'"
# Structural keywords that describe the original file, not this frame's pixels.
_SKIP = frozenset({"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND",
                   "BZERO", "BSCALE", "BLANK", "END", "COMMENT", "HISTORY", ""})


def fits_value(text: str) -> bool | int | float | str:
    """A FITSKeyword value string as FITS would type it (T/F, integer, float, string)."""
    value = _card_value(f"XISFKEY = {text.strip()}")  # parsed as the FITS card it was
    return text.strip().strip("'").strip() if value is None else value


def _header(meta: dict[str, Any], dtype: np.dtype) -> fits.Header:
    header = fits.Header()
    header[FORMAT_KEY] = ("xisf", "format of the original file")
    keywords = meta.get("FITSKeywords") or {}
    for name, values in keywords.items():
        key = str(name).strip().upper()
        if key in _SKIP or not values or len(key) > 8:
            continue
        try:
            header[key] = (fits_value(str(values[0].get("value", ""))),
                           str(values[0].get("comment", ""))[:40])
        except (ValueError, VerifyError):
            continue  # a keyword FITS cannot hold is not one we read
    props = meta.get("XISFProperties") or {}
    exposure = props.get("Instrument:ExposureTime", {}).get("value")
    if "EXPTIME" not in header and "EXPOSURE" not in header and exposure is not None:
        header["EXPTIME"] = (float(exposure), "[s] from Instrument:ExposureTime")
    start = props.get("Observation:Time:Start", {}).get("value")
    if "DATE-OBS" not in header and start is not None:
        header["DATE-OBS"] = (str(start).rstrip("Z"), "from Observation:Time:Start")
    add_container_cards(header, dtype)
    return header


def read_xisf(path: Path, options: ReadOptions) -> tuple[np.ndarray, fits.Header]:
    """Read the first image of an XISF file.

    Parameters
    ----------
    path : Path
    options : ReadOptions
        Unused (XISF carries FITS keywords); kept for a uniform reader signature.

    Returns
    -------
    image : ndarray, shape (ny, nx) or (3, ny, nx), float32
        Sample values as stored; RGB channels first (stacked in colour).
    header : astropy.io.fits.Header
        The image's FITSKeywords, FRAMEFMT, and BITPIX/BZERO of integer samples.

    Raises
    ------
    FrameReadError
        ``"missing_extra"`` (xisf not installed), ``"corrupt"`` (no XISF signature,
        bad XML header), ``"truncated"`` (data block shorter than declared or not
        decompressible), ``"not_2d"``, ``"all_nan"``.
    """
    del options
    try:
        from xisf import XISF
    except ImportError:
        raise err(Reason.MISSING_EXTRA, path, MISSING_EXTRA) from None
    try:
        xisf = XISF(str(path))
        metas = xisf.get_images_metadata()
        if not metas:
            raise err(Reason.NOT_2D, path, "the XISF file holds no image")
        meta = metas[0]
    except (ValueError, ParseError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise err(Reason.CORRUPT, path, f"not a readable XISF file: {exc}") from exc
    try:
        arr = xisf.read_image(0)
    except (ValueError, KeyError, TypeError, RuntimeError, NotImplementedError,
            zlib.error, struct.error) as exc:
        raise err(Reason.TRUNCATED, path, f"XISF image data cannot be decoded: {exc}") from exc
    image = to_image_float32(np.asarray(arr), path, "xisf")
    return image, _header(meta, np.asarray(arr).dtype)

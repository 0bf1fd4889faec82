"""FITS header -> :class:`~livestack.pipeline.types.FrameInfo`. Pure: header in, FrameInfo out.

Capture programs disagree on keywords and units; this module is the one place
that knows the variants.

Bayer pattern convention (``BAYERPAT``, ``XBAYROFF``, ``YBAYROFF``, ``ROWORDER``)
---------------------------------------------------------------------------------
``ROWORDER`` (``TOP-DOWN`` or ``BOTTOM-UP``) was introduced by Siril and CCDCiel
and is written by INDI, KStars, N.I.N.A., SharpCap, MaxIm DL 6.23+, ASTAP and
others (Siril documentation, "FITS" page, section "Orientation of FITS images";
free-astro wiki ``Siril:FITS_orientation``). ``BAYERPAT`` names the CFA tile as
seen reading the image top-down: for a ``TOP-DOWN`` file that is the first
stored row; for a ``BOTTOM-UP`` file it is the *last* stored row, so the
pattern of the first stored row is the flipped one ("the usual RGGB Bayer
pattern becomes GBRG if the image is upside-down", same page). Siril's
``src/algos/demosaicing.c`` implements exactly this: for bottom-up files it
flips the pattern rows with the parity of the image height
(``adjust_Bayer_pattern_orientation``: swapped for an even number of rows,
unchanged for an odd one), then shifts it by ``XBAYROFF``/``YBAYROFF``
(``adjust_Bayer_pattern_offset``: an odd ``XBAYROFF`` turns RGGB into GRBG,
an odd ``YBAYROFF`` turns RGGB into GBRG). With 2x2 tiles the order of flip
and shift does not matter. A missing ``ROWORDER`` means ``TOP-DOWN`` (what
nearly every camera driver writes, and Siril's default).

astropy returns the array in stored order (row 0 = first stored row), so
:attr:`FrameInfo.bayer_pattern` is::

    colour of array[i, j] = BAYERPAT tile[(r + YBAYROFF) % 2][(j + XBAYROFF) % 2]
    with r = i for TOP-DOWN and r = ny - 1 - i for BOTTOM-UP.

Pixel scale
-----------
``XPIXSZ`` is the *binned* pixel size in the SBIG/MaxIm convention that
N.I.N.A., INDI and ZWO follow (the real data sets say "Pixel Width in microns
(after binning)" and "pixel size in microns (with binning)"), so the scale is
``XPIXSZ / FOCALLEN * 206.265`` arcsec. INDI's unbinned ``PIXSIZE1`` is
multiplied by ``XBINNING``. ``SCALE``/``PIXSCALE``/``IM_SCALE``/``SECPIX`` win when
present (:func:`_pixel_scale`).

Saturation level
----------------
:func:`saturation_level` reads the level a pixel saturates at, first found wins:
``SATURATE`` (the camera's white level; the RAW/TIFF reader writes it there too),
``DATAMAX`` (the FITS standard's maximum valid value), then the container's range from
``BITPIX``/``BZERO`` (8 -> 255, unsigned 16 -> 65535, signed 16 -> 32767, unsigned
32 -> 4294967295). A level from ``BITPIX`` is only the container's: a 12- or 14-bit
camera writes 16-bit files, and :func:`livestack.pipeline.saturation.resolve_level`
narrows it from the data (its maximum being <= 4095 or <= 16383, or a flat-topped
maximum). Floating-point data has no level from BITPIX.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from astropy.io.fits.card import Undefined
from astropy.io.fits.verify import VerifyError

from livestack.pipeline.debayer import flip_pattern_rows, normalize_pattern, shift_pattern
from livestack.pipeline.types import FrameInfo

MJD_EPOCH = datetime(1858, 11, 17, tzinfo=timezone.utc)
# A naive DATE-OBS that differs from an independent UTC source (MJD-OBS, UT-OBS,
# JD) by at least this much is local time; smaller differences are mid-exposure
# stamps or rounding, and DATE-OBS stands.
LOCAL_TIME_MIN_S = 600.0
# Time zones are whole quarter hours: the local-time offset is rounded to this.
TZ_STEP_S = 900.0


def normalize_image_type(value: Any) -> str:
    """Map an IMAGETYP/FRAME value to ``light|dark|bias|flat|darkflat|unknown``.

    Handles ``'Light Frame'``, ``'LIGHT'``, ``'Object'``, ``'Dark Frame'``,
    ``'Bias Frame'``, ``'Offset'``, ``'Zero'``, ``'Flat Field'``, ``'Flat'``,
    ``'Dark Flat'``, ``'DARKFLAT'``, ``'Flat Dark'``, ``'Master Dark'`` ...
    """
    if value is None:
        return "unknown"
    text = re.sub(r"[^a-z]", "", str(value).lower())
    if not text:
        return "unknown"
    if "dark" in text and "flat" in text:
        return "darkflat"
    if "bias" in text or "offset" in text or text == "zero":
        return "bias"
    if "dark" in text:
        return "dark"
    if "flat" in text:
        return "flat"
    if "light" in text or text in ("object", "science", "sky"):
        return "light"
    return "unknown"


def _get(header: Mapping[str, Any], *keys: str) -> Any:
    """First present, non-empty value of ``keys``; unparsable cards count as absent."""
    for key in keys:
        if key not in header:
            continue
        try:
            value = header[key]
        except VerifyError:  # astropy raises on access to a malformed card
            continue
        if value is None or isinstance(value, Undefined):
            continue
        if isinstance(value, str) and not value.strip():
            continue
        return value
    return None


def _float(header: Mapping[str, Any], *keys: str) -> float | None:
    value = _get(header, *keys)
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(header: Mapping[str, Any], *keys: str, default: int) -> int:
    value = _float(header, *keys)
    return round(value) if value is not None else default


def _str(header: Mapping[str, Any], *keys: str) -> str:
    value = _get(header, *keys)
    return str(value).strip() if value is not None else ""


_ISO_RE = re.compile(
    r"^\s*(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?"
    r"\s*(Z|UTC|[+-]\d{2}:?\d{2})?\s*$",
    re.IGNORECASE,
)
_TIME_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?\s*$")


def _parse_iso(text: str) -> tuple[datetime, bool] | None:
    """Parse an ISO-8601 date/time; return (aware datetime, explicit_zone).

    Without a zone the result is labelled UTC and ``explicit_zone`` is False.
    """
    m = _ISO_RE.match(text)
    if not m:
        return None
    year, month, day, hh, mm, ss, frac, zone = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:
        naive = datetime(int(year), int(month), int(day), int(hh or 0), int(mm or 0),
                         int(ss or 0), micro)
    except ValueError:
        return None
    if zone is None:
        return naive.replace(tzinfo=timezone.utc), False
    if zone.upper() in ("Z", "UTC"):
        return naive.replace(tzinfo=timezone.utc), True
    sign = 1 if zone[0] == "+" else -1
    digits = zone[1:].replace(":", "")
    offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return (naive.replace(tzinfo=timezone(sign * offset))).astimezone(timezone.utc), True


def _parse_time_of_day(text: str) -> timedelta | None:
    m = _TIME_RE.match(text)
    if not m:
        return None
    hh, mm, ss, frac = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    return timedelta(hours=int(hh), minutes=int(mm), seconds=int(ss or 0), microseconds=micro)


def mjd_to_datetime(mjd: float) -> datetime:
    """Convert an MJD (UTC) to an aware UTC datetime (microsecond resolution)."""
    return MJD_EPOCH + timedelta(days=mjd)


def datetime_to_mjd(when: datetime) -> float:
    """Convert an aware datetime to MJD (UTC)."""
    return (when - MJD_EPOCH).total_seconds() / 86400.0


def _parse_dates(header: Mapping[str, Any]) -> tuple[datetime | None, float | None]:
    """Return (date_obs UTC, mjd_obs) from DATE-OBS, UT-OBS/TIME-OBS, MJD-OBS, JD.

    Precedence: DATE-OBS with an explicit zone (``Z``, ``+02:00``) is UTC
    after conversion. A naive DATE-OBS is checked against an independent UTC
    source (MJD-OBS, then UT-OBS, then JD): when they differ by 10 minutes or
    more, DATE-OBS is local time and the difference, rounded to whole quarter
    hours (time zones), is removed from it, which keeps DATE-OBS's precision
    and exposure-start meaning even when the UTC source is a mid-exposure
    stamp. Otherwise DATE-OBS is taken as UTC. Without DATE-OBS the UTC source
    is used as is.
    """
    date_text = _str(header, "DATE-OBS", "DATE_OBS")
    parsed = _parse_iso(date_text) if date_text else None
    date_obs: datetime | None = None
    explicit = False
    if parsed is not None:
        date_obs, explicit = parsed
        has_time = "T" in date_text.upper() or " " in date_text.strip() or ":" in date_text
        if not has_time:
            # Old style: DATE-OBS holds only the date, the time is elsewhere.
            tod_text = _str(header, "TIME-OBS", "UT", "UTSTART", "UT-OBS")
            tod = _parse_time_of_day(tod_text) if tod_text else None
            date_obs = date_obs + tod if tod is not None else date_obs

    utc_source: datetime | None = None
    mjd_header = _float(header, "MJD-OBS", "MJD_OBS")
    if mjd_header is not None and mjd_header > 0:
        utc_source = mjd_to_datetime(mjd_header)
    else:
        ut_text = _str(header, "UT-OBS", "UT_OBS", "DATE-UTC")
        if ut_text:
            full = _parse_iso(ut_text)
            if full is not None:
                utc_source = full[0]
            elif date_obs is not None:
                tod = _parse_time_of_day(ut_text)
                if tod is not None:
                    # Time of day only: combine with the date nearest DATE-OBS.
                    day = date_obs.replace(hour=0, minute=0, second=0, microsecond=0)
                    candidates = [day + tod + timedelta(days=k) for k in (-1, 0, 1)]
                    utc_source = min(candidates,
                                     key=lambda c: abs((c - date_obs).total_seconds()))
        if utc_source is None:
            jd = _float(header, "JD", "JD-OBS", "JD_OBS")
            if jd is not None and jd > 2400000.5:
                utc_source = mjd_to_datetime(jd - 2400000.5)

    chosen: datetime | None = date_obs
    if date_obs is None:
        chosen = utc_source
    elif not explicit and utc_source is not None:
        diff_s = (date_obs - utc_source).total_seconds()
        if abs(diff_s) >= LOCAL_TIME_MIN_S:
            chosen = date_obs - timedelta(seconds=round(diff_s / TZ_STEP_S) * TZ_STEP_S)
    if chosen is None:
        return None, None
    return chosen, datetime_to_mjd(chosen)


def _sexagesimal(text: str) -> float | None:
    parts = re.split(r"[\s:hmsd°'\"]+", text.strip())
    parts = [p for p in parts if p]
    if not parts or len(parts) > 3:
        return None
    try:
        sign = -1.0 if parts[0].startswith("-") else 1.0
        values = [abs(float(p)) for p in parts]
    except ValueError:
        return None
    total = values[0] + (values[1] / 60.0 if len(values) > 1 else 0.0) + (
        values[2] / 3600.0 if len(values) > 2 else 0.0)
    return sign * total


def _ra_dec(header: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """RA/DEC in degrees: numeric RA/DEC are degrees; strings are sexagesimal hours/degrees."""
    ra: float | None = None
    dec: float | None = None
    for ra_key, dec_key in (("RA", "DEC"), ("OBJCTRA", "OBJCTDEC"), ("RA_OBJ", "DEC_OBJ")):
        ra_val = _get(header, ra_key)
        dec_val = _get(header, dec_key)
        if ra_val is None or dec_val is None:
            continue
        if isinstance(ra_val, str):
            hours = _sexagesimal(ra_val)
            ra = hours * 15.0 if hours is not None else None
        elif not isinstance(ra_val, bool):
            ra = float(ra_val)
        if isinstance(dec_val, str):
            dec = _sexagesimal(dec_val)
        elif not isinstance(dec_val, bool):
            dec = float(dec_val)
        if ra is not None and dec is not None and math.isfinite(ra) and math.isfinite(dec):
            return ra % 360.0, dec
        ra = dec = None
    return None, None


def _pixel_scale(header: Mapping[str, Any], xbin: int) -> float | None:
    """Arcsec per (binned) pixel: a scale keyword, else pixel size over focal length.

    Scale keywords, first present and positive wins: ``SCALE`` (Siril, MaxIm),
    ``PIXSCALE`` (N.I.N.A., SharpCap), ``IM_SCALE`` (MicroObservatory, which has no
    FOCALLEN), ``SECPIX``/``SECPIX1`` (IRAF, WCSTools). Otherwise ``FOCALLEN`` (mm) with
    ``XPIXSZ`` (binned pixel size, um) or ``PIXSIZE1``/``PIXSIZE`` (unbinned) times the
    x binning. None when no combination is present.
    """
    for key in ("SCALE", "PIXSCALE", "IM_SCALE", "SECPIX", "SECPIX1"):
        scale = _float(header, key)
        if scale is not None and scale > 0:
            return scale
    focal_mm = _float(header, "FOCALLEN", "FOCAL")
    if focal_mm is None or focal_mm <= 0:
        return None
    binned_um = _float(header, "XPIXSZ")
    if binned_um is None:
        unbinned = _float(header, "PIXSIZE1", "PIXSIZE")
        binned_um = unbinned * xbin if unbinned is not None else None
    if binned_um is None or binned_um <= 0:
        return None
    return binned_um / focal_mm * 206.265


def saturation_level(header: Mapping[str, Any]) -> tuple[float | None, str]:
    """The saturation level in ADU and the keyword it came from (module docstring).

    Returns
    -------
    level_adu : float or None
        None when no keyword says it (floating-point data without SATURATE/DATAMAX).
    source : str
        ``"SATURATE"``, ``"DATAMAX"``, ``"BITPIX"`` or ``""``.
    """
    for key in ("SATURATE", "DATAMAX"):
        level = _float(header, key)
        if level is not None and level > 0:
            return level, key
    bitpix = _int(header, "BITPIX", default=0)
    bzero = _float(header, "BZERO") or 0.0
    bscale = _float(header, "BSCALE")
    if bscale not in (None, 1.0) or bitpix <= 0:
        return None, ""
    if bitpix == 8:
        return 255.0, "BITPIX"
    if bitpix in (16, 32):
        unsigned_zero = 2.0 ** (bitpix - 1)
        top = 2.0 ** bitpix - 1 if bzero == unsigned_zero else unsigned_zero - 1 + bzero
        return top, "BITPIX"
    return None, ""


def effective_bayer_pattern(header: Mapping[str, Any], ny: int) -> str | None:
    """Pattern of array pixels ``[0:2, 0:2]`` as read (see the module docstring).

    Parameters
    ----------
    header : mapping
        FITS header (BAYERPAT or COLORTYP, XBAYROFF/YBAYROFF or BAYOFFX/BAYOFFY,
        ROWORDER).
    ny : int
        Number of rows of the image (the parity matters for BOTTOM-UP).

    Returns
    -------
    str or None
        None for mono data or an unrecognised pattern.
    """
    base = normalize_pattern(_str(header, "BAYERPAT", "COLORTYP", "CFA-PAT"))
    if base is None:
        return None
    xoff = _int(header, "XBAYROFF", "BAYOFFX", default=0)
    yoff = _int(header, "YBAYROFF", "BAYOFFY", default=0)
    roworder = _str(header, "ROWORDER").upper()
    pattern = flip_pattern_rows(base, ny) if roworder == "BOTTOM-UP" else base
    return shift_pattern(pattern, xoff, yoff)


def parse_frame_info(header: Mapping[str, Any], path: str, shape: tuple[int, int]) -> FrameInfo:
    """Build the :class:`FrameInfo` of a frame from its FITS header.

    Parameters
    ----------
    header : mapping
        An ``astropy.io.fits.Header`` or any str -> value mapping.
    path : str
        File path (may contain spaces); stored as is.
    shape : tuple of int
        ``(ny, nx)`` of the image as read.

    Returns
    -------
    FrameInfo
        ``date_obs`` is timezone-aware UTC (see :func:`_parse_dates` for the
        precedence of DATE-OBS, MJD-OBS, UT-OBS, JD); ``bayer_pattern`` is the
        effective pattern of the array as read (module docstring).

    Notes
    -----
    Never raises on odd values: an unparsable keyword is treated as absent.
    """
    image_type = normalize_image_type(_get(header, "IMAGETYP", "FRAME", "FRAMETYP", "OBSTYPE"))
    exposure = _float(header, "EXPTIME", "EXPOSURE", "EXP_TIME")
    xbin = max(1, _int(header, "XBINNING", "CCDXBIN", "BINX", default=1))
    ybin = max(1, _int(header, "YBINNING", "CCDYBIN", "BINY", default=xbin))
    date_obs, mjd_obs = _parse_dates(header)
    ra, dec = _ra_dec(header)
    ny = int(shape[0])
    saturation_adu, saturation_source = saturation_level(header)
    return FrameInfo(
        path=path,
        image_type=image_type,
        shape=(int(shape[0]), int(shape[1])),
        exposure_s=exposure if exposure is not None and exposure >= 0 else 0.0,
        date_obs=date_obs,
        mjd_obs=mjd_obs,
        object_name=_str(header, "OBJECT"),
        filter_name=_str(header, "FILTER", "FILTER1", "FILTNAME"),
        ccd_temp_c=_float(header, "CCD-TEMP", "CCD_TEMP", "CCDTEMP", "SENSOR-TEMP", "TEMPERAT"),
        binning=(xbin, ybin),
        gain=_float(header, "GAIN"),
        offset=_float(header, "OFFSET", "BLKLEVEL"),
        egain_e_per_adu=_float(header, "EGAIN"),
        bayer_pattern=effective_bayer_pattern(header, ny),
        ra_deg=ra,
        dec_deg=dec,
        pixel_scale_arcsec=_pixel_scale(header, xbin),
        saturation_adu=saturation_adu,
        saturation_source=saturation_source,
    )

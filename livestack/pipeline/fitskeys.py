"""FITS keywords that say what a stack is: observation times and colour layout.

Pure helpers shared by the live stack (:mod:`.session`), ``livestack integrate`` and the
stack writer (:mod:`livestack.storage.stackfits`).

Time keywords (FITS 4.0, section 9.2.2 "Time coordinate frame")
--------------------------------------------------------------
* ``DATE-OBS``/``MJD-OBS``: the start of the observation, i.e. the start of the earliest
  frame. The standard ties MJD-OBS to DATE-OBS; both name the same instant.
* ``DATE-AVG``/``MJD-AVG``: the mean time of the observation, here the plain mean of the
  frames' mid-exposure times (start + exposure / 2).
* ``DATE-END``/``MJD-END``: the end of the observation, the latest frame's start plus its
  exposure.

Colour layout
-------------
``CFAPAT``, ``BAYERPAT``, ``XBAYROFF``, ``YBAYROFF`` (and their variants) describe a raw
mosaic. A debayered stack (NAXIS = 3) is not one, and a FITS reader that sees the
keywords would debayer it again, so they are dropped from RGB outputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

MJD_EPOCH = datetime(1858, 11, 17, tzinfo=timezone.utc)

#: Keywords that describe a CFA mosaic; meaningless (and harmful) on an RGB image.
CFA_KEYS = frozenset({"CFAPAT", "BAYERPAT", "XBAYROFF", "YBAYROFF", "BAYOFFX", "BAYOFFY",
                      "COLORTYP", "CFA-PAT", "CFATYPE"})

#: Header comments of the time keywords.
TIME_COMMENTS = {
    "DATE-OBS": "UTC start of the first frame",
    "MJD-OBS": "MJD (UTC) start of the first frame",
    "DATE-AVG": "UTC mean of the frames' mid-exposures",
    "MJD-AVG": "MJD mean of the frames' mid-exposures",
    "DATE-END": "UTC end of the last frame",
    "MJD-END": "MJD (UTC) end of the last frame",
}


def _utc(moment: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken as UTC (what the header parser returns)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def iso_utc(moment: datetime) -> str:
    """``YYYY-MM-DDThh:mm:ss.sss`` (UTC, millisecond precision, no zone suffix)."""
    return _utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def _mjd(moment: datetime) -> float:
    return (_utc(moment) - MJD_EPOCH).total_seconds() / 86400.0


def time_keywords(frames: Iterable[tuple[datetime | None, float]]) -> dict[str, str | float]:
    """DATE-OBS/MJD-OBS, DATE-AVG/MJD-AVG and DATE-END/MJD-END of a set of frames.

    Parameters
    ----------
    frames : iterable of (datetime or None, float)
        Each frame's exposure start (timezone-aware UTC; None when unknown, then the
        frame is ignored) and its exposure time in seconds.

    Returns
    -------
    dict of str to str or float
        Empty when no frame has a start time; otherwise the six keywords (dates as ISO
        strings, MJDs as float days).
    """
    known = [(_utc(start), max(0.0, float(exposure_s))) for start, exposure_s in frames
             if start is not None]
    if not known:
        return {}
    first = min(start for start, _ in known)
    end = max(start + timedelta(seconds=exposure_s) for start, exposure_s in known)
    # Mean of offsets from the first start: exact to the microsecond, no float epoch sums.
    mean_offset_s = sum((start - first).total_seconds() + exposure_s / 2.0
                        for start, exposure_s in known) / len(known)
    avg = first + timedelta(seconds=mean_offset_s)
    return {
        "DATE-OBS": iso_utc(first), "MJD-OBS": _mjd(first),
        "DATE-AVG": iso_utc(avg), "MJD-AVG": _mjd(avg),
        "DATE-END": iso_utc(end), "MJD-END": _mjd(end),
    }


def is_cfa_key(key: str) -> bool:
    """True for a keyword that describes a raw CFA mosaic (see :data:`CFA_KEYS`)."""
    return key.strip().upper() in CFA_KEYS

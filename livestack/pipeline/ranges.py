"""Range metadata for config dataclass fields (read by :mod:`livestack.config`).

Every numeric setting carries its valid range in ``dataclasses.field(metadata=...)``, so
``livestack config check`` refuses a value that would fail later in the worker (a JPEG
quality of 0 used to pass validation and then crash the first preview). The pipeline's
own ``__post_init__`` checks stay for callers that build the dataclasses directly and for
rules between fields.
"""

from __future__ import annotations

from typing import Any


def rng(lo: float | None = None, hi: float | None = None, *,
        lo_open: bool = False) -> dict[str, Any]:
    """Field metadata for an inclusive (or left-open) numeric range.

    Parameters
    ----------
    lo, hi : float or None
        Smallest and largest valid value; None leaves that side open-ended.
    lo_open : bool
        ``lo`` itself is invalid (the value must be strictly greater).

    Returns
    -------
    dict
        ``{"min": lo, "max": hi, "lo_open": lo_open}``.
    """
    return {"min": lo, "max": hi, "lo_open": lo_open}

"""The result of a stack: image, per-pixel maps, provenance and header values."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray

from livestack.pipeline.fitskeys import time_keywords
from livestack.pipeline.types import FrameInfo, FrameRecord


@dataclass(frozen=True)
class StackProduct:
    """A stack ready to be written as FITS.

    Attributes
    ----------
    image : ndarray (ny, nx) or (3, ny, nx), float32
        Stacked image in ADU; NaN where no frame covers.
    weight : ndarray (ny, nx), float32
        Summed weights of the accepted samples.
    count : ndarray (ny, nx) or (3, ny, nx), uint16
        Accepted samples per pixel.
    rejected_low, rejected_high : ndarray, like ``count``, uint16
        Samples rejected below / above the running mean per pixel.
    records : list of FrameRecord
        Every frame seen by the stack (accepted, rejected and failed), in order.
    header : dict of str to object
        FITS header values (NCOMBINE, EXPTIME, DATE-OBS, DATE-END, MJD-OBS, EGAIN, ...).
        Keys are FITS keywords (<= 8 characters); values are str, int, float or bool.
    std : ndarray like ``image``, float32, optional
        Per-pixel weighted standard deviation of the accepted samples.
    frame_noise_adu : ndarray, shape (n_accepted, channels), float64, optional
        Background sigma (ADU) of each accepted frame after normalisation, in the order
        of the accepted ``records`` (batch integrations; lets a live stack continue).
    frame_norms : list of dict, optional
        Each accepted frame's normalisation (``FrameNorm.to_json()``), in the order of the
        accepted ``records`` (batch integrations).
    """

    image: NDArray[np.float32]
    weight: NDArray[np.float32]
    count: NDArray[np.uint16]
    rejected_low: NDArray[np.uint16]
    rejected_high: NDArray[np.uint16]
    records: list[FrameRecord]
    header: dict[str, object]
    std: NDArray[np.float32] | None = None
    frame_noise_adu: NDArray[np.float64] | None = None
    frame_norms: list[dict[str, Any]] | None = None


def provenance_header(stack_id: str, frames: Iterable[tuple[datetime | None, float]],
                      reference: FrameInfo | None, egain_e_per_adu: float | None,
                      **settings: object) -> dict[str, object]:
    """The header values every stack carries, live or batch (one place for both).

    Parameters
    ----------
    stack_id : str
    frames : iterable of (datetime or None, float)
        Start time and exposure (s) of each combined frame.
    reference : FrameInfo or None
        The reference frame's header facts (object, filter, binning).
    egain_e_per_adu : float or None
        The frames' gain (e-/ADU).
    **settings
        Further keywords in order (``COMBINE``, ``NORMALIZ``, ``WARPKERN``, ...).

    Returns
    -------
    dict of str to object
        ``NCOMBINE``, ``EXPTIME``, ``STACKID``, the settings, the time keywords
        (``DATE-OBS``, ``DATE-AVG``, ``DATE-END``, ...), ``OBJECT``, ``FILTER``,
        ``XBINNING``, ``YBINNING`` and ``EGAIN``. A colour stack is debayered, so no CFA
        keys (``pipeline.fitskeys``).
    """
    listed = list(frames)
    header: dict[str, object] = {
        "NCOMBINE": len(listed),
        "EXPTIME": float(sum(exposure_s for _, exposure_s in listed)),
        "STACKID": stack_id,
    }
    header.update(settings)
    header.update(time_keywords(listed))
    if reference is not None:
        header["OBJECT"] = reference.object_name
        header["FILTER"] = reference.filter_name
        header["XBINNING"] = reference.binning[0]
        header["YBINNING"] = reference.binning[1]
    if egain_e_per_adu is not None:
        header["EGAIN"] = float(egain_e_per_adu)
    return header

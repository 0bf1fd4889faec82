"""Reading a light frame: one way for the live session, ``integrate`` and the rebuild.

:func:`read_light` honours the ``formats`` options of the configuration (the UTC offset
of a camera's local clock, a fall-back exposure, the RAW black level) in every path, so
a re-stack reads a frame exactly as the live stack read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from livestack.pipeline.types import Allocator, FrameInfo
from livestack.storage.fitsio import FileBytes
from livestack.storage.formats import options_for, read_frame


def read_light(path: Path | str, formats: Any = None, masters: Any = None,
               data: FileBytes | None = None, *, empty: Allocator | None = None
               ) -> tuple[np.ndarray, FrameInfo]:
    """Read a light frame of any supported format as float32 with its header facts.

    Parameters
    ----------
    path : Path or str
    formats : FormatsConfig, optional
        ``raw_black`` (``"auto"``, ``"subtract"``, ``"keep"``), ``utc_offset_h`` and
        ``exposure_s``; None: ``"auto"`` and no fall-backs.
    masters : object, optional
        The masters in use (anything with ``entries`` or ``library.entries``): with
        ``raw_black="auto"`` a bias or dark master keeps the RAW black level in the frame,
        since the master carries it.
    data : ndarray (n_bytes,) uint8 or bytes, optional
        The file's whole content, already read (plain FITS is decoded from it; see
        :func:`livestack.storage.formats.read_frame`).
    empty : Allocator, optional
        Where a plain FITS frame's image comes from (default ``np.empty``).

    Returns
    -------
    image : ndarray, shape (ny, nx), float32
        ADU, a CFA mosaic for colour cameras.
    info : FrameInfo

    Raises
    ------
    FrameReadError
        The file cannot be decoded (reason code and the path in the message).
    OSError
        From the file system (missing, permissions); the caller decides the reason.
    """
    raw_black = getattr(formats, "raw_black", "auto")
    utc_offset_h = getattr(formats, "utc_offset_h", None)
    exposure_s = getattr(formats, "exposure_s", None)
    image, info, _header = read_frame(Path(path),
                                      options_for(raw_black, utc_offset_h, exposure_s, masters),
                                      data, empty=empty)
    return image, info


__all__ = ["read_light"]

"""Does ``stack.fits`` on disk match a stack's restored state?

After a crash the checkpoint and the journal may hold more frames than the last
``stack.fits`` written (it is rewritten every ``output.fits_every_frames``), and a file cut
short by a full disk or a copy may sit in the stack folder. The daemon asks
:func:`stack_fits_matches` when it restores a stack and rewrites the file when the answer
is no. Only headers are read (the image is not), so the check is cheap at 26 MP.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from astropy.io import fits

__all__ = ["stack_fits_matches"]

_log = logging.getLogger(__name__)


def stack_fits_matches(path: Path, n_accepted: int, n_records: int) -> bool:
    """True when ``path`` is a complete stack FITS of ``n_accepted`` frames.

    Parameters
    ----------
    path : Path
        The ``stack.fits`` file.
    n_accepted : int
        Frames in the restored stack (must equal ``NCOMBINE``).
    n_records : int
        Frames the restored stack has seen (must equal the ``FRAMES`` table's rows).

    Returns
    -------
    bool
        False when the file is missing, unreadable, truncated (an HDU's data runs past
        the end of the file) or describes another number of frames. Never raises.
    """
    try:
        size = os.path.getsize(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a truncated file is an answer here, not news
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                for hdu in hdul:
                    info = hdu.fileinfo()
                    if info is None or info["datLoc"] + info["datSpan"] > size:
                        return False
                ncombine = hdul[0].header.get("NCOMBINE")
                rows = hdul["FRAMES"].header.get("NAXIS2") if "FRAMES" in hdul else None
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        _log.debug("%s: not a usable stack FITS: %s", path, exc)
        return False
    return ncombine == n_accepted and rows == n_records

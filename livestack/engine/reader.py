"""Reading a frame for the engine and choosing its masters.

Used by ingest, resume, re-routing and the rebuild's catch-up: one place turns an
``OSError`` into a :class:`~livestack.errors.FrameError` with a reason, and one place
decides which masters calibrate a light.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from livestack.errors import (
    CalibrationError,
    DescriptorsExhaustedError,
    FrameError,
    MasterError,
)
from livestack.reasons import Reason
from livestack.runopts import UNCALIBRATED_HINT, calibration_gap
from livestack.service.limits import is_fd_exhaustion
from livestack.storage.calibration import CalibrationRecord, open_masters
from livestack.storage.lights import read_light

if TYPE_CHECKING:
    import numpy as np

    from livestack.config import Config
    from livestack.pipeline.types import Allocator, FrameInfo
    from livestack.storage.fitsio import FileBytes

log = logging.getLogger("livestack.engine")


def load_masters(config: Config) -> Any:
    """The master library ``config.masters.paths`` names (None when it names none).

    Raises
    ------
    MasterError
        A master cannot be loaded.
    """
    library = open_masters(paths=config.masters.paths,
                           temp_tolerance_c=config.masters.temp_tolerance_c)
    if library is None:
        return None
    log.info("loaded %d master frame(s) from %s", len(library),
             ", ".join(config.masters.paths))
    return library


class FrameReader:
    """Reads lights read-only and selects their masters.

    Parameters
    ----------
    config : Config
    masters : object or None
        A ``MasterLibrary`` (``select(info, tolerance_c)``); None: lights are uncalibrated.
    calibration : CalibrationRecord
        Keeps each master used in ``<output>/masters/`` with its hash.
    """

    def __init__(self, config: Config, masters: Any, calibration: CalibrationRecord) -> None:
        self.config = config
        self.masters = masters
        self.calibration = calibration
        #: The recorded masters of the frame in progress (for its journal row).
        self.frame_masters: list[dict[str, str]] = []
        self._masters_note: dict[tuple[int, int], str] = {}
        self._uncalibrated_warned = False  # the no-dark/no-flat warning is given once

    def read(self, path: str, data: FileBytes | None = None, *,
             empty: Allocator | None = None) -> tuple[np.ndarray, FrameInfo]:
        """Read a frame read-only.

        Parameters
        ----------
        path : str
        data : ndarray (n_bytes,) uint8 or bytes, optional
            The file's whole content when the caller has read it already (to hash it):
            a plain FITS frame is then decoded from these bytes, not read again.
        empty : Allocator, optional
            Where a plain FITS frame's image comes from (the ingest's buffer pool).

        Returns
        -------
        image : ndarray
            The raw frame (shape ``(ny, nx)``, float32, ADU).
        info : FrameInfo

        Raises
        ------
        FrameError
            ``vanished``, ``permission_denied``, ``not_a_file``, ``unreadable`` or the
            reader's own reason (``not_fits``, ``truncated``, ...).
        DescriptorsExhaustedError
            No file descriptor was left (never a verdict on the frame).
        """
        try:
            image, info = read_light(path, self.config.formats, self.masters, data,
                                     empty=empty)
        except FileNotFoundError:
            raise FrameError(Reason.VANISHED, f"{path}: the file disappeared while it was read",
                             path) from None
        except PermissionError:
            raise FrameError(Reason.PERMISSION_DENIED, f"{path}: permission denied",
                             path) from None
        except IsADirectoryError:
            raise FrameError(Reason.NOT_A_FILE, f"{path}: not a regular file", path) from None
        except OSError as exc:
            if is_fd_exhaustion(exc):  # the row stays pending; the worker retries
                raise DescriptorsExhaustedError(f"{path}: {exc.strerror}") from None
            raise FrameError(Reason.UNREADABLE, f"{path}: cannot read: {exc.strerror or exc}",
                             path) from None
        return image, info

    def select_masters(self, info: FrameInfo) -> Any:
        """The masters for a light (None without a library).

        Raises
        ------
        CalibrationError
            ``master_shape_mismatch`` when masters are configured but none has the frame's
            shape and binning (stacking it uncalibrated would hide the mistake);
            ``master_unreadable`` when a chosen master file cannot be read any more.
        """
        self.frame_masters = []
        if self.masters is None:
            if not self._uncalibrated_warned:
                self._uncalibrated_warned = True
                log.warning("light frames are stacked uncalibrated: no master dark or flat "
                            "(%s)", UNCALIBRATED_HINT)
            return None
        entries = getattr(self.masters, "entries", None)
        if entries and not any(e.info.shape == info.shape and e.info.binning == info.binning
                               and e.info.channels == info.channels for e in entries):
            rgb = {1: "", 3: " RGB"}  # RGB frames need RGB masters, mono/CFA ones 2-D masters
            have = sorted({f"{e.info.shape[1]}x{e.info.shape[0]}{rgb.get(e.info.channels, '')}"
                           for e in entries})
            raise CalibrationError(
                Reason.MASTER_SHAPE_MISMATCH,
                f"{info.path}: frame is {info.shape[1]}x{info.shape[0]}"
                f"{rgb.get(info.channels, '')} bin "
                f"{info.binning[0]}x{info.binning[1]} but the masters are {', '.join(have)}",
                info.path)
        try:
            chosen, self.frame_masters = self.calibration.select(
                info, self.config.masters.temp_tolerance_c)
        except MasterError as exc:
            raise CalibrationError(Reason.MASTER_UNREADABLE, f"{info.path}: {exc}",
                                   info.path) from None
        assert chosen is not None  # a library is there (checked above)
        gap = calibration_gap(chosen)
        if gap is not None and not self._uncalibrated_warned:
            self._uncalibrated_warned = True
            log.warning("light frames are stacked with %s (%s)", gap, UNCALIBRATED_HINT)
        description = "; ".join(chosen.description) or "no masters apply"
        if self._masters_note.get(info.shape) != description:
            self._masters_note[info.shape] = description
            log.info("masters for %s frames: %s", f"{info.shape[1]}x{info.shape[0]}",
                     description)
        return chosen

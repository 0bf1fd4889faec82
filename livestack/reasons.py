"""Why a frame was not stacked: the reason codes of :class:`~livestack.errors.FrameError`.

The codes are stored in the journal's ``reason`` column, sent to viewers in ``frame``
events and written to ``stack.fits``; their string values are part of those formats and
never change. A replay that can no longer read a frame stores ``replay_<code>``.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    """Machine-readable reason a frame cannot be used (``snake_case`` on the wire).

    A ``str`` subclass: members compare equal to their value, serialise to it in JSON and
    SQLite, and format as it (``f"{Reason.TRUNCATED}"`` is ``"truncated"``).
    """

    # -- the file
    VANISHED = "vanished"                      #: gone before or while it was read
    UNREADABLE = "unreadable"                  #: an I/O error, a directory
    PERMISSION_DENIED = "permission_denied"
    NOT_A_FILE = "not_a_file"                  #: a directory, FIFO, device
    EMPTY_FILE = "empty_file"                  #: 0 bytes
    INCOMPLETE = "incomplete"                  #: still being written (retried)
    TRUNCATED = "truncated"                    #: shorter than its header declares
    CORRUPT = "corrupt"                        #: the format's decoder refuses it
    NOT_FITS = "not_fits"
    UNKNOWN_FORMAT = "unknown_format"          #: a suffix no reader handles
    UNSUPPORTED = "unsupported"                #: a camera or variant LibRaw cannot read
    UNSUPPORTED_CFA = "unsupported_cfa"        #: not a 2x2 Bayer mosaic
    MISSING_EXTRA = "missing_extra"            #: the optional package for the format
    # -- the image
    NOT_2D = "not_2d"
    ALL_NAN = "all_nan"                        #: no finite pixel
    NAN_PIXELS = "nan_pixels"                  #: too many non-finite pixels
    SHAPE_MISMATCH = "shape_mismatch"          #: differs from the stack's frames
    ZERO_NOISE = "zero_noise"                  #: a constant or clipped frame
    BAD_WEIGHT = "bad_weight"                  #: a non-finite or negative frame weight
    # -- calibration
    MASTER_SHAPE_MISMATCH = "master_shape_mismatch"
    MASTER_UNREADABLE = "master_unreadable"
    # -- registration
    TOO_FEW_STARS = "too_few_stars"
    NO_MATCH = "no_match"
    NO_OVERLAP = "no_overlap"
    # -- re-reading a frame the journal lists (resume, rebuild, integrate)
    MISSING = "missing"
    CHANGED_ON_DISK = "changed_on_disk"
    # -- the engine's own verdicts on a file (journal rows, never raised)
    DUPLICATE = "duplicate"                    #: same content as a file already stacked
    CALIBRATION_FRAME = "calibration_frame"    #: a bias/dark/flat in the watch folder
    DANGLING_SYMLINK = "dangling_symlink"
    OUTSIDE_WATCH_FOLDER = "outside_watch_folder"  #: a symlink leading out of it
    INTERNAL_ERROR = "internal_error"          #: a bug met by this frame (traceback logged)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)


#: Reasons that mark a frame ``failed`` (the setup is wrong) rather than ``rejected``.
CALIBRATION_FAILURES = frozenset({Reason.MASTER_SHAPE_MISMATCH, Reason.MASTER_UNREADABLE})

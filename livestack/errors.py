"""The one exception tree of livestack.

Every error livestack raises on purpose derives from :class:`LivestackError`.
User errors (bad config, bad input files, missing masters) carry a one-line
message that names the file or key; ``livestack.cli`` prints that line without
a traceback and maps the class to an exit code.

Per-frame problems derive from :class:`FrameError` and carry a machine-readable
:class:`~livestack.reasons.Reason` and the frame's path. The daemon turns them into a
journal row with that reason and keeps running; they never stop the stack.
"""

from __future__ import annotations

import os

from livestack.reasons import Reason

__all__ = [
    "CalibrationError", "ConfigError", "DescriptorsExhaustedError", "FrameError",
    "FrameNotReadyError", "FrameReadError", "JournalError", "JournalFullError",
    "LivestackError", "MasterError", "Reason", "RegistrationError", "StorageError",
    "TransientError", "UsageError",
]


class LivestackError(Exception):
    """Base class of every error livestack raises on purpose."""

    #: Process exit code used by the CLI when this error ends a command.
    exit_code: int = 1


class ConfigError(LivestackError):
    """A configuration file or value is invalid.

    The message names the file and the key path, e.g.
    ``livestack.yaml: stack.reject.kappa_high: must be > 0, got -1``.
    """

    exit_code = 2


class UsageError(LivestackError):
    """A command-line argument is invalid (bad path, bad expression, ...)."""

    exit_code = 2


class FrameError(LivestackError):
    """One frame cannot be used. The daemon records it and goes on.

    Parameters
    ----------
    reason : Reason or str
        Why, e.g. ``Reason.TRUNCATED`` (or its value ``"truncated"``).
    message : str
        One human sentence naming the file where known.
    path : str or PathLike, optional
        The frame's file, when known (a rebuild names the frame it must leave out by it).

    Raises
    ------
    ValueError
        ``reason`` is not a :class:`Reason` value (every code lives in one place).
    """

    def __init__(self, reason: Reason | str, message: str,
                 path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.reason = Reason(reason)
        self.message = message
        self.path = None if path is None else os.fspath(path)

    def __reduce__(self) -> tuple[type, tuple[Reason, str, str | None]]:
        # Pickled with every argument: a Dask worker's FrameError reaches the client
        # intact (the default would call __init__ with the message only).
        return (type(self), (self.reason, self.message, self.path))


class FrameReadError(FrameError):
    """The file is not a readable, complete, 2-D FITS image."""


class FrameNotReadyError(FrameError):
    """The file is still being written (data unit incomplete); retry later."""


class CalibrationError(FrameError):
    """No usable master fits the frame, or the master's shape does not match."""


class RegistrationError(FrameError):
    """The frame cannot be aligned to the stack's reference."""


class MasterError(LivestackError):
    """Building or loading master calibration frames failed."""


class StorageError(LivestackError):
    """Writing output (stack FITS, checkpoint, journal) failed, e.g. disk full."""


class JournalError(StorageError):
    """The SQLite journal cannot be opened or written."""


class TransientError(LivestackError):
    """A temporary shortage (no file descriptor, no disk space for the journal).

    The frame it struck is not judged: the worker pauses intake, retries with backoff and
    goes on by itself once the shortage is over (:mod:`livestack.resilience`).

    Attributes
    ----------
    code : str
        Alert code: ``descriptors_exhausted`` or ``journal_full``.
    """

    code = "transient"


class DescriptorsExhaustedError(TransientError):
    """``EMFILE``/``ENFILE``: the process or the system has no file descriptor free."""

    code = "descriptors_exhausted"


class JournalFullError(JournalError, TransientError):
    """A journal write failed with "database or disk is full" (``SQLITE_FULL``/ENOSPC)."""

    code = "journal_full"

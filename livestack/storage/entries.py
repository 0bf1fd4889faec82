"""Rules for directory entries that look like frames but must not be read as such.

* A **symlink leading outside the watch folder** is refused (journal status ``ignored``,
  reason ``outside_watch_folder``): the watch folder is what the operator exposed to the
  capture software, and a link must not make livestack read (and serve the name of) any
  other file the service user can read. Links inside the folder are followed.
* A **dangling symlink** is recorded as ``failed``/``dangling_symlink`` (not ``vanished``,
  which would suggest a file that existed).

FIFOs, sockets and directories named like frames are caught by the engine's regular-file
check (``not_a_file``) before anything opens them (opening a FIFO would block).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from livestack.config import is_within
from livestack.reasons import Reason
from livestack.storage.journal import Journal

__all__ = ["check_entry", "unjournaled"]


def check_entry(path: str, watch_root: Path | None) -> tuple[Reason, str, str, int] | None:
    """Refuse a symlink out of the watch folder or a dangling one.

    Parameters
    ----------
    path : str
        Absolute path of the candidate.
    watch_root : Path or None
        The watch folder; None (batch mode: the files were named by the user) skips the
        folder rule.

    Returns
    -------
    tuple or None
        ``(reason, message, status, log level)`` for the journal, or None to go on.
    """
    if not os.path.islink(path) and (watch_root is None or is_within(path, watch_root)):
        return None
    target = os.path.realpath(path)
    if not os.path.exists(path):
        return (Reason.DANGLING_SYMLINK, f"{path}: a symlink to {target}, which does not exist",
                "failed", logging.WARNING)
    if watch_root is not None and not is_within(path, watch_root):
        return (Reason.OUTSIDE_WATCH_FOLDER,
                f"{path}: a symlink to {target}, outside the watch folder {watch_root}; "
                "not followed (links out of the watch folder are refused)",
                "ignored", logging.WARNING)
    return None


def unjournaled(journal: Journal, paths: list[Path]) -> list[Path]:
    """The paths the journal has no final row for (same path, size and mtime).

    A restart's scan of the watch folder finds every frame of the night; queueing the ones
    already journaled made the daemon report "falling behind: 40 frames waiting" at every
    start. They are left out here (one ``stat`` and one indexed query each); anything that
    cannot be stat'ed is kept, so that the engine records why.

    Raises
    ------
    JournalError
        The journal cannot be queried.
    """
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(path)
            continue
        if not journal.seen(os.path.abspath(path), st.st_size, st.st_mtime_ns):
            out.append(path)
    return out

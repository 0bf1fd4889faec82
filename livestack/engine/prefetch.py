"""Hash the next file in a second thread while the current frame is processed.

Every file is hashed (SHA-256, for the journal's duplicate check) before its frame is read:
about 40 ms of one core per 26 MP frame on a quiet machine, during which the numeric
kernels of the frame before could use that core's twin. ``hashlib`` releases the GIL on
large updates, so hashing file N+1 in a thread while frame N is calibrated, warped and
accumulated takes the hash off the frame's critical path (``bench/bench_stack_dense.py``).

Only the hash runs in the thread, never a numba kernel: numba's ``workqueue`` threading
layer (the fall-back when neither TBB nor OpenMP is installed) aborts the process when two
threads launch parallel kernels at once. Reading the pixels stays in the engine's thread.

What the thread computes is used only if the file still has the size, mtime and inode it
had when hashed (:meth:`Prefetcher.take`); otherwise the engine hashes it again itself, as
it did before. The journal is written by the engine's thread alone, in the same order as
before, so the crash-safety invariants of :mod:`livestack.engine.core` are unchanged: a
crash while the thread hashes leaves no trace for that file, and the next start handles
it as new.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from livestack.storage.journal import sha256_file

log = logging.getLogger("livestack.engine")


@dataclass(frozen=True)
class FileHash:
    """A file's SHA-256 and the identity of the version that was hashed.

    Attributes
    ----------
    path : str
        Absolute path.
    size : int
        Bytes, from ``os.stat`` before hashing.
    mtime_ns : int
        Modification time, ns, from the same ``stat``.
    inode : int
        ``st_ino`` of the same ``stat``.
    sha256 : str
        Hex digest of the content.
    """

    path: str
    size: int
    mtime_ns: int
    inode: int
    sha256: str

    def matches(self, st: os.stat_result) -> bool:
        """True when ``st`` (a later ``stat`` of the same path) describes the hashed file."""
        return (st.st_size == self.size and st.st_mtime_ns == self.mtime_ns
                and st.st_ino == self.inode)


def hash_file(path: str) -> FileHash | None:
    """Stat and hash ``path`` (the thread's job); None when it cannot be read.

    The engine then hashes the file itself and turns the error into the frame's verdict.
    """
    try:
        before = os.stat(path)
        sha = sha256_file(path)
        after = os.stat(path)
    except OSError:
        return None
    if (after.st_size, after.st_mtime_ns, after.st_ino) != (
            before.st_size, before.st_mtime_ns, before.st_ino):
        return None  # written to while hashed: the engine hashes it itself
    return FileHash(path, before.st_size, before.st_mtime_ns, before.st_ino, sha)


class Prefetcher:
    """At most one file hashed ahead, in one daemon thread.

    :meth:`submit` starts hashing a path (it replaces a pending result for another path);
    :meth:`take` returns the hash of a path if it was submitted, waiting for the thread.
    Any thread may call them; the engine's thread normally does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[str, Future[FileHash | None]] | None = None
        self._closed = False

    def submit(self, path: Path | str) -> None:
        """Start hashing ``path`` in the background (no-op after :meth:`close`)."""
        spath = os.path.abspath(path)
        with self._lock:
            if self._closed:
                return
            if self._pending is not None and self._pending[0] == spath:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="livestack-prefetch")
            self._pending = (spath, self._pool.submit(hash_file, spath))

    def take(self, path: Path | str) -> FileHash | None:
        """The hash of ``path`` if it was submitted (waits for it), else None.

        The result is handed out once; a result for another path is dropped.
        """
        spath = os.path.abspath(path)
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None or pending[0] != spath:
            return None
        return pending[1].result()

    def close(self) -> None:
        """Drop any pending result and stop the thread (waits for a hash in progress)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            self._pending = None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

"""Watch a folder and report each new FITS frame once the camera has finished writing it.

Readiness rules
---------------
Capture software either writes straight to the final name (INDI: ``open(O_CREAT|O_TRUNC)``,
``write``, ``close``; a poller sees a 0-byte or half-written file most of the time) or writes a
temporary name and renames it. So a file becomes a *candidate* only when

* **Linux (inotify):** it is closed after writing (``IN_CLOSE_WRITE``) or moved into the
  folder (rename). Plain creation and modification events are not even subscribed to.
* **Polling** (``polling=True``, e.g. network shares where inotify sees nothing) **and other
  platforms:** its ``(size, mtime)`` stayed unchanged for one poll interval.

A candidate is then checked with :func:`livestack.storage.fitsio.check_complete`:

* it passes: ``on_ready(path)`` is called;
* :class:`~livestack.errors.FrameNotReadyError` (data unit still short): the file is re-checked
  later with back-off; if it is still short after ``not_ready_timeout_s`` it is reported anyway
  so that the daemon's reader records it (e.g. a capture program that crashed mid-write);
* :class:`~livestack.errors.FrameReadError` (not FITS, bad header): reported anyway, so the
  daemon's reader produces the journal row with the reason (``"not_fits"``, ...).

A **zero-byte file** is treated as not ready, with or without close events: a close event is
handled asynchronously, and by then a writer such as INDI (``open(O_CREAT|O_TRUNC)``, write,
close) may have truncated the file to start its next write. A file still empty after
``not_ready_timeout_s`` is reported, and the daemon records it as ``"empty_file"``. A file that
vanishes before it is checked is dropped silently.

``on_ready`` is called at most once per ``(path, size, mtime_ns)``; a file rewritten later is
reported again.

A candidate name that is not a regular file (a FIFO, a socket, a directory, a dangling
symlink) is reported once as well, at once and without reading it, so that the daemon
journals it with its reason and logs it; symlinks are followed by this module, and the
daemon refuses those that lead outside the watch folder.

Names starting with ``.`` or ``~`` and names ending in ``.tmp``/``.part`` are
ignored; the suffixes of :data:`FRAME_SUFFIXES` are accepted, case-insensitively.

Missed events
-------------
inotify drops events when its kernel queue overflows (a burst of files, a stalled process),
and a network share may deliver none. :meth:`FrameWatcher.rescan` lists the folder again
(the daemon calls it periodically): a candidate that was never reported with its current
``(size, mtime_ns)`` and is not already waiting is handled like a polled file: checked once its
size and mtime stayed unchanged for ``poll_interval_s``. A file seen by the start-up scan or
already reported costs one ``stat``.

Threads
-------
watchdog's observer thread dies if a handler raises, so the handler only puts
``(kind, path)`` tuples on a queue. One daemon thread (``livestack-watcher``) owns all state:
it consumes the queue, runs the timers of re-checks and size-stability checks, calls
``check_complete`` and finally ``on_ready``. ``on_ready`` must therefore be quick and must
not raise (the daemon only enqueues); an exception in it ends the watcher thread, which
:meth:`FrameWatcher.is_alive` then reports.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from livestack.errors import FrameNotReadyError, FrameReadError, UsageError
from livestack.reasons import Reason
from livestack.storage.formats import FRAME_SUFFIXES as ALL_FRAME_SUFFIXES
from livestack.storage.formats import check_complete as default_check

log = logging.getLogger(__name__)

#: Accepted frame suffixes (compared lower-case): FITS, .fits.gz, RAW, TIFF/PNG/JPEG, XISF.
FRAME_SUFFIXES: tuple[str, ...] = ALL_FRAME_SUFFIXES
#: Suffixes of partial files written by capture or copy tools (compared lower-case).
PARTIAL_SUFFIXES: tuple[str, ...] = (".tmp", ".part")

_STOP = object()
# First re-check delay after FrameNotReadyError, doubled per attempt up to the maximum.
_RECHECK_FIRST_S = 0.1
_RECHECK_MAX_S = 2.0


def is_candidate(path: Path | str) -> bool:
    """Tell whether a file name looks like a frame livestack should read.

    Parameters
    ----------
    path : Path or str
        Any path; only the final name is examined.

    Returns
    -------
    bool
        True for a suffix in :data:`FRAME_SUFFIXES` (any case), unless the name
        starts with ``.`` or ``~`` or ends with ``.tmp`` / ``.part``.
    """
    name = os.path.basename(os.fspath(path))
    if not name or name[0] in ".~":
        return False
    lower = name.lower()
    if lower.endswith(PARTIAL_SUFFIXES):
        return False
    return lower.endswith(FRAME_SUFFIXES)


@dataclass
class _Pending:
    """A file waiting for a timer: a size-stability check or a re-check."""

    due: float                      # time.monotonic() of the next look
    mode: str                       # "stable" (wait for an unchanged stat) or "recheck"
    stat_key: tuple[int, int] | None = None   # (size, mtime_ns) at the previous look
    attempts: int = 0               # FrameNotReadyError results so far
    first_not_ready: float = 0.0    # monotonic time of the first one


class _EnqueueHandler(FileSystemEventHandler):
    """watchdog handler that only enqueues ``(kind, path)``; it never raises."""

    def __init__(self, events: queue.SimpleQueue[object]) -> None:
        self._events = events

    def on_closed(self, event: FileClosedEvent) -> None:
        self._events.put(("closed", os.fsdecode(event.src_path)))

    def on_moved(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if event.src_path:
            self._events.put(("gone", os.fsdecode(event.src_path)))
        if event.dest_path:
            self._events.put(("moved", os.fsdecode(event.dest_path)))

    def on_created(self, event: FileSystemEvent) -> None:
        # Directories too: a folder named *.fits is reported (and journalled) as such.
        self._events.put(("created", os.fsdecode(event.src_path)))

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._events.put(("changed", os.fsdecode(event.src_path)))

    def on_deleted(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._events.put(("gone", os.fsdecode(event.src_path)))


class FrameWatcher:
    """Report complete FITS frames appearing in a folder.

    Parameters
    ----------
    watch_dir : Path
        Folder to watch (made absolute; symlinks are not resolved, so reported paths keep
        the spelling the operator configured).
    on_ready : callable
        ``on_ready(path)`` is called from the watcher thread, at most once per
        ``(path, size, mtime_ns)``. It must only enqueue and must not raise.
    polling : bool
        Poll the folder instead of using inotify (network shares, some container mounts).
    poll_interval_s : float
        Polling period; also the time a file's size and mtime must stay unchanged before it is
        checked when close events are not available (polling mode, non-Linux platforms).
    recursive : bool
        Also watch sub-folders (hidden sub-folders are ignored).
    not_ready_timeout_s : float
        After this many seconds of :class:`~livestack.errors.FrameNotReadyError` the file is
        reported anyway so that the daemon records it as truncated.
    check_complete : callable, optional
        ``check_complete(path) -> int`` raising ``FrameNotReadyError`` / ``FrameReadError``;
        defaults to :func:`livestack.storage.formats.check_complete`.

    Raises
    ------
    ValueError
        If ``poll_interval_s`` or ``not_ready_timeout_s`` is not positive.
    """

    def __init__(self, watch_dir: Path, on_ready: Callable[[Path], None], *,
                 polling: bool = False, poll_interval_s: float = 1.0, recursive: bool = False,
                 not_ready_timeout_s: float = 60.0,
                 check_complete: Callable[[Path], int] | None = None) -> None:
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        if not not_ready_timeout_s > 0:
            raise ValueError(f"not_ready_timeout_s must be > 0, got {not_ready_timeout_s}")
        if check_complete is None:

            check_complete = default_check
        self.watch_dir = Path(os.path.abspath(watch_dir))
        self.polling = polling
        self.poll_interval_s = float(poll_interval_s)
        self.recursive = recursive
        self.not_ready_timeout_s = float(not_ready_timeout_s)
        self._on_ready = on_ready
        self._check = check_complete
        self._events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pending: dict[str, _Pending] = {}
        self._reported: dict[str, tuple[int, int]] = {}
        self._observer: BaseObserver | None = None
        self._thread: threading.Thread | None = None
        self._close_events = False     # True when the observer reports IN_CLOSE_WRITE
        self._stopped = False

    # ------------------------------------------------------------------ public API
    def start(self) -> list[Path]:
        """Start watching and return the candidate frames already in the folder.

        The observer starts first, then the folder is scanned, so a file written during the
        scan is reported exactly once (by the scan or later by ``on_ready``).

        Returns
        -------
        list of Path
            Existing candidate frames that are complete (or unreadable, so that the daemon
            records them), sorted by modification time then name. Files still being written
            are not returned; ``on_ready`` reports them once complete.

        Raises
        ------
        UsageError
            If the folder does not exist or is not a directory.
        RuntimeError
            If called twice.
        OSError
            If the observer cannot start (e.g. the inotify watch limit is reached).
        """
        if self._observer is not None:
            raise RuntimeError("FrameWatcher.start() called twice")
        if not self.watch_dir.is_dir():
            raise UsageError(f"watch folder {self.watch_dir} does not exist or is not a folder")
        observer, self._close_events = self._make_observer()
        handler = _EnqueueHandler(self._events)
        if self._close_events:
            # Created events only matter for entries that are never closed after writing
            # (FIFOs, directories, symlinks); see _handle.
            observer.schedule(handler, str(self.watch_dir), recursive=self.recursive,
                              event_filter=[FileClosedEvent, FileMovedEvent, FileDeletedEvent,
                                            FileCreatedEvent, DirCreatedEvent])
        else:
            observer.schedule(handler, str(self.watch_dir), recursive=self.recursive)
        self._observer = observer
        observer.start()
        existing = self._scan()
        self._thread = threading.Thread(target=self._run, name="livestack-watcher", daemon=True)
        self._thread.start()
        log.info("watching %s (%s)", self.watch_dir,
                 "inotify close/move" if self._close_events else
                 f"size-stable polling every {self.poll_interval_s:g} s")
        return existing

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop observing and end the watcher thread (idempotent).

        Parameters
        ----------
        timeout_s : float
            Longest wait for each thread to end.
        """
        if self._stopped:
            return
        self._stopped = True
        if self._observer is not None:
            self._observer.stop()
            if self._observer.is_alive():
                self._observer.join(timeout_s)
        self._events.put(_STOP)
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout_s)

    def rescan(self) -> None:
        """Ask the watcher thread to list the folder again (thread-safe; never blocks).

        Finds frames whose events were lost (inotify queue overflow, network shares);
        see "Missed events" in the module docstring. Frames already reported with the same
        ``(size, mtime_ns)`` are not reported again.
        """
        if not self._stopped:
            self._events.put(("rescan", ""))

    def is_alive(self) -> bool:
        """True while both the observer and the watcher thread run (for the systemd watchdog)."""
        return (self._observer is not None and self._observer.is_alive()
                and self._thread is not None and self._thread.is_alive())

    # ------------------------------------------------------------------ internals
    def _make_observer(self) -> tuple[BaseObserver, bool]:
        if self.polling:
            return PollingObserver(timeout=self.poll_interval_s), False
        if sys.platform.startswith("linux"):
            # Lazy: the inotify module exists only on Linux.
            from watchdog.observers.inotify import InotifyObserver

            # Full events: a file moved in from another folder arrives as a move, not a create.
            return InotifyObserver(generate_full_events=True), True
        return Observer(), False     # FSEvents / ReadDirectoryChangesW: no close events

    def _relevant(self, path: str) -> bool:
        if not is_candidate(path):
            return False
        if self.recursive:
            rel = os.path.relpath(os.path.dirname(path), self.watch_dir)
            if rel != "." and any(part.startswith(".") for part in Path(rel).parts):
                return False
        return True

    def _listing(self) -> list[str]:
        """Relevant candidate paths in the folder (and sub-folders when recursive)."""
        pattern = "**/*" if self.recursive else "*"
        try:
            return [str(entry) for entry in self.watch_dir.glob(pattern)
                    if self._relevant(str(entry))]
        except OSError as exc:   # the folder itself vanished or became unreadable
            log.warning("cannot list %s: %s", self.watch_dir, exc)
            return []

    def _scan(self) -> list[Path]:
        """Find existing candidates (runs before the watcher thread starts)."""
        found: list[tuple[int, str]] = []
        for path in self._listing():
            key = _stat_key(path)
            if key is None:
                odd = _odd_key(path)
                if odd is not None:  # reported for the journal, never read here
                    self._reported[path] = odd
                    found.append((odd[1], path))
                continue
            if self._check_now(path, key, report=False):
                found.append((key[1], path))
        found.sort()
        return [Path(p) for _, p in found]

    def _rescan(self) -> None:
        """Queue a size-stability check for every candidate not reported in its current state."""
        now = time.monotonic()
        missed = 0
        for path in self._listing():
            if path in self._pending:
                continue
            key = _stat_key(path)
            if key is None:
                odd = _odd_key(path)
                if odd is not None and self._reported.get(path) != odd:
                    self._report(path, odd)
                continue
            if self._reported.get(path) == key:
                continue
            self._pending[path] = _Pending(now + self.poll_interval_s, "stable", key)
            missed += 1
        if missed:
            log.info("rescan of %s found %d file(s) without an event; checking them",
                     self.watch_dir, missed)

    def _run(self) -> None:
        while True:
            timeout = self._next_timeout()
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if isinstance(item, tuple):
                if item[0] == "rescan":
                    self._rescan()
                else:
                    self._handle(item[0], item[1])
            self._run_due()

    def _next_timeout(self) -> float | None:
        if not self._pending:
            return None
        due = min(p.due for p in self._pending.values())
        return max(0.0, due - time.monotonic())

    def _handle(self, kind: str, path: str) -> None:
        if not self._relevant(path):
            return
        if kind == "gone":
            self._pending.pop(path, None)
            self._reported.pop(path, None)
        elif kind in ("closed", "moved"):
            key = _stat_key(path)
            if key is None:
                self._pending.pop(path, None)
            else:
                self._check_now(path, key, report=True)
        elif kind == "created":
            odd = _odd_key(path)
            key = _stat_key(path)
            if odd is not None:
                self._report(path, odd)
            elif key is not None and os.path.islink(path):  # a symlink is never "closed"
                self._check_now(path, key, report=True)
            elif not self._close_events and path not in self._pending:
                self._pending[path] = _Pending(time.monotonic() + self.poll_interval_s,
                                               "stable", key)
        elif kind == "changed" and not self._close_events:
            if path not in self._pending:
                self._pending[path] = _Pending(time.monotonic() + self.poll_interval_s,
                                               "stable", _stat_key(path))

    def _run_due(self) -> None:
        now = time.monotonic()
        for path in [p for p, item in self._pending.items() if item.due <= now]:
            item = self._pending.get(path)
            if item is None:
                continue
            key = _stat_key(path)
            if key is None:
                self._pending.pop(path, None)
            elif item.mode == "stable" and key != item.stat_key:
                item.stat_key = key
                item.due = now + self.poll_interval_s
            else:
                self._check_now(path, key, report=True)

    def _check_now(self, path: str, key: tuple[int, int], *, report: bool) -> bool:
        """Check one readiness candidate; return True if it is ready (and report it)."""
        if self._reported.get(path) == key:
            self._pending.pop(path, None)
            return False
        if key[0] == 0:
            # An empty file may be about to be written, even after a close event: the event
            # may be stale (the writer truncated the file again since).
            return self._not_ready(path, key, "file is empty", report=report)
        try:
            self._check(Path(path))
        except FrameNotReadyError as exc:
            return self._not_ready(path, key, exc.message, report=report)
        except FrameReadError as exc:
            if exc.reason is Reason.VANISHED:
                self._pending.pop(path, None)
                return False
            log.debug("%s is unreadable (%s); reporting it for the journal", path, exc.reason)
        except FileNotFoundError:
            self._pending.pop(path, None)
            return False
        except OSError as exc:       # e.g. permissions not yet set by the writer
            return self._not_ready(path, key, str(exc), report=report)
        self._settle(path, key, report=report)
        return True

    def _settle(self, path: str, key: tuple[int, int], *, report: bool) -> None:
        """Done with ``path`` at ``key``: report it now, or only mark it as seen."""
        if report:
            self._report(path, key)
        else:
            self._reported[path] = key
            self._pending.pop(path, None)

    def _not_ready(self, path: str, key: tuple[int, int], why: str, *, report: bool) -> bool:
        now = time.monotonic()
        item = self._pending.get(path)
        if item is None or item.mode != "recheck":
            item = _Pending(now, "recheck", key, 0, now)
            self._pending[path] = item
        if now - item.first_not_ready >= self.not_ready_timeout_s:
            log.warning("%s still incomplete after %.0f s (%s); reporting it", path,
                        now - item.first_not_ready, why)
            self._settle(path, key, report=report)
            return True
        item.due = now + min(_RECHECK_MAX_S, _RECHECK_FIRST_S * 2.0 ** item.attempts)
        item.attempts += 1
        item.stat_key = key
        return False

    def _report(self, path: str, key: tuple[int, int]) -> None:
        self._pending.pop(path, None)
        if self._reported.get(path) == key:
            return
        self._reported[path] = key
        self._on_ready(Path(path))


def _stat_key(path: str) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a regular file, or None if it vanished or is not a file."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_size, st.st_mtime_ns


def _odd_key(path: str) -> tuple[int, int] | None:
    """``(-1, mtime_ns)`` of a candidate that is not a regular file (FIFO, socket,
    directory, dangling symlink); None for a regular file or a vanished entry."""
    try:
        lst = os.lstat(path)
    except OSError:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:  # a dangling symlink
        return -1, lst.st_mtime_ns
    except OSError:
        return None
    return None if stat.S_ISREG(st.st_mode) else (-1, lst.st_mtime_ns)

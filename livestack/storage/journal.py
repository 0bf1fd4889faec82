"""The SQLite journal: one row per file seen, so that no frame is lost or counted twice.

The journal lives at ``<output>/journal.sqlite`` (WAL mode, ``synchronous=FULL`` so a
committed row survives power loss). Tables:

``frames``
    One row per (path, content) seen: size, mtime, sha256, stack, status, reason,
    message, metrics (JSON), transform (6 floats JSON + model), weight, ``seq`` (processing
    order within the stack), ``active`` (0 once excluded from the stack or after a reset)
    and timestamps; ``norm`` (the frame's normalisation onto the reference as JSON: scale,
    offset, reference, weight, noise, method, weights) and ``masters`` (the masters that
    calibrated it as JSON: ``[{"kind", "file", "sha256"}]``, files in ``<root>/masters/``).
    Status is one of ``pending``, ``accepted``, ``rejected``, ``failed``,
    ``ignored`` (calibration frames, duplicates).
``stacks``
    Stack id, key (JSON), folder, creation time, and ``generation`` (bumped whenever the
    stack is rebuilt, so an older checkpoint is not trusted).
``checkpoints``
    Per stack: the last ``seq`` the last checkpoint covers and its file count.
``state``
    Small key -> JSON values (the router's state).

All methods are thread-safe (one connection guarded by a lock); they raise
:class:`~livestack.errors.JournalError` when SQLite fails.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from livestack.errors import JournalError, JournalFullError

if TYPE_CHECKING:
    from livestack.pipeline.types import Allocator

JOURNAL_NAME = "journal.sqlite"
STATUSES = ("pending", "accepted", "rejected", "failed", "ignored")
FINAL_STATUSES = ("accepted", "rejected", "failed", "ignored")
#: Statuses that a replay feeds back into the stack (in ``seq`` order).
REPLAY_STATUSES = ("accepted", "rejected")
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_SCHEMA_VERSION = 1
#: Frame columns filled once the stack is plate-solved (added to older journals on open).
POINTING_COLUMNS = ("center_ra_deg", "center_dec_deg", "pa_deg")
#: Frame columns holding each frame's normalisation and recorded masters (JSON), added to
#: older journals on open (rows stacked before them hold NULL: re-stacks then measure).
CALIBRATION_COLUMNS = ("norm", "masters")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    size INTEGER,
    mtime_ns INTEGER,
    sha256 TEXT,
    stack_id TEXT,
    status TEXT NOT NULL CHECK (status IN ('pending','accepted','rejected','failed','ignored')),
    reason TEXT,
    message TEXT,
    metrics TEXT,
    transform TEXT,
    model TEXT,
    weight REAL,
    seq INTEGER,
    active INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS frames_path_sha ON frames(path, sha256);
CREATE INDEX IF NOT EXISTS frames_sha ON frames(sha256);
CREATE INDEX IF NOT EXISTS frames_stack_seq ON frames(stack_id, seq);
CREATE INDEX IF NOT EXISTS frames_status ON frames(status);
CREATE TABLE IF NOT EXISTS stacks (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    folder TEXT NOT NULL,
    created REAL NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS checkpoints (
    stack_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    n_files INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    path TEXT NOT NULL,
    written REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file's content, read streaming and read-only.

    Raises
    ------
    OSError
        As raised by ``open``/``read`` (missing file, permissions, a directory).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(chunk_bytes)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


#: Bytes read per step of :func:`read_file_hashing`; the helper thread hashes each step
#: while the next is read. 4 MiB: 13 hand-overs for a 52 MB frame (each ~20 us), and the
#: hash starts ~1 ms after the read does.
READ_CHUNK_BYTES = 4 << 20


class PendingSha256:
    """The SHA-256 of a file's bytes, computed by a helper thread while they are read.

    The reader hands over each chunk as soon as it is in memory (:meth:`feed`, in file
    order) and then :meth:`end`; :meth:`hexdigest` waits for the thread. ``hashlib``
    releases the GIL while it hashes, so the hash of chunk k runs on the other core while
    chunk k+1 is read, and while the caller decodes the bytes.

    The thread is a daemon and ends at :meth:`end` whatever happened meanwhile: a read
    that fails part-way leaves no thread behind.
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._chunks: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._complete = False
        self._data: NDArray[np.uint8] | None = None
        self._hex: str | None = None
        self._thread = threading.Thread(target=self._run, name="livestack-sha256",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._digest.update(chunk)
        self._complete = True

    def feed(self, chunk: memoryview) -> None:
        """Hash ``chunk`` (the next bytes of the file) in the helper thread.

        The caller must not modify the chunk's bytes afterwards.
        """
        self._chunks.put(chunk)

    def end(self, data: NDArray[np.uint8] | None = None) -> None:
        """No more chunks; ``data`` is the whole content fed (kept for :meth:`hexdigest`)."""
        self._data = data
        self._chunks.put(None)

    def hexdigest(self) -> str:
        """Wait for the helper thread and return the hex SHA-256 of the bytes fed.

        Raises
        ------
        RuntimeError
            If called before :meth:`end` with the content.
        """
        if self._hex is None:
            self._thread.join()
            if self._data is None:
                raise RuntimeError("PendingSha256.hexdigest before end(data)")
            if self._complete:
                self._hex = self._digest.hexdigest()
            else:  # the thread failed (MemoryError): hash here instead
                self._hex = hashlib.sha256(self._data.data).hexdigest()
            self._data = None  # nothing here holds the bytes any more (a pool may reuse them)
        return self._hex


def read_file_hashing(path: str | Path, max_bytes: int | None = None, *,
                      empty: Allocator | None = None
                      ) -> tuple[NDArray[np.uint8], PendingSha256]:
    """Read a whole file once while a helper thread hashes what is read so far.

    Returns as soon as the last byte is in memory; the hash of the last chunks may still
    be running (:meth:`PendingSha256.hexdigest` waits for it), so the caller can decode
    the bytes meanwhile. The identity is the one of :func:`sha256_file`, of exactly the
    bytes returned.

    Returns
    -------
    data : ndarray, shape (n_bytes,), uint8
        The file's content (the whole file is held in memory). A numpy buffer, not
        ``bytes``: numpy asks for transparent huge pages, so reading 52 MB into it costs
        ~1000 page faults instead of ~12700 (22 instead of 36 ms of system time).
        Read-only for the caller until :meth:`PendingSha256.hexdigest` has returned.
    sha256 : PendingSha256

    Parameters
    ----------
    path : str or Path
    max_bytes : int, optional
        Refuse to hold more than this many bytes: a file that grows past it while it is
        read raises instead of being pulled into memory whole.
    empty : Allocator, optional
        Where the buffer comes from (default ``np.empty``): the ingest's buffer pool
        hands out the same memory frame after frame instead of fresh pages.

    Raises
    ------
    OSError
        As raised by ``open``/``read`` (missing file, permissions, a directory); with
        ``errno.EFBIG`` when the file is or grows larger than ``max_bytes``.
    """
    with open(path, "rb", buffering=0) as fh:
        expected = os.fstat(fh.fileno()).st_size
        if max_bytes is not None and expected > max_bytes:
            raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes")
        # One byte more than the size: a file still growing shows as a full buffer.
        buf = (empty or np.empty)((expected + 1,), np.uint8)
        pending = PendingSha256()
        data: NDArray[np.uint8] | None = None
        try:
            view = buf.data  # a memoryview of the array
            got = 0
            while got < len(buf):
                n = fh.readinto(view[got:got + READ_CHUNK_BYTES])
                if not n:
                    break
                pending.feed(view[got:got + n])
                got += n
            del view
            if got == len(buf):  # grew since the fstat: take the rest as it is now, bounded
                chunks = [buf]
                while chunk := fh.read(1 << 20):
                    got += len(chunk)
                    if max_bytes is not None and got > max_bytes:
                        raise OSError(errno.EFBIG, f"grew past {max_bytes} bytes while read")
                    pending.feed(memoryview(chunk))
                    chunks.append(np.frombuffer(chunk, dtype=np.uint8))
                buf = np.concatenate(chunks)
            data = buf[:got]
        finally:
            pending.end(data)  # on an error too: the helper thread ends
    assert data is not None
    return data, pending


def read_file_sha256(path: str | Path, max_bytes: int | None = None, *,
                     empty: Allocator | None = None) -> tuple[NDArray[np.uint8], str]:
    """Read a whole file once; return its content and the hex SHA-256 of that content.

    :func:`read_file_hashing`, waiting for the hash: the caller can decode the same bytes
    instead of reading the file a second time (and the hash is then of exactly the bytes
    decoded).

    Returns
    -------
    data : ndarray, shape (n_bytes,), uint8
    sha256 : str

    Parameters
    ----------
    path : str or Path
    max_bytes : int, optional
        As for :func:`read_file_hashing`.
    empty : Allocator, optional
        As for :func:`read_file_hashing`.

    Raises
    ------
    OSError
        As :func:`read_file_hashing`.
    """
    data, pending = read_file_hashing(path, max_bytes, empty=empty)
    return data, pending.hexdigest()


@dataclass(frozen=True)
class FrameRow:
    """One row of the ``frames`` table (see the module docstring for the columns)."""

    id: int
    path: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    stack_id: str | None
    status: str
    reason: str | None
    message: str | None
    metrics: dict[str, Any] | None
    transform: list[float] | None
    model: str | None
    weight: float | None
    seq: int | None
    active: bool
    created: float
    updated: float
    norm: dict[str, Any] | None = None
    masters: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class StackRow:
    """One row of the ``stacks`` table."""

    id: str
    key: dict[str, Any]
    folder: str
    created: float
    generation: int


@dataclass(frozen=True)
class CheckpointRow:
    """Bookkeeping of a stack's last checkpoint."""

    stack_id: str
    seq: int
    n_files: int
    generation: int
    path: str
    written: float


_FRAME_COLS = ("id, path, size, mtime_ns, sha256, stack_id, status, reason, message, metrics, "
               "transform, model, weight, seq, active, created, updated, norm, masters")


def _frame_row(r: tuple) -> FrameRow:
    return FrameRow(
        id=r[0], path=r[1], size=r[2], mtime_ns=r[3], sha256=r[4], stack_id=r[5], status=r[6],
        reason=r[7], message=r[8], metrics=json.loads(r[9]) if r[9] else None,
        transform=json.loads(r[10]) if r[10] else None, model=r[11], weight=r[12], seq=r[13],
        active=bool(r[14]), created=r[15], updated=r[16],
        norm=json.loads(r[17]) if r[17] else None, masters=json.loads(r[18]) if r[18] else None)


#: SQLite's result code for "database or disk is full".
_SQLITE_FULL = 13


def _journal_error(message: str, exc: sqlite3.Error) -> JournalError:
    """JournalFullError for a full disk (retried by the worker), else JournalError."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code == _SQLITE_FULL or "disk is full" in str(exc) or (
            isinstance(exc.__context__, OSError) and exc.__context__.errno == errno.ENOSPC):
        return JournalFullError(message)
    return JournalError(message)


class Journal:
    """The frame journal at ``<root>/journal.sqlite``.

    Parameters
    ----------
    path : str or Path
        The SQLite file (its folder is created if missing).

    Raises
    ------
    JournalError
        The file cannot be opened or is not a livestack journal.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                       isolation_level=None, timeout=10.0)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(f"{self.path}: cannot enable WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._add_pointing_columns()
            self._add_calibration_columns()
            self._db.execute("INSERT OR IGNORE INTO state(key, value) VALUES ('schema', ?)",
                             (json.dumps(_SCHEMA_VERSION),))
        except (sqlite3.Error, OSError) as exc:
            raise JournalError(f"{self.path}: cannot open journal: {exc} (`livestack recover "
                               f"{self.path.parent}` rebuilds it)") from None

    # -- plumbing ------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on error."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _journal_error(f"{self.path}: {exc}", exc) from None
            try:
                yield self._db
            except sqlite3.Error as exc:
                # SQLite may have rolled back already (SQLITE_FULL does): then this fails.
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise _journal_error(f"{self.path}: {exc}", exc) from None
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                # A failed COMMIT (disk full) leaves the transaction open: end it, so the
                # next write can begin once space returns.
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise _journal_error(f"{self.path}: commit failed: {exc}", exc) from None

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: {exc}") from None

    def close(self) -> None:
        """Close the connection (a checkpoint of the WAL happens on close)."""
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: {exc}") from None

    def journal_mode(self) -> str:
        """The SQLite journal mode in force (``"wal"``)."""
        return str(self._query("PRAGMA journal_mode")[0][0]).lower()

    # -- frames --------------------------------------------------------------------------

    def seen(self, path: str, size: int, mtime_ns: int) -> bool:
        """True when ``path`` with this size and mtime already has a final status.

        A cheap pre-check before hashing: a restart's scan of the watch folder skips the
        files it has already dealt with without reading them again.
        """
        rows = self._query(
            "SELECT 1 FROM frames WHERE path=? AND size=? AND mtime_ns=? AND status!='pending' "
            "LIMIT 1", (path, size, mtime_ns))
        return bool(rows)

    def already_done(self, path: str, sha256: str) -> FrameRow | None:
        """Return the row that makes processing this content again unnecessary, if any.

        Same content already accepted, rejected or ignored (under any path: a touched or
        renamed file is not counted twice), or this very (path, content) already has a
        final status. A failed or empty content under another path is processed again
        (it gets its own row).
        """
        rows = self._query(
            f"SELECT {_FRAME_COLS} FROM frames WHERE path=? AND sha256=? AND status!='pending'",
            (path, sha256))
        if rows:
            return _frame_row(rows[0])
        if sha256 == _EMPTY_SHA256:
            return None
        rows = self._query(
            f"SELECT {_FRAME_COLS} FROM frames WHERE sha256=? AND status IN "
            "('accepted','rejected') ORDER BY id LIMIT 1", (sha256,))
        return _frame_row(rows[0]) if rows else None

    def mark_pending(self, path: str, size: int | None, mtime_ns: int | None,
                     sha256: str | None) -> int:
        """Record that a file was seen and is about to be processed; return its row id.

        An existing row for the same (path, content) is reused (set back to pending).
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT id FROM frames WHERE path=? AND sha256 IS ?",
                             (path, sha256)).fetchone()
            if row is not None:
                db.execute("UPDATE frames SET status='pending', size=?, mtime_ns=?, updated=? "
                           "WHERE id=?", (size, mtime_ns, now, row[0]))
                return int(row[0])
            cur = db.execute(
                "INSERT INTO frames(path, size, mtime_ns, sha256, status, created, updated) "
                "VALUES (?, ?, ?, ?, 'pending', ?, ?)", (path, size, mtime_ns, sha256, now, now))
            return int(cur.lastrowid or 0)

    def finish(self, row_id: int, status: str, *, reason: str | None = None,
               message: str = "", stack_id: str | None = None,
               metrics: dict[str, Any] | None = None, transform: list[float] | None = None,
               model: str | None = None, weight: float | None = None,
               seq: int | None = None, assign_seq: bool = False,
               state: dict[str, Any] | None = None, norm: dict[str, Any] | None = None,
               masters: list[dict[str, str]] | None = None) -> int | None:
        """Give a row its final status; return the ``seq`` assigned (or None).

        Parameters
        ----------
        row_id : int
            From :meth:`mark_pending`.
        status : str
            ``accepted``, ``rejected``, ``failed`` or ``ignored``.
        reason, message : str
            Machine-readable reason code and one human sentence.
        stack_id : str or None
            The stack the frame went to (None when it never reached one).
        metrics, transform, model, weight
            Measurements, 6 floats row-major frame -> reference plus model name, weight.
        seq : int or None
            Processing order to store (a replay keeps the row's number).
        assign_seq : bool
            Instead, give the row the next processing-order number within ``stack_id`` (frames the
            stack session has seen, in order: replay feeds them back in this order).
        state : dict or None
            Key -> JSON-able values written in the same transaction (router state).
        norm : dict or None
            The frame's normalisation (``FrameNorm.to_json()``).
        masters : list of dict or None
            The masters that calibrated it (``CalibrationRecord.select``).

        Raises
        ------
        JournalError
            Unknown status or SQLite failure.
        """
        if status not in FINAL_STATUSES:
            raise JournalError(f"{self.path}: finish: bad status {status!r}")
        now = time.time()
        with self._tx() as db:
            if assign_seq and stack_id is not None:
                top = db.execute("SELECT MAX(seq) FROM frames WHERE stack_id=?",
                                 (stack_id,)).fetchone()[0]
                seq = int(top or 0) + 1
            db.execute(
                "UPDATE frames SET status=?, reason=?, message=?, stack_id=?, metrics=?, "
                "transform=?, model=?, weight=?, seq=?, active=1, updated=?, norm=?, masters=? "
                "WHERE id=?",
                (status, reason, message, stack_id,
                 json.dumps(metrics) if metrics is not None else None,
                 json.dumps(transform) if transform is not None else None,
                 model, weight, seq, now,
                 json.dumps(norm) if norm is not None else None,
                 json.dumps(masters) if masters else None, row_id))
            for key, value in (state or {}).items():
                db.execute("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)",
                           (key, json.dumps(value)))
            return seq

    def record(self, path: str, size: int | None, mtime_ns: int | None, sha256: str | None,
               status: str, reason: str, message: str) -> int:
        """Insert (or update) a row directly in a final status; return its id.

        For files that fail before they can be hashed (vanished, unreadable, a folder).
        """
        row_id = self.mark_pending(path, size, mtime_ns, sha256)
        self.finish(row_id, status, reason=reason, message=message)
        return row_id

    def row(self, row_id: int) -> FrameRow | None:
        """The row with this id, or None."""
        rows = self._query(f"SELECT {_FRAME_COLS} FROM frames WHERE id=?", (row_id,))
        return _frame_row(rows[0]) if rows else None

    def rows(self, *, path: str | None = None, stack_id: str | None = None,
             status: str | None = None) -> list[FrameRow]:
        """Rows filtered by path, stack and/or status, in insertion order."""
        clauses, args = [], []
        for col, val in (("path", path), ("stack_id", stack_id), ("status", status)):
            if val is not None:
                clauses.append(f"{col}=?")
                args.append(val)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        return [_frame_row(r) for r in
                self._query(f"SELECT {_FRAME_COLS} FROM frames{where} ORDER BY id", tuple(args))]

    def rows_after(self, stack_id: str, seq: int,
                   statuses: tuple[str, ...] = REPLAY_STATUSES) -> list[FrameRow]:
        """Active rows of a stack with ``seq`` > ``seq`` and a replayable status, by seq."""
        marks = ",".join("?" * len(statuses))
        return [_frame_row(r) for r in self._query(
            f"SELECT {_FRAME_COLS} FROM frames WHERE stack_id=? AND seq>? AND active=1 "
            f"AND status IN ({marks}) ORDER BY seq", (stack_id, seq, *statuses))]

    def reopen_transient_failures(self) -> list[FrameRow]:
        """Set rows failed by a descriptor shortage back to pending; return them.

        Older versions recorded ``EMFILE``/``ENFILE`` as a final ``failed/unreadable``;
        such a verdict says nothing about the frame, so it is processed again. A row
        without a hash (the file could not even be hashed) is removed instead: processing
        the file again makes its row.

        Returns
        -------
        list of FrameRow
            The pending rows, then the removed ones.
        """
        texts = tuple(f"%{os.strerror(e)}%" for e in (errno.EMFILE, errno.ENFILE))
        where = ("status='failed' AND reason='unreadable' AND (message LIKE ? OR "
                 "message LIKE ?)")
        with self._tx() as db:
            removed = [_frame_row(r) for r in db.execute(
                f"SELECT {_FRAME_COLS} FROM frames WHERE {where} AND sha256 IS NULL "
                "ORDER BY id", texts).fetchall()]
            db.execute(f"DELETE FROM frames WHERE {where} AND sha256 IS NULL", texts)
            db.execute(f"UPDATE frames SET status='pending' WHERE {where}", texts)
        return self.pending() + removed

    def pending(self) -> list[FrameRow]:
        """Rows still pending (a crash or a stop interrupted them), oldest first."""
        return self.rows(status="pending")

    def counts(self, stack_id: str | None = None) -> dict[str, int]:
        """Number of rows per status (active rows only when ``stack_id`` is given)."""
        if stack_id is None:
            res = self._query("SELECT status, COUNT(*) FROM frames GROUP BY status")
        else:
            res = self._query("SELECT status, COUNT(*) FROM frames WHERE stack_id=? AND "
                              "active=1 GROUP BY status", (stack_id,))
        out = dict.fromkeys(STATUSES, 0)
        out.update({str(s): int(n) for s, n in res})
        return out

    def last_seq(self, stack_id: str) -> int:
        """Highest ``seq`` of the stack (0 when none)."""
        top = self._query("SELECT MAX(seq) FROM frames WHERE stack_id=?", (stack_id,))[0][0]
        return int(top or 0)

    def deactivate(self, stack_id: str, row_ids: list[int] | None = None) -> None:
        """Take rows out of a stack (all rows when ``row_ids`` is None: a reset).

        The rows keep their status (it is still true of the file); they are no longer
        replayed or counted. The stack's generation is bumped in the same transaction.
        """
        with self._tx() as db:
            if row_ids is None:
                db.execute("UPDATE frames SET active=0, updated=? WHERE stack_id=?",
                           (time.time(), stack_id))
            else:
                db.executemany("UPDATE frames SET active=0, updated=? WHERE id=? AND stack_id=?",
                               [(time.time(), rid, stack_id) for rid in row_ids])
            db.execute("UPDATE stacks SET generation=generation+1 WHERE id=?", (stack_id,))

    def rewrite_stack(self, stack_id: str, updates: list[tuple[int, int, list[float] | None]]
                      ) -> None:
        """Renumber and re-transform rows after a rebuild, and bump the generation.

        Parameters
        ----------
        updates : list of (row_id, new_seq, transform)
            New processing order and transform (relative to the new reference).
        """
        now = time.time()
        with self._tx() as db:
            # Move the old numbers out of the way first (seq is unique per stack in use).
            db.execute("UPDATE frames SET seq=-seq WHERE stack_id=? AND seq>0", (stack_id,))
            # Only rows still in the stack (one may have been rerouted meanwhile).
            db.executemany(
                "UPDATE frames SET seq=?, transform=COALESCE(?, transform), updated=? "
                "WHERE id=? AND stack_id=?",
                [(seq, json.dumps(tr) if tr is not None else None, now, rid, stack_id)
                 for rid, seq, tr in updates])
            top = len(updates)
            # Rows not in the rebuild keep a positive order after the rebuilt ones.
            rest = db.execute("SELECT id FROM frames WHERE stack_id=? AND seq<0 ORDER BY -seq",
                              (stack_id,)).fetchall()
            db.executemany("UPDATE frames SET seq=? WHERE id=?",
                           [(top + i + 1, r[0]) for i, r in enumerate(rest)])
            db.execute("UPDATE stacks SET generation=generation+1 WHERE id=?", (stack_id,))

    # -- stacks and checkpoints ----------------------------------------------------------

    def ensure_stack(self, stack_id: str, key: dict[str, Any], folder: str) -> StackRow:
        """Create the stack row if new; return it."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO stacks(id, key, folder, created) VALUES "
                       "(?, ?, ?, ?)", (stack_id, json.dumps(key), folder, time.time()))
        stack = self.stack(stack_id)
        assert stack is not None
        return stack

    def set_generation(self, stack_id: str, generation: int) -> None:
        """Set a stack's generation (``livestack recover`` matches it to a checkpoint)."""
        with self._tx() as db:
            db.execute("UPDATE stacks SET generation=? WHERE id=?", (generation, stack_id))

    def quick_check(self) -> str:
        """SQLite's ``PRAGMA quick_check``: ``"ok"`` for an intact database file."""
        return "; ".join(str(r[0]) for r in self._query("PRAGMA quick_check"))

    def stack(self, stack_id: str) -> StackRow | None:
        """The stack row, or None."""
        rows = self._query("SELECT id, key, folder, created, generation FROM stacks WHERE id=?",
                           (stack_id,))
        if not rows:
            return None
        r = rows[0]
        return StackRow(r[0], json.loads(r[1]), r[2], r[3], int(r[4]))

    def stacks(self) -> list[StackRow]:
        """All stacks, oldest first."""
        return [StackRow(r[0], json.loads(r[1]), r[2], r[3], int(r[4])) for r in self._query(
            "SELECT id, key, folder, created, generation FROM stacks ORDER BY created, id")]

    def note_checkpoint(self, stack_id: str, seq: int, n_files: int, generation: int,
                        path: str) -> None:
        """Record that the checkpoint at ``path`` covers the stack up to ``seq``."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO checkpoints(stack_id, seq, n_files, generation, "
                       "path, written) VALUES (?, ?, ?, ?, ?, ?)",
                       (stack_id, seq, n_files, generation, path, time.time()))

    def checkpoint(self, stack_id: str) -> CheckpointRow | None:
        """Bookkeeping of the stack's last checkpoint, or None."""
        rows = self._query("SELECT stack_id, seq, n_files, generation, path, written FROM "
                           "checkpoints WHERE stack_id=?", (stack_id,))
        return CheckpointRow(*rows[0]) if rows else None

    # -- sky pointing (plate solving) ----------------------------------------------------

    def _add_pointing_columns(self) -> None:
        """Add the frames' solved-pointing columns to a journal made before them."""
        have = {r[1] for r in self._db.execute("PRAGMA table_info(frames)").fetchall()}
        for col in POINTING_COLUMNS:
            if col not in have:
                self._db.execute(f"ALTER TABLE frames ADD COLUMN {col} REAL")

    def _add_calibration_columns(self) -> None:
        """Add the ``norm`` and ``masters`` columns to a journal made before them."""
        have = {r[1] for r in self._db.execute("PRAGMA table_info(frames)").fetchall()}
        for col in CALIBRATION_COLUMNS:
            if col not in have:
                self._db.execute(f"ALTER TABLE frames ADD COLUMN {col} TEXT")

    def stack_masters(self, stack_id: str) -> list[dict[str, str]]:
        """The masters recorded for a stack's active accepted frames, each once, by first use."""
        rows = self._query("SELECT masters FROM frames WHERE stack_id=? AND active=1 AND "
                           "status='accepted' AND masters IS NOT NULL ORDER BY seq, id",
                           (stack_id,))
        out: list[dict[str, str]] = []
        seen: set[tuple[str, str]] = set()
        for (text,) in rows:
            for m in json.loads(text):
                key = (str(m.get("file", "")), str(m.get("sha256", "")))
                if key not in seen:
                    seen.add(key)
                    out.append(m)
        return out

    def set_pointing(self, values: list[tuple[int, float | None, float | None, float | None]]
                     ) -> None:
        """Store ``(row_id, centre_ra_deg, centre_dec_deg, pa_deg)`` of frames (None clears)."""
        if not values:
            return
        with self._tx() as db:
            db.executemany("UPDATE frames SET center_ra_deg=?, center_dec_deg=?, pa_deg=? "
                           "WHERE id=?", [(ra, dec, pa, rid) for rid, ra, dec, pa in values])

    def pointing(self, stack_id: str) -> dict[int, tuple[float, float, float]]:
        """Solved centre RA/Dec and position angle (degrees) of a stack's frames by row id."""
        rows = self._query("SELECT id, center_ra_deg, center_dec_deg, pa_deg FROM frames "
                           "WHERE stack_id=? AND center_ra_deg IS NOT NULL ORDER BY id",
                           (stack_id,))
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    # -- state ---------------------------------------------------------------------------

    def get_state(self, key: str, default: Any = None) -> Any:
        """A JSON value stored with :meth:`set_state` (or ``finish(state=...)``)."""
        rows = self._query("SELECT value FROM state WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def set_state(self, key: str, value: Any) -> None:
        """Store a JSON-able value under ``key``."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)",
                       (key, json.dumps(value)))

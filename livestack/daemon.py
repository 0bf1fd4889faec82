"""The composition root: watcher -> queue -> worker (pipeline, journal, checkpoints) -> server.

Two layers:

:class:`Engine`
    Everything that happens to a file, synchronously, in one thread: hash, journal row,
    read, route, masters, :class:`~livestack.pipeline.session.StackSession`, journal
    outcome, checkpoint / ``stack.fits`` / preview cadence, hub events and metrics. It also
    resumes stacks (checkpoint + journal replay), executes operator commands and rebuilds
    stacks: ``exclude_frame`` / ``set_reference`` run the integration engine in a child
    process (:mod:`livestack.rebuild`) while the old stack keeps stacking and serving, then
    seed a live session from its result, replay the frames that arrived meanwhile and swap.
    ``livestack stack`` drives it directly; the daemon drives it from its worker.
:class:`Daemon`
    The long-running service: the asyncio loop in the main thread runs the live server,
    signal handling, the systemd watchdog and status; one worker thread runs the engine;
    the watcher's callback only enqueues.

Crash-safety invariants
-----------------------
* A file gets a ``pending`` journal row before it is read and a final status after the
  stack session has processed it, in one transaction with the router's state. A crash in
  between leaves it ``pending``; the next start processes it again from scratch.
* Every row the session processed has ``seq`` (processing order within its stack). A
  checkpoint records the last ``seq`` it covers and the stack's ``generation``. Resume loads
  the checkpoint (if its generation is current) and replays the journal's accepted/rejected
  rows after that ``seq`` from their files, with their stored transforms.
* Rebuilds (exclude a frame, set the reference, reset) bump the generation in the journal
  first, so an older checkpoint is never trusted after them.
* The user's frames are opened read-only and never modified, moved or deleted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import shutil
import signal
import stat as stat_mod
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from livestack.config import is_loopback, is_within
from livestack.errors import (
    CalibrationError,
    DescriptorsExhaustedError,
    FrameError,
    JournalError,
    JournalFullError,
    LivestackError,
    MasterError,
    StorageError,
    TransientError,
    UsageError,
)
from livestack.resilience import retry_transient
from livestack.runopts import UNCALIBRATED_HINT, calibration_gap, ensure_folder, lan_banner
from livestack.service.guard import PathRedactor
from livestack.service.hub import COMMANDS
from livestack.service.limits import is_fd_exhaustion
from livestack.storage.atomic import StagedFile, atomic_write
from livestack.storage.calibration import CalibrationRecord, master_cards, open_masters
from livestack.storage.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    remove_stale_temps,
    stage_checkpoint,
)
from livestack.storage.entries import check_entry, unjournaled
from livestack.storage.formats import frame_format
from livestack.storage.journal import JOURNAL_NAME, FrameRow, Journal, sha256_file
from livestack.storage.lights import read_light

if TYPE_CHECKING:
    import numpy as np

    from livestack.config import Config
    from livestack.pipeline.session import FrameOutcome, StackSession
    from livestack.pipeline.types import FrameInfo, Transform
    from livestack.service.hub import Hub
    from livestack.service.metrics import Metrics

log = logging.getLogger("livestack.daemon")

#: IMAGETYP values (normalised by the FITS reader) that are never stacked as lights.
CALIBRATION_TYPES = frozenset({"bias", "dark", "flat", "darkflat"})
#: Rejections caused by alignment (they count towards the router's failure run). The
#: registrar's "too_few_stars" is left out: the gate uses the same code for clouds, and a
#: cloud bank must not start a new stack.
ALIGNMENT_REASONS = frozenset({"no_match", "no_overlap"})
#: Files the daemon serves per stack.
STACK_FILES = ("stack.fits", "preview.jpg")
PREVIEW_NAME = "preview.jpg"
FITS_NAME = "stack.fits"
#: File (mode 0600, in the output root) holding a generated operator token when stdout is
#: not a terminal.
TOKEN_NAME = "operator-token"
#: Consecutive rejections that raise an ``alert`` event.
REJECTION_RUN_ALERT = 5
#: Queue depth / oldest waiting age that raise a lag ``alert``.
LAG_ALERT_FRAMES = 5
LAG_ALERT_AGE_S = 60.0
#: Longest JIT warm-up / single frame the watchdog tolerates before it stops pinging.
WARM_UP_LIMIT_S = 900.0
FRAME_LIMIT_S = 300.0
#: How long an operator command waits for the worker before answering "queued".
COMMAND_WAIT_S = 5.0
#: Shutdown budget: systemd's default stop timeout is longer, but the spec says 10 s.
SHUTDOWN_S = 9.0
#: Longest wait for the checkpoint thread at finalize/close (0.6 GB + fsync on a slow SD card).
CHECKPOINT_WAIT_S = 300.0

#: How long a cancelled rebuild process may take to clean up before it is killed.
REBUILD_STOP_S = 3.0

#: Writes a checkpoint's temporary file: ``(path, arrays, meta) -> (staged file, bytes)``.
CheckpointWriter = Callable[[Path, dict, dict], tuple[StagedFile, int]]

#: Test hook (crash-safety tests only): ``LIVESTACK_TEST_PAUSE_AT=read|accumulate|checkpoint``
#: with ``LIVESTACK_TEST_PAUSE_AFTER=N`` stops the worker at that point once the journal
#: has N finished rows, after printing ``livestack-test: paused at STAGE`` on stderr, so a
#: test can SIGKILL the process exactly there. Unset in production: no effect.
_PAUSE_ENV = "LIVESTACK_TEST_PAUSE_AT"
_PAUSE_AFTER_ENV = "LIVESTACK_TEST_PAUSE_AFTER"


class _TestPause:
    """The crash-test hook described at ``_PAUSE_ENV``."""

    def __init__(self) -> None:
        self.stage = os.environ.get(_PAUSE_ENV) or None
        self.after = int(os.environ.get(_PAUSE_AFTER_ENV, "0") or 0)

    def __call__(self, stage: str, journal: Journal) -> None:
        if self.stage != stage:
            return
        done = sum(n for status, n in journal.counts().items() if status != "pending")
        if done < self.after:
            return
        os.write(2, f"livestack-test: paused at {stage}\n".encode())
        time.sleep(60.0)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def stack_key_of(info: FrameInfo) -> dict[str, Any]:
    """The header facts that define a stack (stored in the journal's ``stacks`` table)."""
    return {"object": info.object_name, "filter": info.filter_name,
            "exposure_s": info.exposure_s, "binning": list(info.binning),
            "shape": list(info.shape), "bayer_pattern": info.bayer_pattern, "gain": info.gain}


def _write_atomic(path: Path, blob: bytes) -> None:
    """Write ``blob`` to ``path`` atomically (readers never see half a file).

    Raises
    ------
    StorageError
        The file cannot be written.
    """
    with atomic_write(path) as (fd, _tmp), os.fdopen(fd, "wb", closefd=False) as fh:
        fh.write(blob)


@dataclass
class _Runtime:
    """A live stack: its session plus output cadence bookkeeping."""

    stack_id: str
    folder: Path
    session: StackSession
    key: dict[str, Any]
    generation: int
    last_seq: int = 0
    frames_since_checkpoint: int = 0
    last_checkpoint_t: float = field(default_factory=time.monotonic)
    accepted_since_fits: int = 0
    accepted_since_preview: int = 0
    last_preview_t: float = 0.0
    preview_version: int = 0
    rejection_run: int = 0
    seen: int = 0
    rejected: int = 0
    failed: int = 0
    started: str = field(default_factory=_now_iso)


def _remove_files(folder: Path, names: Iterable[str]) -> None:
    """Remove our own files ``names`` from ``folder`` where they exist."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()


@dataclass
class _Rebuild:
    """A background rebuild of one stack (exclude a frame / set the reference).

    Two phases: the integration engine runs in a child process (:mod:`livestack.rebuild`)
    while the old session keeps stacking and serving; then the frames the old session took
    meanwhile are replayed onto the session seeded from the integration, and it replaces
    the old one.
    """

    stack_id: str
    why: str
    reference: str | None                   # path of the new reference (None: keep it)
    folder: Path
    process: subprocess.Popen[bytes] | None = None
    log_file: Any = None
    attempts: int = 1
    started: float = field(default_factory=time.monotonic)
    last_seq_seen: int = 0                  # the old session's rows up to here are in it
    # catch-up phase
    session: StackSession | None = None
    base_inverse: Transform | None = None   # old-reference coords -> the new reference
    order: list[int] = field(default_factory=list)  # rows to replay after the integration
    done: set[int] = field(default_factory=set)
    updates: list[tuple[int, int, list[float] | None]] = field(default_factory=list)


@dataclass
class _CheckpointJob:
    """A checkpoint written to its temporary file, waiting to be made durable."""

    stack_id: str
    staged: StagedFile
    size: int
    t0: float
    seq: int
    n_files: int
    generation: int


class _CheckpointThread:
    """Makes staged checkpoints durable (fsync, rename) one at a time in a background thread.

    At most one job per stack waits: a newer snapshot replaces an older one that has not
    started (it covers more frames), so a slow disk never queues up gigabytes.
    """

    def __init__(self, write: Callable[[_CheckpointJob], bool]) -> None:
        self._write = write
        self._cond = threading.Condition()
        self._jobs: dict[str, _CheckpointJob] = {}
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    def submit(self, job: _CheckpointJob) -> None:
        with self._cond:
            older = self._jobs.pop(job.stack_id, None)
            if older is not None:
                older.staged.discard()  # superseded before it was synced
            self._jobs[job.stack_id] = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="livestack-checkpoint",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted job is written; False on timeout.

        Also returns when the thread has ended (jobs then stay unwritten and are retried
        by the next :meth:`submit`), so a dead thread never blocks a shutdown.
        """
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._busy and (not self._jobs or self._thread is None), timeout_s)

    def stop(self, timeout_s: float | None = None) -> bool:
        """Write the waiting jobs and end the thread; False when ``timeout_s`` ran out."""
        t_end = None if timeout_s is None else time.monotonic() + timeout_s
        drained = self.drain(timeout_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(None if t_end is None else max(0.0, t_end - time.monotonic()))
        return drained and (thread is None or not thread.is_alive())

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: bool(self._jobs) or self._stopping)
                    if not self._jobs:
                        return
                    job = self._jobs.pop(next(iter(self._jobs)))
                    self._busy = True
                try:
                    self._write(job)
                except LivestackError as exc:  # e.g. the journal note failed: keep the thread
                    log.error("%s: checkpoint bookkeeping failed: %s", job.stack_id, exc)
                except Exception:
                    # A bug: logged with its traceback. The thread must live on, or every
                    # later checkpoint is lost and drain() waits in vain.
                    log.exception("%s: checkpoint at seq %d failed", job.stack_id, job.seq)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
        finally:
            with self._cond:  # a later submit() starts a new thread
                if self._thread is threading.current_thread():
                    self._thread = None
                self._busy = False
                self._cond.notify_all()


class Engine:
    """Processes files into stacks, synchronously, in the calling thread.

    Parameters
    ----------
    config : Config
    output_root : Path
        Holds ``journal.sqlite`` and one folder per stack (``<night>/<slug>``).
    masters : object or None
        A ``MasterLibrary`` (``select(info)``); None: load from ``config.masters``.
    hub, metrics : optional
        Live-server bridge and metrics registry (None in batch mode).
    checkpoint_writer : callable, optional
        ``(path, arrays, meta) -> (StagedFile, bytes)``, default
        :func:`~livestack.storage.checkpoint.stage_checkpoint` (tests inject a failing one).
    background_checkpoints : bool
        Write checkpoints in a background thread (default) or inline.

    Raises
    ------
    JournalError
        The journal cannot be opened.
    MasterError
        The configured masters cannot be loaded.
    """

    def __init__(self, config: Config, output_root: Path, *, masters: Any = None,
                 hub: Hub | None = None, metrics: Metrics | None = None,
                 checkpoint_writer: CheckpointWriter | None = None,
                 background_checkpoints: bool = True) -> None:
        from livestack.pipeline.routing import Router

        self.config = config
        self.output_root = Path(os.path.abspath(output_root))
        self.output_root.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.output_root / JOURNAL_NAME)
        self.hub = hub
        self.metrics = metrics
        self._pause = _TestPause()
        self._stage_checkpoint: CheckpointWriter = checkpoint_writer or stage_checkpoint
        self._checkpoints = _CheckpointThread(self._write_job) if background_checkpoints \
            else None
        self._masters_note: dict[tuple[int, int], str] = {}
        self._uncalibrated_warned = False  # the no-dark/no-flat warning is given once
        self.masters = masters if masters is not None else self._load_masters()
        #: Keeps each master used in <output>/masters/ with its hash (storage.calibration).
        self.calibration = CalibrationRecord(self.output_root, self.masters,
                                             config.masters.temp_tolerance_c)
        #: The recorded masters of the frame in progress (for its journal row).
        self._frame_masters: list[dict[str, str]] = []
        self.router = Router(slew_threshold_deg=config.routing.slew_threshold_deg,
                             failure_run=config.routing.failure_run,
                             solved_jump_fraction=config.routing.solved_jump_fraction)
        saved = self.journal.get_state("router")
        if saved is not None:
            try:
                self.router = Router.from_dict(saved)
            except ValueError as exc:
                log.warning("%s: router state not usable (%s); routing starts afresh",
                            self.journal.path, exc)
            self.router.solved_jump_fraction = config.routing.solved_jump_fraction
        # new_stack command: router id -> the id frames of that key go to instead.
        self.redirects: dict[str, str] = dict(self.journal.get_state("redirects", {}))
        self.runtimes: dict[str, _Runtime] = {}
        #: Preview versions of stacks dropped by :meth:`forget_runtime` (they continue).
        self._preview_versions: dict[str, int] = {}
        self.current_stack: str | None = None
        self.paused = False
        self.rebuilds: dict[str, _Rebuild] = {}
        self.processed = 0
        #: The journal row left ``pending`` by the frame in progress (None between frames).
        self.open_row: int | None = None
        #: Journal counts per status, kept by :meth:`close` for reports after closing.
        self.final_counts: dict[str, int] = {}
        #: The daemon's watch folder: symlinks leading out of it are refused (None: batch).
        self.watch_root: Path | None = None
        from livestack.service.solving import StackSolving

        #: Background plate solving of each stack's reference (never blocks a frame).
        self.solving = StackSolving(self)

    def _commit_checkpoint(self, staged: StagedFile) -> None:
        hook = None
        if self._pause.stage == "checkpoint":
            def hook(_tmp: Path) -> None:
                self._pause("checkpoint", self.journal)
        staged.commit(hook)

    def _load_masters(self) -> Any:
        library = open_masters(paths=self.config.masters.paths,
                               temp_tolerance_c=self.config.masters.temp_tolerance_c)
        if library is None:
            return None
        log.info("loaded %d master frame(s) from %s", len(library),
                 ", ".join(self.config.masters.paths))
        return library

    def close(self) -> None:
        """Finish pending checkpoint writes and close the journal.

        The journal's counts stay readable in :attr:`final_counts`.
        """
        for stack_id in list(self.rebuilds):
            self._cancel_rebuild(stack_id)
        if self._checkpoints is not None and not self._checkpoints.stop(CHECKPOINT_WAIT_S):
            log.error("checkpoints not written within %.0f s; the journal is replayed at the "
                      "next start instead", CHECKPOINT_WAIT_S)
        self.solving.close()
        self.final_counts = self.journal.counts()
        self.journal.close()

    # ---------------------------------------------------------------- resume

    def resume(self, should_stop: Callable[[], bool] = lambda: False) -> list[str]:
        """Restore the stacks with recent work and return the paths left ``pending``.

        Stacks of the latest night in the journal (and any stack with pending rows) are
        restored now: last checkpoint, then replay of the later journal rows. Older stacks
        are restored lazily when a frame routes to them.
        """
        stacks = self.journal.stacks()
        pending = self.journal.reopen_transient_failures()  # EMFILE is never a verdict
        if stacks:
            latest_night = max(s.id.split("/", 1)[0] for s in stacks)
            wanted = [s.id for s in stacks if s.id.split("/", 1)[0] == latest_night]
            for stack_id in wanted:
                if should_stop():
                    break
                if self.journal.rows_after(stack_id, 0) or self.journal.checkpoint(stack_id):
                    self.runtime(stack_id)
        if pending:
            log.info("%d frame(s) left pending by the last run will be processed again",
                     len(pending))
        return list(dict.fromkeys(row.path for row in pending))

    def runtime(self, stack_id: str, info: FrameInfo | None = None,
                should_stop: Callable[[], bool] = lambda: False) -> _Runtime:
        """The live stack ``stack_id``, restoring it (checkpoint + replay) if needed."""
        rt = self.runtimes.get(stack_id)
        if rt is not None:
            return rt
        from livestack.pipeline.session import StackSession

        folder = self.output_root / stack_id
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
        from livestack.rebuild import FILE_NAMES as rebuild_files

        _remove_files(folder, rebuild_files)  # of a rebuild the last run did not finish
        for scratch in folder.glob(".livestack-integrate-*"):  # a killed rebuild's scratch
            shutil.rmtree(scratch, ignore_errors=True)
        row = self.journal.stack(stack_id)
        if row is None:
            key = stack_key_of(info) if info is not None else {}
            row = self.journal.ensure_stack(stack_id, key, str(folder.relative_to(
                self.output_root)))
        session, seq = self._restore_checkpoint(stack_id, folder, row.generation)
        if session is None:
            session, seq = StackSession(stack_id, self.config.pipeline), 0
        rt = _Runtime(stack_id, folder, session, row.key, row.generation, last_seq=seq)
        rt.preview_version = self._preview_versions.pop(stack_id, rt.preview_version)
        self.runtimes[stack_id] = rt
        rows = self.journal.rows_after(stack_id, seq)
        if rows:
            log.info("%s: replaying %d journal row(s) after seq %d", stack_id, len(rows), seq)
        try:
            for jrow in rows:
                if should_stop():
                    break
                self._replay_row(rt, rt.session, jrow)
                rt.last_seq = max(rt.last_seq, jrow.seq or 0)
                rt.frames_since_checkpoint += 1
        except TransientError:
            self.forget_runtime(rt)  # half restored: restored afresh when retried
            raise
        counts = self.journal.counts(stack_id)
        rt.seen = sum(counts.values())
        rt.rejected, rt.failed = counts["rejected"], counts["failed"]
        if rt.session.n_accepted:
            if rows:
                rt.accepted_since_fits = 1  # stack.fits is older than the replayed frames
            from livestack.storage.stackcheck import stack_fits_matches

            if not stack_fits_matches(folder / FITS_NAME, rt.session.n_accepted,
                                      len(rt.session.records)):
                self.write_fits(rt)  # behind the checkpoint, truncated or missing: rewrite
            if rows or self.hub is not None:
                rt.accepted_since_preview = 1  # viewers get the restored stack at once
        self._publish_stack(rt)
        return rt

    def _restore_checkpoint(self, stack_id: str, folder: Path, generation: int
                            ) -> tuple[StackSession | None, int]:
        from livestack.pipeline.session import StackSession

        path = folder / CHECKPOINT_NAME
        try:
            arrays, meta = load_checkpoint(path)
        except FileNotFoundError:
            return None, 0
        except StorageError as exc:
            log.warning("%s; replaying the journal instead", exc)
            return None, 0
        if meta.get("stack_id") != stack_id or meta.get("generation") != generation:
            log.info("%s: checkpoint is from an older version of the stack; replaying", path)
            return None, 0
        seq = int(meta.get("seq", 0))
        if seq > self.journal.last_seq(stack_id):
            log.warning("%s: checkpoint is ahead of the journal; replaying", path)
            return None, 0
        try:
            session = StackSession.restore(stack_id, self.config.pipeline, arrays,
                                           meta["session"])
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("%s: unusable checkpoint (%s); replaying the journal instead", path, exc)
            return None, 0
        log.info("%s: restored checkpoint at seq %d (%d frames)", stack_id, seq,
                 session.n_accepted)
        return session, seq

    def _replay_row(self, rt: _Runtime, session: StackSession, row: FrameRow,
                    transform: Transform | None = None, *, use_stored: bool = True
                    ) -> FrameOutcome | None:
        """Feed one journal row's file back into ``session`` (resume or rebuild)."""
        from livestack.pipeline.types import Transform as _Transform

        try:
            sha = sha256_file(row.path)
            if sha != row.sha256:
                raise FrameError("changed_on_disk",
                                 f"{row.path}: content changed since it was stacked")
            raw, info = self._read(row.path)
            masters = self._select_masters(info)
        except (FrameError, OSError) as exc:
            if is_fd_exhaustion(exc):  # never a verdict on the frame (issue 14)
                raise DescriptorsExhaustedError(f"{row.path}: {exc}") from None
            reason = exc.reason if isinstance(exc, FrameError) else "vanished"
            log.warning("%s: %s: cannot replay: %s", row.path, reason, exc)
            self.journal.finish(row.id, "failed", reason=f"replay_{reason}", message=str(exc),
                                stack_id=rt.stack_id, seq=row.seq)
            return None
        if transform is None and use_stored and row.transform is not None:
            transform = _Transform.from_list(row.transform, row.model or "similarity")
        outcome = session.process(raw, info, masters, stored_transform=transform,
                                  overwrite_raw=True)
        if outcome.verdict != row.status:
            log.warning("%s: replay gave %s (%s) where the journal says %s", row.path,
                        outcome.verdict, outcome.reason, row.status)
            self.journal.finish(row.id, outcome.verdict, reason=outcome.reason,
                                message=outcome.message, stack_id=rt.stack_id,
                                metrics=_metrics_json(outcome), weight=outcome.weight,
                                transform=row.transform, model=row.model, seq=row.seq)
        return outcome

    # ---------------------------------------------------------------- frames

    def process_path(self, path: Path | str) -> FrameRow | None:
        """Take one file through the whole pipeline; return its final journal row.

        Returns None when the file needs no work (already in the journal). Per-frame
        problems end as a journal row (status ``failed``/``rejected``/``ignored``) and one
        log line ``path: reason: message``; they never raise.

        Raises
        ------
        JournalError
            The journal cannot be written (the daemon stops: nothing would be safe).
        """
        spath = os.path.abspath(path)
        t0 = time.perf_counter()
        self.solving.frame_started()  # a running solve-field waits (SIGSTOP) until idle
        refusal = check_entry(spath, self.watch_root)
        if refusal is not None:  # symlink out of the watch folder, dangling symlink
            reason, message, status, level = refusal
            return self._record_failure(spath, None, None, None, reason, message,
                                        status=status, level=level)
        try:
            st = os.stat(spath)
        except FileNotFoundError:
            return self._record_failure(spath, None, None, None, "vanished",
                                        f"{spath}: the file disappeared before it was read")
        except OSError as exc:
            return self._record_failure(spath, None, None, None, "unreadable",
                                        f"{spath}: cannot stat: {exc.strerror}")
        if not stat_mod.S_ISREG(st.st_mode):
            return self._record_failure(spath, None, None, None, "not_a_file",
                                        f"{spath}: not a regular file")
        if self.journal.seen(spath, st.st_size, st.st_mtime_ns):
            log.debug("%s: already in the journal", spath)
            return None
        if self.metrics is not None:
            self.metrics.inc("livestack_frames_seen_total")
        try:
            sha = sha256_file(spath)
        except FileNotFoundError:
            return self._record_failure(spath, st.st_size, st.st_mtime_ns, None, "vanished",
                                        f"{spath}: the file disappeared while it was read")
        except PermissionError:
            return self._record_failure(spath, st.st_size, st.st_mtime_ns, None,
                                        "permission_denied", f"{spath}: permission denied")
        except OSError as exc:
            if is_fd_exhaustion(exc):  # says nothing about the frame: retried, never final
                raise DescriptorsExhaustedError(f"{spath}: {exc.strerror}") from None
            return self._record_failure(spath, st.st_size, st.st_mtime_ns, None, "unreadable",
                                        f"{spath}: cannot read: {exc.strerror or exc}")
        done = self.journal.already_done(spath, sha)
        if done is not None:
            if done.path == spath:
                return None
            return self._record_failure(
                spath, st.st_size, st.st_mtime_ns, sha, "duplicate",
                f"{spath}: same content as {done.path} (already {done.status})",
                status="ignored", level=logging.INFO)
        row_id = self.journal.mark_pending(spath, st.st_size, st.st_mtime_ns, sha)
        self.open_row = row_id
        self._pause("read", self.journal)
        try:
            raw, info = self._read(spath)
        except FrameError as exc:
            return self._finish_failure(row_id, spath, exc.reason, exc.message)
        if info.image_type in CALIBRATION_TYPES:
            message = f"{spath}: {info.image_type} frame in the watch folder, not stacked"
            return self._finish_failure(row_id, spath, "calibration_frame", message,
                                        status="ignored", level=logging.INFO)
        try:
            masters = self._select_masters(info)
        except CalibrationError as exc:
            return self._finish_failure(row_id, spath, exc.reason, exc.message)
        if not info.exposure_s > 0:
            log.warning("%s: no exposure time in the header (EXPTIME/EXPOSURE/EXP_TIME): "
                        "stacked in a 'no-exptime' stack, adding 0 s to its total", spath)
        stack_id = self._route(info)
        rt = self.runtime(stack_id, info)
        self.current_stack = stack_id
        t_read = time.perf_counter()
        try:
            # The frame as read is not needed afterwards: calibrated where it lies.
            outcome = rt.session.process(raw, info, masters, overwrite_raw=True)
        except OSError as exc:  # a lazy import or kernel compile found no descriptor
            if not is_fd_exhaustion(exc):
                raise
            self.forget_runtime(rt)  # it may hold part of the frame: rebuilt from the journal
            raise DescriptorsExhaustedError(f"{spath}: {exc.strerror}") from None
        self._pause("accumulate", self.journal)
        return self._after_outcome(rt, row_id, info, outcome,
                                   read_ms=(t_read - t0) * 1e3, t0=t0)

    def _read(self, path: str) -> tuple[np.ndarray, FrameInfo]:
        """Read a frame read-only; OSError becomes a FrameError with a clear reason."""
        try:
            image, info = read_light(path, self.config.formats, self.masters)
        except FileNotFoundError:
            raise FrameError("vanished", f"{path}: the file disappeared while it was read"
                             ) from None
        except PermissionError:
            raise FrameError("permission_denied", f"{path}: permission denied") from None
        except IsADirectoryError:
            raise FrameError("not_a_file", f"{path}: not a regular file") from None
        except OSError as exc:
            if is_fd_exhaustion(exc):  # the row stays pending; the worker retries
                raise DescriptorsExhaustedError(f"{path}: {exc.strerror}") from None
            raise FrameError("unreadable", f"{path}: cannot read: {exc.strerror or exc}"
                             ) from None
        return image, info

    def _select_masters(self, info: FrameInfo) -> Any:
        """The masters for a light (None without a library).

        Raises
        ------
        CalibrationError
            ``master_shape_mismatch`` when masters are configured but none has the frame's
            shape and binning (stacking it uncalibrated would hide the mistake);
            ``master_unreadable`` when a chosen master file cannot be read any more.
        """
        self._frame_masters = []
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
                "master_shape_mismatch",
                f"{info.path}: frame is {info.shape[1]}x{info.shape[0]}"
                f"{rgb.get(info.channels, '')} bin "
                f"{info.binning[0]}x{info.binning[1]} but the masters are {', '.join(have)}")
        try:
            chosen, self._frame_masters = self.calibration.select(
                info, self.config.masters.temp_tolerance_c)
        except MasterError as exc:
            raise CalibrationError("master_unreadable", f"{info.path}: {exc}") from None
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

    def _route(self, info: FrameInfo) -> str:
        stack_id = self.router.route(info)
        return self.redirects.get(stack_id, stack_id)

    def _router_id(self, stack_id: str) -> str:
        """The router's id of a stack (differs after a ``new_stack`` command)."""
        return next((k for k, v in self.redirects.items() if v == stack_id), stack_id)

    def _record_failure(self, path: str, size: int | None, mtime_ns: int | None,
                        sha: str | None, reason: str, message: str, *,
                        status: str = "failed", level: int = logging.WARNING) -> FrameRow | None:
        row_id = self.journal.mark_pending(path, size, mtime_ns, sha)
        return self._finish_failure(row_id, path, reason, message, status=status, level=level)

    def _finish_failure(self, row_id: int, path: str, reason: str, message: str, *,
                        status: str = "failed", stack_id: str | None = None,
                        level: int = logging.WARNING) -> FrameRow | None:
        text = message if message.startswith(path) else f"{path}: {message}"
        log.log(level, "%s: %s: %s", path, reason, text[len(path) + 2:] if
                text.startswith(path + ": ") else text)
        self.journal.finish(row_id, status, reason=reason, message=text, stack_id=stack_id,
                            state=self._router_state())
        if self.open_row == row_id:
            self.open_row = None
        if self.metrics is not None and status == "failed":
            self.metrics.inc("livestack_frames_failed_total", {"reason": reason})
        if self.hub is not None and status == "failed":  # ignored files are not frames
            event = {"type": "frame", "stack_id": stack_id, "file": path, "verdict": status,
                     "reason": reason, "message": text, "weight": 0.0, "time": _now_iso(),
                     "metrics": None}
            self.hub.publish(event)
            if stack_id is not None:
                self.hub.record_frame(stack_id, event)
        self.processed += 1
        return self.journal.row(row_id)

    def fail_open_row(self, path: str, message: str) -> FrameRow | None:
        """Finish the row left ``pending`` by an internal error as ``failed``/``internal_error``.

        Returns the finished row, or None when the error struck outside a pending row (the
        file then has no new row; its final row, if any, is left as it is).

        Raises
        ------
        JournalError
            The journal cannot be written.
        """
        row_id, self.open_row = self.open_row, None
        if row_id is None:
            return None
        return self._finish_failure(row_id, path, "internal_error", message)

    def _router_state(self) -> dict[str, Any]:
        return {"router": self.router.to_dict(), "redirects": self.redirects}

    def _after_outcome(self, rt: _Runtime, row_id: int, info: FrameInfo,
                       outcome: FrameOutcome, *, read_ms: float, t0: float) -> FrameRow | None:
        alignment = outcome.verdict == "rejected" and outcome.reason in ALIGNMENT_REASONS
        reroute: tuple[str, ...] = ()
        router_id = self._router_id(rt.stack_id)
        if alignment:
            reroute = self.router.report_alignment_failure(router_id, info)
            self.solving.unaligned(rt, row_id, info, outcome.stars)
        elif outcome.verdict == "accepted":
            self.router.report_alignment_success(router_id)
        transform = outcome.transform
        metrics = _metrics_json(outcome)
        if metrics is not None:  # provenance: the format the frame came in
            metrics["format"] = frame_format(info.path)
        try:
            seq = self.journal.finish(
                row_id, outcome.verdict, reason=outcome.reason, message=outcome.message,
                stack_id=rt.stack_id, metrics=metrics,
                transform=transform.to_list() if transform is not None else None,
                model=transform.model if transform is not None else None,
                weight=outcome.weight, assign_seq=True, state=self._router_state(),
                norm=None if outcome.norm is None else {
                    **outcome.norm.to_json(), "reference_file": rt.session.reference_file},
                masters=self._frame_masters if outcome.verdict != "failed" else None)
        except JournalFullError:
            self.forget_runtime(rt)  # the stack holds a frame the journal lacks: undo it
            raise
        if self.open_row == row_id:
            self.open_row = None
        rt.last_seq = seq or rt.last_seq
        rt.seen += 1
        rt.frames_since_checkpoint += 1
        self.processed += 1
        if outcome.verdict == "accepted":
            rt.accepted_since_fits += 1
            rt.accepted_since_preview += 1
            rt.rejection_run = 0
        else:
            rt.rejected += outcome.verdict == "rejected"
            rt.failed += outcome.verdict == "failed"
            rt.rejection_run += 1
        if outcome.verdict == "accepted":
            log.info("%s: %s", info.path, outcome.message)
        else:
            log.warning("%s: %s: %s", info.path, outcome.reason, outcome.message)
        elapsed_s = time.perf_counter() - t0
        self._frame_metrics(outcome, read_ms, elapsed_s)
        self._frame_event(rt, info, outcome, seq)
        if rt.rejection_run == REJECTION_RUN_ALERT:
            self._alert("warning", "rejection_run",
                        f"{REJECTION_RUN_ALERT} frames in a row rejected in {rt.stack_id} "
                        f"(last: {outcome.reason})", rt.stack_id)
        self.solving.after_frame(rt, row_id, transform, outcome.verdict == "accepted")
        self.after_frame(rt)
        if reroute:
            self._reroute(rt.stack_id, reroute)
        self.solving.route_moves()
        return self.journal.row(row_id)

    def forget_runtime(self, rt: _Runtime) -> None:
        """Drop a live stack whose memory is ahead of the journal (a journal write failed).

        The next frame of that stack restores it from its checkpoint and the journal, so
        retrying the frame adds it exactly once; the router goes back to its journaled
        state. Preview versions continue (viewers skip versions they have seen).
        """
        from livestack.pipeline.routing import Router

        if rt.stack_id in self.rebuilds:
            self._cancel_rebuild(rt.stack_id)
        self.runtimes.pop(rt.stack_id, None)
        self._preview_versions[rt.stack_id] = rt.preview_version
        saved = self.journal.get_state("router")
        if saved is not None:
            with contextlib.suppress(ValueError):
                self.router = Router.from_dict(saved)
        self.redirects = dict(self.journal.get_state("redirects", {}))

    def _reroute(self, old_stack: str, paths: tuple[str, ...], *,
                 to_stack: str | None = None, why: str = "") -> None:
        """A run of agreeing alignment failures closed ``old_stack``: restack the run.

        The frames (rejected in the old stack) move to the stack the router now gives
        them, or to ``to_stack`` (solved routing, ``why`` says why): their journal rows get
        the new stack and a new ``seq`` there.
        """
        if to_stack is None:
            log.info("%s: %d frames in a row do not align but agree among themselves: "
                     "starting a new stack with them", old_stack, len(paths))
        for path in paths:
            rows = [r for r in self.journal.rows(path=path, stack_id=old_stack)
                    if r.status == "rejected"]
            if not rows:
                continue
            row = rows[-1]
            try:
                raw, info = self._read(path)
                masters = self._select_masters(info)
            except FrameError as exc:
                log.warning("%s: %s: %s", path, exc.reason, exc.message)
                continue
            stack_id = self._route(info) if to_stack is None else to_stack
            if to_stack is not None:
                log.info("%s: %s -> %s (%s)", path, old_stack, to_stack, why)
            new_rt = self.runtime(stack_id, info)
            self.current_stack = stack_id
            t0 = time.perf_counter()
            outcome = new_rt.session.process(raw, info, masters, overwrite_raw=True)
            self.journal.mark_pending(row.path, row.size, row.mtime_ns, row.sha256)
            self.open_row = row.id
            self._after_outcome(new_rt, row.id, info, outcome, read_ms=0.0, t0=t0)
        # The moved rows were the old stack's last seqs (rejected: its state is unchanged
        # by them). Checkpoint it at the journal's new last seq; an older checkpoint above
        # that seq would look "ahead of the journal" and force a full replay at each start.
        old_rt = self.runtimes.get(old_stack)
        if old_rt is not None and old_stack not in self.rebuilds:
            old_rt.last_seq = self.journal.last_seq(old_stack)
            old_rt.frames_since_checkpoint = max(old_rt.frames_since_checkpoint, 1)
            self.checkpoint(old_rt)

    def _frame_metrics(self, outcome: FrameOutcome, read_ms: float, elapsed_s: float) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        if outcome.verdict == "accepted":
            m.inc("livestack_frames_accepted_total")
        elif outcome.verdict == "rejected":
            m.inc("livestack_frames_rejected_total", {"reason": outcome.reason or "unknown"})
        else:
            m.inc("livestack_frames_failed_total", {"reason": outcome.reason or "unknown"})
        m.observe("livestack_stage_seconds", read_ms / 1e3, {"stage": "read"})
        for stage, ms in outcome.timings_ms.items():
            m.observe("livestack_stage_seconds", ms / 1e3, {"stage": stage})
        m.observe("livestack_frame_seconds", elapsed_s)

    def _frame_event(self, rt: _Runtime, info: FrameInfo, outcome: FrameOutcome,
                     seq: int | None) -> None:
        if self.hub is None:
            return
        event = {"type": "frame", "stack_id": rt.stack_id, "file": info.path,
                 "verdict": outcome.verdict, "reason": outcome.reason,
                 "message": outcome.message, "weight": outcome.weight,
                 "exposure_s": info.exposure_s, "seq": seq,
                 "time": info.date_obs.isoformat() if info.date_obs else _now_iso(),
                 "metrics": outcome.metrics.as_dict() if outcome.metrics else None,
                 "timings_ms": outcome.timings_ms,
                 # pixels clipped by the stack: a satellite trail shows as a jump here
                 "rejected_low": outcome.rejected_low, "rejected_high": outcome.rejected_high}
        self.hub.publish(event)
        self.hub.record_frame(rt.stack_id, event)

    def alert(self, level: str, code: str, message: str) -> None:
        """Log and publish an alert not tied to a stack (see :mod:`livestack.resilience`)."""
        self._alert(level, code, message)

    def _alert(self, level: str, code: str, message: str, stack_id: str | None = None) -> None:
        log.warning("alert: %s", message)
        if self.hub is not None:
            self.hub.publish({"type": "alert", "level": level, "code": code,
                              "message": message, "stack_id": stack_id})

    # ---------------------------------------------------------------- outputs

    def after_frame(self, rt: _Runtime, *, force: bool = False) -> None:
        """Apply the preview / checkpoint / FITS cadences after a frame (or when forced).

        The preview goes first and its ``stack`` event at once, so viewers never wait for a
        ``stack.fits`` write (1.8 s at 26 MP) or a checkpoint snapshot.
        """
        out = self.config.output
        now = time.monotonic()
        if rt.session.n_accepted and rt.accepted_since_preview > 0 and (
                force or (rt.accepted_since_preview >= out.preview_every_frames
                          and now - rt.last_preview_t >= out.preview_min_interval_s)):
            self.render_preview(rt)
        self._publish_stack(rt)
        if rt.stack_id not in self.rebuilds and rt.frames_since_checkpoint > 0 and (
                force or rt.frames_since_checkpoint >= out.checkpoint_every_frames
                or now - rt.last_checkpoint_t >= out.checkpoint_every_s):
            self.checkpoint(rt)
        if rt.session.n_accepted and rt.accepted_since_fits > 0 and (
                force or rt.accepted_since_fits >= out.fits_every_frames):
            self.write_fits(rt)

    def idle(self) -> None:
        """Called when no frame is waiting: flush what the cadences deferred."""
        out = self.config.output
        now = time.monotonic()
        self.solving.idle()  # the solve-field stopped during frames runs again
        self.solving.poll()
        self.solving.route_moves()
        for rt in list(self.runtimes.values()):
            if rt.session.n_accepted and rt.accepted_since_preview > 0 and (
                    now - rt.last_preview_t >= out.preview_min_interval_s):
                self.render_preview(rt)
                self._publish_stack(rt)
            if (rt.frames_since_checkpoint > 0 and rt.stack_id not in self.rebuilds
                    and now - rt.last_checkpoint_t >= out.checkpoint_every_s):
                self.checkpoint(rt)

    def checkpoint(self, rt: _Runtime) -> None:
        """Snapshot the stack's state and have it written (in the background by default).

        The state is written here, in the worker, straight from the stack's own arrays into
        a temporary file, so it is consistent with ``rt.last_seq`` and needs no copy of the
        state (18 B/px, 470 MB at 26 MP mono; writing into the page cache costs about what
        the copy did). The slow part (fsync and rename) happens in the checkpoint thread
        while the worker goes on stacking. A failed write (disk full) is logged once and
        alerted; the previous checkpoint stays valid and the next cadence tries again.
        """
        t0 = time.perf_counter()
        arrays, meta = rt.session.state(copy=False)
        meta = {"stack_id": rt.stack_id, "seq": rt.last_seq, "generation": rt.generation,
                "n_accepted": rt.session.n_accepted, "written": time.time(), "session": meta}
        rt.last_checkpoint_t = time.monotonic()
        rt.frames_since_checkpoint = 0
        try:
            staged, size = self._stage_checkpoint(rt.folder / CHECKPOINT_NAME, arrays, meta)
        except StorageError as exc:
            self._checkpoint_failed(rt.stack_id, exc)
            return
        job = _CheckpointJob(stack_id=rt.stack_id, staged=staged, size=size, t0=t0,
                             seq=rt.last_seq, n_files=rt.seen, generation=rt.generation)
        if self._checkpoints is not None:
            self._checkpoints.submit(job)
        else:
            self._write_job(job)

    def _write_job(self, job: _CheckpointJob) -> bool:
        """Write one checkpoint (checkpoint thread, or inline); never raises StorageError."""
        try:
            self._commit_checkpoint(job.staged)
        except StorageError as exc:
            self._checkpoint_failed(job.stack_id, exc)
            return False
        self.journal.note_checkpoint(job.stack_id, job.seq, job.n_files, job.generation,
                                     str(job.staged.path))
        elapsed = time.perf_counter() - job.t0
        log.debug("%s: checkpoint at seq %d, %.1f MB in %.0f ms", job.stack_id, job.seq,
                  job.size / 1e6, elapsed * 1e3)
        if self.metrics is not None:
            self.metrics.observe("livestack_stage_seconds", elapsed, {"stage": "checkpoint"})
        return True

    def _checkpoint_failed(self, stack_id: str, exc: StorageError) -> None:
        log.error("%s (the previous checkpoint is kept; stacking goes on)", exc)
        if self.metrics is not None:
            self.metrics.inc("livestack_checkpoint_failures_total")
        self._alert("error", "checkpoint_failed", str(exc), stack_id)

    def wait_checkpoints(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted checkpoint is written; False on timeout."""
        return self._checkpoints.drain(timeout_s) if self._checkpoints is not None else True

    def write_fits(self, rt: _Runtime) -> bool:
        """Write ``stack.fits`` atomically; on StorageError log one line and go on."""
        from livestack.storage.stackfits import write_stack_fits

        t0 = time.perf_counter()
        try:
            # Views of the live state (no 10 B/px of map copies): written before the
            # worker folds in another frame.
            product = rt.session.product(copy=False)
            product.header.update(master_cards(self.journal.stack_masters(rt.stack_id)))
            self.solving.annotate(rt, product.header)
            write_stack_fits(rt.folder / FITS_NAME, product)
        except StorageError as exc:
            log.error("%s (stacking goes on)", exc)
            return False
        rt.accepted_since_fits = 0
        if self.metrics is not None:
            self.metrics.observe("livestack_stage_seconds", time.perf_counter() - t0,
                                 {"stage": "fits"})
        return True

    def render_preview(self, rt: _Runtime) -> bool:
        """Render the JPEG, save ``preview.jpg`` and push it to viewers."""
        t0 = time.perf_counter()
        jpeg = rt.session.preview_jpeg()
        rt.accepted_since_preview = 0
        rt.last_preview_t = time.monotonic()
        rt.preview_version += 1
        if self.hub is not None:
            self.hub.publish_preview(rt.stack_id, rt.preview_version, jpeg)
        try:
            _write_atomic(rt.folder / PREVIEW_NAME, jpeg)
        except StorageError as exc:
            log.error("%s (stacking goes on)", exc)
        if self.metrics is not None:
            self.metrics.observe("livestack_stage_seconds", time.perf_counter() - t0,
                                 {"stage": "preview"})
        return True

    def finalize(self) -> None:
        """Checkpoint and write ``stack.fits`` + preview for every stack with new work."""
        for rt in list(self.runtimes.values()):
            if rt.stack_id in self.rebuilds:
                continue
            if rt.frames_since_checkpoint > 0:
                self.checkpoint(rt)
            if rt.session.n_accepted and (rt.accepted_since_fits or
                                          not (rt.folder / FITS_NAME).exists()):
                self.write_fits(rt)
            if rt.session.n_accepted and (rt.accepted_since_preview or
                                          not (rt.folder / PREVIEW_NAME).exists()):
                self.render_preview(rt)
        if not self.wait_checkpoints(CHECKPOINT_WAIT_S):
            log.error("checkpoints not written within %.0f s", CHECKPOINT_WAIT_S)

    def summary(self, rt: _Runtime) -> dict[str, Any]:
        """The hub summary of a stack."""
        session = rt.session
        return {"object": rt.key.get("object", ""), "filter": rt.key.get("filter", ""),
                "frames": session.n_accepted, "frames_seen": rt.seen, "rejected": rt.rejected,
                "failed": rt.failed, "total_exposure_s": session.total_exposure_s,
                "sub_exposure_s": rt.key.get("exposure_s"),
                "preview_version": rt.preview_version,
                "state": "paused" if self.paused else
                         ("rebuilding" if rt.stack_id in self.rebuilds else "running"),
                "reference": session.reference_file, "started": rt.started,
                "updated": _now_iso(), "solve": self.solving.status(rt.stack_id)}

    def _publish_stack(self, rt: _Runtime) -> None:
        if self.hub is None:
            return
        summary = self.summary(rt)
        self.hub.update_stack(rt.stack_id, summary)
        self.hub.publish({"type": "stack", "stack_id": rt.stack_id, **summary})

    # ---------------------------------------------------------------- commands

    def validate_command(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Check a command and its arguments; return normalised arguments.

        Raises
        ------
        UsageError
            Unknown command, unknown stack or frame, bad argument type.
        """
        if name not in COMMANDS:
            raise UsageError(f"unknown command {name!r} (known: {', '.join(COMMANDS)})")
        if not isinstance(args, dict):
            raise UsageError(f"{name}: arguments must be an object")
        out: dict[str, Any] = {}
        stack_id = args.get("stack_id", self.current_stack)
        if name in ("reset", "new_stack", "set_reference", "exclude_frame"):
            if not isinstance(stack_id, str) or self.journal.stack(stack_id) is None:
                raise UsageError(f"{name}: unknown stack {stack_id!r}")
            out["stack_id"] = stack_id
        elif stack_id is not None:
            if not isinstance(stack_id, str) or self.journal.stack(stack_id) is None:
                raise UsageError(f"{name}: unknown stack {stack_id!r}")
            out["stack_id"] = stack_id
        if name in ("set_reference", "exclude_frame"):
            file = args.get("file")
            if not isinstance(file, str) or not file:
                raise UsageError(f"{name}: needs 'file' (a frame of the stack)")
            # Viewers see paths relative to the watch folder (service.guard.PathRedactor).
            shown = os.path.join(str(self.watch_root), file) if self.watch_root else file
            rows = [r for r in self.journal.rows(stack_id=stack_id)
                    if r.active and (r.path in (file, shown)
                                     or os.path.basename(r.path) == file)]
            if not rows:
                raise UsageError(f"{name}: {file!r} is not a frame of {stack_id}")
            wanted = [r for r in rows if r.status == "accepted"]
            if name == "set_reference" and not wanted:
                raise UsageError(f"{name}: {file!r} was not accepted; pick an accepted frame")
            if name == "set_reference" and not os.path.isfile(wanted[-1].path):
                raise UsageError(f"{name}: {wanted[-1].path} is no longer on disk; pick another "
                                 "frame")
            out["row_id"] = (wanted or rows)[-1].id
        return out

    def execute_command(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run a validated command (in the worker thread)."""
        stack_id: str = args.get("stack_id") or ""
        if name == "pause":
            self.paused = True
        elif name == "resume":
            self.paused = False
        elif name == "snapshot":
            targets = [self.runtimes[stack_id]] if stack_id in self.runtimes else list(
                self.runtimes.values())
            for rt in targets:
                self.after_frame(rt, force=True)
            return {"ok": True, "stacks": [rt.stack_id for rt in targets]}
        elif name == "new_stack":
            return self._new_stack(stack_id)
        elif name == "reset":
            self._reset(stack_id)
        elif name == "exclude_frame":
            self.journal.deactivate(stack_id, [args["row_id"]])
            self._start_rebuild(stack_id, why="exclude_frame")
        elif name == "set_reference":
            self.journal.deactivate(stack_id, [])  # bump the generation only
            ref_row = self.journal.row(args["row_id"])
            self._start_rebuild(stack_id, why="set_reference",
                                reference=ref_row.path if ref_row is not None else None)
        for rt in self.runtimes.values():
            self._publish_stack(rt)
        return {"ok": True}

    def _new_stack(self, stack_id: str) -> dict[str, Any]:
        base = next((k for k, v in self.redirects.items() if v == stack_id), stack_id)
        n = 2
        existing = {s.id for s in self.journal.stacks()}
        while f"{base}-n{n}" in existing:
            n += 1
        new_id = f"{base}-n{n}"
        old = self.runtimes.get(stack_id)
        self.redirects[base] = new_id
        self.journal.ensure_stack(new_id, old.key if old else {}, new_id)
        self.journal.set_state("redirects", self.redirects)
        if old is not None:
            self.after_frame(old, force=True)
        log.info("new stack %s: frames of %s go there from now on", new_id, base)
        return {"ok": True, "stack_id": new_id}

    def _reset(self, stack_id: str) -> None:
        from livestack.pipeline.session import StackSession

        self.journal.deactivate(stack_id)
        self._cancel_rebuild(stack_id)
        rt = self.runtime(stack_id)
        row = self.journal.stack(stack_id)
        assert row is not None
        rt.session = StackSession(stack_id, self.config.pipeline)
        rt.generation = row.generation
        rt.frames_since_checkpoint = 1
        rt.accepted_since_fits = rt.accepted_since_preview = 0
        rt.rejection_run = 0
        for name in (FITS_NAME, PREVIEW_NAME):
            with contextlib.suppress(FileNotFoundError):
                (rt.folder / name).unlink()  # our own outputs, stale after a reset
        self.checkpoint(rt)
        log.info("%s: reset (the frames stay in the journal, inactive)", stack_id)

    def _start_rebuild(self, stack_id: str, why: str, reference: str | None = None,
                       attempts: int = 1) -> None:
        """Start integrating the stack's active frames in a child process.

        Frames whose raw file is missing or changed are marked ``failed`` first (they
        cannot be integrated). A rebuild already running for the stack is cancelled: the
        new one covers the newer command too.
        """
        from livestack import rebuild as rb
        from livestack.config import config_to_dict
        from livestack.integrate import check_frame_file, load_session

        previous = self.rebuilds.get(stack_id)
        self._cancel_rebuild(stack_id)
        rt = self.runtime(stack_id)
        if reference is None and previous is not None:
            # A set_reference still being rebuilt holds for the newer command too.
            reference = previous.reference
        try:
            frames = load_session(journal=self.journal, stack_id=stack_id).frames
        except UsageError as exc:  # nothing accepted is left: an empty stack
            log.info("%s: %s; the stack is emptied", stack_id, exc)
            self._reset(stack_id)
            return
        row_ids: list[int] = []
        for frame in frames:
            try:
                check_frame_file(frame)
            except FrameError as exc:
                self._drop_from_rebuild(stack_id, frame.row_id, exc.reason, exc.message)
                continue
            if frame.row_id is not None:
                row_ids.append(frame.row_id)
        if reference is not None and not any(
                f.path == reference and f.row_id in row_ids for f in frames):
            log.warning("%s: the chosen reference %s cannot be re-read; the rebuild keeps the "
                        "stack's reference", stack_id, reference)
            reference = None
        if not row_ids:
            log.warning("%s: no frame of the stack can be re-read; the stack is emptied",
                        stack_id)
            self._reset(stack_id)
            return
        _remove_files(rt.folder, rb.FILE_NAMES)
        request = rb.RebuildRequest(
            journal=str(self.journal.path), stack_id=stack_id, reference=reference,
            config={"pipeline": config_to_dict(self.config.pipeline),
                    "masters": config_to_dict(self.config.masters),
                    "formats": config_to_dict(self.config.formats)},
            folder=str(rt.folder),
            memory_limit_bytes=self.config.rebuild.memory_limit_mb * 1024 * 1024,
            row_ids=row_ids, nice=self.config.rebuild.nice)
        job = _Rebuild(stack_id, why, reference, rt.folder, attempts=attempts,
                       last_seq_seen=self.journal.last_seq(stack_id))
        request.save(rt.folder / rb.REQUEST_NAME)
        try:
            job.log_file = open(rt.folder / rb.LOG_NAME, "wb")
            job.process = subprocess.Popen(
                [sys.executable, "-m", "livestack.rebuild", str(rt.folder / rb.REQUEST_NAME)],
                stdin=subprocess.DEVNULL, stdout=job.log_file, stderr=subprocess.STDOUT,
                close_fds=True, start_new_session=True)  # Ctrl-C is for the daemon
        except OSError as exc:
            if job.log_file is not None:
                job.log_file.close()
            raise StorageError(f"{rt.folder}: cannot start the rebuild process: "
                               f"{exc.strerror or exc}") from None
        self.rebuilds[stack_id] = job
        log.info("%s: rebuilding (%s) with the integration engine in the background "
                 "(pid %d)", stack_id, why, job.process.pid)
        self._publish_stack(rt)

    def _drop_from_rebuild(self, stack_id: str, row_id: int | None, reason: str,
                           message: str) -> None:
        """Mark a frame that cannot be re-read ``failed`` so rebuilds leave it out."""
        if row_id is None:
            return
        row = self.journal.row(row_id)
        if row is None:
            return
        log.warning("%s: %s: cannot rebuild with it: %s", row.path, reason, message)
        self.journal.finish(row.id, "failed", reason=f"replay_{reason}", message=message,
                            stack_id=stack_id, seq=row.seq)

    def _accepted_in(self, row_id: int, stack_id: str) -> bool:
        """True if journal row ``row_id`` is an active, accepted frame of ``stack_id``."""
        row = self.journal.row(row_id)
        return (row is not None and row.active and row.stack_id == stack_id
                and row.status == "accepted")

    def _cancel_rebuild(self, stack_id: str) -> None:
        """Stop a stack's rebuild (its process removes its scratch file on SIGTERM)."""
        from livestack import rebuild as rb

        job = self.rebuilds.pop(stack_id, None)
        if job is not None:
            self._stop_process(job)
            _remove_files(job.folder, rb.FILE_NAMES)

    @staticmethod
    def _stop_process(job: _Rebuild) -> None:
        if job.process is not None and job.process.poll() is None:
            job.process.terminate()
            try:
                job.process.wait(REBUILD_STOP_S)
            except subprocess.TimeoutExpired:
                job.process.kill()
                job.process.wait()
                for scratch in job.folder.glob(".livestack-integrate-*"):  # it had no time
                    shutil.rmtree(scratch, ignore_errors=True)
        if job.log_file is not None:
            job.log_file.close()
            job.log_file = None

    def abandon_rebuilds(self, message: str) -> None:
        """Give every pending rebuild up (after an unexpected error in one of them)."""
        for stack_id, job in list(self.rebuilds.items()):
            self._stop_process(job)
            self._abandon_rebuild(self.runtime(stack_id), job, message)

    def terminate_rebuilds(self) -> None:
        """Ask every rebuild process to stop, without waiting (any thread; at shutdown)."""
        for job in list(self.rebuilds.values()):
            if job.process is not None and job.process.poll() is None:
                job.process.terminate()

    def rebuild_step(self, wait_s: float = 0.0) -> bool:
        """Advance a pending rebuild by one step; swap when done.

        Parameters
        ----------
        wait_s : float
            How long to wait for a running integration to finish (0: just look).

        Returns
        -------
        bool
            True when something was done (a result loaded, a frame replayed, a swap);
            False when no rebuild is pending or the integration is still running.
        """
        if not self.rebuilds:
            return False
        # A job that can move on goes first (catching up, or its process has ended).
        stack_id, job = next(
            ((k, j) for k, j in self.rebuilds.items()
             if j.session is not None or (j.process is not None and j.process.poll() is not None)),
            next(iter(self.rebuilds.items())))
        rt = self.runtime(stack_id)
        if job.session is None:
            assert job.process is not None
            try:
                code = job.process.wait(wait_s) if wait_s > 0 else job.process.poll()
            except subprocess.TimeoutExpired:
                code = None
            if code is None:
                return False
            self._stop_process(job)
            if code != 0:
                self._rebuild_failed(rt, job, code)
                return True
            self._seed_from_result(rt, job)
            return True
        # Frames stacked into the old session meanwhile join the end of the rebuild.
        for row in self.journal.rows_after(stack_id, job.last_seq_seen):
            if row.id not in job.order:
                job.order.append(row.id)
            job.last_seq_seen = max(job.last_seq_seen, row.seq or 0)
        todo = [i for i in job.order if i not in job.done]
        if not todo:
            self._swap(rt, job)
            return True
        next_row = self.journal.row(todo[0])
        job.done.add(todo[0])
        # A row rerouted to another stack meanwhile belongs to that stack only.
        if (next_row is None or not next_row.active or next_row.stack_id != stack_id
                or next_row.status not in ("accepted", "rejected")):
            return True
        row = next_row
        transform = None
        stored: list[float] | None = None
        if row.transform is not None:
            from livestack.pipeline.types import Transform as _Transform

            transform = _Transform.from_list(row.transform, row.model or "similarity")
            if job.base_inverse is not None:
                transform = transform.then(job.base_inverse)
            stored = transform.to_list()
        outcome = self._replay_row(rt, job.session, row, transform=transform)
        if outcome is not None:
            new_tr = outcome.transform.to_list() if outcome.transform is not None else stored
            job.updates.append((row.id, len(job.updates) + 1, new_tr))
        return True

    def _rebuild_failed(self, rt: _Runtime, job: _Rebuild, code: int) -> None:
        """A rebuild process failed: drop a frame it could not read and retry, or give up."""
        from livestack import rebuild as rb

        del self.rebuilds[rt.stack_id]
        if code in (rb.EXIT_CANCELLED, -signal.SIGTERM, -signal.SIGKILL):
            # Stopped from outside (systemd stopping the whole unit, a kill): not a failure.
            log.info("%s: rebuild (%s) was stopped (exit %d); the journal replay at the next "
                     "start applies the command", rt.stack_id, job.why, code)
            return
        error = rb.read_error(job.folder / rb.ERROR_NAME) or {}
        message = str(error.get("message") or f"exit status {code}, see "
                      f"{job.folder / rb.LOG_NAME}")
        reason = str(error.get("reason") or "failed")
        culprit = next((r for r in self.journal.rows(stack_id=rt.stack_id)
                        if r.active and message.startswith(f"{r.path}:")), None)
        if culprit is not None and job.attempts < 3:
            self._drop_from_rebuild(rt.stack_id, culprit.id, reason, message)
            self._restart_rebuild(rt, job)
            return
        self._abandon_rebuild(rt, job, message)

    def _restart_rebuild(self, rt: _Runtime, job: _Rebuild) -> None:
        """Start the same rebuild again on the journal as it is now."""
        self.rebuilds.pop(rt.stack_id, None)
        self._start_rebuild(rt.stack_id, job.why, job.reference, attempts=job.attempts + 1)

    def _seed_from_result(self, rt: _Runtime, job: _Rebuild) -> None:
        """Load the integration and seed the new live session from it (catch-up phase)."""
        from livestack import rebuild as rb
        from livestack.pipeline.session import StackSession
        from livestack.pipeline.types import Transform as _Transform

        try:
            result = rb.read_result(job.folder / rb.RESULT_NAME)
        except StorageError as exc:
            self._abandon_rebuild(rt, job, str(exc))
            return
        finally:
            _remove_files(job.folder, (rb.RESULT_NAME, rb.REQUEST_NAME, rb.ERROR_NAME))
        moved = [row_id for row_id, _ in result.rows
                 if not self._accepted_in(row_id, rt.stack_id)]
        if moved:
            # A frame left the stack while it was integrated (rerouted): again without it.
            if job.attempts >= 3:
                self._abandon_rebuild(rt, job, "frames keep leaving the stack")
                return
            log.info("%s: %d integrated frame(s) left the stack meanwhile; rebuilding again",
                     rt.stack_id, len(moved))
            self._restart_rebuild(rt, job)
            return
        ref_row = self.journal.row(result.reference_row)
        noise = result.product.frame_noise_adu
        try:
            if noise is None:
                raise ValueError("the result has no per-frame noise")
            raw, info = self._read(result.reference)
            masters = self._select_masters(info)
            session = StackSession.from_product(rt.stack_id, self.config.pipeline,
                                                result.product, noise, raw, info, masters)
        except (FrameError, ValueError) as exc:
            self._abandon_rebuild(rt, job, str(exc))
            return
        _remove_files(job.folder, (rb.LOG_NAME,))  # kept only when something went wrong
        job.session = session
        # The reference goes first: a replay of the journal makes its first frame the
        # reference, and the stored transforms refer to this one.
        ordered = sorted(result.rows, key=lambda r: r[0] != result.reference_row)
        job.updates = [(row_id, seq, tr) for seq, (row_id, tr) in enumerate(ordered, start=1)]
        job.done = {row_id for row_id, _ in result.rows}
        if ref_row is not None and ref_row.transform is not None:
            # Frames the old session took meanwhile are on the old reference's grid.
            job.base_inverse = _Transform.from_list(ref_row.transform,
                                                    ref_row.model or "similarity").inverse()
        log.info("%s: rebuild (%s) integrated %d frames in %.1f s; catching up", rt.stack_id,
                 job.why, len(result.rows), time.monotonic() - job.started)

    def _abandon_rebuild(self, rt: _Runtime, job: _Rebuild, message: str) -> None:
        """Give a rebuild up: one error line and an alert; the old stack stays."""
        self.rebuilds.pop(rt.stack_id, None)
        log.error("%s: rebuild (%s) failed: %s; the stack keeps its previous frames until the "
                  "next restart replays the journal", rt.stack_id, job.why, message)
        if self.hub is not None:
            self.hub.publish({"type": "alert", "level": "error", "code": "rebuild_failed",
                              "message": f"{rt.stack_id}: rebuild failed: {message}",
                              "stack_id": rt.stack_id})
        self._publish_stack(rt)

    def _swap(self, rt: _Runtime, job: _Rebuild) -> None:
        assert job.session is not None
        self.journal.rewrite_stack(rt.stack_id, job.updates)
        row = self.journal.stack(rt.stack_id)
        assert row is not None
        rt.session = job.session
        rt.generation = row.generation
        # Rows numbered after the rebuilt ones (rejected, failed, excluded) add nothing:
        # the checkpoint covers them, so a restart does not read them again.
        rt.last_seq = self.journal.last_seq(rt.stack_id)
        del self.rebuilds[rt.stack_id]
        counts = self.journal.counts(rt.stack_id)
        rt.rejected, rt.failed = counts["rejected"], counts["failed"]
        rt.frames_since_checkpoint = 1
        rt.accepted_since_fits = rt.accepted_since_preview = 1
        log.info("%s: rebuild (%s) done: %d frames", rt.stack_id, job.why,
                 rt.session.n_accepted)
        self.after_frame(rt, force=True)

    def stack_file(self, stack_id: str, name: str) -> Path | None:
        """Path of a stack's ``stack.fits`` / ``preview.jpg`` if it exists (else None)."""
        if name not in STACK_FILES:
            return None
        if self.journal.stack(stack_id) is None:  # only known ids: no path tricks
            return None
        path = self.output_root / stack_id / name
        return path if path.is_file() else None


def _metrics_json(outcome: FrameOutcome) -> dict[str, Any] | None:
    if outcome.metrics is None:
        return None
    data: dict[str, Any] = dict(outcome.metrics.as_dict())
    data["timings_ms"] = {k: round(v, 3) for k, v in outcome.timings_ms.items()}
    data["rejected_low"] = outcome.rejected_low
    data["rejected_high"] = outcome.rejected_high
    return data


# ======================================================================================
# the worker thread


class WorkQueue:
    """Thread-safe FIFO of file paths plus a priority lane of commands.

    Remembers when each path was enqueued, for the lag report.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._paths: collections.deque[tuple[Path, float]] = collections.deque()
        self._commands: collections.deque[tuple[str, dict[str, Any], Future[dict[str, Any]]]]
        self._commands = collections.deque()

    def put_path(self, path: Path) -> None:
        """Enqueue a file (from any thread; never blocks)."""
        with self._cond:
            self._paths.append((path, time.monotonic()))
            self._cond.notify()

    def put_command(self, name: str, args: dict[str, Any]) -> Future[dict[str, Any]]:
        """Enqueue a command (served before files); its result arrives in the future."""
        future: Future[dict[str, Any]] = Future()
        with self._cond:
            self._commands.append((name, args, future))
            self._cond.notify()
        return future

    def wake(self) -> None:
        """Wake a waiting :meth:`get`."""
        with self._cond:
            self._cond.notify_all()

    def get(self, timeout_s: float, *, paths: bool = True
            ) -> tuple[str, Any] | None:
        """Next ``("command", (name, args, future))`` or ``("path", Path)``; None on timeout."""
        with self._cond:
            deadline = time.monotonic() + timeout_s
            while True:
                if self._commands:
                    return "command", self._commands.popleft()
                if paths and self._paths:
                    return "path", self._paths.popleft()[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def depth(self) -> int:
        """Files waiting."""
        with self._cond:
            return len(self._paths)

    def oldest_age_s(self) -> float:
        """Seconds the oldest waiting file has waited (0 when none)."""
        with self._cond:
            return time.monotonic() - self._paths[0][1] if self._paths else 0.0


class Worker(threading.Thread):
    """The one thread that runs the engine: resume, then files and commands."""

    def __init__(self, engine_factory: Callable[[], Engine], queue: WorkQueue,
                 on_started: Callable[[Engine], None] | None = None) -> None:
        super().__init__(name="livestack-worker", daemon=True)
        self._factory = engine_factory
        self.queue = queue
        self.engine: Engine | None = None
        self._on_started = on_started
        self.stop_requested = threading.Event()
        self.heartbeat = time.monotonic()
        self.busy_since: float | None = None
        #: Deadline of a known long step (JIT warm-up) during which the worker counts as alive.
        self.long_step_until = 0.0
        self.error: BaseException | None = None
        #: Run the JIT warm-up steps between frames (tests of the worker may turn it off).
        self.warm_up = True
        self.resumed = threading.Event()
        self.ready = threading.Event()   # set by the daemon after READY
        self.finished = threading.Event()

    def alive(self, limit_s: float) -> bool:
        """True when the worker beat within ``limit_s``, or is in a step known to be long
        (JIT warm-up), or has been on one frame for less than ``FRAME_LIMIT_S``."""
        now = time.monotonic()
        if now - self.heartbeat < limit_s or now < self.long_step_until:
            return True
        busy = self.busy_since
        return busy is not None and now - busy < FRAME_LIMIT_S

    def _beat(self) -> None:
        self.heartbeat = time.monotonic()

    def request_stop(self) -> None:
        """Finish the current frame, then checkpoint and end."""
        self.stop_requested.set()
        self.queue.wake()

    def _warm_up_step(self, steps: Iterator[str]) -> Iterator[str] | None:
        """Run one warm-up step; return None when the warm-up is over."""
        # A first start compiles the kernels: seconds each here, minutes on a Raspberry Pi.
        self.long_step_until = time.monotonic() + WARM_UP_LIMIT_S
        t0 = time.perf_counter()
        try:
            name = next(steps, None)
        except OSError as exc:
            if not is_fd_exhaustion(exc):
                raise
            # Kernels import modules while compiling; without a descriptor the warm-up
            # stops here and the first frames compile what they need instead.
            log.warning("warm-up stopped: %s", exc.strerror)
            return None
        finally:
            self.long_step_until = 0.0
        if name is None:
            return None
        log.debug("warm-up step %r: %.0f ms", name, (time.perf_counter() - t0) * 1e3)
        return steps

    def run(self) -> None:
        try:
            self.engine = engine = self._factory()
            if self._on_started is not None:
                self._on_started(engine)
            for path in engine.resume(self.stop_requested.is_set):
                self.queue.put_path(Path(path))
            self.resumed.set()
            # Warm the JIT only once the daemon has reported READY (it competes for CPU),
            # one step at a time while no frame waits (see _warm_up_steps).
            while not (self.ready.wait(0.5) or self.stop_requested.is_set()):
                self.heartbeat = time.monotonic()
            rebuild_moving = False
            warm_up: Iterator[str] | None = _warm_up_steps(
                engine.config, with_masters=engine.masters is not None) if self.warm_up else None
            while not self.stop_requested.is_set():
                self.heartbeat = time.monotonic()
                # No idle tick while a rebuild catches up or warm-up steps remain.
                item = self.queue.get(0.0 if warm_up is not None or rebuild_moving else 0.5,
                                      paths=not engine.paused)
                if item is None:
                    if self._rebuild_step(engine):
                        rebuild_moving = True
                        continue
                    rebuild_moving = False
                    try:
                        engine.idle()
                    except OSError as exc:  # a preview or checkpoint without a descriptor
                        if not is_fd_exhaustion(exc):
                            raise
                        log.warning("idle work deferred: %s", exc.strerror)
                    if warm_up is not None:
                        warm_up = self._warm_up_step(warm_up)
                    continue
                kind, payload = item
                self.busy_since = time.monotonic()
                if kind == "command":
                    name, args, future = payload
                    try:
                        future.set_result(engine.execute_command(name, args))
                    except LivestackError as exc:
                        future.set_exception(exc)
                    except Exception as exc:
                        # A bug in a command: the caller gets the error, the night goes on.
                        log.exception("command %s failed: %s", name, exc)
                        future.set_exception(exc)
                else:
                    self._process(engine, payload)
                    if engine.rebuilds:
                        self._rebuild_step(engine)
                self.busy_since = None
            engine.finalize()
        except BaseException as exc:  # recorded and logged; the daemon then exits with 1
            self.error = exc
            log.critical("worker stopped: %s", exc, exc_info=not isinstance(exc, LivestackError))
        finally:
            self.resumed.set()
            self.finished.set()

    @staticmethod
    def _rebuild_step(engine: Engine) -> bool:
        """One rebuild step; a rebuild that breaks is given up, the live stack goes on."""
        try:
            return engine.rebuild_step()
        except JournalError:
            raise
        except LivestackError as exc:  # e.g. a retry that cannot write its request
            engine.abandon_rebuilds(str(exc))
            return True
        except Exception as exc:
            # A bug in a rebuild must not end an unattended night: traceback in the log,
            # the old stack keeps going.
            log.exception("rebuild step failed: %s", exc)
            engine.abandon_rebuilds(f"internal error: {exc}")
            return True

    def _process(self, engine: Engine, path: Path) -> None:
        def step() -> None:
            try:
                engine.process_path(path)
            except OSError as exc:  # any descriptor shortage the engine did not name
                if not is_fd_exhaustion(exc):
                    raise
                raise DescriptorsExhaustedError(f"{path}: {exc.strerror}") from None

        try:
            retry_transient(step, stop=self.stop_requested, alert=engine.alert,
                            beat=self._beat)
        except LivestackError:
            raise
        except Exception as exc:
            # A bug hit by one frame must not end an unattended night: record the frame
            # with the full traceback in the log and keep stacking the next ones.
            # The row made by mark_pending gets the final status: a new row would leave it
            # pending and the file would be retried (and crash again) at every start.
            log.exception("%s: internal_error: %s", path, exc)
            spath = os.path.abspath(path)
            try:
                engine.fail_open_row(spath, f"{spath}: {type(exc).__name__}: {exc}")
            except LivestackError as jexc:
                log.error("%s: cannot record the internal error: %s", spath, jexc)


def _warm_up_steps(config: Config, *, with_masters: bool) -> Iterator[str]:
    """JIT warm-up in small steps: what the first frame needs first, the rest afterwards.

    Each ``next()`` runs one step and returns its name. The worker runs a step only when no
    frame is waiting, so a frame never waits behind the whole warm-up, at most behind one
    step (one kernel compile on a fresh install, milliseconds once numba's cache is warm).
    Tiny synthetic frames go through a throwaway session; no file, journal or hub.

    Order (on a fresh install each compile takes seconds; measured in the report of
    ``livestack demo``): FITS decoding, the master defect map and fused calibration (or the
    hot-pixel finder without masters), detection, the identity warp of the reference frame,
    the held warm-up frames and the preview, all of which the first frame needs; then the
    affine warp (rotated frames), the running kappa-sigma stack and, with masters, the
    hot-pixel finder for lights no master dark matches. Kernels a configuration may never
    use (debayering: colour frames only) compile on first use.

    Parameters
    ----------
    config : Config
    with_masters : bool
        Master frames are configured: the first frame is calibrated with them.

    Yields
    ------
    str
        The name of the step just done.
    """
    import numpy as np

    from livestack.pipeline.calibrate import MasterSet, find_defects
    from livestack.pipeline.session import StackSession
    from livestack.pipeline.types import FrameInfo
    from livestack.storage.fitsio import _decode

    rng = np.random.default_rng(0)
    ny, nx = 160, 192
    n_frames = config.pipeline.stack.warmup_frames + 2
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    centre = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    stars = rng.uniform(14, min(ny, nx) - 14, size=(40, 2))
    flux = rng.uniform(2e3, 4e4, size=40)
    flat = (1.0 - 0.1 * (((xx - centre[0]) / nx) ** 2 + ((yy - centre[1]) / ny) ** 2)
            ).astype(np.float32)
    offset = np.full((ny, nx), 500.0, dtype=np.float32)

    def raw_frame(i: int) -> np.ndarray:
        # A small rotation and shift per frame: the registrar returns a similarity, so the
        # affine warp is compiled (frame 0, the reference, takes the identity warp).
        angle = np.radians(0.3 * i)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pos = (stars - centre) @ rot.T + centre + 0.7 * i
        image = rng.normal(1000.0, 10.0, size=(ny, nx)).astype(np.float32)
        for (x, y), f in zip(pos, flux, strict=True):
            image += (f / (2 * np.pi * 1.5**2) * np.exp(
                -((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2))).astype(np.float32)
        return image * flat + offset

    def info(i: int) -> FrameInfo:
        return FrameInfo(path=f"<warm-up {i}>", image_type="light", shape=(ny, nx),
                         exposure_s=1.0, saturation_adu=65535.0, saturation_source="BITPIX")

    t0 = time.perf_counter()
    # FITS decoding as storage.fitsio does it: 16-bit lights, float32 masters.
    buf = np.zeros(ny * nx * 4, dtype=np.uint8)
    _decode(buf[: ny * nx * 2], 16, (ny, nx), 1.0, 32768.0)
    _decode(buf, -32, (ny, nx), 1.0, 0.0)
    yield "read"
    masters: MasterSet | None = None
    if with_masters:
        dark = offset + rng.normal(0.0, 2.0, size=(ny, nx)).astype(np.float32)
        dark[5, 7] += 500.0
        defects = find_defects(dark - offset, 60.0, master_flat=flat)
        masters = MasterSet(subtract=offset, flat=flat, defects=defects)
        yield "masters"
    session = StackSession("warm-up", config.pipeline)
    # overwrite_raw as the worker calls it, so the in-place calibration kernel is compiled.
    session.process(raw_frame(0), info(0), masters, overwrite_raw=True)
    if session.n_accepted:
        session.preview_jpeg()
    yield "first frame"
    for i in range(1, n_frames):
        session.process(raw_frame(i), info(i), masters, overwrite_raw=True)
        yield f"frame {i}"
    if session.n_accepted:
        session.preview_jpeg()
        yield "preview"
    if with_masters and config.pipeline.cosmetic.auto_hot_pixels:
        StackSession("warm-up", config.pipeline).process(raw_frame(0), info(0), None,
                                                         overwrite_raw=True)
        yield "no masters"
    log.debug("pipeline warmed up in %.0f ms of steps (%d synthetic frames stacked)",
              (time.perf_counter() - t0) * 1e3, session.n_accepted)


# ======================================================================================
# the daemon


class Daemon:
    """The long-running service (``livestack run`` / ``livestack demo``).

    Parameters
    ----------
    config : Config
    out : text stream
        Where the "where to look" lines go (stdout).
    checkpoint_writer : callable, optional
        Injected into the engine (tests).
    """

    def __init__(self, config: Config, *, out: TextIO | None = None,
                 checkpoint_writer: CheckpointWriter | None = None) -> None:
        from livestack.service.hub import Hub
        from livestack.service.metrics import Metrics

        self.config = config
        self.out = out or sys.stdout
        self.watch_dir = Path(os.path.abspath(config.watch.dir))
        self.output_root = Path(os.path.abspath(config.output.dir))
        self.hub = Hub()
        self.hub.redact = PathRedactor([self.watch_dir, self.output_root])  # issue 14
        self.metrics = Metrics()
        self.metrics.describe("livestack_oldest_pending_seconds", "gauge",
                              "Age of the oldest frame waiting for the worker.")
        self.metrics.describe("livestack_checkpoint_failures_total", "counter",
                              "Checkpoint writes that failed (disk full, ...).")
        self.queue = WorkQueue()
        self._checkpoint_writer = checkpoint_writer
        self.worker = Worker(self._make_engine, self.queue)
        self.token = config.server.token or secrets.token_urlsafe(24)
        self.port: int | None = None
        #: The folder watcher (a ``FrameWatcher``) once started.
        self.watcher: Any = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        self._lagging = False
        #: Set once :meth:`run`'s event loop is up (:meth:`request_stop` works from then on).
        self.loop_started = threading.Event()

    def _make_engine(self) -> Engine:
        engine = Engine(self.config, self.output_root, hub=self.hub, metrics=self.metrics,
                        checkpoint_writer=self._checkpoint_writer)
        engine.watch_root = self.watch_dir
        return engine

    # -- the Commands protocol of the live server (called on the event loop) ------------

    def run_command(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Validate an operator command and queue it for the worker.

        Raises
        ------
        UsageError
            Unknown command or bad arguments (the server answers with a refusal).
        """
        engine = self.worker.engine
        if engine is None:
            raise UsageError("the daemon is still starting; try again")
        checked = engine.validate_command(name, args or {})
        if name == "pause":       # effective at once, even while a frame is processed
            engine.paused = True
        future = self.queue.put_command(name, checked)
        try:
            # Called in a thread by the server: waiting here never blocks the event loop.
            return future.result(timeout=COMMAND_WAIT_S)
        except FutureTimeout:
            return {"ok": True, "command": name, "queued": True}

    def stack_file(self, stack_id: str, name: str) -> Path | None:
        """``stack.fits`` / ``preview.jpg`` of a stack, if written."""
        engine = self.worker.engine
        return engine.stack_file(stack_id, name) if engine is not None else None

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code (0 on a clean stop)."""
        return asyncio.run(self._main())

    def request_stop(self) -> None:
        """Stop as on SIGTERM (from any thread): finish the frame, checkpoint, return 0.

        Used by ``livestack demo`` and tests; a no-op before :meth:`run` has started.
        """
        loop, stop = self._loop, self._stop
        if loop is None or stop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed: nothing to stop
            loop.call_soon_threadsafe(stop.set)
        self.worker.request_stop()

    def _on_ready(self, path: Path) -> None:
        # Called from the watcher thread: enqueue only.
        self._enqueue(path)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1 and signum == signal.SIGINT:
            os.write(2, b"livestack: second interrupt, exiting now\n")
            os._exit(130)
        if self._signals == 1:
            log.info("%s received: finishing the current frame, then stopping",
                     signal.Signals(signum).name)
            assert self._stop is not None
            self._stop.set()
            self.worker.request_stop()  # also cuts a long resume short (it is resumable)

    async def _main(self) -> int:
        from livestack.service.notify import SystemdNotifier

        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._loop = loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.loop_started.set()
        notifier = SystemdNotifier()
        ensure_folder(self.watch_dir, "watch folder")  # UsageError: one line, no traceback
        ensure_folder(self.output_root, "output folder")
        self.worker.start()
        from livestack import precompile

        helper = precompile.start()  # first start only: kernels compile in a 2nd process
        server: Any = None
        tasks: list[asyncio.Task[None]] = []
        code = 1
        try:
            server = await self._start(notifier, tasks)
            await self._stop.wait()
            code = 0
        finally:
            # -- shutdown (also after a failed start): STOPPING, stop intake, let the
            # worker finish + checkpoint within the deadline, else abandon it (its frame
            # stays pending and is processed at the next start).
            code = await self._shutdown(notifier, server, tasks, code)
            precompile.stop(helper)
        return code

    async def _start(self, notifier: Any, tasks: list[asyncio.Task[None]]) -> Any:
        """Resume, start the watcher and the server, report READY; return the server.

        Raises
        ------
        UsageError
            The server's address cannot be bound (port in use, ...).
        """
        from livestack.service.server import LiveServer
        from livestack.service.viewerlog import summary_loop as viewer_summary_loop
        from livestack.service.watcher import FrameWatcher

        assert self._stop is not None
        # Journal open + resume; polled so a stop request is never stuck behind it.
        while not await self._wait_event(self.worker.resumed, 0.2):
            if self._stop.is_set():
                return None
        if self.worker.error is not None:
            raise self.worker.error
        watcher = FrameWatcher(self.watch_dir, self._on_ready, polling=self.config.watch.polling,
                               poll_interval_s=self.config.watch.poll_interval_s,
                               recursive=self.config.watch.recursive)
        self.watcher = watcher
        existing = watcher.start()
        engine = self.worker.engine
        if engine is not None:  # frames journaled by earlier runs are not work (nor lag)
            fresh = await asyncio.to_thread(unjournaled, engine.journal, existing)
            if len(fresh) < len(existing):
                log.info("%d file(s) in the watch folder are already in the journal; %d new",
                         len(existing) - len(fresh), len(fresh))
            existing = fresh
        for path in existing:
            self._enqueue(path)
        host, port = self.config.server.host, self.config.server.port
        sc = self.config.server
        server = LiveServer(self.hub, self, self.metrics, host=host, port=port,
                            token=self.token, max_viewers=sc.max_viewers,
                            max_connections=sc.max_connections, fd_reserve=sc.fd_reserve,
                            allowed_hosts=sc.allowed_hosts)
        try:
            self.port = await server.start()
        except OSError as exc:
            shown = f"[{host}]" if ":" in host else host
            # asyncio wraps strerror in "error while attempting to bind ..."; keep the cause.
            reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
            raise UsageError(f"cannot listen on {shown}:{port}: {reason}") from None
        self._print_banner()
        notifier.ready()
        notifier.status(self._status_text())
        self.worker.ready.set()
        tasks.append(asyncio.create_task(self._status_loop(notifier)))
        tasks.append(asyncio.create_task(self._watch_worker()))
        tasks.append(asyncio.create_task(viewer_summary_loop(server)))  # one line now and then
        watchdog_s = notifier.watchdog_interval_s()
        if watchdog_s is not None:
            tasks.append(asyncio.create_task(self._watchdog_loop(notifier, watchdog_s)))
        if self.config.watch.rescan_interval_s > 0:
            tasks.append(asyncio.create_task(self._rescan_loop(
                watcher, self.config.watch.rescan_interval_s)))
        return server

    async def _shutdown(self, notifier: Any, server: Any, tasks: list[asyncio.Task[None]],
                        code: int) -> int:
        """Stop everything within ``SHUTDOWN_S``; return the exit code."""
        deadline = time.monotonic() + SHUTDOWN_S
        notifier.stopping()
        notifier.status("stopping: saving the stacks")
        for task in tasks:
            task.cancel()
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop, 2.0)
        self.worker.request_stop()
        # Polled, never a blocking wait in a thread: asyncio.run() joins its executor
        # threads at exit, so a stuck worker would keep the process alive past the limit.
        finished = await self._wait_event(self.worker.finished,
                                          max(0.1, deadline - time.monotonic() - 0.5))
        if not finished:
            log.error("the worker did not finish in time; its frame stays pending and is "
                      "processed at the next start")
        elif self.worker.error is not None:
            code = 1
        if server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.stop(), max(0.1, deadline - time.monotonic()))
        engine = self.worker.engine
        if engine is not None and finished:
            engine.close()
        elif engine is not None:
            engine.terminate_rebuilds()  # no orphan rebuild process outlives the daemon
            engine.solving.terminate()  # nor a solve-field (maybe stopped mid-frame)
        log.info("stopped")
        return code

    @staticmethod
    async def _wait_event(event: threading.Event, timeout_s: float | None = None) -> bool:
        """Wait for a thread's ``event`` without tying up an executor thread."""
        t_end = None if timeout_s is None else time.monotonic() + timeout_s
        while not event.is_set():
            if t_end is not None and time.monotonic() >= t_end:
                return False
            await asyncio.sleep(0.05)
        return True

    def _enqueue(self, path: Path) -> None:
        """Queue a file for the worker unless it lies in the output folder (our own
        ``stack.fits`` is never a frame, whatever the watch settings)."""
        if is_within(path, self.output_root):
            log.debug("%s: in the output folder; not a frame", path)
            return
        self.queue.put_path(path)

    async def _watch_worker(self) -> None:
        """Stop the daemon if the worker thread dies (systemd restarts us)."""
        await self._wait_event(self.worker.finished)
        if self._stop is not None and not self._stop.is_set():
            self._signals += 1
            self._stop.set()

    def _print_banner(self) -> None:
        host = self.config.server.host
        shown = f"[{host}]" if ":" in host else host
        lines = [
            f"livestack {_version()} ready",
            f"  watching  {self.watch_dir}",
            f"  output    {self.output_root}",
            f"  viewer    http://{shown}:{self.port}/",
        ]
        if self.config.server.token is None and _is_tty(self.out):
            lines.append(f"  operator token (shown once): {self.token}")
        elif self.config.server.token is None:
            # Not a terminal (systemd sends stdout to the journal): the token goes to a
            # file only its owner can read, never into logs.
            path = self.output_root / TOKEN_NAME
            _write_private(path, self.token + "\n")
            lines.append(f"  operator token: in {path}")
        else:
            lines.append("  operator token: from the configuration (server.token)")
        if self.config.server.allow_lan and not is_loopback(host) and self.port is not None:
            lines += lan_banner(self.port, self.config.server.token is not None)
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()

    def _status_text(self) -> str:
        engine = self.worker.engine
        if engine is None:
            return "starting"
        depth = self.queue.depth()
        parts = []
        for rt in list(engine.runtimes.copy().values())[-3:]:  # the worker may add one
            parts.append(f"{rt.stack_id}: {rt.session.n_accepted} stacked, "
                         f"{rt.rejected} rejected")
        text = "; ".join(parts) if parts else "waiting for frames"
        if engine.paused:
            text = "paused; " + text
        text += f"; queue {depth}"
        if depth:
            text += f" (oldest {self.queue.oldest_age_s():.0f} s)"
        return text

    async def _status_loop(self, notifier: Any) -> None:
        last = ""
        while True:
            depth, age = self.queue.depth(), self.queue.oldest_age_s()
            self.metrics.set_gauge("livestack_queue_depth", depth)
            self.metrics.set_gauge("livestack_oldest_pending_seconds", age)
            lagging = depth >= LAG_ALERT_FRAMES or age >= LAG_ALERT_AGE_S
            if lagging and not self._lagging:
                msg = (f"falling behind: {depth} frames waiting, oldest for {age:.0f} s "
                       "(none is dropped)")
                log.warning("%s", msg)
                self.hub.publish({"type": "alert", "level": "warning", "code": "lag",
                                  "message": msg})
            elif self._lagging and depth == 0:
                self.hub.publish({"type": "alert", "level": "info", "code": "lag_cleared",
                                  "message": "caught up: no frame waiting"})
            self._lagging = lagging if lagging else (self._lagging and depth > 0)
            status = self._status_text()
            if status != last:
                notifier.status(status)
                last = status
            await asyncio.sleep(1.0)

    async def _watchdog_loop(self, notifier: Any, interval_s: float) -> None:
        limit_s = interval_s * 2
        while True:
            await asyncio.sleep(interval_s)
            # Ping only while the worker shows signs of life (idle beats every 0.5 s; a
            # frame or a checkpoint may take longer, but never the whole watchdog period)
            # and the watcher still runs (watchdog's observer thread dies if a handler
            # raises; without it no new frame would ever be seen). systemd then restarts us.
            if not self.worker.alive(limit_s):
                log.error("worker heartbeat is %.0f s old; not pinging the watchdog",
                          time.monotonic() - self.worker.heartbeat)
            elif self.watcher is not None and not self.watcher.is_alive():
                log.error("the folder watcher has stopped; not pinging the watchdog")
            else:
                notifier.watchdog()

    async def _rescan_loop(self, watcher: Any, interval_s: float) -> None:
        """List the watch folder every ``interval_s`` (frames whose events were lost)."""
        while True:
            await asyncio.sleep(interval_s)
            watcher.rescan()  # only enqueues: the listing happens in the watcher thread


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (atomically, via a temp file).

    Raises
    ------
    StorageError
        The file cannot be written.
    """
    with atomic_write(path, mode=0o600) as (fd, _tmp), \
            os.fdopen(fd, "w", closefd=False) as fh:
        fh.write(text)


def _version() -> str:
    from livestack import __version__

    return __version__


# ======================================================================================
# batch mode (livestack stack)


def stack_files(config: Config, files: Iterable[Path], output_root: Path, *,
                masters: Any = None, progress: Callable[[int, int, FrameRow | None], None]
                | None = None) -> Engine:
    """Put existing files through the same pipeline, in DATE-OBS order.

    Parameters
    ----------
    config : Config
    files : iterable of Path
        Light frames (sorted here by DATE-OBS, then name).
    output_root : Path
        Output root (journal + stack folders), as for the daemon.
    masters : MasterLibrary or None
    progress : callable, optional
        ``progress(done, total, row)`` after each file.

    Returns
    -------
    Engine
        Closed; its counters remain readable.
    """
    ordered = sort_by_date_obs(list(files))
    engine = Engine(config, output_root, masters=masters)
    try:
        ordered.extend(Path(p) for p in engine.resume())
        total = len(ordered)
        for i, frame in enumerate(ordered, 1):
            row = engine.process_path(frame)
            if progress is not None:
                progress(i, total, row)
        engine.solving.drain()  # batch: the stack.fits written next carries the WCS
        while engine.solving.route_moves():  # frames solved elsewhere: their stacks too
            engine.solving.drain()
        engine.finalize()
    finally:
        engine.close()
    return engine


def sort_by_date_obs(files: list[Path]) -> list[Path]:
    """Sort frames by exposure start from their headers (unreadable ones last, by name)."""
    from astropy.io import fits

    from livestack.storage.formats import is_fits, read_header
    from livestack.storage.headers import parse_frame_info

    def key(path: Path) -> tuple[int, float, str]:
        try:
            if not is_fits(path) and frame_format(path) != "fits.gz":
                _header, info = read_header(path)  # RAW, TIFF, PNG, XISF: decoded
            else:
                header = fits.getheader(path)
                info = parse_frame_info(header, str(path), (int(header.get("NAXIS2", 0)),
                                                            int(header.get("NAXIS1", 0))))
        except (FrameError, OSError, ValueError, TypeError, KeyError, IndexError):
            return (1, 0.0, str(path))
        if info.date_obs is None:
            return (1, 0.0, str(path))
        return (0, info.date_obs.timestamp(), str(path))

    return sorted(files, key=key)

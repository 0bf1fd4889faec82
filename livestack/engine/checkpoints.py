"""Checkpoints: a consistent snapshot in the worker, the slow write in a background thread.

:class:`Checkpointer` takes a stack's snapshot where the worker is (so it matches the
stack's last journal ``seq``), then hands it to :class:`CheckpointThread`, which writes
one checkpoint at a time and notes it in the journal. A failed write (disk full) is logged
and alerted; the previous checkpoint stays valid and the next cadence tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livestack.engine.state import CrashPause
from livestack.errors import LivestackError, StorageError
from livestack.storage.checkpoint import CHECKPOINT_NAME, save_checkpoint

if TYPE_CHECKING:
    from livestack.engine.state import Runtime
    from livestack.service.metrics import Metrics
    from livestack.storage.journal import Journal

log = logging.getLogger("livestack.engine")

#: ``(path, arrays, meta) -> bytes written`` (tests inject a failing one).
CheckpointWriter = Callable[[Path, dict, dict], int]
#: ``(level, code, message, stack_id)``: how a failed write reaches the operator.
Alert = Callable[[str, str, str, "str | None"], None]


@dataclass
class CheckpointJob:
    """A state snapshot waiting to be written."""

    stack_id: str
    path: Path
    arrays: dict[str, Any]
    meta: dict[str, Any]
    seq: int
    n_files: int
    generation: int


class CheckpointThread:
    """Writes checkpoints one at a time in a background thread.

    At most one job per stack waits: a newer snapshot replaces an older one that has not
    started (it covers more frames), so a slow disk never queues up gigabytes.
    """

    def __init__(self, write: Callable[[CheckpointJob], bool]) -> None:
        self._write = write
        self._cond = threading.Condition()
        self._jobs: dict[str, CheckpointJob] = {}
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    def submit(self, job: CheckpointJob) -> None:
        """Queue ``job``, replacing a waiting job of the same stack; start the thread."""
        with self._cond:
            self._jobs.pop(job.stack_id, None)
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


class Checkpointer:
    """Snapshots live stacks and has them written (in the background by default).

    Parameters
    ----------
    journal : Journal
        Notes each written checkpoint (stack, seq, files, generation).
    metrics : Metrics or None
    alert : callable
        ``alert(level, code, message, stack_id)`` for a failed write.
    pause : CrashPause
        The crash-test hook (``checkpoint`` stage: just before the file is replaced).
    writer : callable, optional
        ``(path, arrays, meta) -> bytes written``; default :func:`save_checkpoint`.
    background : bool
        Write in a background thread (default) or inline.
    """

    def __init__(self, journal: Journal, metrics: Metrics | None, alert: Alert,
                 pause: CrashPause, writer: CheckpointWriter | None = None,
                 background: bool = True) -> None:
        self.journal = journal
        self.metrics = metrics
        self._alert = alert
        self._pause = pause
        self._write_checkpoint: CheckpointWriter = writer or self._save
        self._thread = CheckpointThread(self.write_job) if background else None

    def _save(self, path: Path, arrays: dict, meta: dict) -> int:
        hook = None
        if self._pause.stage == "checkpoint":
            def hook(_tmp: Path) -> None:
                self._pause("checkpoint", self.journal)
        return save_checkpoint(path, arrays, meta, before_replace=hook)

    def checkpoint(self, rt: Runtime) -> None:
        """Snapshot the stack's state and have it written.

        The snapshot (``session.state()`` copies the arrays) is taken here, in the worker,
        so it is consistent with ``rt.last_seq``; the slow part (writing ~0.6 GB with fsync
        at 26 MP) happens in the checkpoint thread while the worker goes on stacking.
        """
        arrays, meta = rt.session.state()
        job = CheckpointJob(
            stack_id=rt.stack_id, path=rt.folder / CHECKPOINT_NAME, arrays=arrays,
            meta={"stack_id": rt.stack_id, "seq": rt.last_seq, "generation": rt.generation,
                  "n_accepted": rt.session.n_accepted, "written": time.time(),
                  "session": meta},
            seq=rt.last_seq, n_files=rt.seen, generation=rt.generation)
        rt.last_checkpoint_t = time.monotonic()
        rt.frames_since_checkpoint = 0
        if self._thread is not None:
            self._thread.submit(job)
        else:
            self.write_job(job)

    def write_job(self, job: CheckpointJob) -> bool:
        """Write one checkpoint (checkpoint thread, or inline); never raises StorageError.

        Raises
        ------
        JournalError
            The checkpoint was written but the journal cannot note it.
        """
        t0 = time.perf_counter()
        try:
            size = self._write_checkpoint(job.path, job.arrays, job.meta)
        except StorageError as exc:
            log.error("%s (the previous checkpoint is kept; stacking goes on)", exc)
            if self.metrics is not None:
                self.metrics.inc("livestack_checkpoint_failures_total")
            self._alert("error", "checkpoint_failed", str(exc), job.stack_id)
            return False
        self.journal.note_checkpoint(job.stack_id, job.seq, job.n_files, job.generation,
                                     str(job.path))
        elapsed = time.perf_counter() - t0
        log.debug("%s: checkpoint at seq %d, %.1f MB in %.0f ms", job.stack_id, job.seq,
                  size / 1e6, elapsed * 1e3)
        if self.metrics is not None:
            self.metrics.observe("livestack_stage_seconds", elapsed, {"stage": "checkpoint"})
        return True

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted checkpoint is written; False on timeout."""
        return self._thread.drain(timeout_s) if self._thread is not None else True

    def stop(self, timeout_s: float | None = None) -> bool:
        """Write what waits and end the thread; False when ``timeout_s`` ran out."""
        return self._thread.stop(timeout_s) if self._thread is not None else True

"""The engine: everything that happens to a file, synchronously, in one thread.

:class:`Engine` composes the parts, each in its own module, and holds what they share:
the journal, the live stacks (``runtimes``), the hub and metrics.

* :mod:`~livestack.engine.resume`: checkpoint + journal replay;
* :mod:`~livestack.engine.ingest`: one file to a journal verdict, routing;
* :mod:`~livestack.engine.outputs`: preview / checkpoint / ``stack.fits`` cadence;
* :mod:`~livestack.engine.checkpoints`: snapshots and the checkpoint thread;
* :mod:`~livestack.engine.commands`: operator commands;
* :mod:`~livestack.engine.rebuild`: background rebuilds (supervisor, child, protocol).

``livestack stack`` (:mod:`livestack.batch`) drives it directly; the daemon drives it from
its worker thread (:mod:`livestack.engine.worker`).

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

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livestack.engine.checkpoints import Checkpointer, CheckpointWriter
from livestack.engine.commands import Commands
from livestack.engine.ingest import Ingest
from livestack.engine.outputs import Outputs
from livestack.engine.reader import FrameReader, load_masters
from livestack.engine.rebuild import RebuildJob, RebuildSupervisor
from livestack.engine.resume import Resumer
from livestack.engine.state import CHECKPOINT_WAIT_S, STACK_FILES, CrashPause, Runtime
from livestack.service.events import AlertEvent, StackSummary
from livestack.service.solving import StackSolving
from livestack.storage.calibration import CalibrationRecord
from livestack.storage.journal import JOURNAL_NAME, Journal

if TYPE_CHECKING:
    from livestack.config import Config
    from livestack.pipeline.routing import Router
    from livestack.pipeline.types import FrameInfo
    from livestack.service.hub import Hub
    from livestack.service.metrics import Metrics
    from livestack.storage.journal import FrameRow

log = logging.getLogger("livestack.engine")


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
        self.config = config
        self.output_root = Path(os.path.abspath(output_root))
        self.output_root.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.output_root / JOURNAL_NAME)
        self.hub = hub
        self.metrics = metrics
        self.crash_pause = CrashPause()
        self.masters = masters if masters is not None else load_masters(config)
        self.runtimes: dict[str, Runtime] = {}
        #: Preview versions of stacks dropped by :meth:`forget_runtime` (they continue).
        self.preview_versions: dict[str, int] = {}
        self.current_stack: str | None = None
        self.paused = False
        #: Journal counts per status, kept by :meth:`close` for reports after closing.
        self.final_counts: dict[str, int] = {}
        #: The daemon's watch folder: symlinks leading out of it are refused (None: batch).
        self.watch_root: Path | None = None
        #: Keeps each master used in <output>/masters/ with its hash (storage.calibration).
        self.calibration = CalibrationRecord(self.output_root, self.masters,
                                             config.masters.temp_tolerance_c)
        self.reader = FrameReader(config, self.masters, self.calibration)
        self.checkpointer = Checkpointer(self.journal, metrics, self.alert, self.crash_pause,
                                         checkpoint_writer, background_checkpoints)
        self.outputs = Outputs(self)
        self.resumer = Resumer(self)
        self.ingest = Ingest(self)
        self.commands = Commands(self)
        self.rebuilder = RebuildSupervisor(self)
        #: Background plate solving of each stack's reference (never blocks a frame).
        self.solving = StackSolving(self)

    # ---------------------------------------------------------------- shared state

    @property
    def rebuilds(self) -> dict[str, RebuildJob]:
        """Rebuilds in progress, by stack id."""
        return self.rebuilder.jobs

    @property
    def router(self) -> Router:
        """The router that assigns frames to stacks."""
        return self.ingest.router

    @property
    def redirects(self) -> dict[str, str]:
        """``new_stack`` redirects: router id -> the stack its frames go to instead."""
        return self.ingest.redirects

    @property
    def open_row(self) -> int | None:
        """The journal row left ``pending`` by the frame in progress (None between frames)."""
        return self.ingest.open_row

    def close(self) -> None:
        """Stop rebuilds, finish pending checkpoint writes and close the journal.

        The journal's counts stay readable in :attr:`final_counts`.
        """
        self.rebuilder.cancel_all()
        if not self.checkpointer.stop(CHECKPOINT_WAIT_S):
            log.error("checkpoints not written within %.0f s; the journal is replayed at the "
                      "next start instead", CHECKPOINT_WAIT_S)
        self.solving.close()
        self.ingest.buffers.release()  # a closed engine keeps no frame buffers
        self.final_counts = self.journal.counts()
        self.journal.close()

    # ---------------------------------------------------------------- resume

    def resume(self, should_stop: Callable[[], bool] = lambda: False) -> list[str]:
        """Restore the stacks with recent work and return the paths left ``pending``.

        Stacks of the latest night in the journal (and any stack with pending rows) are
        restored now: last checkpoint, then replay of the later journal rows. Older stacks
        are restored lazily when a frame routes to them.
        """
        return self.resumer.resume(should_stop)

    def runtime(self, stack_id: str, info: FrameInfo | None = None,
                should_stop: Callable[[], bool] = lambda: False) -> Runtime:
        """The live stack ``stack_id``, restoring it (checkpoint + replay) if needed."""
        return self.resumer.runtime(stack_id, info, should_stop)

    def forget_runtime(self, rt: Runtime) -> None:
        """Drop a live stack whose memory is ahead of the journal (a journal write failed).

        The next frame of that stack restores it from its checkpoint and the journal, so
        retrying the frame adds it exactly once; the router goes back to its journaled
        state. Preview versions continue (viewers skip versions they have seen).
        """
        if rt.stack_id in self.rebuilds:
            self.rebuilder.cancel(rt.stack_id)
        self.runtimes.pop(rt.stack_id, None)
        self.preview_versions[rt.stack_id] = rt.preview_version
        self.ingest.reload_router()

    # ---------------------------------------------------------------- frames

    def process_path(self, path: Path | str) -> FrameRow | None:
        """Take one file through the whole pipeline; return its final journal row.

        See :meth:`Ingest.process_path`.

        Raises
        ------
        JournalError
            The journal cannot be written (the daemon stops: nothing would be safe).
        """
        return self.ingest.process_path(path)

    def fail_open_row(self, path: str, message: str) -> FrameRow | None:
        """Finish the row left ``pending`` by an internal error (see :class:`Ingest`)."""
        return self.ingest.fail_open_row(path, message)

    def alert(self, level: str, code: str, message: str, stack_id: str | None = None) -> None:
        """Log and publish an alert (see :mod:`livestack.resilience`)."""
        log.warning("alert: %s", message)
        if self.hub is not None:
            self.hub.publish(AlertEvent(level, code, message, stack_id))

    # ---------------------------------------------------------------- outputs

    def after_frame(self, rt: Runtime, *, force: bool = False) -> None:
        """Apply the preview / checkpoint / FITS cadences after a frame (or when forced)."""
        self.outputs.after_frame(rt, force=force)

    def idle(self) -> None:
        """Called when no frame is waiting: flush what the cadences deferred."""
        self.outputs.idle()

    def checkpoint(self, rt: Runtime) -> None:
        """Snapshot the stack's state and have it written (in the background by default)."""
        self.checkpointer.checkpoint(rt)

    def wait_checkpoints(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted checkpoint is written; False on timeout."""
        return self.checkpointer.wait(timeout_s)

    def write_fits(self, rt: Runtime) -> bool:
        """Write ``stack.fits`` atomically; on StorageError log one line and go on."""
        return self.outputs.write_fits(rt)

    def render_preview(self, rt: Runtime) -> bool:
        """Render the JPEG, save ``preview.jpg`` and push it to viewers."""
        return self.outputs.render_preview(rt)

    def finalize(self) -> None:
        """Checkpoint and write ``stack.fits`` + preview for every stack with new work."""
        self.outputs.finalize()

    def summary(self, rt: Runtime) -> StackSummary:
        """The hub summary of a stack."""
        return self.outputs.summary(rt)

    def publish_stack(self, rt: Runtime) -> None:
        """Send the stack's summary to the hub (no-op without one)."""
        self.outputs.publish_stack(rt)

    def stack_file(self, stack_id: str, name: str) -> Path | None:
        """Path of a stack's ``stack.fits`` / ``preview.jpg`` if it exists (else None)."""
        if name not in STACK_FILES:
            return None
        if self.journal.stack(stack_id) is None:  # only known ids: no path tricks
            return None
        path = self.output_root / stack_id / name
        return path if path.is_file() else None

    # ---------------------------------------------------------------- commands

    def validate_command(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Check a command and its arguments; return normalised arguments.

        Raises
        ------
        UsageError
            Unknown command, unknown stack or frame, bad argument type.
        """
        return self.commands.validate(name, args)

    def execute_command(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run a validated command (in the worker thread)."""
        return self.commands.execute(name, args)

    # ---------------------------------------------------------------- rebuilds

    def rebuild_step(self, wait_s: float = 0.0) -> bool:
        """Advance a pending rebuild by one step (see :meth:`RebuildSupervisor.step`)."""
        return self.rebuilder.step(wait_s)

    def abandon_rebuilds(self, message: str) -> None:
        """Give every pending rebuild up (after an unexpected error in one of them)."""
        self.rebuilder.abandon_all(message)

    def terminate_rebuilds(self) -> None:
        """Ask every rebuild process to stop, without waiting (any thread; at shutdown)."""
        self.rebuilder.terminate_all()

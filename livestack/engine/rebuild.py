"""Background rebuilds of a live stack: the supervisor in the daemon, the child, their protocol.

The daemon's ``exclude_frame`` and ``set_reference`` commands re-stack the session from
its journal with :mod:`livestack.restack` (the engine behind ``livestack integrate``),
then seed a live :class:`~livestack.pipeline.session.StackSession` from the result and
keep stacking onto it. The live stack keeps serving viewers until the rebuilt one
replaces it.

Why a child process (``python -m livestack.engine.rebuild REQUEST.json``):

* the live pipeline keeps its CPU: the child lowers its own priority (``nice``);
* its memory (up to ``rebuild.memory_limit_mb``) is returned when it exits, and a rebuild
  that goes wrong cannot take the daemon with it;
* cancelling is a SIGTERM, which the child turns into a clean exit that removes its
  scratch file (a newer command, or the daemon stopping).

Protocol: the daemon writes a :class:`RebuildRequest` as JSON; the child writes the
result (:func:`write_result`, an atomic ``.npz`` like the checkpoints) and exits 0, or
writes one JSON line describing the error (:func:`read_error`) and exits 1. Its log
lines go to a file the daemon names.

The parent half is :class:`RebuildSupervisor`: it starts the child while the old stack
keeps stacking and serving, then seeds a live session from the result, replays the frames
the old stack took meanwhile (one per step, between frames) and swaps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from livestack.config import config_to_dict
from livestack.engine.state import remove_files
from livestack.errors import FrameError, LivestackError, StorageError, UsageError
from livestack.pipeline.product import StackProduct
from livestack.pipeline.session import StackSession
from livestack.pipeline.types import Transform
from livestack.reasons import Reason
from livestack.restack import IntegrationCancelled, sigterm_interrupts
from livestack.service.events import AlertEvent
from livestack.sessionplan import check_frame_file, load_session

if TYPE_CHECKING:
    from livestack.engine.core import Engine
    from livestack.engine.state import Runtime

#: The child's log (a file in the stack folder).
log = logging.getLogger("livestack.rebuild")
#: The supervisor's log (the daemon's).
slog = logging.getLogger("livestack.engine")

RESULT_NAME = "rebuild.npz"
REQUEST_NAME = "rebuild-request.json"
ERROR_NAME = "rebuild-error.json"
LOG_NAME = "rebuild.log"
#: Exit status of a child stopped by SIGTERM (or its parent's death) after cleaning up.
EXIT_CANCELLED = 130
#: How often the child checks that the daemon that started it is still there.
PARENT_CHECK_S = 1.0
#: How long a cancelled rebuild process may take to clean up before it is killed.
REBUILD_STOP_S = 3.0
#: Attempts of one rebuild (a frame the child cannot read is dropped before each retry).
MAX_ATTEMPTS = 3
#: Files of a rebuild in the stack folder (removed when it ends or the daemon starts).
FILE_NAMES = (RESULT_NAME, REQUEST_NAME, ERROR_NAME, LOG_NAME)

_PRODUCT_ARRAYS = ("image", "weight", "count", "rejected_low", "rejected_high", "std",
                   "frame_noise_adu")


@dataclass(frozen=True)
class RebuildRequest:
    """What the child integrates and where it writes.

    Attributes
    ----------
    journal : str
        The daemon's ``journal.sqlite``.
    stack_id : str
    reference : str or None
        Path of the new reference frame; None keeps the stack's reference (or, when it
        is no longer active, the first remaining frame).
    config : dict
        The daemon's configuration (:func:`livestack.config.config_to_dict`).
    folder : str
        The stack folder: result, error and log files, and the scratch file's place.
    memory_limit_bytes : int
    row_ids : list of int
        The journal rows to integrate (the stack's active accepted rows when the rebuild
        started; frames the live stack takes meanwhile are added live afterwards).
    nice : int
        Niceness increment the child applies to itself.
    """

    journal: str
    stack_id: str
    reference: str | None
    config: dict[str, Any]
    folder: str
    memory_limit_bytes: int
    row_ids: list[int]
    nice: int = 10

    def save(self, path: Path) -> None:
        """Write the request as JSON.

        Raises
        ------
        StorageError
            The file cannot be written.
        """
        try:
            path.write_text(json.dumps(asdict(self)), encoding="utf-8")
        except OSError as exc:
            raise StorageError(f"{path}: cannot write: {exc.strerror or exc}") from None

    @classmethod
    def load(cls, path: Path) -> RebuildRequest:
        """Read a request written by :meth:`save`.

        Raises
        ------
        StorageError
            Unreadable or malformed.
        """
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise StorageError(f"{path}: not a rebuild request: {exc}") from None


@dataclass(frozen=True)
class RebuildResult:
    """A finished integration, as the daemon reads it back.

    Attributes
    ----------
    product : StackProduct
        With ``std`` and ``frame_noise_adu`` set.
    rows : list of (int, list of float)
        Journal row id and transform onto the (new) reference, in the order of the
        product's accepted records.
    reference : str
        Path of the reference frame.
    reference_row : int
        Its journal row id.
    """

    product: StackProduct
    rows: list[tuple[int, list[float]]]
    reference: str
    reference_row: int


def rebuild_config(pipeline: Any) -> Any:
    """The integration a live rebuild runs for a stack with these pipeline settings.

    ``livestack integrate``'s defaults (weighted mean, winsorized rejection), with the live
    stack's kappas and frame weights, plus the standard-deviation map the live stack needs
    to go on rejecting. A live ``mean`` / ``sum`` stack (no rejection) is rebuilt without
    rejection, ``sum`` also without weights.

    Parameters
    ----------
    pipeline : PipelineConfig

    Returns
    -------
    IntegrateConfig
    """
    from livestack.pipeline.combine import IntegrateConfig

    method = pipeline.stack.method
    return IntegrateConfig(
        combine="mean", reject="winsorized" if method == "kappa_sigma" else "none",
        low=float(pipeline.stack.kappa_low), high=float(pipeline.stack.kappa_high),
        weights="none" if method == "sum" else pipeline.normalize.weights, std_map=True)


def write_result(path: Path, product: StackProduct, plan: Any) -> None:
    """Write an integration for the daemon (atomic ``.npz``).

    Parameters
    ----------
    path : Path
    product : StackProduct
        From :func:`livestack.restack.integrate_plan` with ``std_map``.
    plan : IntegrationPlan
        The plan it came from (row ids and transforms).

    Raises
    ------
    StorageError
        The file cannot be written (full disk, permissions).
    """
    from livestack.pipeline.session import record_to_json
    from livestack.storage.checkpoint import save_checkpoint

    arrays = {name: np.asarray(getattr(product, name)) for name in _PRODUCT_ARRAYS
              if getattr(product, name) is not None}
    meta = {
        "header": product.header,
        "records": [record_to_json(r) for r in product.records],
        "rows": [[f.row_id, f.transform.to_list()] for f in plan.frames],
        "reference": plan.reference.path,
        "reference_row": plan.reference.row_id,
    }
    save_checkpoint(path, arrays, meta)


def read_result(path: Path) -> RebuildResult:
    """Read what :func:`write_result` wrote.

    Raises
    ------
    StorageError
        Missing, torn or malformed.
    """
    from livestack.pipeline.session import record_from_json
    from livestack.storage.checkpoint import load_checkpoint

    arrays, meta = load_checkpoint(path)
    try:
        product = StackProduct(
            image=arrays["image"], weight=arrays["weight"], count=arrays["count"],
            rejected_low=arrays["rejected_low"], rejected_high=arrays["rejected_high"],
            records=[record_from_json(r) for r in meta["records"]], header=meta["header"],
            std=arrays.get("std"), frame_noise_adu=arrays["frame_noise_adu"])
        rows = [(int(r[0]), [float(v) for v in r[1]]) for r in meta["rows"]]
        return RebuildResult(product, rows, str(meta["reference"]), int(meta["reference_row"]))
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise StorageError(f"{path}: not a rebuild result: {exc}") from None


def write_error(path: Path, exc: LivestackError) -> None:
    """Describe a failed rebuild in one JSON line: reason code, message and frame.

    A frame's problem has its :class:`~livestack.reasons.Reason` (``missing``,
    ``changed_on_disk``, ...) and the frame's path, which the daemon drops before it
    retries; any other error has its class name as reason and no path.
    """
    if isinstance(exc, FrameError):
        payload = {"reason": exc.reason.value, "message": str(exc), "path": exc.path}
    else:
        payload = {"reason": type(exc).__name__, "message": str(exc), "path": None}
    with contextlib.suppress(OSError):
        path.write_text(json.dumps(payload), encoding="utf-8")


def read_error(path: Path) -> dict[str, Any] | None:
    """The error a failed child described (``reason``, ``message``, ``path``), or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_request(request: RebuildRequest) -> None:
    """Integrate the stack a request names and write the result next to it.

    Raises
    ------
    LivestackError
        From the journal, the plan, a frame, the masters or the result file.
    """
    from livestack.config import config_from_dict
    from livestack.restack import integrate_plan
    from livestack.sessionplan import load_session, plan_integration
    from livestack.storage.calibration import open_masters, session_masters
    from livestack.storage.journal import Journal

    config = config_from_dict(request.config)
    folder = Path(request.folder)
    journal = Journal(request.journal)
    try:
        session = load_session(journal=journal, stack_id=request.stack_id)
    finally:
        journal.close()
    # The frames' recorded calibration (hash-checked); the configured masters only for
    # frames stacked before masters were recorded.
    recorded = session.recorded_masters()
    masters = session_masters(recorded, session.root, given=None if recorded else open_masters(
        paths=config.masters.paths, temp_tolerance_c=config.masters.temp_tolerance_c))
    wanted = set(request.row_ids)
    # Rows taken out of the stack since the request (rerouted, excluded) are left out.
    frames = tuple(f for f in session.frames if f.row_id in wanted)
    if len(frames) != len(wanted):
        log.info("%s: %d of the requested rows left the stack; integrating %d",
                 request.stack_id, len(wanted) - len(frames), len(frames))
    plan = plan_integration(replace(session, frames=frames), reference=request.reference)
    orphaned = threading.Event()
    parent = os.getppid()

    def watch_parent() -> None:
        # A daemon killed outright cannot stop us: notice it and stop (scratch removed).
        while not orphaned.wait(PARENT_CHECK_S):
            if os.getppid() != parent:
                log.warning("%s: the daemon is gone; rebuild cancelled", request.stack_id)
                orphaned.set()

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    try:
        product = integrate_plan(plan, rebuild_config(config.pipeline),
                                 pipeline=config.pipeline, masters=masters,
                                 memory_limit_bytes=request.memory_limit_bytes,
                                 scratch_dir=folder, cancel=orphaned, frame_noise=True,
                                 formats=config.formats)
    finally:
        orphaned.set()  # ends the watcher
    write_result(folder / RESULT_NAME, product, plan)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m livestack.engine.rebuild REQUEST.json``: exit 0 with a result, 1 on error."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m livestack.engine.rebuild REQUEST.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    request_path = Path(args[0])
    try:
        request = RebuildRequest.load(request_path)
    except StorageError as exc:
        print(f"livestack rebuild: {exc}", file=sys.stderr)
        return 1
    error_path = Path(request.folder) / ERROR_NAME
    if request.nice:
        with contextlib.suppress(OSError):
            os.nice(request.nice)
    try:
        with sigterm_interrupts():
            run_request(request)
    except (KeyboardInterrupt, IntegrationCancelled):
        log.info("%s: rebuild cancelled", request.stack_id)
        return EXIT_CANCELLED
    except LivestackError as exc:
        log.error("%s: rebuild failed: %s", request.stack_id, exc)
        write_error(error_path, exc)
        return 1
    log.info("%s: rebuild integrated", request.stack_id)
    return 0


# ======================================================================================
# the parent half: the daemon's supervisor


@dataclass
class RebuildJob:
    """A background rebuild of one stack (exclude a frame / set the reference).

    Two phases: the integration engine runs in a child process while the old session
    keeps stacking and serving; then the frames the old session took meanwhile are
    replayed onto the session seeded from the integration, and it replaces the old one.
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


class RebuildSupervisor:
    """Starts, advances, retries and swaps the background rebuilds of live stacks.

    Parameters
    ----------
    engine : Engine
        Gives the journal, the configuration, the live stacks, the frame reader and
        replay (:meth:`Resumer.replay_row`), the output cadence and the hub.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.journal = engine.journal
        #: Rebuilds in progress, by stack id.
        self.jobs: dict[str, RebuildJob] = {}

    def start(self, stack_id: str, why: str, reference: str | None = None,
              attempts: int = 1) -> None:
        """Start integrating the stack's active frames in a child process.

        Frames whose raw file is missing or changed are marked ``failed`` first (they
        cannot be integrated). A rebuild already running for the stack is cancelled: the
        new one covers the newer command too.

        Raises
        ------
        StorageError
            The request cannot be written or the child cannot be started.
        """
        engine = self.engine
        previous = self.jobs.get(stack_id)
        self.cancel(stack_id)
        rt = engine.runtime(stack_id)
        if reference is None and previous is not None:
            # A set_reference still being rebuilt holds for the newer command too.
            reference = previous.reference
        try:
            frames = load_session(journal=self.journal, stack_id=stack_id).frames
        except UsageError as exc:  # nothing accepted is left: an empty stack
            slog.info("%s: %s; the stack is emptied", stack_id, exc)
            engine.commands.reset(stack_id)
            return
        row_ids: list[int] = []
        for frame in frames:
            try:
                check_frame_file(frame)
            except FrameError as exc:
                self.drop(stack_id, frame.row_id, exc.reason, exc.message)
                continue
            if frame.row_id is not None:
                row_ids.append(frame.row_id)
        if reference is not None and not any(
                f.path == reference and f.row_id in row_ids for f in frames):
            slog.warning("%s: the chosen reference %s cannot be re-read; the rebuild keeps "
                         "the stack's reference", stack_id, reference)
            reference = None
        if not row_ids:
            slog.warning("%s: no frame of the stack can be re-read; the stack is emptied",
                         stack_id)
            engine.commands.reset(stack_id)
            return
        remove_files(rt.folder, FILE_NAMES)
        config = engine.config
        request = RebuildRequest(
            journal=str(self.journal.path), stack_id=stack_id, reference=reference,
            config={"pipeline": config_to_dict(config.pipeline),
                    "masters": config_to_dict(config.masters),
                    "formats": config_to_dict(config.formats)},
            folder=str(rt.folder),
            memory_limit_bytes=config.rebuild.memory_limit_mb * 1024 * 1024,
            row_ids=row_ids, nice=config.rebuild.nice)
        job = RebuildJob(stack_id, why, reference, rt.folder, attempts=attempts,
                         last_seq_seen=self.journal.last_seq(stack_id))
        request.save(rt.folder / REQUEST_NAME)
        try:
            job.log_file = open(rt.folder / LOG_NAME, "wb")
            job.process = subprocess.Popen(
                [sys.executable, "-m", "livestack.engine.rebuild",
                 str(rt.folder / REQUEST_NAME)],
                stdin=subprocess.DEVNULL, stdout=job.log_file, stderr=subprocess.STDOUT,
                close_fds=True, start_new_session=True)  # Ctrl-C is for the daemon
        except OSError as exc:
            if job.log_file is not None:
                job.log_file.close()
            raise StorageError(f"{rt.folder}: cannot start the rebuild process: "
                               f"{exc.strerror or exc}") from None
        self.jobs[stack_id] = job
        slog.info("%s: rebuilding (%s) with the integration engine in the background "
                  "(pid %d)", stack_id, why, job.process.pid)
        engine.outputs.publish_stack(rt)

    def drop(self, stack_id: str, row_id: int | None, reason: Reason | str,
             message: str) -> None:
        """Mark a frame that cannot be re-read ``failed`` so rebuilds leave it out."""
        if row_id is None:
            return
        row = self.journal.row(row_id)
        if row is None:
            return
        slog.warning("%s: %s: cannot rebuild with it: %s", row.path, reason, message)
        self.journal.finish(row.id, "failed", reason=f"replay_{reason}", message=message,
                            stack_id=stack_id, seq=row.seq)

    def _accepted_in(self, row_id: int, stack_id: str) -> bool:
        """True if journal row ``row_id`` is an active, accepted frame of ``stack_id``."""
        row = self.journal.row(row_id)
        return (row is not None and row.active and row.stack_id == stack_id
                and row.status == "accepted")

    def cancel(self, stack_id: str) -> None:
        """Stop a stack's rebuild (its process removes its scratch file on SIGTERM)."""
        job = self.jobs.pop(stack_id, None)
        if job is not None:
            self._stop_process(job)
            remove_files(job.folder, FILE_NAMES)

    def cancel_all(self) -> None:
        """Stop every rebuild (the engine is closing)."""
        for stack_id in list(self.jobs):
            self.cancel(stack_id)

    @staticmethod
    def _stop_process(job: RebuildJob) -> None:
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

    def abandon_all(self, message: str) -> None:
        """Give every pending rebuild up (after an unexpected error in one of them)."""
        for stack_id, job in list(self.jobs.items()):
            self._stop_process(job)
            self._abandon(self.engine.runtime(stack_id), job, message)

    def terminate_all(self) -> None:
        """Ask every rebuild process to stop, without waiting (any thread; at shutdown)."""
        for job in list(self.jobs.values()):
            if job.process is not None and job.process.poll() is None:
                job.process.terminate()

    def step(self, wait_s: float = 0.0) -> bool:
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
        if not self.jobs:
            return False
        # A job that can move on goes first (catching up, or its process has ended).
        stack_id, job = next(
            ((k, j) for k, j in self.jobs.items()
             if j.session is not None or (j.process is not None and j.process.poll() is not None)),
            next(iter(self.jobs.items())))
        rt = self.engine.runtime(stack_id)
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
                self._failed(rt, job, code)
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
            transform = Transform.from_list(row.transform, row.model or "similarity")
            if job.base_inverse is not None:
                transform = transform.then(job.base_inverse)
            stored = transform.to_list()
        outcome = self.engine.resumer.replay_row(rt, job.session, row, transform=transform)
        if outcome is not None:
            new_tr = outcome.transform.to_list() if outcome.transform is not None else stored
            job.updates.append((row.id, len(job.updates) + 1, new_tr))
        return True

    def _failed(self, rt: Runtime, job: RebuildJob, code: int) -> None:
        """A rebuild process failed: drop a frame it could not read and retry, or give up."""
        del self.jobs[rt.stack_id]
        if code in (EXIT_CANCELLED, -signal.SIGTERM, -signal.SIGKILL):
            # Stopped from outside (systemd stopping the whole unit, a kill): not a failure.
            slog.info("%s: rebuild (%s) was stopped (exit %d); the journal replay at the "
                      "next start applies the command", rt.stack_id, job.why, code)
            return
        error = read_error(job.folder / ERROR_NAME) or {}
        message = str(error.get("message") or f"exit status {code}, see "
                      f"{job.folder / LOG_NAME}")
        reason = str(error.get("reason") or "failed")
        frame_path = error.get("path")
        culprit = None if not frame_path else next(
            (r for r in self.journal.rows(stack_id=rt.stack_id)
             if r.active and r.path == frame_path), None)
        if culprit is not None and job.attempts < MAX_ATTEMPTS:
            self.drop(rt.stack_id, culprit.id, reason, message)
            self._restart(rt, job)
            return
        self._abandon(rt, job, message)

    def _restart(self, rt: Runtime, job: RebuildJob) -> None:
        """Start the same rebuild again on the journal as it is now."""
        self.jobs.pop(rt.stack_id, None)
        self.start(rt.stack_id, job.why, job.reference, attempts=job.attempts + 1)

    def _seed_from_result(self, rt: Runtime, job: RebuildJob) -> None:
        """Load the integration and seed the new live session from it (catch-up phase)."""
        engine = self.engine
        try:
            result = read_result(job.folder / RESULT_NAME)
        except StorageError as exc:
            self._abandon(rt, job, str(exc))
            return
        finally:
            remove_files(job.folder, (RESULT_NAME, REQUEST_NAME, ERROR_NAME))
        moved = [row_id for row_id, _ in result.rows
                 if not self._accepted_in(row_id, rt.stack_id)]
        if moved:
            # A frame left the stack while it was integrated (rerouted): again without it.
            if job.attempts >= MAX_ATTEMPTS:
                self._abandon(rt, job, "frames keep leaving the stack")
                return
            slog.info("%s: %d integrated frame(s) left the stack meanwhile; rebuilding again",
                      rt.stack_id, len(moved))
            self._restart(rt, job)
            return
        ref_row = self.journal.row(result.reference_row)
        noise = result.product.frame_noise_adu
        try:
            if noise is None:
                raise ValueError("the result has no per-frame noise")
            raw, info = engine.reader.read(result.reference)
            masters = engine.reader.select_masters(info)
            session = StackSession.from_product(rt.stack_id, engine.config.pipeline,
                                                result.product, noise, raw, info, masters)
        except (FrameError, ValueError) as exc:
            self._abandon(rt, job, str(exc))
            return
        remove_files(job.folder, (LOG_NAME,))  # kept only when something went wrong
        job.session = session
        # The reference goes first: a replay of the journal makes its first frame the
        # reference, and the stored transforms refer to this one.
        ordered = sorted(result.rows, key=lambda r: r[0] != result.reference_row)
        job.updates = [(row_id, seq, tr) for seq, (row_id, tr) in enumerate(ordered, start=1)]
        job.done = {row_id for row_id, _ in result.rows}
        if ref_row is not None and ref_row.transform is not None:
            # Frames the old session took meanwhile are on the old reference's grid.
            job.base_inverse = Transform.from_list(ref_row.transform,
                                                   ref_row.model or "similarity").inverse()
        slog.info("%s: rebuild (%s) integrated %d frames in %.1f s; catching up",
                  rt.stack_id, job.why, len(result.rows), time.monotonic() - job.started)

    def _abandon(self, rt: Runtime, job: RebuildJob, message: str) -> None:
        """Give a rebuild up: one error line and an alert; the old stack stays."""
        self.jobs.pop(rt.stack_id, None)
        slog.error("%s: rebuild (%s) failed: %s; the stack keeps its previous frames until "
                   "the next restart replays the journal", rt.stack_id, job.why, message)
        if self.engine.hub is not None:
            self.engine.hub.publish(AlertEvent("error", "rebuild_failed",
                                               f"{rt.stack_id}: rebuild failed: {message}",
                                               rt.stack_id))
        self.engine.outputs.publish_stack(rt)

    def _swap(self, rt: Runtime, job: RebuildJob) -> None:
        assert job.session is not None
        self.journal.rewrite_stack(rt.stack_id, job.updates)
        row = self.journal.stack(rt.stack_id)
        assert row is not None
        rt.session = job.session
        rt.generation = row.generation
        # Rows numbered after the rebuilt ones (rejected, failed, excluded) add nothing:
        # the checkpoint covers them, so a restart does not read them again.
        rt.last_seq = self.journal.last_seq(rt.stack_id)
        del self.jobs[rt.stack_id]
        counts = self.journal.counts(rt.stack_id)
        rt.rejected, rt.failed = counts["rejected"], counts["failed"]
        rt.frames_since_checkpoint = 1
        rt.accepted_since_fits = rt.accepted_since_preview = 1
        slog.info("%s: rebuild (%s) done: %d frames", rt.stack_id, job.why,
                  rt.session.n_accepted)
        self.engine.outputs.after_frame(rt, force=True)


if __name__ == "__main__":
    raise SystemExit(main())

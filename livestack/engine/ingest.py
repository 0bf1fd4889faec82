"""Ingest and routing: one file from the watch folder to a journal verdict.

Per file: refuse odd entries, hash, ``pending`` journal row, read, choose masters, route to
a stack, stack it, and finish the row with the verdict and the router's state in one
transaction. Per-frame problems end as a journal row and one log line, never as an
exception. A run of agreeing alignment failures closes a stack and restacks the run in the
stack the router now gives it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat as stat_mod
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from livestack.engine.buffers import BufferPool
from livestack.engine.state import (
    ALIGNMENT_REASONS,
    CALIBRATION_TYPES,
    REJECTION_RUN_ALERT,
    Runtime,
    metrics_json,
    now_iso,
)
from livestack.errors import (
    CalibrationError,
    DescriptorsExhaustedError,
    FrameError,
    JournalFullError,
)
from livestack.pipeline.routing import Router
from livestack.reasons import Reason
from livestack.service.events import FrameEvent
from livestack.service.limits import is_fd_exhaustion
from livestack.storage.entries import check_entry
from livestack.storage.formats import frame_format
from livestack.storage.journal import PendingSha256, read_file_hashing, sha256_file

if TYPE_CHECKING:
    from pathlib import Path

    from livestack.engine.core import Engine
    from livestack.pipeline.session import FrameOutcome
    from livestack.pipeline.types import Allocator, FrameInfo
    from livestack.storage.fitsio import FileBytes
    from livestack.storage.journal import FrameRow

log = logging.getLogger("livestack.engine")

#: A FITS file up to this size is read once, hashed and decoded from memory. A larger one
#: (a cube or a foreign file named .fits) is hashed streaming and its header checked before
#: its data are read, as before: holding it whole would cost its full size in RAM on a 4 GB
#: board. 512 MiB covers a 100 MP float32 frame.
SINGLE_READ_MAX_BYTES = 512 * 1024 * 1024


class _EarlyFrame:
    """A frame decoded before the journal's checks, kept for where it is used.

    The ingest decodes a file's bytes while their hash is being finished, i.e. before the
    duplicate check and ``mark_pending``. What the decode gave, an exception included, is
    handed out by :meth:`result` at the place the decode used to run, so every outcome
    lands in the journal as before: a decode failure after ``mark_pending`` with the sha
    in its row, a bug as ``internal_error`` of that row, and a duplicate is never
    reported as a failure of its decode.
    """

    __slots__ = ("error", "frame")

    def __init__(self, frame: tuple[np.ndarray, FrameInfo] | None,
                 error: Exception | None) -> None:
        self.frame = frame
        self.error = error

    @classmethod
    def decode(cls, engine: Engine, path: str, data: FileBytes | None,
               empty: Allocator | None = None) -> _EarlyFrame:
        """``engine.reader.read(path, data, empty=empty)``, its exception kept instead of
        raised."""
        try:
            return cls(engine.reader.read(path, data, empty=empty), None)
        except Exception as exc:  # deferred, not handled: result() raises it unchanged
            return cls(None, exc)

    def result(self) -> tuple[np.ndarray, FrameInfo]:
        """The decoded frame, or raise what the decode raised.

        Raises
        ------
        Exception
            The decode's own exception (``FrameError``, ``DescriptorsExhaustedError``, or
            a bug), with its traceback.
        """
        error, self.error = self.error, None
        if error is not None:
            try:
                raise error
            finally:  # no frame -> exception -> traceback -> frame cycle holding the frame
                del error
        frame, self.frame = self.frame, None
        assert frame is not None
        return frame


class Ingest:
    """Takes files through the pipeline into stacks and keeps the router.

    Parameters
    ----------
    engine : Engine
        Gives the journal, the frame reader, the live stacks, the hub and metrics, and
        the output cadence that runs after each frame.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.journal = engine.journal
        config = engine.config
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
        #: new_stack command: router id -> the id frames of that key go to instead.
        self.redirects: dict[str, str] = dict(self.journal.get_state("redirects", {}))
        #: The journal row left ``pending`` by the frame in progress (None between frames).
        self.open_row: int | None = None
        #: The frame's file bytes, decoded image and warp output, reused frame after frame
        #: (an array is handed out again only when nothing else holds it; engine.buffers).
        self.buffers = BufferPool()

    # ---------------------------------------------------------------- routing

    def route(self, info: FrameInfo) -> str:
        """The stack a light goes to (after ``new_stack`` redirects)."""
        stack_id = self.router.route(info)
        return self.redirects.get(stack_id, stack_id)

    def router_id(self, stack_id: str) -> str:
        """The router's id of a stack (differs after a ``new_stack`` command)."""
        return next((k for k, v in self.redirects.items() if v == stack_id), stack_id)

    def router_state(self) -> dict[str, Any]:
        """What the journal stores with each verdict: the router and the redirects."""
        return {"router": self.router.to_dict(), "redirects": self.redirects}

    def reload_router(self) -> None:
        """Go back to the router state last written to the journal."""
        saved = self.journal.get_state("router")
        if saved is not None:
            with contextlib.suppress(ValueError):
                self.router = Router.from_dict(saved)
        self.redirects = dict(self.journal.get_state("redirects", {}))

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
        DescriptorsExhaustedError
            No file descriptor was left; the row stays ``pending`` and is retried.
        """
        engine = self.engine
        spath = os.path.abspath(path)
        t0 = time.perf_counter()
        engine.solving.frame_started()  # a running solve-field waits (SIGSTOP) until idle
        refusal = check_entry(spath, engine.watch_root)
        if refusal is not None:  # symlink out of the watch folder, dangling symlink
            reason, message, status, level = refusal
            return self._record_failure(spath, None, None, None, reason, message,
                                        status=status, level=level)
        try:
            st = os.stat(spath)
        except FileNotFoundError:
            return self._record_failure(spath, None, None, None, Reason.VANISHED,
                                        f"{spath}: the file disappeared before it was read")
        except OSError as exc:
            return self._record_failure(spath, None, None, None, Reason.UNREADABLE,
                                        f"{spath}: cannot stat: {exc.strerror}")
        if not stat_mod.S_ISREG(st.st_mode):
            return self._record_failure(spath, None, None, None, Reason.NOT_A_FILE,
                                        f"{spath}: not a regular file")
        if self.journal.seen(spath, st.st_size, st.st_mtime_ns):
            log.debug("%s: already in the journal", spath)
            return None
        if engine.metrics is not None:
            engine.metrics.inc("livestack_frames_seen_total")
        # A plain FITS file up to SINGLE_READ_MAX_BYTES is read once: the journal's identity
        # is the SHA-256 of these bytes and the reader decodes them (a second full read cost
        # 10-20 ms of system time per 26 MP frame). Other formats and larger files are
        # hashed streaming and read by their decoders.
        data: FileBytes | None = None
        hashing: PendingSha256 | None = None
        try:
            if frame_format(spath) == "fits" and st.st_size <= SINGLE_READ_MAX_BYTES:
                # The bytes are dropped once decoded: they borrow the warp output's arena.
                data, hashing = read_file_hashing(spath, SINGLE_READ_MAX_BYTES,
                                                  empty=self.buffers.transient)
            else:
                sha = sha256_file(spath)
        except FileNotFoundError:
            return self._record_failure(spath, st.st_size, st.st_mtime_ns, None, Reason.VANISHED,
                                        f"{spath}: the file disappeared while it was read")
        except PermissionError:
            return self._record_failure(spath, st.st_size, st.st_mtime_ns, None,
                                        Reason.PERMISSION_DENIED, f"{spath}: permission denied")
        except OSError as exc:
            if is_fd_exhaustion(exc):  # says nothing about the frame: retried, never final
                raise DescriptorsExhaustedError(f"{spath}: {exc.strerror}") from None
            return self._record_failure(spath, st.st_size, st.st_mtime_ns, None, Reason.UNREADABLE,
                                        f"{spath}: cannot read: {exc.strerror or exc}")
        early: _EarlyFrame | None = None
        if hashing is not None:
            # The bytes are decoded while the helper thread finishes their hash (at 26 MP
            # the hash takes 29 ms, the read 10-18 ms); the outcome, a failure included,
            # is used where the decode ran before, after the journal's checks.
            early = _EarlyFrame.decode(engine, spath, data, self.buffers.empty)
            sha = hashing.hexdigest()
            data = None  # decoded: not held while the frame is stacked
        done = self.journal.already_done(spath, sha)
        if done is not None:
            del data, early
            if done.path == spath:
                return None
            return self._record_failure(
                spath, st.st_size, st.st_mtime_ns, sha, Reason.DUPLICATE,
                f"{spath}: same content as {done.path} (already {done.status})",
                status="ignored", level=logging.INFO)
        row_id = self.journal.mark_pending(spath, st.st_size, st.st_mtime_ns, sha)
        self.open_row = row_id
        engine.crash_pause("read", self.journal)
        try:
            raw, info = (engine.reader.read(spath, data, empty=self.buffers.empty)
                         if early is None else early.result())
        except FrameError as exc:
            return self.finish_failure(row_id, spath, exc.reason, exc.message)
        finally:
            del data, early  # the file's bytes are decoded: not held while the frame is stacked
        if info.image_type in CALIBRATION_TYPES:
            message = f"{spath}: {info.image_type} frame in the watch folder, not stacked"
            return self.finish_failure(row_id, spath, Reason.CALIBRATION_FRAME, message,
                                       status="ignored", level=logging.INFO)
        try:
            masters = engine.reader.select_masters(info)
        except CalibrationError as exc:
            return self.finish_failure(row_id, spath, exc.reason, exc.message)
        if not info.exposure_s > 0:
            log.warning("%s: no exposure time in the header (EXPTIME/EXPOSURE/EXP_TIME): "
                        "stacked in a 'no-exptime' stack, adding 0 s to its total", spath)
        stack_id = self.route(info)
        rt = engine.runtime(stack_id, info)
        engine.current_stack = stack_id
        t_read = time.perf_counter()
        try:
            # The frame as read is not needed afterwards: calibrated where it lies.
            outcome = rt.session.process(raw, info, masters, overwrite_raw=True,
                                         scratch=self._scratch(raw, info))
        except OSError as exc:  # a lazy import or kernel compile found no descriptor
            if not is_fd_exhaustion(exc):
                raise
            engine.forget_runtime(rt)  # it may hold part of the frame: rebuilt from the journal
            raise DescriptorsExhaustedError(f"{spath}: {exc.strerror}") from None
        engine.crash_pause("accumulate", self.journal)
        return self._after_outcome(rt, row_id, info, outcome,
                                   read_ms=(t_read - t0) * 1e3, t0=t0)

    def _scratch(self, raw: np.ndarray, info: FrameInfo) -> Allocator:
        """Where the session's frame-sized buffers come from: the pool.

        A colour frame's byte maps (1 B/px: the saturation masks, the clamp's flags and
        seeds, the warp footprint) are not pooled, only its float planes: between their
        uses the maps' arenas would sit idle through the debayer, whose full-size outputs
        are fresh memory (+115 MB at the 26 MP colour peak: 2.94 against 2.82 GB).
        A mono frame has no such step; its maps stay pooled (~1000 page faults and
        ~16 ms of system time per 26 MP frame less).
        """
        if info.bayer_pattern or raw.ndim == 3:
            return self.buffers.at_least(2 * raw.shape[-1] * raw.shape[-2])
        return self.buffers.empty

    def _record_failure(self, path: str, size: int | None, mtime_ns: int | None,
                        sha: str | None, reason: Reason, message: str, *,
                        status: str = "failed", level: int = logging.WARNING) -> FrameRow | None:
        row_id = self.journal.mark_pending(path, size, mtime_ns, sha)
        return self.finish_failure(row_id, path, reason, message, status=status, level=level)

    def finish_failure(self, row_id: int, path: str, reason: Reason, message: str, *,
                       status: str = "failed", stack_id: str | None = None,
                       level: int = logging.WARNING) -> FrameRow | None:
        """Finish a row as ``failed`` / ``ignored``: log line, journal, metrics, event.

        Raises
        ------
        JournalError
            The journal cannot be written.
        """
        engine = self.engine
        text = message if message.startswith(path) else f"{path}: {message}"
        log.log(level, "%s: %s: %s", path, reason, text[len(path) + 2:] if
                text.startswith(path + ": ") else text)
        self.journal.finish(row_id, status, reason=reason, message=text, stack_id=stack_id,
                            state=self.router_state())
        if self.open_row == row_id:
            self.open_row = None
        if engine.metrics is not None and status == "failed":
            engine.metrics.inc("livestack_frames_failed_total", {"reason": reason})
        if engine.hub is not None and status == "failed":  # ignored files are not frames
            event = FrameEvent(stack_id, path, status, reason, text, 0.0, time=now_iso())
            engine.hub.publish(event)
            if stack_id is not None:
                engine.hub.record_frame(stack_id, event)
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
        return self.finish_failure(row_id, path, Reason.INTERNAL_ERROR, message)

    def _after_outcome(self, rt: Runtime, row_id: int, info: FrameInfo,
                       outcome: FrameOutcome, *, read_ms: float, t0: float) -> FrameRow | None:
        engine = self.engine
        alignment = outcome.verdict == "rejected" and outcome.reason in ALIGNMENT_REASONS
        reroute: tuple[str, ...] = ()
        router_id = self.router_id(rt.stack_id)
        if alignment:
            reroute = self.router.report_alignment_failure(router_id, info)
            engine.solving.unaligned(rt, row_id, info, outcome.stars)
        elif outcome.verdict == "accepted":
            self.router.report_alignment_success(router_id)
        transform = outcome.transform
        metrics = metrics_json(outcome)
        if metrics is not None:  # provenance: the format the frame came in
            metrics["format"] = frame_format(info.path)
        try:
            seq = self.journal.finish(
                row_id, outcome.verdict, reason=outcome.reason, message=outcome.message,
                stack_id=rt.stack_id, metrics=metrics,
                transform=transform.to_list() if transform is not None else None,
                model=transform.model if transform is not None else None,
                weight=outcome.weight, assign_seq=True, state=self.router_state(),
                norm=None if outcome.norm is None else {
                    **outcome.norm.to_json(), "reference_file": rt.session.reference_file},
                masters=engine.reader.frame_masters if outcome.verdict != "failed" else None)
        except JournalFullError:
            engine.forget_runtime(rt)  # the stack holds a frame the journal lacks: undo it
            raise
        if self.open_row == row_id:
            self.open_row = None
        rt.last_seq = seq or rt.last_seq
        rt.seen += 1
        rt.frames_since_checkpoint += 1
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
            engine.alert("warning", "rejection_run",
                         f"{REJECTION_RUN_ALERT} frames in a row rejected in {rt.stack_id} "
                         f"(last: {outcome.reason})", rt.stack_id)
        engine.solving.after_frame(rt, row_id, transform, outcome.verdict == "accepted")
        engine.outputs.after_frame(rt)
        if reroute:
            self.reroute(rt.stack_id, reroute)
        engine.solving.route_moves()
        return self.journal.row(row_id)

    def reroute(self, old_stack: str, paths: tuple[str, ...], *,
                to_stack: str | None = None, why: str = "") -> None:
        """A run of agreeing alignment failures closed ``old_stack``: restack the run.

        The frames (rejected in the old stack) move to the stack the router now gives
        them, or to ``to_stack`` (solved routing, ``why`` says why): their journal rows get
        the new stack and a new ``seq`` there.
        """
        engine = self.engine
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
                raw, info = engine.reader.read(path)
                masters = engine.reader.select_masters(info)
            except FrameError as exc:
                log.warning("%s: %s: %s", path, exc.reason, exc.message)
                continue
            stack_id = self.route(info) if to_stack is None else to_stack
            if to_stack is not None:
                log.info("%s: %s -> %s (%s)", path, old_stack, to_stack, why)
            new_rt = engine.runtime(stack_id, info)
            engine.current_stack = stack_id
            t0 = time.perf_counter()
            outcome = new_rt.session.process(raw, info, masters, overwrite_raw=True)
            self.journal.mark_pending(row.path, row.size, row.mtime_ns, row.sha256)
            self.open_row = row.id
            self._after_outcome(new_rt, row.id, info, outcome, read_ms=0.0, t0=t0)
        # The moved rows were the old stack's last seqs (rejected: its state is unchanged
        # by them). Checkpoint it at the journal's new last seq; an older checkpoint above
        # that seq would look "ahead of the journal" and force a full replay at each start.
        old_rt = engine.runtimes.get(old_stack)
        if old_rt is not None and old_stack not in engine.rebuilds:
            old_rt.last_seq = self.journal.last_seq(old_stack)
            old_rt.frames_since_checkpoint = max(old_rt.frames_since_checkpoint, 1)
            engine.checkpoint(old_rt)

    def _frame_metrics(self, outcome: FrameOutcome, read_ms: float, elapsed_s: float) -> None:
        m = self.engine.metrics
        if m is None:
            return
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

    def _frame_event(self, rt: Runtime, info: FrameInfo, outcome: FrameOutcome,
                     seq: int | None) -> None:
        hub = self.engine.hub
        if hub is None:
            return
        event = FrameEvent(
            rt.stack_id, info.path, outcome.verdict, outcome.reason, outcome.message,
            outcome.weight, exposure_s=info.exposure_s, seq=seq,
            time=info.date_obs.isoformat() if info.date_obs else now_iso(),
            metrics=outcome.metrics.as_dict() if outcome.metrics else None,
            timings_ms=outcome.timings_ms,
            # pixels clipped by the stack: a satellite trail shows as a jump here
            rejected_low=outcome.rejected_low, rejected_high=outcome.rejected_high)
        hub.publish(event)
        hub.record_frame(rt.stack_id, event)

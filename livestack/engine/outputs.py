"""Output cadence: when a live stack gets a preview, a checkpoint and a ``stack.fits``.

The preview goes first and its ``stack`` event at once, so viewers never wait for a
``stack.fits`` write (1.8 s at 26 MP) or a checkpoint snapshot. A stack being rebuilt is
not checkpointed (its state is about to be replaced). Write failures are logged and
stacking goes on.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from livestack.engine.state import (
    CHECKPOINT_WAIT_S,
    FITS_NAME,
    PREVIEW_NAME,
    Runtime,
    now_iso,
    write_atomic,
)
from livestack.errors import StorageError
from livestack.service.events import StackEvent, StackSummary
from livestack.storage.calibration import master_cards
from livestack.storage.stackfits import write_stack_fits

if TYPE_CHECKING:
    from livestack.engine.core import Engine

log = logging.getLogger("livestack.engine")


class Outputs:
    """Previews, checkpoints and ``stack.fits`` on the configured cadences; hub summaries.

    Parameters
    ----------
    engine : Engine
        Gives the configuration (``output``), the live stacks, the checkpointer, the
        hub, metrics and the plate solver (which annotates ``stack.fits``).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        #: Accepted frames between ``stack.fits`` rewrites; 0: only when forced (end of a
        #: batch, shutdown, snapshot). The batch sets ``output.batch_fits_every_frames``.
        self.fits_every_frames = engine.config.output.fits_every_frames

    def after_frame(self, rt: Runtime, *, force: bool = False) -> None:
        """Apply the preview / checkpoint / FITS cadences after a frame (or when forced)."""
        out = self.engine.config.output
        now = time.monotonic()
        if rt.session.n_accepted and rt.accepted_since_preview > 0 and (
                force or (rt.accepted_since_preview >= out.preview_every_frames
                          and now - rt.last_preview_t >= out.preview_min_interval_s)):
            self.render_preview(rt)
        self.publish_stack(rt)
        if rt.stack_id not in self.engine.rebuilds and rt.frames_since_checkpoint > 0 and (
                force or rt.frames_since_checkpoint >= out.checkpoint_every_frames
                or now - rt.last_checkpoint_t >= out.checkpoint_every_s):
            self.engine.checkpointer.checkpoint(rt)
        if rt.session.n_accepted and rt.accepted_since_fits > 0 and (
                force or (self.fits_every_frames > 0
                          and rt.accepted_since_fits >= self.fits_every_frames)):
            self.write_fits(rt)

    def idle(self) -> None:
        """Called when no frame is waiting: flush what the cadences deferred."""
        engine = self.engine
        out = engine.config.output
        now = time.monotonic()
        for rt in engine.runtimes.values():
            rt.session.release_scratch()  # no frame waits: the warp buffer is not needed
        engine.ingest.buffers.release()  # nor the frame buffers
        engine.solving.idle()  # the solve-field stopped during frames runs again
        engine.solving.poll()
        engine.solving.route_moves()
        for rt in list(engine.runtimes.values()):
            if rt.session.n_accepted and rt.accepted_since_preview > 0 and (
                    now - rt.last_preview_t >= out.preview_min_interval_s):
                self.render_preview(rt)
                self.publish_stack(rt)
            if (rt.frames_since_checkpoint > 0 and rt.stack_id not in engine.rebuilds
                    and now - rt.last_checkpoint_t >= out.checkpoint_every_s):
                engine.checkpointer.checkpoint(rt)

    def write_fits(self, rt: Runtime) -> bool:
        """Write ``stack.fits`` atomically; on StorageError log one line and go on."""
        t0 = time.perf_counter()
        try:
            # Views of the live state (no 10 B/px of map copies): written before the
            # worker folds in another frame.
            product = rt.session.product(copy=False)
            product.header.update(master_cards(self.engine.journal.stack_masters(rt.stack_id)))
            self.engine.solving.annotate(rt, product.header)
            write_stack_fits(rt.folder / FITS_NAME, product)
        except StorageError as exc:
            log.error("%s (stacking goes on)", exc)
            return False
        rt.accepted_since_fits = 0
        if self.engine.metrics is not None:
            self.engine.metrics.observe("livestack_stage_seconds", time.perf_counter() - t0,
                                        {"stage": "fits"})
        return True

    def render_preview(self, rt: Runtime) -> bool:
        """Render the JPEG, save ``preview.jpg`` and push it to viewers."""
        t0 = time.perf_counter()
        jpeg = rt.session.preview_jpeg()
        rt.accepted_since_preview = 0
        rt.last_preview_t = time.monotonic()
        rt.preview_version += 1
        if self.engine.hub is not None:
            self.engine.hub.publish_preview(rt.stack_id, rt.preview_version, jpeg)
        try:
            write_atomic(rt.folder / PREVIEW_NAME, jpeg)
        except StorageError as exc:
            log.error("%s (stacking goes on)", exc)
        if self.engine.metrics is not None:
            self.engine.metrics.observe("livestack_stage_seconds", time.perf_counter() - t0,
                                        {"stage": "preview"})
        return True

    def finalize(self) -> None:
        """Checkpoint and write ``stack.fits`` + preview for every stack with new work."""
        engine = self.engine
        engine.ingest.buffers.release()
        for rt in list(engine.runtimes.values()):
            rt.session.release_scratch()
            if rt.stack_id in engine.rebuilds:
                continue
            if rt.frames_since_checkpoint > 0:
                # The stack takes no more frames: its checkpoint is written while
                # stack.fits and the preview are (the wait below).
                engine.checkpointer.checkpoint(rt, final=True)
            if rt.session.n_accepted and (rt.accepted_since_fits or
                                          not (rt.folder / FITS_NAME).exists()):
                self.write_fits(rt)
            if rt.session.n_accepted and (rt.accepted_since_preview or
                                          not (rt.folder / PREVIEW_NAME).exists()):
                self.render_preview(rt)
        if not engine.checkpointer.wait(CHECKPOINT_WAIT_S):
            log.error("checkpoints not written within %.0f s", CHECKPOINT_WAIT_S)

    def summary(self, rt: Runtime) -> StackSummary:
        """The hub summary of a stack."""
        engine = self.engine
        session = rt.session
        return StackSummary(
            object=rt.key.get("object", ""), filter=rt.key.get("filter", ""),
            frames=session.n_accepted, frames_seen=rt.seen, rejected=rt.rejected,
            failed=rt.failed, total_exposure_s=session.total_exposure_s,
            sub_exposure_s=rt.key.get("exposure_s"), preview_version=rt.preview_version,
            state="paused" if engine.paused else
                  ("rebuilding" if rt.stack_id in engine.rebuilds else "running"),
            reference=session.reference_file, started=rt.started, updated=now_iso(),
            solve=engine.solving.status(rt.stack_id))

    def publish_stack(self, rt: Runtime) -> None:
        """Send the stack's summary to the hub (no-op without one)."""
        hub = self.engine.hub
        if hub is None:
            return
        summary = self.summary(rt)
        hub.update_stack(rt.stack_id, summary)
        hub.publish(StackEvent(rt.stack_id, summary))

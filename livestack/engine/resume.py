"""Resume: a live stack is its last checkpoint plus a replay of the later journal rows.

Stacks of the latest night (and any stack with pending rows) are restored when the engine
starts; older stacks when a frame routes to them. A checkpoint is trusted only when it
carries the stack's current ``generation`` and is not ahead of the journal.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING

from livestack.engine.rebuild import FILE_NAMES as REBUILD_FILES
from livestack.engine.state import FITS_NAME, Runtime, metrics_json, remove_files, stack_key_of
from livestack.errors import DescriptorsExhaustedError, FrameError, StorageError, TransientError
from livestack.pipeline.session import StackSession
from livestack.pipeline.types import Transform
from livestack.reasons import Reason
from livestack.service.limits import is_fd_exhaustion
from livestack.storage.checkpoint import CHECKPOINT_NAME, load_checkpoint, remove_stale_temps
from livestack.storage.journal import sha256_file
from livestack.storage.stackcheck import stack_fits_matches

if TYPE_CHECKING:
    from pathlib import Path

    from livestack.engine.core import Engine
    from livestack.pipeline.session import FrameOutcome
    from livestack.pipeline.types import FrameInfo
    from livestack.storage.journal import FrameRow

log = logging.getLogger("livestack.engine")


class Resumer:
    """Restores live stacks from their checkpoint and the journal.

    Parameters
    ----------
    engine : Engine
        Gives the journal, the configuration, the frame reader, the live stacks
        (``runtimes``) and the output cadence.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.journal = engine.journal

    def resume(self, should_stop: Callable[[], bool] = lambda: False) -> list[str]:
        """Restore the stacks with recent work and return the paths left ``pending``."""
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
                should_stop: Callable[[], bool] = lambda: False) -> Runtime:
        """The live stack ``stack_id``, restoring it (checkpoint + replay) if needed.

        Raises
        ------
        TransientError
            A replay ran out of file descriptors (the stack is restored afresh next time).
        JournalError
            The journal cannot be read or written.
        """
        engine = self.engine
        rt = engine.runtimes.get(stack_id)
        if rt is not None:
            return rt
        folder = engine.output_root / stack_id
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
        remove_files(folder, REBUILD_FILES)  # of a rebuild the last run did not finish
        for scratch in folder.glob(".livestack-integrate-*"):  # a killed rebuild's scratch
            shutil.rmtree(scratch, ignore_errors=True)
        row = self.journal.stack(stack_id)
        if row is None:
            key = stack_key_of(info) if info is not None else {}
            row = self.journal.ensure_stack(stack_id, key, str(folder.relative_to(
                engine.output_root)))
        session, seq = self._restore_checkpoint(stack_id, folder, row.generation)
        if session is None:
            session, seq = StackSession(stack_id, engine.config.pipeline), 0
        rt = Runtime(stack_id, folder, session, row.key, row.generation, last_seq=seq)
        rt.preview_version = engine.preview_versions.pop(stack_id, rt.preview_version)
        engine.runtimes[stack_id] = rt
        rows = self.journal.rows_after(stack_id, seq)
        if rows:
            log.info("%s: replaying %d journal row(s) after seq %d", stack_id, len(rows), seq)
        try:
            for jrow in rows:
                if should_stop():
                    break
                self.replay_row(rt, rt.session, jrow)
                rt.last_seq = max(rt.last_seq, jrow.seq or 0)
                rt.frames_since_checkpoint += 1
        except TransientError:
            engine.forget_runtime(rt)  # half restored: restored afresh when retried
            raise
        counts = self.journal.counts(stack_id)
        rt.seen = sum(counts.values())
        rt.rejected, rt.failed = counts["rejected"], counts["failed"]
        if rt.session.n_accepted:
            if rows:
                rt.accepted_since_fits = 1  # stack.fits is older than the replayed frames
            if not stack_fits_matches(folder / FITS_NAME, rt.session.n_accepted,
                                      len(rt.session.records)):
                engine.outputs.write_fits(rt)  # behind the checkpoint, truncated or missing
            if rows or engine.hub is not None:
                rt.accepted_since_preview = 1  # viewers get the restored stack at once
        engine.outputs.publish_stack(rt)
        return rt

    def _restore_checkpoint(self, stack_id: str, folder: Path, generation: int
                            ) -> tuple[StackSession | None, int]:
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
            session = StackSession.restore(stack_id, self.engine.config.pipeline, arrays,
                                           meta["session"])
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("%s: unusable checkpoint (%s); replaying the journal instead", path, exc)
            return None, 0
        log.info("%s: restored checkpoint at seq %d (%d frames)", stack_id, seq,
                 session.n_accepted)
        return session, seq

    def replay_row(self, rt: Runtime, session: StackSession, row: FrameRow,
                   transform: Transform | None = None, *, use_stored: bool = True
                   ) -> FrameOutcome | None:
        """Feed one journal row's file back into ``session`` (resume or rebuild).

        A file that is gone, changed or unreadable now is marked ``failed`` with reason
        ``replay_<reason>`` and None is returned.

        Raises
        ------
        DescriptorsExhaustedError
            No file descriptor was left (never a verdict on the frame).
        """
        try:
            sha = sha256_file(row.path)
            if sha != row.sha256:
                raise FrameError(Reason.CHANGED_ON_DISK,
                                 f"{row.path}: content changed since it was stacked", row.path)
            raw, info = self.engine.reader.read(row.path)
            masters = self.engine.reader.select_masters(info)
        except (FrameError, OSError) as exc:
            if is_fd_exhaustion(exc):  # never a verdict on the frame (issue 14)
                raise DescriptorsExhaustedError(f"{row.path}: {exc}") from None
            reason = exc.reason if isinstance(exc, FrameError) else Reason.VANISHED
            log.warning("%s: %s: cannot replay: %s", row.path, reason, exc)
            self.journal.finish(row.id, "failed", reason=f"replay_{reason}", message=str(exc),
                                stack_id=rt.stack_id, seq=row.seq)
            return None
        if transform is None and use_stored and row.transform is not None:
            transform = Transform.from_list(row.transform, row.model or "similarity")
        outcome = session.process(raw, info, masters, stored_transform=transform,
                                  overwrite_raw=True)
        if outcome.verdict != row.status:
            log.warning("%s: replay gave %s (%s) where the journal says %s", row.path,
                        outcome.verdict, outcome.reason, row.status)
            self.journal.finish(row.id, outcome.verdict, reason=outcome.reason,
                                message=outcome.message, stack_id=rt.stack_id,
                                metrics=metrics_json(outcome), weight=outcome.weight,
                                transform=row.transform, model=row.model, seq=row.seq)
        return outcome

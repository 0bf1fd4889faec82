"""Operator commands: validated on the server's side, executed in the worker.

``pause`` / ``resume`` / ``snapshot`` act at once; ``new_stack`` redirects a stack's
frames to a fresh stack; ``reset`` empties a stack (its frames stay in the journal,
inactive); ``exclude_frame`` and ``set_reference`` bump the stack's generation in the
journal and start a background rebuild.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from livestack.engine.state import FITS_NAME, PREVIEW_NAME
from livestack.errors import UsageError
from livestack.pipeline.session import StackSession
from livestack.service.hub import COMMANDS

if TYPE_CHECKING:
    from livestack.engine.core import Engine

log = logging.getLogger("livestack.engine")


class Commands:
    """Checks and runs operator commands.

    Parameters
    ----------
    engine : Engine
        Gives the journal, the live stacks, the routing redirects, the output cadence and
        the rebuild supervisor.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.journal = engine.journal

    def validate(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
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
        stack_id = args.get("stack_id", self.engine.current_stack)
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
            watch_root = self.engine.watch_root
            shown = os.path.join(str(watch_root), file) if watch_root else file
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

    def execute(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run a validated command (in the worker thread).

        Raises
        ------
        JournalError
            The journal cannot be written.
        StorageError
            A rebuild cannot be started.
        """
        engine = self.engine
        stack_id: str = args.get("stack_id") or ""
        if name == "pause":
            engine.paused = True
        elif name == "resume":
            engine.paused = False
        elif name == "snapshot":
            targets = [engine.runtimes[stack_id]] if stack_id in engine.runtimes else list(
                engine.runtimes.values())
            for rt in targets:
                engine.outputs.after_frame(rt, force=True)
            return {"ok": True, "stacks": [rt.stack_id for rt in targets]}
        elif name == "new_stack":
            return self.new_stack(stack_id)
        elif name == "reset":
            self.reset(stack_id)
        elif name == "exclude_frame":
            self.journal.deactivate(stack_id, [args["row_id"]])
            engine.rebuilder.start(stack_id, why="exclude_frame")
        elif name == "set_reference":
            self.journal.deactivate(stack_id, [])  # bump the generation only
            ref_row = self.journal.row(args["row_id"])
            engine.rebuilder.start(stack_id, why="set_reference",
                                   reference=ref_row.path if ref_row is not None else None)
        for rt in engine.runtimes.values():
            engine.outputs.publish_stack(rt)
        return {"ok": True}

    def new_stack(self, stack_id: str) -> dict[str, Any]:
        """Send the frames that go to ``stack_id`` to a new stack ``<base>-n<N>``."""
        engine = self.engine
        ingest = engine.ingest
        base = ingest.router_id(stack_id)
        n = 2
        existing = {s.id for s in self.journal.stacks()}
        while f"{base}-n{n}" in existing:
            n += 1
        new_id = f"{base}-n{n}"
        old = engine.runtimes.get(stack_id)
        ingest.redirects[base] = new_id
        self.journal.ensure_stack(new_id, old.key if old else {}, new_id)
        self.journal.set_state("redirects", ingest.redirects)
        if old is not None:
            engine.outputs.after_frame(old, force=True)
        log.info("new stack %s: frames of %s go there from now on", new_id, base)
        return {"ok": True, "stack_id": new_id}

    def reset(self, stack_id: str) -> None:
        """Empty a stack: its frames stay in the journal, inactive; a fresh session."""
        engine = self.engine
        self.journal.deactivate(stack_id)
        engine.rebuilder.cancel(stack_id)
        rt = engine.runtime(stack_id)
        row = self.journal.stack(stack_id)
        assert row is not None
        rt.session = StackSession(stack_id, engine.config.pipeline)
        rt.generation = row.generation
        rt.frames_since_checkpoint = 1
        rt.accepted_since_fits = rt.accepted_since_preview = 0
        rt.rejection_run = 0
        for name in (FITS_NAME, PREVIEW_NAME):
            with contextlib.suppress(FileNotFoundError):
                (rt.folder / name).unlink()  # our own outputs, stale after a reset
        engine.checkpointer.checkpoint(rt)
        log.info("%s: reset (the frames stay in the journal, inactive)", stack_id)

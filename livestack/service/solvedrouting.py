"""Route frames by their solved pointing: a jump the header did not report starts a stack.

A frame that does not align with its stack (``no_match``/``no_overlap``) is handed to
:meth:`SolvedRouting.unaligned`. Once the stack's reference is solved, the frame's own
centre is found in the background: from a celestial WCS in its header, else by
``solve-field`` on the stars the pipeline already detected, with the stack's pixel scale as
the hint (a few seconds). :meth:`SolvedRouting.route_moves`, called by the worker after
each frame and when idle, gives the centres to
:meth:`livestack.pipeline.routing.Router.route_solved`; a frame that moved farther than
``routing.solved_jump_fraction`` of the field diagonal is stacked again in the stack the
router names (an earlier stack already pointing there, else a new one), and the unaligned
frames of the old stack still waiting for a solve go with it. The worker never waits for a
solve: a move happens at the first frame or idle tick after the solve has finished.

The solve of the moved frame is the WCS of the new stack's reference (the frame is the
new stack's first): it is handed to :class:`~livestack.service.solving.StackSolving` as a
seed, so the new stack is not solved a second time.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

from astropy.io import fits

from livestack.pipeline.types import FrameInfo, StarList
from livestack.pipeline.wcs import field_geometry
from livestack.storage.solver import (
    ChildPause,
    SolveResult,
    header_wcs,
    hints_from_header,
    solve_stars,
)

log = logging.getLogger(__name__)

#: Unaligned frames waiting for a solve, at most (more are left to the failure run).
MAX_QUEUED = 8


@dataclass
class FrameSolve:
    """One unaligned frame waiting for (or having) its solved centre.

    Attributes
    ----------
    stack_id : str
        The engine's stack the frame was rejected in.
    row_id : int
        Its journal row.
    info : FrameInfo
    stars : StarList or None
        Stars the pipeline detected in the frame (0-based pixels of ``info.shape``).
    state : str
        ``queued``, ``solving`` or ``done``.
    centre : tuple of float or None
        ``(ra_deg, dec_deg)`` of the frame's centre once found.
    how : str
        ``"WCS header"`` or ``"plate solve"``; the reason when not found.
    result : SolveResult or None
        The plate solve, when one ran.
    """

    stack_id: str
    row_id: int
    info: FrameInfo
    stars: StarList | None
    state: str = "queued"
    centre: tuple[float, float] | None = None
    how: str = ""
    result: SolveResult | None = None
    thread: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)


class SolvedRouting:
    """The unaligned frames of the live stacks and their solved centres (worker thread).

    Parameters
    ----------
    solving : StackSolving
        Owner: its ``engine`` (journal, router, redirects, ``_reroute``), ``jobs`` (each
        stack's solve), ``config`` (index folder, time limit) and ``pause``.
    """

    def __init__(self, solving: Any) -> None:
        self.solving = solving
        self.queue: list[FrameSolve] = []
        self.ready: list[FrameSolve] = []
        self._moving = False

    @property
    def running(self) -> bool:
        """True while a frame's solve runs."""
        return any(r.state == "solving" for r in self.queue)

    @property
    def pending(self) -> bool:
        """True while frames wait for a solve or a move."""
        return bool(self.queue or self.ready)

    def unaligned(self, stack_id: str, row_id: int, info: FrameInfo,
                  stars: StarList | None) -> None:
        """Queue a frame that did not align with ``stack_id`` (cheap: no I/O)."""
        if len(self.queue) >= MAX_QUEUED:
            log.debug("%s: not solved for routing (%d frames already wait)", info.path,
                      len(self.queue))
            return
        self.queue.append(FrameSolve(stack_id, row_id, info, stars))

    def take_in(self) -> None:
        """Move finished solves to ``ready`` (their moves are made by :meth:`route_moves`)."""
        for req in [r for r in self.queue if r.state == "solving" and r.done.is_set()]:
            req.state = "done"
            self.queue.remove(req)
            if req.centre is not None:
                self.ready.append(req)
            else:
                log.info("%s: does not align with %s and its pointing is unknown (%s)",
                         req.info.path, req.stack_id, req.how)

    def start_next(self) -> bool:
        """Start the oldest frame solve whose stack is solved; True when one started.

        Frames of a stack that failed to solve are dropped (nothing to compare with);
        those of a stack still being solved wait.
        """
        for req in list(self.queue):
            if req.state != "queued":
                continue
            job = self.solving.jobs.get(req.stack_id)
            if job is None or job.state == "failed":
                self.queue.remove(req)
                continue
            if job.state != "solved" or job.field is None:
                continue
            self._start(req, float(job.field["scale_arcsec"]))
            return True
        return False

    def cancel_all(self) -> None:
        """Kill running frame solves (their children) without waiting."""
        for req in list(self.queue):
            req.cancel.set()

    def join(self, timeout_s: float) -> None:
        """Wait for cancelled frame solves' threads."""
        for req in list(self.queue):
            if req.thread is not None:
                req.thread.join(timeout=timeout_s)

    def route_moves(self) -> int:
        """Stack again the frames whose solved centre jumped; return how many moved.

        Re-entrant calls (the re-stacking itself ends in the worker's outcome handling,
        which calls this again) return 0 at once.
        """
        if self._moving:
            return 0
        self.take_in()
        moved = 0
        self._moving = True
        try:
            while self.ready:
                moved += self._move(self.ready.pop(0))
        finally:
            self._moving = False
        return moved

    # ----------------------------------------------------------------- internals

    def _start(self, req: FrameSolve, scale_arcsec: float) -> None:
        config = self.solving.config
        pause: ChildPause = self.solving.pause
        req.state = "solving"

        def run() -> None:
            try:
                _find_centre(req, scale_arcsec, config.index_dir, config.time_limit_s, pause)
            finally:
                req.done.set()

        log.info("%s: does not align with %s; plate solving it in the background to see "
                 "where it points", req.info.path, req.stack_id)
        req.thread = threading.Thread(target=run, name=f"solve-frame-{req.row_id}",
                                      daemon=True)
        req.thread.start()

    def _move(self, req: FrameSolve) -> int:
        engine = self.solving.engine
        assert req.centre is not None
        row = engine.journal.row(req.row_id)
        if row is None or row.stack_id != req.stack_id or row.status != "rejected":
            return 0  # moved meanwhile (a failure run, an operator command)
        old_router_id = engine._router_id(req.stack_id)
        try:
            decision = engine.router.route_solved(old_router_id, req.info, *req.centre)
        except (KeyError, ValueError) as exc:
            log.debug("%s: no solved routing (%s)", req.info.path, exc)
            return 0
        if decision is None:
            log.info("%s: its solved centre (%s) is within the field of %s: it stays rejected",
                     req.info.path, req.how, req.stack_id)
            return 0
        new_router_id, moved_deg = decision
        target = engine.redirects.get(new_router_id, new_router_id)
        # Unaligned frames of the old stack still waiting for a solve came after this one:
        # they most likely moved with it (if not, they come back here from the new stack).
        followers: list[FrameSolve] = []
        for other in [r for r in self.queue if r.state == "queued"
                      and r.stack_id == req.stack_id]:
            self.queue.remove(other)
            with_it = engine.router.route_solved(old_router_id, other.info, *req.centre)
            if with_it is not None and with_it[0] == new_router_id:
                followers.append(other)
        if req.result is not None and req.result.solved:
            self.solving.seed(target, req.info.path, req.result)
        why = f"routed: solved centre moved {moved_deg:.2f} deg"
        engine._reroute(req.stack_id, (req.info.path, *(f.info.path for f in followers)),
                        to_stack=target, why=why)
        return 1


def _find_centre(req: FrameSolve, scale_arcsec: float, index_dir: str, time_limit_s: float,
                 pause: ChildPause) -> None:
    """The background part: the frame's WCS header, else a solve of its stars."""
    try:
        header: Any = fits.getheader(req.info.path)
    except OSError as exc:
        log.debug("%s: header not readable (%s)", req.info.path, exc)
        header = fits.Header()
    existing = header_wcs(header)
    if existing is not None:
        try:
            geo = field_geometry(existing, req.info.shape)
        except ValueError as exc:
            req.how = f"its WCS header is not usable: {exc}"
            return
        if math.isfinite(geo.ra_deg) and math.isfinite(geo.dec_deg):
            req.centre, req.how = (geo.ra_deg, geo.dec_deg), "WCS header"
        else:
            req.how = "its WCS header gives no finite centre"
        return
    if req.stars is None:
        req.how = "no stars detected"
        return
    hints = hints_from_header(header, req.info, {"scale_arcsec": scale_arcsec})
    result = solve_stars(req.stars, req.info.shape, hints, index_dir=index_dir,
                         time_limit_s=time_limit_s, cancel=req.cancel, pause=pause)
    req.result = result
    if result.solved and result.cards is not None:
        geo = field_geometry(result.cards, req.info.shape)
        req.centre, req.how = (geo.ra_deg, geo.dec_deg), "plate solve"
    else:
        req.how = f"not solved: {result.message}"

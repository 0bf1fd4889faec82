"""Background plate solving of live stacks (the daemon's hook into the solver).

Each stack's reference frame is solved once, in a background thread that waits on a
niced ``solve-field`` child (:mod:`livestack.storage.solver`); the worker never waits.
The worker calls :meth:`StackSolving.after_frame` after every frame and
:meth:`StackSolving.poll` when idle: both only look at flags, start a solve when one is
due, and take in a finished result (journal note, frames' centre RA/Dec and position
angle, viewer alert, ``stack.fits`` rewrite). The stack's WCS goes into ``stack.fits``
through :meth:`StackSolving.annotate`.

A stack that does not solve (clouds, too few stars, a field narrower than the index
files cover) keeps no WCS; the solve is tried again once the stack holds twice as many
frames, on stars detected in the deeper stack, up to :data:`MAX_ATTEMPTS` times.
A change of reference (``set_reference``) is noticed and the new reference solved, with
the previous solution as the hint.

Frames that do not align are solved too, to route them by where they point
(:mod:`livestack.service.solvedrouting`). A running ``solve-field`` is stopped while the
worker processes a frame (:meth:`StackSolving.frame_started`) and continued when it is
idle (:meth:`StackSolving.idle`), so that a solve does not slow the frames on two cores.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.io import fits

from livestack.pipeline.types import FrameInfo, StarList, Transform
from livestack.pipeline.wcs import (
    WcsCards,
    field_geometry,
    frame_pointing,
    header_cards,
    max_offset_px,
    to_astropy,
)
from livestack.service.solvedrouting import SolvedRouting
from livestack.storage.solver import (
    ChildPause,
    SolveResult,
    header_wcs,
    hints_from_header,
    solve_stars,
    solver_problem,
)

log = logging.getLogger(__name__)

#: Solves of one reference (first on its own stars, then on deeper stacks).
MAX_ATTEMPTS = 4
#: A retry waits until the stack holds this many times the frames of the last attempt.
DEPTH_FACTOR = 2
#: An existing WCS in the frame that differs from ours by more than this is logged.
DISAGREE_PX = 3.0
#: Pointing rows are written to the journal in batches of this many frames.
POINTING_BATCH = 10


@dataclass
class _Job:
    """One stack's solve state (owned by the worker thread)."""

    reference: str
    shape: tuple[int, int]
    camera: str                       # shape and binning: the scale hint of later stacks
    state: str = "waiting"            # waiting | solving | solved | failed
    attempts: int = 0
    frames_at_attempt: int = 0
    started: float = 0.0
    result: SolveResult | None = None
    thread: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)  # kills its solve-field
    outcome: SolveResult | None = None  # set by the thread, taken in by the worker
    wcs: Any = None                   # astropy WCS of result.cards, built once
    field: dict[str, Any] | None = None  # field_geometry(...).as_dict(), computed once


class StackSolving:
    """Solve live stacks in the background and give them and their frames a WCS.

    Parameters
    ----------
    engine : Engine
        The daemon's engine (``config.solver``, ``journal``, ``runtimes``, ``_alert``,
        ``_publish_stack``); called from its worker thread only.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.config = engine.config.solver
        self.jobs: dict[str, _Job] = {}
        self._pointing: list[tuple[int, float | None, float | None, float | None]] = []
        self.problem: str | None = None
        if self.config.enabled:
            self.problem = solver_problem(self.config.index_dir)
            if self.problem is not None:
                log.warning("%s; everything else works", self.problem)
        #: Solutions by camera (shape and binning): the scale hint of new stacks.
        self.cameras: dict[str, dict[str, float]] = dict(
            engine.journal.get_state("solver:cameras", {}) or {})
        #: Stops solve-field children while a frame is processed.
        self.pause = ChildPause()
        #: Unaligned frames solved to route them by their pointing.
        self.routing = SolvedRouting(self)
        #: stack id -> (reference path, solve of that frame) from a solved-routing move.
        self._seeds: dict[str, tuple[str, SolveResult]] = {}

    @property
    def active(self) -> bool:
        """True when solving is on and possible on this machine."""
        return bool(self.config.enabled) and self.problem is None

    # ----------------------------------------------------------------- worker hooks

    def frame_started(self) -> None:
        """The worker starts on a frame: stop the running solve-field (SIGSTOP)."""
        self.pause.pause()

    def idle(self) -> None:
        """The worker is idle: let the solve-field run again (SIGCONT)."""
        self.pause.resume()

    def unaligned(self, rt: Any, row_id: int, info: FrameInfo,
                  stars: StarList | None) -> None:
        """A frame of ``rt`` did not align: find where it points, in the background."""
        if self.active:
            self.routing.unaligned(rt.stack_id, row_id, info, stars)

    def route_moves(self) -> int:
        """Re-stack the unaligned frames whose solved centre jumped; return how many moved.

        Called by the worker at the end of a frame's outcome handling and when idle; never
        waits for a solve.
        """
        if not self.active:
            return 0
        return self.routing.route_moves()

    def seed(self, stack_id: str, reference: str, result: SolveResult) -> None:
        """A solve of ``reference``, the first frame of ``stack_id``: its stack's solution."""
        self._seeds[stack_id] = (reference, result)

    def after_frame(self, rt: Any, row_id: int, transform: Transform | None,
                    accepted: bool) -> None:
        """After a frame: record its pointing, take in results, start a due solve."""
        if not self.active:
            return
        job = self._job(rt)
        if job is not None and job.state == "solved" and accepted and transform is not None \
                and job.wcs is not None:
            ra, dec, pa = frame_pointing(job.wcs, transform, job.shape)
            self._pointing.append((row_id, ra, dec, pa))
            if job.field is not None:  # the stack points where its latest frame does
                self._route_by(rt.stack_id, ra, dec,
                               math.hypot(job.field["width_deg"], job.field["height_deg"]))
        if len(self._pointing) >= POINTING_BATCH:
            self._flush_pointing()
        self.poll()

    def poll(self) -> None:
        """Take in finished solves and start due ones (worker thread; never blocks)."""
        if not self.active:
            return
        for stack_id, job in list(self.jobs.items()):
            if job.state == "solving" and job.done.is_set():
                self._finish(stack_id, job)
        self.routing.take_in()
        if any(j.state == "solving" for j in self.jobs.values()) or self.routing.running:
            return  # one solve at a time: the machine may have only 2 cores
        if self.routing.start_next():
            return  # frames waiting to be routed come before deeper retries
        for stack_id, rt in list(self.engine.runtimes.items()):
            current = self._job(rt)
            if current is None or stack_id in getattr(self.engine, "rebuilds", {}):
                continue
            n, done_at = rt.session.n_accepted, current.frames_at_attempt
            due = current.state == "waiting" or (
                current.state == "failed" and current.attempts < MAX_ATTEMPTS
                and current.result is not None
                and current.result.reason in ("not_solved", "too_few_stars")
                and n >= max(DEPTH_FACTOR * done_at, done_at + 2))
            if due:
                self._start(rt, current)
                return
        self._flush_pointing()

    def drain(self, timeout_s: float | None = None) -> None:
        """Wait for the running solve (batch mode), then take it in."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None
                                       else self.config.time_limit_s + 10.0)
        self.pause.resume()  # nothing else runs now
        while self.active:
            self.poll()
            running = [j.done for j in self.jobs.values() if j.state == "solving"]
            running += [r.done for r in self.routing.queue if r.state == "solving"]
            if not running or time.monotonic() > deadline:
                break
            running[0].wait(0.2)
        self._flush_pointing()

    def close(self) -> None:
        """Cancel a running solve (its child is killed) and write pending pointings."""
        for job in self.jobs.values():
            job.cancel.set()
        self.routing.cancel_all()
        for job in self.jobs.values():
            if job.thread is not None:
                job.thread.join(timeout=10.0)
        self.routing.join(10.0)
        self._flush_pointing()

    def terminate(self) -> None:
        """Kill every solver child now, from any thread (the worker is stuck): no orphan."""
        for job in list(self.jobs.values()):
            job.cancel.set()
        self.routing.cancel_all()
        self.pause.kill_all()

    def annotate(self, rt: Any, header: dict[str, object]) -> None:
        """Add the stack's WCS cards (TAN or TAN-SIP) to a ``stack.fits`` header dict."""
        job = self.jobs.get(rt.stack_id)
        if job is None or job.state != "solved" or job.result is None \
                or job.result.cards is None or job.reference != rt.session.reference_file:
            return
        add_wcs_cards(header, job.result.cards)

    def status(self, stack_id: str) -> dict[str, Any] | None:
        """The viewer's view of a stack's solve (None when solving is off)."""
        if self.problem is not None:
            return {"state": "unavailable", "message": self.problem}
        if not self.active:
            return None
        job = self.jobs.get(stack_id)
        if job is None:
            return {"state": "waiting", "message": "waiting for a reference frame"}
        out: dict[str, Any] = {"state": job.state, "attempts": job.attempts}
        if job.state == "solving":
            out["message"] = f"solving (attempt {job.attempts})"
        elif job.result is not None:
            out["message"] = job.result.message
            out["reason"] = job.result.reason
            out["elapsed_s"] = round(job.result.elapsed_s, 1)
        if job.state == "solved" and job.result is not None and job.result.cards is not None:
            out["wcs"] = job.result.cards
            out["shape"] = list(job.shape)
            out["field"] = job.field
        return out

    # ----------------------------------------------------------------- internals

    def _job(self, rt: Any) -> _Job | None:
        """The stack's job for its current reference (a new reference starts afresh)."""
        reference = rt.session.reference_file
        stars = rt.session.reference_stars
        if reference is None or stars is None:
            return None
        job = self.jobs.get(rt.stack_id)
        if job is None or job.reference != reference:
            if job is not None:
                log.info("%s: the reference changed to %s; solving it", rt.stack_id, reference)
                self._cancel_job(job)
            info = rt.session.first_info
            if info is None:
                return None
            job = _Job(reference, info.shape, _camera_key(info))
            self.jobs[rt.stack_id] = job
            seed = self._seeds.pop(rt.stack_id, None)
            if seed is not None and seed[0] == reference:
                # Solved already, to route it here: taken in by the next poll.
                job.attempts, job.frames_at_attempt = 1, rt.session.n_accepted
                job.state, job.started, job.outcome = "solving", time.monotonic(), seed[1]
                job.done.set()
        return job

    def _cancel_job(self, job: _Job) -> None:
        """Stop a solve of a reference the stack no longer has (its child is killed)."""
        job.cancel.set()
        if job.thread is not None:
            job.thread.join(timeout=10.0)

    def _start(self, rt: Any, job: _Job) -> None:
        session = rt.session
        deeper = job.attempts > 0
        image = session.stacked_image() if deeper else None
        stars: StarList | None = None if deeper else session.reference_stars
        previous = self._previous(rt.stack_id, job)
        job.attempts += 1
        job.frames_at_attempt = session.n_accepted
        job.state, job.started = "solving", time.monotonic()
        job.done.clear()
        detect_config = session.config.detect
        info = session.first_info
        stack_id = rt.stack_id

        def run() -> None:
            job.outcome = _solve_job(job, info, stars, image, detect_config, previous,
                                     self.config.index_dir, self.config.time_limit_s,
                                     job.cancel, self.pause)
            job.done.set()

        what = f"the stack of {session.n_accepted} frames" if deeper else job.reference
        log.info("%s: plate solving %s in the background (attempt %d)", stack_id, what,
                 job.attempts)
        job.thread = threading.Thread(target=run, name=f"solve-{stack_id}", daemon=True)
        job.thread.start()
        self.engine._publish_stack(rt)

    def _previous(self, stack_id: str, job: _Job) -> dict[str, float]:
        """Hint from an earlier solution of this stack or of the same camera."""
        old = self.engine.journal.get_state(f"solver:{stack_id}")
        if old and old.get("solved") and old.get("field"):
            f = old["field"]
            return {"ra_deg": f["ra_deg"], "dec_deg": f["dec_deg"],
                    "scale_arcsec": f["scale_arcsec"]}
        return dict(self.cameras.get(job.camera, {}))

    def _finish(self, stack_id: str, job: _Job) -> None:
        result = job.outcome
        rt = self.engine.runtimes.get(stack_id)
        if result is None or rt is None or rt.session.reference_file != job.reference:
            return
        job.result = result
        note: dict[str, Any] = {"reference": job.reference, "attempt": job.attempts,
                                "frames": job.frames_at_attempt, **result.as_dict()}
        if result.solved and result.cards is not None:
            job.state = "solved"
            job.wcs = to_astropy(result.cards)
            geo = field_geometry(job.wcs, job.shape)
            job.field = note["field"] = geo.as_dict()
            note["wcs"] = result.cards
            log.info("%s: %s", stack_id, result.message)
            self.cameras[job.camera] = {"scale_arcsec": geo.scale_arcsec}
            self._route_by(stack_id, geo.ra_deg, geo.dec_deg,
                           math.hypot(geo.width_deg, geo.height_deg))
            self.engine.journal.set_state("solver:cameras", self.cameras)
            self._check_existing(stack_id, job, result.cards)
            self._all_pointings(stack_id, job)
            self.engine.write_fits(rt)  # stack.fits gets the WCS now, not at the cadence
        else:
            job.state = "failed"
            retry = (job.attempts < MAX_ATTEMPTS
                     and result.reason in ("not_solved", "too_few_stars"))
            message = f"{stack_id}: not plate-solved: {result.message}" + (
                "; trying again on a deeper stack" if retry else "")
            note["retry"] = retry
            if result.reason != "cancelled":
                self.engine._alert("warning", "not_solved", message, stack_id)
        self.engine.journal.set_state(f"solver:{stack_id}", note)
        self.engine._publish_stack(rt)

    def _route_by(self, stack_id: str, ra_deg: float, dec_deg: float,
                  diagonal_deg: float) -> None:
        """Tell the router where the stack points (its frames are routed by it too)."""
        router = getattr(self.engine, "router", None)
        if router is None:
            return
        try:
            router.set_solved_centre(self.engine._router_id(stack_id), ra_deg, dec_deg,
                                     diagonal_deg)
        except (KeyError, ValueError) as exc:  # a stack the router does not know
            log.debug("%s: solved centre not given to the router (%s)", stack_id, exc)

    def _check_existing(self, stack_id: str, job: _Job, cards: WcsCards) -> None:
        """Log when the capture software's own WCS disagrees with ours."""
        try:
            theirs = header_wcs(fits.getheader(job.reference))
        except OSError:
            return
        if theirs is None:
            return
        try:
            offset = max_offset_px(theirs, cards, job.shape)
        except ValueError:
            return
        if offset > DISAGREE_PX:
            log.warning("%s: the WCS in %s disagrees with our solution by up to %.1f px "
                        "(ours is used)", stack_id, job.reference, offset)

    def _all_pointings(self, stack_id: str, job: _Job) -> None:
        for row in self.engine.journal.rows(stack_id=stack_id, status="accepted"):
            if row.transform is None or not row.active:
                continue
            transform = Transform.from_list(row.transform, row.model or "similarity")
            ra, dec, pa = frame_pointing(job.wcs, transform, job.shape)
            self._pointing.append((row.id, ra, dec, pa))
        self._flush_pointing()

    def _flush_pointing(self) -> None:
        if self._pointing:
            batch, self._pointing = self._pointing, []
            self.engine.journal.set_pointing(batch)


def _solve_job(job: _Job, info: FrameInfo, stars: StarList | None,
               image: np.ndarray | None, detect_config: Any, previous: dict[str, float],
               index_dir: str, time_limit_s: float, cancel: threading.Event,
               pause: ChildPause | None = None) -> SolveResult:
    """The background part: hints from the reference header, stars, solve-field."""
    from livestack.pipeline.debayer import luminance
    from livestack.pipeline.detect import detect_stars

    try:
        header = fits.getheader(job.reference)
    except OSError as exc:
        log.info("%s: header not readable for hints (%s)", job.reference, exc)
        header = fits.Header()
    hints = hints_from_header(header, info, previous)
    if stars is None and image is not None:
        lum = luminance(image) if image.ndim == 3 else image
        stars = detect_stars(np.ascontiguousarray(lum, dtype=np.float32), detect_config)[0]
    assert stars is not None
    return solve_stars(stars, job.shape, hints, index_dir=index_dir,
                       time_limit_s=time_limit_s, cancel=cancel, pause=pause)


def _camera_key(info: FrameInfo) -> str:
    return f"{info.shape[1]}x{info.shape[0]} bin {info.binning[0]}x{info.binning[1]}"


def add_wcs_cards(header: MutableMapping[str, Any], cards: WcsCards) -> None:
    """Put WCS cards into a header dict or astropy Header (replacing any earlier WCS)."""
    for key in [k for k in header if k.startswith(("CTYPE", "CRVAL", "CRPIX", "CD1_", "CD2_",
                                                     "A_", "B_", "AP_", "BP_"))]:
        del header[key]
    for key, value, _comment in header_cards(cards):
        header[key] = value


def integration_wcs(session: Any, plan: Any, header: MutableMapping[str, Any]) -> bool:
    """Give a ``livestack integrate`` result the live stack's WCS, on the plan's reference.

    The live ``stack.fits`` (in ``session.folder``) carries the solved WCS of the grid
    its REFFRAME defines, which is the grid the session's stored transforms map to. The
    plan's reference (possibly another frame) maps onto that grid through its stored
    transform, so the result's WCS is that WCS composed with it.

    Returns
    -------
    bool
        True when WCS cards were added (False: the live stack was not solved, or its
        ``stack.fits`` is missing or on another reference).
    """
    from livestack.pipeline.wcs import compose

    if session.folder is None:
        return False
    try:
        live = fits.getheader(session.folder / "stack.fits")
    except OSError:
        return False
    cards = header_wcs(live)
    stored_ref = str(live.get("REFFRAME", ""))
    if cards is None or not any(f.path == stored_ref for f in session.frames):
        return False
    original = next((f for f in session.frames if f.row_id == plan.reference.row_id
                     and f.path == plan.reference.path), None)
    if original is None:
        return False
    add_wcs_cards(header, compose(cards, original.transform))
    return True

"""Offline plate solving with astrometry.net's ``solve-field`` in a child process.

Why a subprocess to ``solve-field`` rather than the PyPI ``astrometry`` package: the
Debian package ships the solver and the Tycho-2 index files together, so nothing is
built or downloaded; a child process can be niced, killed (its whole process group) at a
time limit or at shutdown, and a crash inside the C solver cannot take the daemon down.
``solve-field`` takes our own star list as an ``xyls`` table (no re-detection), the
pixel-scale and position hints, ``--cpulimit`` and ``--odds-to-solve``; it stops at the
first match whose Bayesian log-odds pass the threshold (the early stop) and writes the
TAN-SIP WCS it verified.

A wrong hint cannot produce a wrong WCS: a match is only accepted after astrometry.net
verifies it against the index stars at odds of 1e9 to 1; a hint only narrows the
search. When a hinted search fails, the next attempt drops the position hint (within
what is left of the time limit); a scale hint is kept (see :func:`_attempt_plan`).

On two cores even a niced, ``SCHED_IDLE`` child slows the frame path (memory bandwidth,
caches, the second core's other work): :class:`ChildPause` stops the child's process group
with SIGSTOP while a frame is processed and continues it (SIGCONT) when the worker is idle.
Paused time does not count against the time limit. A killed daemon leaves no stopped
``solve-field`` behind: the child gets SIGKILL when the thread that started it dies (where
``setpriv`` exists), and its group, orphaned, gets the kernel's SIGHUP + SIGCONT.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from livestack.pipeline.types import FrameInfo, StarList
from livestack.pipeline.wcs import WcsCards, clean_cards, field_geometry

log = logging.getLogger(__name__)

SOLVE_FIELD = "solve-field"
#: Debian packages that provide the solver and the index files.
INSTALL_HINT = ("apt-get install astrometry.net astrometry-data-tycho2-07 "
                "astrometry-data-tycho2-08 astrometry-data-tycho2-09 "
                "astrometry-data-tycho2-10-19")
#: Log-odds threshold: astrometry.net's default, 1e9 to 1 against a false match.
ODDS_TO_SOLVE = 1e9
#: Fewer stars than this cannot be solved (a quad needs 4 plus verification stars).
MIN_STARS = 8
#: Stars handed to the solver (brightest first); more only slow the search.
MAX_STARS = 300
_LOG_ODDS = re.compile(r"log-odds ratio ([0-9.eE+-]+)")
_INDEX = re.compile(r"solved with index (\S+?)\.?$", re.MULTILINE)


@dataclass(frozen=True)
class SolveHints:
    """What is known about the field before solving.

    Attributes
    ----------
    ra_deg, dec_deg : float or None
        Approximate centre, degrees.
    radius_deg : float
        Search radius around the centre, degrees.
    scale_low_arcsec, scale_high_arcsec : float or None
        Pixel-scale range, arcseconds per pixel.
    sources : tuple of str
        Where the hints came from (``"RA/DEC"``, ``"OBJCTRA/OBJCTDEC"``, ``"WCS"``,
        ``"pixel scale"``, ``"previous solution"``...).
    """

    ra_deg: float | None = None
    dec_deg: float | None = None
    radius_deg: float = 5.0
    scale_low_arcsec: float | None = None
    scale_high_arcsec: float | None = None
    sources: tuple[str, ...] = ()

    @property
    def has_position(self) -> bool:
        """True when a centre is known."""
        return self.ra_deg is not None and self.dec_deg is not None

    @property
    def has_scale(self) -> bool:
        """True when a pixel-scale range is known."""
        return self.scale_low_arcsec is not None and self.scale_high_arcsec is not None

    def without_position(self) -> SolveHints:
        """The same hints with the centre dropped."""
        return SolveHints(None, None, self.radius_deg, self.scale_low_arcsec,
                          self.scale_high_arcsec, self.sources)

    def without_scale(self) -> SolveHints:
        """No hints at all (a blind solve)."""
        return SolveHints(sources=())


@dataclass
class SolveResult:
    """The outcome of one solve (one or more attempts).

    Attributes
    ----------
    solved : bool
    cards : WcsCards or None
        The verified WCS of the image the stars came from.
    reason : str
        ``"solved"``, ``"too_few_stars"``, ``"not_solved"``, ``"solver_missing"``,
        ``"cancelled"`` or ``"solver_failed"``.
    message : str
        One line for logs, journal and viewer.
    elapsed_s : float
        Wall time of all attempts, seconds.
    attempts : list of str
        What each attempt used (``"position+scale"``, ``"scale"``, ``"blind"``).
    log_odds : float or None
        Log-odds of the accepted match.
    index : str
        Index file that solved it.
    n_stars : int
        Stars handed to the solver.
    """

    solved: bool
    cards: WcsCards | None
    reason: str
    message: str
    elapsed_s: float = 0.0
    attempts: list[str] = field(default_factory=list)
    log_odds: float | None = None
    index: str = ""
    n_stars: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (journal note)."""
        return {"solved": self.solved, "reason": self.reason, "message": self.message,
                "elapsed_s": round(self.elapsed_s, 2), "attempts": self.attempts,
                "log_odds": self.log_odds, "index": self.index, "n_stars": self.n_stars}


def index_files(index_dir: str | os.PathLike[str]) -> list[Path]:
    """The astrometry.net index files (``index-*.fits``) in ``index_dir``."""
    folder = Path(index_dir)
    try:
        return sorted(p for p in folder.glob("index-*.fits") if p.is_file())
    except OSError:
        return []


def solver_problem(index_dir: str | os.PathLike[str]) -> str | None:
    """Why solving cannot work on this machine (one line), or None when it can."""
    if shutil.which(SOLVE_FIELD) is None:
        return (f"plate solving is off: astrometry.net's {SOLVE_FIELD} is not installed "
                f"(Debian/Ubuntu: {INSTALL_HINT})")
    if not index_files(index_dir):
        return (f"plate solving is off: no astrometry.net index files (index-*.fits) in "
                f"{index_dir} (Debian/Ubuntu: {INSTALL_HINT}, or set solver.index_dir)")
    return None


# ------------------------------------------------------------------------------ hints


def hints_from_header(header: Mapping[str, Any], info: FrameInfo,
                      previous: Mapping[str, float] | None = None) -> SolveHints:
    """Gather solve hints from a frame header and what we solved before.

    Parameters
    ----------
    header : mapping
        The frame's FITS header: an existing celestial WCS (capture software that
        solved) is the best hint.
    info : FrameInfo
        The frame's parsed header: ``shape``, ``ra_deg``/``dec_deg`` (RA/DEC,
        OBJCTRA/OBJCTDEC) and ``pixel_scale_arcsec`` (pixel-scale keys, FOCALLEN with
        XPIXSZ and binning).
    previous : mapping or None
        A previous solution of the same stack or camera: ``scale_arcsec`` and optionally
        ``ra_deg``/``dec_deg``.

    Returns
    -------
    SolveHints
        Values outside the sky (|Dec| > 90) or non-positive scales are ignored.
    """
    ny, nx = info.shape
    ra: float | None = None
    dec: float | None = None
    scale: float | None = None
    sources: list[str] = []
    scale_tol = 0.1
    existing = header_wcs(header)
    if existing is not None:
        geo = field_geometry(existing, info.shape)
        ra, dec, scale, scale_tol = geo.ra_deg, geo.dec_deg, geo.scale_arcsec, 0.05
        sources.append("WCS")
    if ra is None and info.ra_deg is not None and info.dec_deg is not None \
            and abs(info.dec_deg) <= 90.0:
        ra, dec = info.ra_deg, info.dec_deg
        sources.append("header RA/Dec")
    if previous:
        if scale is None and previous.get("scale_arcsec"):
            scale, scale_tol = float(previous["scale_arcsec"]), 0.03
            sources.append("previous solution")
        if ra is None and previous.get("ra_deg") is not None \
                and previous.get("dec_deg") is not None:
            ra, dec = float(previous["ra_deg"]), float(previous["dec_deg"])
            sources.append("previous solution")
    if scale is None and info.pixel_scale_arcsec is not None and info.pixel_scale_arcsec > 0:
        scale = float(info.pixel_scale_arcsec)
        sources.append("pixel scale")
    radius = 5.0
    if scale is not None:
        diagonal_deg = math.hypot(nx, ny) * scale / 3600.0
        # Mount pointing is good to a field or so; a larger miss falls back to a search
        # without the position.
        radius = max(1.0, 2.0 * diagonal_deg)
    return SolveHints(
        ra_deg=ra, dec_deg=dec, radius_deg=radius,
        scale_low_arcsec=scale * (1 - scale_tol) if scale is not None else None,
        scale_high_arcsec=scale * (1 + scale_tol) if scale is not None else None,
        sources=tuple(dict.fromkeys(sources)))


def header_wcs(header: Mapping[str, Any]) -> WcsCards | None:
    """A celestial TAN WCS already in a header, or None."""
    if not str(header.get("CTYPE1", "")).startswith("RA---TAN"):
        return None
    try:
        return clean_cards(dict(header))
    except (ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------ pausing

# The child gets its own process group (stopped, continued and killed as a group) but stays
# in the daemon's session: when the daemon dies, a stopped group left without it is
# orphaned, and the kernel sends it SIGHUP + SIGCONT (in a session of its own it would stay
# stopped for ever). Python 3.10 has no ``process_group``; setpgid is async-signal-safe.
_OWN_GROUP: dict[str, Any] = ({"process_group": 0} if sys.version_info >= (3, 11)
                              else {"preexec_fn": os.setpgrp})



class ChildPause:
    """Stop (SIGSTOP) and continue (SIGCONT) the process groups of running solver children.

    Thread-safe: the worker calls :meth:`pause` and :meth:`resume`; solve threads register
    their child with :meth:`child`. A child started while paused is stopped at once. Every
    child is continued before it is killed or waited for (a stopped process never exits on
    its own), and :meth:`kill_all` ends every registered group from any thread.

    Parameters
    ----------
    clock : callable, optional
        Monotonic seconds (tests give a fake one).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._groups: set[int] = set()
        self._paused_since: float | None = None
        self._paused_total_s = 0.0
        #: Set when a child is registered (callers and tests wait on it).
        self.registered = threading.Event()

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return self._paused_since is not None

    def paused_s(self) -> float:
        """Seconds spent paused since this object was made (the current pause included)."""
        with self._lock:
            now = self._clock()
            return self._paused_total_s + (0.0 if self._paused_since is None
                                           else now - self._paused_since)

    def pause(self) -> None:
        """Stop every registered child group (no-op when already paused)."""
        with self._lock:
            if self._paused_since is not None:
                return
            self._paused_since = self._clock()
            for pgid in self._groups:
                _signal_group(pgid, signal.SIGSTOP)

    def resume(self) -> None:
        """Continue every registered child group (no-op when not paused)."""
        with self._lock:
            if self._paused_since is None:
                return
            self._paused_total_s += self._clock() - self._paused_since
            self._paused_since = None
            for pgid in self._groups:
                _signal_group(pgid, signal.SIGCONT)

    def kill_all(self) -> None:
        """Kill every registered child group (continued first); the solve threads reap them."""
        with self._lock:
            for pgid in self._groups:
                _signal_group(pgid, signal.SIGCONT)
                _signal_group(pgid, signal.SIGKILL)

    def groups(self) -> list[int]:
        """Process-group ids of the registered children."""
        with self._lock:
            return sorted(self._groups)

    @contextmanager
    def child(self, proc: subprocess.Popen) -> Iterator[None]:
        """Register a child that leads its own process group (pgid = pid) for the block.

        On leaving, the child's group is continued so that a kill or a wait after the block
        cannot hang on a stopped process.
        """
        with self._lock:
            self._groups.add(proc.pid)
            if self._paused_since is not None:
                _signal_group(proc.pid, signal.SIGSTOP)
        self.registered.set()
        try:
            yield
        finally:
            with self._lock:
                self._groups.discard(proc.pid)
                _signal_group(proc.pid, signal.SIGCONT)


def _signal_group(pgid: int, signum: int) -> None:
    # The group may have exited between the check and the signal: nothing to do then.
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------ solving


def _write_xyls(path: Path, stars: StarList) -> int:
    n = min(len(stars), MAX_STARS)
    order = np.argsort(-stars.flux, kind="stable")[:n]
    xy = stars.xy[order] + 1.0  # FITS pixel coordinates are 1-based
    cols = [fits.Column(name="X", format="D", array=xy[:, 0]),
            fits.Column(name="Y", format="D", array=xy[:, 1]),
            fits.Column(name="FLUX", format="D", array=stars.flux[order])]
    fits.BinTableHDU.from_columns(cols).writeto(path, overwrite=True)
    return n


def _command(xyls: Path, work: Path, shape: tuple[int, int], hints: SolveHints,
             index_dir: str, cpu_limit_s: float) -> list[str]:
    ny, nx = shape
    config = work / "solver.cfg"
    config.write_text(f"add_path {index_dir}\nautoindex\n", encoding="utf-8")
    # SCHED_IDLE (where chrt exists) runs the search only on otherwise idle CPU time, so
    # the live frames keep their pace; nice 19 on top for systems without it.
    idle = ["chrt", "--idle", "0"] if shutil.which("chrt") else []
    # SIGKILL when the starting thread dies (a crashed or SIGKILLed daemon): a paused child
    # would otherwise stay stopped for ever. Its own children (same group) then get the
    # kernel's SIGHUP + SIGCONT for a stopped orphaned process group.
    death = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
    cmd = [*death, *idle, "nice", "-n", "19", SOLVE_FIELD, str(xyls), "--config", str(config),
           "--width", str(nx), "--height", str(ny), "--x-column", "X", "--y-column", "Y",
           "--sort-column", "FLUX", "--dir", str(work), "--overwrite", "--no-plots",
           "--new-fits", "none", "--rdls", "none", "--corr", "none", "--match", "none",
           "--index-xyls", "none", "--temp-dir", str(work), "--crpix-center",
           "--cpulimit", str(max(1, math.ceil(cpu_limit_s))),
           "--odds-to-solve", f"{ODDS_TO_SOLVE:g}", "--tweak-order", "2",
           "--wcs", str(work / "out.wcs"), "--solved", str(work / "out.solved")]
    if hints.has_scale:
        cmd += ["--scale-units", "arcsecperpix", "--scale-low", f"{hints.scale_low_arcsec:.5f}",
                "--scale-high", f"{hints.scale_high_arcsec:.5f}"]
    if hints.has_position:
        cmd += ["--ra", f"{hints.ra_deg:.6f}", "--dec", f"{hints.dec_deg:.6f}",
                "--radius", f"{hints.radius_deg:.4f}"]
    return cmd


def _kill(proc: subprocess.Popen) -> None:
    # Continued first: a SIGSTOPped group (see ChildPause) must run to act on the kill.
    _signal_group(proc.pid, signal.SIGCONT)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _attempt_plan(hints: SolveHints) -> list[tuple[str, SolveHints]]:
    """Hinted first; then without the position (a header pointing may be wrong).

    A known scale is kept: searching all scales costs minutes, and a wrong scale ends
    as "not solved" within the time limit. With no hint at all the search is blind.
    """
    plan: list[tuple[str, SolveHints]] = []
    if hints.has_position:
        plan.append(("position+scale" if hints.has_scale else "position", hints))
    if hints.has_scale:
        plan.append(("scale", hints.without_position()))
    elif not hints.has_position:
        plan.append(("blind", hints.without_scale()))
    return plan


def solve_stars(stars: StarList, shape: tuple[int, int], hints: SolveHints, *,
                index_dir: str, time_limit_s: float,
                cancel: threading.Event | None = None,
                pause: ChildPause | None = None) -> SolveResult:
    """Solve a star list with ``solve-field`` (niced child process, killable).

    Parameters
    ----------
    stars : StarList
        Detected stars in 0-based pixel coordinates of an image of ``shape``.
    shape : tuple of int
        ``(ny, nx)``.
    hints : SolveHints
    index_dir : str
        Folder of the ``index-*.fits`` files.
    time_limit_s : float
        Budget for all attempts together (CPU limit of each child and wall limit).
    cancel : threading.Event, optional
        Set it to kill the child and return ``reason="cancelled"``.
    pause : ChildPause, optional
        Registers the child so the caller can stop it while frames are processed; time
        spent paused does not count against ``time_limit_s``.

    Returns
    -------
    SolveResult
        Never raises for solver problems: a missing solver, a crash or a timeout is a
        result with a reason.
    """
    t0 = time.monotonic()
    paused0 = pause.paused_s() if pause is not None else 0.0

    def running_s() -> float:
        paused = pause.paused_s() - paused0 if pause is not None else 0.0
        return time.monotonic() - t0 - paused

    problem = solver_problem(index_dir)
    if problem is not None:
        return SolveResult(False, None, "solver_missing", problem)
    if len(stars) < MIN_STARS:
        return SolveResult(False, None, "too_few_stars",
                           f"only {len(stars)} stars detected (at least {MIN_STARS} needed)",
                           n_stars=len(stars))
    result = SolveResult(False, None, "not_solved", "", n_stars=0)
    with tempfile.TemporaryDirectory(prefix="livestack-solve-") as tmp:
        work = Path(tmp)
        xyls = work / "stars.xyls"
        result.n_stars = _write_xyls(xyls, stars)
        for name, attempt in _attempt_plan(hints):
            left = time_limit_s - running_s()
            if left < 1.0:
                break
            result.attempts.append(name)
            outcome = _run_once(_command(xyls, work, shape, attempt, index_dir, left),
                                work, left, cancel, pause)
            if outcome is None:
                result.reason, result.message = "cancelled", "solve cancelled"
                break
            code, text = outcome
            wcs_path = work / "out.wcs"
            if (work / "out.solved").exists() and wcs_path.exists():
                try:
                    cards = clean_cards(fits.getheader(wcs_path))
                except (OSError, ValueError) as exc:
                    result.reason = "solver_failed"
                    result.message = f"solver output unreadable: {exc}"
                    break
                odds = _LOG_ODDS.findall(text)
                index = _INDEX.findall(text)
                result.solved, result.cards, result.reason = True, cards, "solved"
                result.log_odds = float(odds[-1]) if odds else None
                result.index = Path(index[-1]).name if index else ""
                break
            if code not in (0, None):
                tail = text.strip().splitlines()[-1:] or [""]
                log.debug("solve-field exited with %s: %s", code, tail[0])
        result.elapsed_s = time.monotonic() - t0
        if not result.solved and not result.message:
            result.message = (f"no confident match among {result.n_stars} stars "
                              f"({', '.join(result.attempts) or 'no attempt'}, "
                              f"{result.elapsed_s:.0f} s)")
        elif result.solved:
            geo = field_geometry(result.cards or {}, shape)
            result.message = (f"solved in {result.elapsed_s:.1f} s: RA {geo.ra_deg:.4f} "
                              f"Dec {geo.dec_deg:+.4f}, {geo.scale_arcsec:.3f}\"/px, "
                              f"PA {geo.pa_deg:.1f} deg ({result.attempts[-1]})")
    return result


def _run_once(cmd: list[str], work: Path, wall_limit_s: float,
              cancel: threading.Event | None,
              pause: ChildPause | None = None) -> tuple[int | None, str] | None:
    """Run one ``solve-field``; None when cancelled. Output goes to a file (no pipe stall).

    The wall limit counts only the time the child was not paused.
    """
    for stale in ("out.wcs", "out.solved"):
        (work / stale).unlink(missing_ok=True)
    out_path = work / "solve.log"
    t0 = time.monotonic()
    paused0 = pause.paused_s() if pause is not None else 0.0
    registry = pause if pause is not None else ChildPause()
    with open(out_path, "wb") as out:
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, **_OWN_GROUP)
        except OSError as exc:
            return -1, f"cannot start {SOLVE_FIELD}: {exc}"
        with registry.child(proc):
            while True:
                try:
                    code: int | None = proc.wait(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    if cancel is not None and cancel.is_set():
                        _kill(proc)
                        return None
                    paused = registry.paused_s() - paused0
                    if time.monotonic() - t0 - paused > wall_limit_s + 5.0:
                        _kill(proc)
                        code = None
                        break
    return code, out_path.read_text(encoding="utf-8", errors="replace")

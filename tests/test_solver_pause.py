"""The solve-field child is stopped while frames run, continued when idle, never orphaned."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from livestack.pipeline.types import StarList
from livestack.sim.tycho import Catalogue, render_field, tan_cards
from livestack.storage.solver import ChildPause, SolveHints, SolveResult, solve_stars
from tests.daemon_helpers import Daemon
from tests.storage.test_solver import INDEX_DIR, require_solver


def _states(pgid: int) -> dict[int, str]:
    """``pid -> state letter`` of the live members of a process group (zombies left out)."""
    out: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out[int(entry.name)] = fields[0]
    return out


def _solver_children(pid: int) -> dict[int, int]:
    """``pid -> pgid`` of the live ``solve-field`` children of ``pid``."""
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z" and b"solve-field" in cmdline:
            out[int(entry.name)] = int(fields[2])
    return out


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    """Poll ``predicate`` (process states change asynchronously after a signal)."""
    tick = threading.Event()
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return True
        tick.wait(0.02)
    return predicate()


def test_paused_time_is_counted_once_and_only_while_paused() -> None:
    now = [100.0]
    pause = ChildPause(clock=lambda: now[0])
    now[0] += 5.0
    assert pause.paused_s() == 0.0 and not pause.paused
    pause.pause()
    now[0] += 2.0
    pause.pause()  # already paused: the pause goes on, not counted twice
    now[0] += 1.0
    assert pause.paused and pause.paused_s() == pytest.approx(3.0)
    pause.resume()
    now[0] += 10.0
    pause.resume()
    assert not pause.paused and pause.paused_s() == pytest.approx(3.0)
    pause.pause()
    now[0] += 0.5
    assert pause.paused_s() == pytest.approx(3.5)


def _unsolvable_stars() -> StarList:
    """Stars at random places: a blind search that only ends at its limit."""
    rng = np.random.default_rng(5)
    n = 200
    return StarList(rng.uniform(0, 2000, (n, 2)), rng.uniform(1.0, 100.0, n),
                    np.full(n, 3.0), np.ones(n))


@pytest.mark.solver
def test_a_paused_solve_is_stopped_continued_and_killed_as_a_group() -> None:
    require_solver()
    pause = ChildPause()
    cancel = threading.Event()
    results: list[SolveResult] = []

    def run() -> None:
        results.append(solve_stars(_unsolvable_stars(), (2000, 2000), SolveHints(),
                                   index_dir=INDEX_DIR, time_limit_s=120, cancel=cancel,
                                   pause=pause))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert pause.registered.wait(30)
        (pgid,) = pause.groups()
        assert os.getpgid(pgid) == pgid != os.getpgid(0)  # its own group, killable as one
        pause.pause()
        assert _wait_for(lambda: set(_states(pgid).values()) == {"T"}), _states(pgid)
        pause.resume()
        assert _wait_for(lambda: bool(_states(pgid)) and "T" not in _states(pgid).values())
        pause.pause()  # cancelled while stopped: continued, killed and reaped
        assert _wait_for(lambda: set(_states(pgid).values()) == {"T"})
        cancel.set()
        thread.join(30)
        assert not thread.is_alive()
        assert results[0].reason == "cancelled" and not results[0].solved
        assert _wait_for(lambda: not _states(pgid)), _states(pgid)
        assert pause.groups() == []
    finally:
        cancel.set()
        pause.resume()
        thread.join(30)


def _random_sky_frames(folder: Path, n: int) -> list[Path]:
    """Frames of a sky no index file knows (the solve runs until its time limit)."""
    rng = np.random.default_rng(3)
    m = 300
    ra = np.radians(83.8 + rng.uniform(-0.5, 0.5, m))
    dec = np.radians(-5.4 + rng.uniform(-0.5, 0.5, m))
    xyz = np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])
    catalogue = Catalogue(xyz, rng.uniform(8.0, 12.0, m).astype(np.float32))
    shape = (600, 800)
    paths = []
    for i in range(n):
        image = render_field(catalogue, tan_cards(83.8, -5.4, 3.0, shape), shape,
                             rng=np.random.default_rng(i))
        header = fits.Header({"IMAGETYP": "Light Frame", "EXPTIME": 30.0,
                              "DATE-OBS": f"2026-01-01T00:{i:02d}:00"})  # no hint: blind
        path = folder / f"f{i:02d}.fits"
        fits.PrimaryHDU(np.clip(image, 0, 60000).astype(np.uint16), header).writeto(path)
        paths.append(path)
    return paths


@pytest.mark.solver
def test_sigterm_with_a_stuck_worker_leaves_no_solve_field(tmp_path: Path) -> None:
    require_solver()
    watch = tmp_path / "in"
    watch.mkdir()
    _random_sky_frames(watch, 2)
    # The second frame sticks at "accumulate" for 60 s; the first frame's solve started
    # meanwhile and is stopped (SIGSTOP) because a frame is in progress.
    env = {**os.environ, "LIVESTACK_TEST_PAUSE_AT": "accumulate",
           "LIVESTACK_TEST_PAUSE_AFTER": "1"}
    env.pop("NOTIFY_SOCKET", None)
    d = Daemon(["run", "--watch", str(watch), "--output", str(tmp_path / "out"),
                "--port", "0"], env)
    groups: set[int] = set()
    try:
        d.wait_line(lambda s: "paused at accumulate" in s, timeout_s=180)
        assert _wait_for(lambda: bool(_solver_children(d.proc.pid))), "no solve-field child"
        groups = set(_solver_children(d.proc.pid).values())
        assert all(pgid != os.getpgid(d.proc.pid) for pgid in groups)
        assert _wait_for(lambda: all(set(_states(g).values()) == {"T"} for g in groups)), \
            [_states(g) for g in groups]
        d.proc.send_signal(signal.SIGTERM)
        # The stop limit is tested in test_daemon_process; here only what is left behind.
        code = d.proc.wait(timeout=30.0)
        left = [] if _wait_for(lambda: not any(_states(g) for g in groups)) \
            else [_states(g) for g in groups]
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        for pgid in groups:  # a failing run leaves no stopped group behind
            for signum in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.killpg(pgid, signum)
                except ProcessLookupError:
                    pass
    assert code == 0
    assert any("did not finish in time" in text for text in d.drain())
    assert left == []  # checked before the clean-up above

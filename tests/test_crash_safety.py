"""Crash safety: SIGKILL at random points, restart, and end with the uninterrupted stack.

A 40-frame simulated night (256x192 frames) is stacked by ``livestack run``, which is
SIGKILLed at seeded random points and restarted each time:

* during a read (after the frame's ``pending`` row, before its pixels are read),
* during accumulation (the frame is in the in-memory stack, not yet in the journal),
* mid-checkpoint (the temp file is complete, the rename has not happened),
* at a random moment after N journal rows (wherever the worker is).

The stage kills use the daemon's test hook ``LIVESTACK_TEST_PAUSE_AT`` (the process
prints ``livestack-test: paused at STAGE`` and stops there, so the kill lands exactly).
The final run is stopped with SIGTERM and must exit 0 within 10 s. Its ``stack.fits``
must equal an uninterrupted run's (max abs difference <= 1e-5 of the data range), with
NCOMBINE equal to the journal's accepted count and every file in the journal once.
"""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from livestack.config import load_config
from livestack.engine.core import Engine
from livestack.sim import SimConfig, write_sequence

N_FRAMES = 40
CONFIG = """\
output:
  checkpoint_every_frames: 4
  checkpoint_every_s: 3600
  fits_every_frames: 10
  preview_min_interval_s: 0.5
"""


class Run:
    """One ``livestack run`` process; stdout/stderr lines go to a queue."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "livestack.cli", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, predicate: Callable[[str], bool], timeout_s: float = 120.0) -> str:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.log.append(line)
            if predicate(line):
                return line
        raise AssertionError("line not seen; last output:\n" + "\n".join(self.log[-40:]))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL


def journal_counts(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return dict(db.execute("SELECT status, COUNT(*) FROM frames GROUP BY status").fetchall())
    except sqlite3.OperationalError:  # the daemon has not created the tables yet
        return {}
    finally:
        db.close()


def wait_done(journal: Path, at_least: int, timeout_s: float = 120.0) -> None:
    """Poll the journal (WAL readers never block the writer) until enough rows are final."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = journal_counts(journal)
        if sum(n for s, n in counts.items() if s != "pending") >= at_least:
            return
        time.sleep(0.02)
    raise AssertionError(f"journal stuck at {journal_counts(journal)}")


def stack_data(root: Path) -> tuple[np.ndarray, fits.Header]:
    (path,) = root.rglob("stack.fits")
    with fits.open(path) as hdul:
        return np.asarray(hdul[0].data, dtype=np.float64), hdul[0].header


@pytest.mark.slow
def test_sigkill_at_random_points_then_restart_equals_uninterrupted(tmp_path: Path) -> None:
    lights = write_sequence(tmp_path / "src", SimConfig(width=256, height=192), seed=3,
                            n_frames=N_FRAMES)
    watch = tmp_path / "in"
    watch.mkdir()
    base_ns = time.time_ns() - 10**12
    files = []
    for i, src in enumerate(lights):  # mtimes in capture order: the watcher's order
        dest = watch / src.name
        dest.write_bytes(src.read_bytes())
        os.utime(dest, ns=(base_ns + i * 10**9, base_ns + i * 10**9))
        files.append(dest)
    config_path = tmp_path / "livestack.yaml"
    config_path.write_text(CONFIG)

    # The uninterrupted run, in-process, same order and configuration.
    ref_root = tmp_path / "ref"
    ref = Engine(load_config(config_path, {"output.dir": str(ref_root)}), ref_root)
    for path in files:
        ref.process_path(path)
    ref.finalize()
    ref_accepted = ref.journal.counts()["accepted"]
    ref.close()
    want, want_header = stack_data(ref_root)

    out = tmp_path / "stacks"
    journal = out / "journal.sqlite"
    args = ["run", "-c", str(config_path), "--watch", str(watch), "--output", str(out),
            "--port", "0"]
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    rng = np.random.default_rng(20260115)
    plan = [("read", int(rng.integers(2, 7))), ("accumulate", int(rng.integers(8, 14))),
            ("checkpoint", int(rng.integers(15, 22))), ("rows", int(rng.integers(23, 29))),
            ("read", int(rng.integers(30, 34))), ("checkpoint", int(rng.integers(34, 37)))]
    for stage, after in plan:
        run_env = dict(env)
        if stage != "rows":
            run_env["LIVESTACK_TEST_PAUSE_AT"] = stage
            run_env["LIVESTACK_TEST_PAUSE_AFTER"] = str(after)
        run = Run(args, run_env)
        if stage == "rows":
            wait_done(journal, after)
            time.sleep(float(rng.uniform(0.0, 0.05)))  # land anywhere in the next frame
        else:
            run.wait_line(lambda s, st=stage: f"paused at {st}" in s)
        run.kill()

    final = Run(args, env)
    final.wait_line(lambda s: "viewer" in s)
    wait_done(journal, N_FRAMES)
    t0 = time.monotonic()
    final.proc.send_signal(signal.SIGTERM)
    assert final.proc.wait(timeout=15) == 0
    assert time.monotonic() - t0 < 10.0

    db = sqlite3.connect(journal)
    rows = db.execute("SELECT path, status FROM frames").fetchall()
    db.close()
    assert sorted(p for p, _ in rows) == sorted(os.path.abspath(f) for f in files)
    assert all(status in ("accepted", "rejected") for _, status in rows)
    accepted = sum(status == "accepted" for _, status in rows)
    got, header = stack_data(out)
    assert header["NCOMBINE"] == accepted == ref_accepted == want_header["NCOMBINE"]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    span = float(want[finite].max() - want[finite].min())
    assert float(np.abs(got[finite] - want[finite]).max()) <= 1e-5 * span
    # The user's frames are untouched.
    for src, dest in zip(lights, files, strict=True):
        assert src.read_bytes() == dest.read_bytes()

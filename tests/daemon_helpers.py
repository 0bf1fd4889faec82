"""Helpers shared by the daemon tests (``test_daemon_*.py`` and the modules reusing them).

Small simulated frames (256x192) keep the tests fast; ``frames`` is a module-scoped
fixture, so a test module imports it (and lists it in ``__all__``) to use it.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from livestack.config import Config, config_from_dict
from livestack.engine.core import Engine
from livestack.service.events import Event, event_to_dict
from livestack.sim import SimConfig, write_sequence

SIZE = {"width": 256, "height": 192}


def sim_config(**overrides: object) -> SimConfig:
    return SimConfig(**{**SIZE, **overrides})  # type: ignore[arg-type]


def make_config(tmp_path: Path, **output: object) -> Config:
    out = {"dir": str(tmp_path / "stacks"), "checkpoint_every_frames": 3,
           "fits_every_frames": 2, "preview_min_interval_s": 0.0, **output}
    return config_from_dict({"watch": {"dir": str(tmp_path / "in")}, "output": out})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def last_row(engine: Engine, path: Path):
    rows = engine.journal.rows(path=os.path.abspath(path))
    assert rows, f"no journal row for {path}"
    return rows[-1]


def assert_same_image(a: np.ndarray, b: np.ndarray, rel: float = 1e-5) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    finite = np.isfinite(a)
    span = float(np.nanmax(a) - np.nanmin(a))
    assert float(np.max(np.abs(a[finite] - b[finite]))) <= rel * span


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight simulated lights (never modified by the tests: they copy them)."""
    folder = tmp_path_factory.mktemp("lights")
    return write_sequence(folder, sim_config(), seed=1, n_frames=8)


def copy_frames(frames: list[Path], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for src in frames:
        shutil.copy2(src, dest / src.name)
        out.append(dest / src.name)
    return out


class RecordingHub:
    """The real Hub, remembering what the worker published."""

    def __init__(self) -> None:
        from livestack.service.hub import Hub

        self.hub = Hub()
        self.events: list[dict] = []
        self.previews: list[tuple[str, int]] = []

    def publish(self, event: Event | dict) -> None:
        self.hub.publish(event)
        self.events.append(event_to_dict(event))  # as it goes on the wire

    def publish_preview(self, stack_id: str, version: int, jpeg: bytes) -> None:
        assert jpeg[:2] == b"\xff\xd8"
        self.hub.publish_preview(stack_id, version, jpeg)
        self.previews.append((stack_id, version))

    def update_stack(self, stack_id: str, summary: dict) -> None:
        self.hub.update_stack(stack_id, summary)

    def record_frame(self, stack_id: str, frame: dict) -> None:
        self.hub.record_frame(stack_id, frame)


class Daemon:
    """A ``livestack run`` subprocess with line-by-line stdout/stderr."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "livestack.cli", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.seen: list[tuple[str, str]] = []
        for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._pump, args=(name, stream), daemon=True).start()

    def _pump(self, name: str, stream) -> None:
        for line in stream:
            self.lines.put((name, line.rstrip("\n")))

    def wait_line(self, predicate: Callable[[str], bool], timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such line; saw {self.seen[-30:]}")
            try:
                item = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(item)
            if predicate(item[1]):
                return item[1]

    def drain(self) -> list[str]:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return [text for _, text in self.seen]


def wait_rows(journal: Path, predicate: Callable[[dict[str, int]], bool],
              timeout_s: float = 60.0) -> dict[str, int]:
    """Poll the journal (WAL: readers never block the daemon) until ``predicate``."""
    deadline = time.monotonic() + timeout_s
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        if journal.exists():
            try:
                db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)
                try:
                    counts = dict(db.execute("SELECT status, COUNT(*) FROM frames GROUP BY "
                                             "status").fetchall())
                finally:
                    db.close()
            except sqlite3.OperationalError:
                counts = {}
            if predicate(counts):
                return counts
        time.sleep(0.05)
    raise AssertionError(f"journal never satisfied the condition: {counts}")


def run_daemon(config: Config, scenario: Callable[[object], None]) -> int:
    """Run a ``Daemon`` in this (main) thread while ``scenario(daemon)`` runs in another.

    The scenario's exception is re-raised; the daemon is stopped when it ends.
    """
    import io

    from livestack.daemon import Daemon as Service

    service = Service(config, out=io.StringIO())
    service.worker.warm_up = False  # JIT warm-up is not what these tests are about
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            assert service.worker.ready.wait(120), "the daemon never became ready"
            scenario(service)
        except BaseException as exc:
            errors.append(exc)
        finally:
            service.loop_started.wait(120)  # request_stop is a no-op before the loop runs
            service.request_stop()

    thread = threading.Thread(target=drive, name="test-scenario", daemon=True)
    thread.start()
    code = service.run()
    thread.join(60)
    if errors:
        raise errors[0]
    return code

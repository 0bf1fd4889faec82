"""Issue 14, point 7 (daemon part): odd entries named like frames get a row and a line.

FIFOs, directories and dangling symlinks named ``*.fits`` used to leave no journal row
and no log line; a symlink out of the watch folder was followed; a frame without
EXPTIME opened a "0s" stack silently; a restart queued every journaled frame again and
reported "falling behind".
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
from astropy.io import fits

from livestack.engine.core import Engine
from livestack.service.watcher import FrameWatcher
from tests.daemon_helpers import copy_frames, frames, make_config, run_daemon

__all__ = ["frames"]


def _odd_folder(tmp_path: Path, frame: Path) -> tuple[Path, dict[str, Path]]:
    watch = tmp_path / "in"
    watch.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy2(frame, outside / "secret.fits")
    entries = {"fifo": watch / "a_fifo.fits", "dir": watch / "b_dir.fits",
               "dangling": watch / "c_dangling.fits", "outside": watch / "d_outside.fits"}
    os.mkfifo(entries["fifo"])
    entries["dir"].mkdir()
    os.symlink(tmp_path / "missing.fits", entries["dangling"])
    os.symlink(outside / "secret.fits", entries["outside"])
    return watch, entries


EXPECTED = {"fifo": ("failed", "not_a_file"), "dir": ("failed", "not_a_file"),
            "dangling": ("failed", "dangling_symlink"),
            "outside": ("ignored", "outside_watch_folder")}


def test_odd_entries_are_reported_journaled_and_logged(
        tmp_path: Path, frames: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    watch, entries = _odd_folder(tmp_path, frames[0])
    watcher = FrameWatcher(watch, lambda p: None)
    try:
        found = set(watcher.start())
    finally:
        watcher.stop()
    assert found == set(entries.values())  # the start-up scan reports each one
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    engine.watch_root = watch
    with caplog.at_level(logging.WARNING, logger="livestack.engine"):
        for path in entries.values():
            engine.process_path(path)
    for kind, path in entries.items():
        (row,) = engine.journal.rows(path=str(path))
        assert (row.status, row.reason) == EXPECTED[kind], kind
        assert any(str(path) in r.getMessage() and row.reason in r.getMessage()
                   for r in caplog.records), kind
    engine.close()


def test_odd_entries_created_while_watching_are_reported(tmp_path: Path,
                                                          frames: list[Path]) -> None:
    watch = tmp_path / "in"
    watch.mkdir()
    seen: list[Path] = []
    got = threading.Event()

    def on_ready(path: Path) -> None:
        seen.append(path)
        if len(seen) >= 3:
            got.set()

    watcher = FrameWatcher(watch, on_ready)
    try:
        assert watcher.start() == []
        os.mkfifo(watch / "live_fifo.fits")
        (watch / "live_dir.fits").mkdir()
        os.symlink(tmp_path / "nothing.fits", watch / "live_dangling.fits")
        assert got.wait(30), seen
    finally:
        watcher.stop()
    assert {p.name for p in seen} == {"live_fifo.fits", "live_dir.fits", "live_dangling.fits"}


def test_missing_exptime_gets_a_visible_stack_and_a_line(
        tmp_path: Path, frames: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    (path,) = copy_frames(frames[:1], tmp_path / "in")
    with fits.open(path, mode="update") as hdul:  # our copy, never the user's file
        for key in ("EXPTIME", "EXPOSURE", "EXP_TIME"):
            hdul[0].header.pop(key, None)
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    with caplog.at_level(logging.WARNING, logger="livestack.engine"):
        row = engine.process_path(path)
    assert row is not None and row.status == "accepted"
    (stack_id,) = engine.runtimes
    assert stack_id.endswith("no-exptime") and "-0s" not in stack_id
    assert any("no exposure time" in r.getMessage() for r in caplog.records)
    engine.close()


def test_a_restart_does_not_queue_journaled_frames_again(tmp_path: Path,
                                                        frames: list[Path]) -> None:
    watch = copy_frames(frames[:3], tmp_path / "in")
    for i in range(6):  # same content, other names: journaled as duplicates
        shutil.copy2(watch[0], watch[0].parent / f"copy_{i}.fits")
    config = make_config(tmp_path)
    journal_done = threading.Event()

    def first(service: object) -> None:
        engine = service.worker.engine  # type: ignore[attr-defined]
        for _ in range(600):
            counts = engine.journal.counts()
            if counts["accepted"] + counts["rejected"] + counts["ignored"] == 9:
                journal_done.set()
                return
            threading.Event().wait(0.1)

    assert run_daemon(config, first) == 0 and journal_done.is_set()
    queued: list[Path] = []

    def second(service: object) -> None:
        queued.extend(service.queued)  # type: ignore[attr-defined]

    from livestack.daemon import Daemon

    class Recording(Daemon):
        def _enqueue(self, path: Path) -> None:
            self.queued.append(path)
            super()._enqueue(path)

    Recording.queued = []  # type: ignore[attr-defined]
    import livestack.daemon as daemon_mod

    original = daemon_mod.Daemon
    daemon_mod.Daemon = Recording  # run_daemon builds livestack.daemon.Daemon
    try:
        assert run_daemon(config, second) == 0
    finally:
        daemon_mod.Daemon = original
    assert queued == []  # 9 files in the folder, all journaled: nothing queued, no lag


def test_commands_accept_the_relative_names_viewers_see(tmp_path: Path,
                                                        frames: list[Path]) -> None:
    watch = copy_frames(frames[:2], tmp_path / "in" / "night1")
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    engine.watch_root = tmp_path / "in"
    for path in watch:
        engine.process_path(path)
    (stack_id,) = engine.runtimes
    args = engine.validate_command("exclude_frame", {"stack_id": stack_id,
                                                     "file": f"night1/{watch[1].name}"})
    assert args["row_id"] == engine.journal.rows(path=str(watch[1]))[-1].id
    engine.close()

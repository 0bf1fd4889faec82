"""FrameWatcher: real files, real observer threads; waits are on queues with timeouts."""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from livestack.errors import UsageError
from livestack.service.watcher import FrameWatcher, _EnqueueHandler, is_candidate
from livestack.storage.fitsio import check_complete as CHECK

WAIT_S = 10.0          # generous: the test machine is shared and slow


def fits_bytes(seed: int, shape: tuple[int, int] = (200, 300)) -> bytes:
    """A 16-bit FITS file of `shape` with seeded noise, as bytes."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 4000, size=shape).astype(np.int16)
    buf = io.BytesIO()
    fits.PrimaryHDU(data).writeto(buf)
    return buf.getvalue()


def write_slowly(path: Path, payload: bytes, chunk: int = 16384, pause_s: float = 0.01) -> float:
    """INDI style: open(O_CREAT|O_TRUNC) on the final name, write chunks, close.

    Returns the monotonic time right before close(): the watcher may see the close
    event (and report) before close() has returned to this thread.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, len(payload), chunk):
            if start and pause_s:
                time.sleep(pause_s)    # the writer's pace, not a wait for an event
            os.write(fd, payload[start:start + chunk])
    finally:
        closing_at = time.monotonic()
        os.close(fd)
    return closing_at


class Collector:
    """on_ready callback recording (name, size when called, monotonic time)."""

    def __init__(self) -> None:
        self.events: queue.Queue[tuple[str, int, float]] = queue.Queue()
        self.threads: set[str] = set()

    def __call__(self, path: Path) -> None:
        self.threads.add(threading.current_thread().name)
        self.events.put((path.name, path.stat().st_size if path.exists() else -1,
                         time.monotonic()))

    def next(self, timeout: float = WAIT_S) -> tuple[str, int, float]:
        return self.events.get(timeout=timeout)

    def until(self, name: str, timeout: float = WAIT_S) -> list[tuple[str, int, float]]:
        """Return every event up to and including the first one for `name`."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            item = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            seen.append(item)
            if item[0] == name:
                return seen


@pytest.fixture
def make_watcher(tmp_path: Path) -> Iterator[Callable[..., tuple[FrameWatcher, Collector]]]:
    started: list[FrameWatcher] = []

    def make(**kwargs: Any) -> tuple[FrameWatcher, Collector]:
        collector = Collector()
        watcher = FrameWatcher(tmp_path, collector, **kwargs)   # default: fitsio.check_complete
        started.append(watcher)
        return watcher, collector

    yield make
    for watcher in started:
        watcher.stop()


@pytest.mark.parametrize(("name", "expected"), [
    ("a.fits", True), ("B.FIT", True), ("c.Fts", True), ("d.fits.fz", True),
    ("with space 001.fits", True), (".hidden.fits", False), ("~lock.fits", False),
    ("x.fits.tmp", False), ("x.fits.part", False), ("x.TMP", False), ("notes.txt", False),
    ("frame.fits.gz", True), ("IMG_0001.CR2", True), ("a.dng", True), ("b.tiff", True),
    ("c.png", True), ("d.jpg", True), ("e.xisf", True), ("notes.gz", False),
    ("fits", False), ("", False),
])
def test_is_candidate(name: str, expected: bool) -> None:
    assert is_candidate(Path("/some/dir") / name if name else "") is expected


def test_slow_indi_style_write_reported_once_after_close(
        make_watcher, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    watcher, got = make_watcher()
    with caplog.at_level(logging.INFO, logger="livestack.service.watcher"):
        assert watcher.start() == []
    assert "inotify close/move" in caplog.text  # readiness from close events, not polling
    payload = fits_bytes(1)
    closed_at = write_slowly(tmp_path / "light_001.fits", payload)
    name, size, when = got.next()
    assert (name, size) == ("light_001.fits", len(payload))
    assert when >= closed_at
    # a second, sentinel frame arrives next: no duplicate of the first in between
    write_slowly(tmp_path / "light_002.fits", fits_bytes(2), pause_s=0.0)
    assert [e[0] for e in got.until("light_002.fits")] == ["light_002.fits"]
    assert got.threads == {"livestack-watcher"}
    assert watcher.is_alive()


def test_closed_while_incomplete_is_rechecked_until_complete(make_watcher,
                                                              tmp_path: Path) -> None:
    watcher, got = make_watcher()
    watcher.start()
    payload = fits_bytes(3)
    path = tmp_path / "half.fits"
    half = len(payload) // 2
    path.write_bytes(payload[:half])          # close-after-write of a short file
    time.sleep(0.3)                           # the writer's pause before it appends the rest
    with pytest.raises(queue.Empty):
        got.next(timeout=0.0)
    with path.open("ab") as fh:
        fh.write(payload[half:])
    name, size, _ = got.next()
    assert (name, size) == ("half.fits", len(payload))
    write_slowly(tmp_path / "z.fits", fits_bytes(4), pause_s=0.0)
    assert [e[0] for e in got.until("z.fits")] == ["z.fits"]


def test_temp_name_then_rename_reported_exactly_once(make_watcher, tmp_path: Path) -> None:
    watcher, got = make_watcher()
    watcher.start()
    payload = fits_bytes(5)
    for tmp_name in ("frame_a.fits.part", ".frame_b.fits", "frame_c.tmp"):
        write_slowly(tmp_path / tmp_name, payload, pause_s=0.0)
    os.rename(tmp_path / "frame_a.fits.part", tmp_path / "frame_a.fits")
    os.rename(tmp_path / ".frame_b.fits", tmp_path / "frame_b.fits")
    os.rename(tmp_path / "frame_c.tmp", tmp_path / "frame_c.fits")
    write_slowly(tmp_path / "sentinel.fits", fits_bytes(6), pause_s=0.0)
    names = [e[0] for e in got.until("sentinel.fits")]
    assert sorted(names) == ["frame_a.fits", "frame_b.fits", "frame_c.fits", "sentinel.fits"]


def test_move_in_from_another_folder(make_watcher, tmp_path: Path) -> None:
    elsewhere = tmp_path / ".staging"          # hidden, so not itself reported
    elsewhere.mkdir()
    (elsewhere / "moved.fits").write_bytes(fits_bytes(7))
    watcher, got = make_watcher()
    watcher.start()
    os.rename(elsewhere / "moved.fits", tmp_path / "moved.fits")
    name, size, _ = got.next()
    assert name == "moved.fits" and size == len(fits_bytes(7))


def test_ignored_names_are_ignored(make_watcher, tmp_path: Path) -> None:
    watcher, got = make_watcher()
    watcher.start()
    payload = fits_bytes(8)
    for name in (".hidden.fits", "~lock.fits", "a.tmp", "b.fits.part", "notes.txt",
                 "Upper Case.FITS"):
        (tmp_path / name).write_bytes(payload)
    (tmp_path / "sentinel.fits").write_bytes(payload)
    names = sorted(e[0] for e in got.until("sentinel.fits"))
    assert names == ["Upper Case.FITS", "sentinel.fits"]


def test_non_fits_and_empty_files_still_reach_the_daemon(make_watcher, tmp_path: Path) -> None:
    watcher, got = make_watcher(not_ready_timeout_s=0.5)
    watcher.start()
    (tmp_path / "junk.fits").write_text("this is not a FITS file\n" * 10)
    name, size, _ = got.next()
    assert name == "junk.fits" and size > 0           # daemon's reader records "not_fits"
    (tmp_path / "empty.fits").touch()
    name, size, _ = got.next()
    assert (name, size) == ("empty.fits", 0)          # after the timeout: "empty_file"


def test_a_closed_empty_placeholder_is_not_reported_before_its_content(
        make_watcher, tmp_path: Path) -> None:
    """A close event seen while the writer has just truncated the file is stale."""
    watcher, got = make_watcher(not_ready_timeout_s=30.0)
    watcher.start()
    path = tmp_path / "placeholder.fits"
    path.touch()                              # closed at zero bytes...
    payload = fits_bytes(22)
    path.write_bytes(payload)                 # ...then written (O_TRUNC, write, close)
    name, size, _ = got.next()
    assert (name, size) == ("placeholder.fits", len(payload))
    (tmp_path / "sentinel.fits").write_bytes(fits_bytes(23))
    assert [e[0] for e in got.until("sentinel.fits")] == ["sentinel.fits"]


def test_same_content_closed_twice_is_one_event_rewrite_is_two(make_watcher,
                                                               tmp_path: Path) -> None:
    watcher, got = make_watcher()
    watcher.start()
    path = tmp_path / "again.fits"
    path.write_bytes(fits_bytes(9))
    assert got.next()[0] == "again.fits"
    os.close(os.open(path, os.O_WRONLY))               # IN_CLOSE_WRITE, nothing changed
    path.write_bytes(fits_bytes(10, shape=(100, 300)))  # rewritten: new size and mtime
    name, size, _ = got.next()
    assert (name, size) == ("again.fits", len(fits_bytes(10, shape=(100, 300))))
    (tmp_path / "sentinel.fits").write_bytes(fits_bytes(11))
    assert [e[0] for e in got.until("sentinel.fits")] == ["sentinel.fits"]


def test_start_returns_existing_frames_and_later_reports_unfinished(make_watcher,
                                                                  tmp_path: Path) -> None:
    first, second = fits_bytes(12), fits_bytes(13)
    (tmp_path / "old_1.fits").write_bytes(first)
    (tmp_path / "old 2.fits").write_bytes(second)
    os.utime(tmp_path / "old_1.fits", ns=(1_000_000_000, 2_000_000_000))  # older mtime
    (tmp_path / "ignored.txt").write_text("x")
    unfinished = fits_bytes(14)
    half = len(unfinished) // 2
    (tmp_path / "writing.fits").write_bytes(unfinished[:half])
    watcher, got = make_watcher()
    existing = watcher.start()
    assert [p.name for p in existing] == ["old_1.fits", "old 2.fits"]
    assert all(p.is_absolute() for p in existing)
    with (tmp_path / "writing.fits").open("ab") as fh:
        fh.write(unfinished[half:])
    name, size, _ = got.next()
    assert (name, size) == ("writing.fits", len(unfinished))
    (tmp_path / "sentinel.fits").write_bytes(first)
    assert [e[0] for e in got.until("sentinel.fits")] == ["sentinel.fits"]


def test_truncated_file_is_reported_after_the_not_ready_timeout(make_watcher,
                                                               tmp_path: Path) -> None:
    watcher, got = make_watcher(not_ready_timeout_s=0.5)
    watcher.start()
    payload = fits_bytes(15)
    started = time.monotonic()
    (tmp_path / "crashed.fits").write_bytes(payload[: len(payload) // 3])
    name, size, when = got.next()
    assert (name, size) == ("crashed.fits", len(payload) // 3)
    assert when - started >= 0.5


def test_polling_mode_waits_for_stable_size(
        make_watcher, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    watcher, got = make_watcher(polling=True, poll_interval_s=0.1)
    with caplog.at_level(logging.INFO, logger="livestack.service.watcher"):
        assert watcher.start() == []
    assert "size-stable polling" in caplog.text
    payload = fits_bytes(16, shape=(300, 400))
    write_slowly(tmp_path / "polled.fits", payload, chunk=8192, pause_s=0.02)
    name, size, _ = got.next()
    assert (name, size) == ("polled.fits", len(payload))      # never a partial size
    write_slowly(tmp_path / "renamed.fits.part", payload, pause_s=0.0)
    os.rename(tmp_path / "renamed.fits.part", tmp_path / "renamed.fits")
    (tmp_path / "sentinel.fits").write_bytes(fits_bytes(17))
    names = sorted(e[0] for e in got.until("sentinel.fits"))
    if "renamed.fits" not in names:          # same poll: order between the two is free
        names += [got.next()[0]]
    assert sorted(names) == ["renamed.fits", "sentinel.fits"]


def test_recursive_watch_ignores_hidden_folders(make_watcher, tmp_path: Path) -> None:
    (tmp_path / "night1").mkdir()
    (tmp_path / ".thumbs").mkdir()
    (tmp_path / "night1" / "pre.fits").write_bytes(fits_bytes(18))
    watcher, got = make_watcher(recursive=True)
    assert [p.name for p in watcher.start()] == ["pre.fits"]
    (tmp_path / ".thumbs" / "t.fits").write_bytes(fits_bytes(19))
    (tmp_path / "night1" / "new.fits").write_bytes(fits_bytes(20))
    assert [e[0] for e in got.until("new.fits")] == ["new.fits"]


def test_missing_folder_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        FrameWatcher(tmp_path / "nope", lambda p: None, check_complete=CHECK).start()
    with pytest.raises(ValueError, match="poll_interval_s"):
        FrameWatcher(tmp_path, lambda p: None, poll_interval_s=0, check_complete=CHECK)
    watcher = FrameWatcher(tmp_path, lambda p: None, check_complete=CHECK)
    watcher.start()
    with pytest.raises(RuntimeError, match="twice"):
        watcher.start()
    watcher.stop()
    watcher.stop()                     # idempotent
    assert not watcher.is_alive()


def test_polling_treats_an_empty_file_as_not_ready(make_watcher, tmp_path: Path) -> None:
    watcher, got = make_watcher(polling=True, poll_interval_s=0.1, not_ready_timeout_s=30.0)
    watcher.start()
    path = tmp_path / "placeholder.fits"
    path.touch()                       # some writers create the name first...
    time.sleep(0.4)                    # ...and write several poll intervals later
    payload = fits_bytes(21)
    path.write_bytes(payload)
    name, size, _ = got.next()
    assert (name, size) == ("placeholder.fits", len(payload))


def test_rescan_finds_frames_whose_events_were_lost(make_watcher, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    watcher, got = make_watcher(poll_interval_s=0.1)
    assert watcher.start() == []
    # An inotify queue overflow: from now on no event reaches the watcher.
    monkeypatch.setattr(_EnqueueHandler, "dispatch", lambda self, event: None)
    lost = fits_bytes(1)
    write_slowly(tmp_path / "lost.fits", lost, pause_s=0.0)
    watcher.rescan()
    assert got.next()[:2] == ("lost.fits", len(lost))
    # Rescans of a frame already reported report nothing; the next lost frame is found.
    watcher.rescan()
    watcher.rescan()
    write_slowly(tmp_path / "second.fits", fits_bytes(2), pause_s=0.0)
    watcher.rescan()
    assert got.next()[0] == "second.fits"
    assert watcher.is_alive()


def test_rescan_waits_until_a_frame_stops_growing(make_watcher, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    watcher, got = make_watcher(poll_interval_s=0.1)
    watcher.start()
    monkeypatch.setattr(_EnqueueHandler, "dispatch", lambda self, event: None)
    payload = fits_bytes(3)
    half = len(payload) // 2
    with open(tmp_path / "growing.fits", "wb") as fh:  # INDI style, still being written
        fh.write(payload[:half])
        fh.flush()
        watcher.rescan()
        time.sleep(0.3)   # the writer's pace: a stall longer than the stability period
        fh.write(payload[half:])
    watcher.rescan()
    name, size, _ = got.next()
    assert (name, size) == ("growing.fits", len(payload))

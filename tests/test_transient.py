"""Issue 14, points 1 and 4: descriptor exhaustion and a full journal disk are transient.

A frame that meets ``EMFILE`` or a journal write that meets ``SQLITE_FULL`` gets no final
verdict: the worker pauses intake with an alert, retries with backoff and goes on by
itself when the shortage ends, losing and doubling nothing. Real descriptor exhaustion
(the soft RLIMIT_NOFILE lowered, the table filled) and a real SQLite "database or disk is
full" (``PRAGMA max_page_count``) drive the tests.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livestack.engine.core import Engine
from livestack.engine.worker import Worker, WorkQueue
from livestack.errors import JournalFullError
from livestack.service.events import event_to_dict
from livestack.service.hub import Hub
from livestack.service.limits import open_fd_count
from tests.daemon_helpers import assert_same_image, copy_frames, frames, make_config

__all__ = ["frames"]  # the module-scoped fixture, from tests.daemon_helpers

WAIT_S = 120.0


class RecordingHub(Hub):
    """A hub that remembers alerts and signals the ones a test waits for."""

    def __init__(self) -> None:
        super().__init__()
        self.alerts: list[dict[str, Any]] = []
        self.seen: dict[str, threading.Event] = {}

    def publish(self, event: Any) -> None:
        super().publish(event)
        event = event_to_dict(event)  # as it goes on the wire
        if event.get("type") == "alert":
            self.alerts.append(event)
            self.seen.setdefault(event["code"], threading.Event()).set()

    def wait(self, code: str) -> bool:
        return self.seen.setdefault(code, threading.Event()).wait(WAIT_S)


def _statuses(engine: Engine, path: Path) -> list[str]:
    return [r.status for r in engine.journal.rows(path=os.path.abspath(path))]


def test_emfile_on_a_frame_is_retried_never_failed(tmp_path: Path, frames: list[Path]) -> None:
    watch = copy_frames(frames[:2], tmp_path / "in")
    hub = RecordingHub()
    engine = Engine(make_config(tmp_path), tmp_path / "stacks", hub=hub,
                    background_checkpoints=False)
    worker = Worker(lambda: engine, WorkQueue())
    worker._process(engine, watch[0])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    thread = threading.Thread(target=worker._process, args=(engine, watch[1]))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_fd_count() + 16, hard))
        with pytest.raises(OSError):  # fill the table: the frame meets a real EMFILE
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        thread.start()
        assert hub.wait("descriptors_exhausted")
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert hub.wait("descriptors_exhausted_cleared")
    assert _statuses(engine, watch[1]) == ["accepted"]
    assert engine.journal.counts()["failed"] == 0
    engine.close()


def test_an_old_emfile_failure_is_processed_again_after_a_restart(
        tmp_path: Path, frames: list[Path]) -> None:
    (path,) = copy_frames(frames[:1], tmp_path / "in")
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    # What an older version journaled during a descriptor flood.
    st = path.stat()
    row = engine.journal.mark_pending(str(path), st.st_size, st.st_mtime_ns, None)
    engine.journal.finish(row, "failed", reason="unreadable",
                          message=f"{path}: cannot read: Too many open files")
    engine.close()
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    assert engine.resume() == [str(path)]
    engine.process_path(path)
    assert _statuses(engine, path) == ["accepted"]
    engine.close()


def _reference_image(tmp_path: Path, watch: list[Path]) -> np.ndarray:
    engine = Engine(make_config(tmp_path / "ref", fits_every_frames=100),
                    tmp_path / "ref" / "stacks", background_checkpoints=False)
    for path in watch:
        engine.process_path(path)
    (rt,) = engine.runtimes.values()
    image = rt.session.product().image
    engine.close()
    return image


def test_a_full_journal_pauses_intake_and_resumes_losing_and_doubling_nothing(
        tmp_path: Path, frames: list[Path]) -> None:
    watch = copy_frames(frames[:6], tmp_path / "in")
    hub = RecordingHub()
    engine = Engine(make_config(tmp_path, fits_every_frames=100), tmp_path / "stacks",
                    hub=hub, background_checkpoints=False)
    worker = Worker(lambda: engine, WorkQueue())
    for path in watch[:2]:
        worker._process(engine, path)
    journal = engine.journal
    with journal._lock:  # the disk is now full: no page may be added
        pages = journal._db.execute("PRAGMA page_count").fetchone()[0]
        journal._db.execute(f"PRAGMA max_page_count={pages}")
    done = threading.Event()

    def feed() -> None:
        for path in watch[2:]:
            worker._process(engine, path)
        done.set()

    thread = threading.Thread(target=feed)
    thread.start()
    assert hub.wait("journal_full")
    assert not done.is_set()  # intake is paused, the worker is alive and waiting
    with journal._lock:  # space returns
        journal._db.execute("PRAGMA max_page_count=1073741823")
    assert done.wait(WAIT_S)
    thread.join(WAIT_S)
    assert hub.wait("journal_full_cleared")
    for path in watch:
        assert _statuses(engine, path) == ["accepted"], path
    (rt,) = engine.runtimes.values()
    assert rt.session.n_accepted == 6
    assert_same_image(rt.session.product().image, _reference_image(tmp_path, watch))
    engine.close()


def test_a_journal_write_failing_after_accumulation_is_undone_then_retried(
        tmp_path: Path, frames: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    watch = copy_frames(frames[:4], tmp_path / "in")
    hub = RecordingHub()
    engine = Engine(make_config(tmp_path, fits_every_frames=100), tmp_path / "stacks",
                    hub=hub, background_checkpoints=False)
    worker = Worker(lambda: engine, WorkQueue())
    real_finish = engine.journal.finish
    failures = iter([True, True])  # the outcome write of the 3rd frame fails twice

    def finish(row_id: int, status: str, **kw: Any) -> int | None:
        if kw.get("assign_seq") and len(engine.journal.rows(status="accepted")) == 2 \
                and next(failures, False):
            raise JournalFullError("journal.sqlite: database or disk is full")
        return real_finish(row_id, status, **kw)

    monkeypatch.setattr(engine.journal, "finish", finish)
    for path in watch:
        worker._process(engine, path)
    assert [a["code"] for a in hub.alerts] == ["journal_full", "journal_full_cleared"]
    for path in watch:
        assert _statuses(engine, path) == ["accepted"], path
    (rt,) = engine.runtimes.values()
    assert rt.session.n_accepted == 4  # the undone frame counted once
    assert_same_image(rt.session.product().image, _reference_image(tmp_path, watch))
    engine.close()


def test_emfile_during_a_replay_never_marks_a_stacked_frame_failed(
        tmp_path: Path, frames: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import livestack.engine.resume as resume_mod
    from livestack.errors import DescriptorsExhaustedError

    watch = copy_frames(frames[:3], tmp_path / "in")
    config = make_config(tmp_path, checkpoint_every_frames=100)
    engine = Engine(config, tmp_path / "stacks", background_checkpoints=False)
    for path in watch:
        engine.process_path(path)
    engine.close()  # no checkpoint yet: a restart replays the three frames from disk
    engine = Engine(config, tmp_path / "stacks", background_checkpoints=False)
    real_sha = resume_mod.sha256_file
    calls = iter([OSError(errno.EMFILE, "Too many open files")])

    def sha(path: str) -> str:  # the second frame's replay meets EMFILE once
        if path == str(watch[1]) and (exc := next(calls, None)) is not None:
            raise exc
        return real_sha(path)

    monkeypatch.setattr(resume_mod, "sha256_file", sha)
    with pytest.raises(DescriptorsExhaustedError):
        engine.resume()
    assert engine.runtimes == {}  # the half-restored stack was dropped
    engine.resume()
    (rt,) = engine.runtimes.values()
    assert rt.session.n_accepted == 3
    assert engine.journal.counts()["failed"] == 0
    engine.close()

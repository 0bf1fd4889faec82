"""The daemon's operator commands and the background rebuilds they start.

The tests drive :class:`livestack.engine.core.Engine` (and its worker) in-process; a
rebuild runs the integration engine in a child process, as in the daemon.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from livestack.config import config_from_dict
from livestack.engine.core import Engine
from livestack.errors import UsageError
from livestack.pipeline.session import StackSession
from livestack.pipeline.types import Transform
from livestack.sim import Simulator, write_fits
from livestack.storage.checkpoint import CHECKPOINT_NAME, load_checkpoint
from livestack.storage.fitsio import read_frame
from tests.daemon_helpers import (
    RecordingHub,
    copy_frames,
    frames,
    last_row,
    make_config,
    sim_config,
)

__all__ = ["frames"]  # the module-scoped fixture, from tests.daemon_helpers


# ------------------------------------------------------------------------- commands


def _rebuild(engine: Engine) -> None:
    """Drive a pending rebuild to its swap, waiting on the integration process."""
    for _ in range(200):
        if not engine.rebuilds:
            return
        engine.rebuild_step(wait_s=300)
    raise AssertionError("rebuild did not finish")


def _command(engine: Engine, name: str, **args: object) -> dict:
    """Validate and run an operator command as the worker does."""
    return engine.execute_command(name, engine.validate_command(name, args))


def _stacked(tmp_path: Path, frames: list[Path], n: int, **engine_kw: object
             ) -> tuple[Engine, list[Path], str]:
    """An engine that has stacked the first ``n`` frames into one stack."""
    watch = copy_frames(frames[:n], tmp_path / "in")
    engine = Engine(make_config(tmp_path), tmp_path / "stacks", **engine_kw)  # type: ignore[arg-type]
    for path in watch:
        engine.process_path(path)
    (stack_id,) = engine.runtimes
    return engine, watch, stack_id


def test_commands_exclude_reference_reset_pause_new_stack(tmp_path: Path,
                                                          frames: list[Path]) -> None:
    from livestack.restack import integrate_session

    watch = copy_frames(frames[:6], tmp_path / "in")
    engine = Engine(make_config(tmp_path), tmp_path / "stacks", background_checkpoints=False)
    for path in watch[:5]:
        engine.process_path(path)
    (stack_id,) = engine.runtimes
    rt = engine.runtimes[stack_id]
    n0 = rt.session.n_accepted
    with pytest.raises(UsageError, match="unknown command"):
        engine.validate_command("explode", {})
    with pytest.raises(UsageError, match="not a frame of"):
        engine.validate_command("exclude_frame", {"file": "nope.fits"})
    with pytest.raises(UsageError, match="unknown stack"):
        engine.validate_command("reset", {"stack_id": "../../etc"})

    # What `livestack integrate STACK --exclude frame-2` gives (its defaults).
    expected = integrate_session(journal=engine.journal, stack_id=stack_id,
                                 exclude=[watch[2].name], pipeline=engine.config.pipeline)

    # exclude a frame: the integration engine rebuilds the stack in a child process while
    # the old session keeps serving; then the rebuilt stack replaces it.
    old_session = rt.session
    args = engine.validate_command("exclude_frame", {"file": watch[2].name})
    engine.execute_command("exclude_frame", args)
    job = engine.rebuilds[stack_id]
    assert rt.session is old_session and job.process is not None
    assert engine.summary(rt).state == "rebuilding"
    _rebuild(engine)
    assert rt.session is not old_session and not engine.rebuilds
    assert rt.session.n_accepted == n0 - 1
    assert not last_row(engine, watch[2]).active
    product = rt.session.product()
    np.testing.assert_array_equal(product.image, expected.image)
    np.testing.assert_array_equal(product.count, expected.count)
    np.testing.assert_array_equal(product.weight, expected.weight)
    np.testing.assert_array_equal(product.rejected_high, expected.rejected_high)
    with fits.open(rt.folder / "stack.fits") as hdul:
        np.testing.assert_array_equal(hdul[0].data, expected.image)
        assert hdul[0].header["NCOMBINE"] == n0 - 1
        assert hdul[0].header["INTEGRAT"] == "batch+live"
        assert hdul[0].header["REJECT"] == "winsorized"
    assert load_checkpoint(rt.folder / CHECKPOINT_NAME)[1]["generation"] == rt.generation
    assert not list(rt.folder.glob("rebuild*")), "the rebuild's files are removed"

    # set the reference while a new frame arrives: the frame is stacked into the old
    # session at once and into the rebuilt one after the integration.
    args = engine.validate_command("set_reference", {"file": watch[4].name})
    engine.execute_command("set_reference", args)
    engine.process_path(watch[5])
    assert rt.session.n_accepted == n0  # the old session took it
    _rebuild(engine)
    assert rt.session.reference_file == os.path.abspath(watch[4])
    rows = engine.journal.rows_after(stack_id, 0)
    assert rows[0].path == os.path.abspath(watch[4])
    np.testing.assert_allclose(np.reshape(rows[0].transform, (2, 3)), np.eye(2, 3), atol=1e-9)
    assert rows[-1].path == os.path.abspath(watch[5])  # replayed onto the rebuilt stack
    assert rt.session.n_accepted == n0
    # The live frame's journal transform now maps it onto the new reference: it matches
    # a fresh registration against frame 4 to a small fraction of a pixel.
    ref_session = StackSession("check", engine.config.pipeline)
    for path in (watch[4], watch[5]):
        raw, info, _ = read_frame(path)
        outcome = ref_session.process(raw, info, None)
    assert outcome.transform is not None
    fresh = outcome.transform.apply(np.array([[100.0, 80.0]]))
    stored = Transform.from_list(rows[-1].transform, rows[-1].model or "similarity")
    assert np.abs(stored.apply(np.array([[100.0, 80.0]])) - fresh).max() < 0.05

    # pause / resume / snapshot
    engine.execute_command("pause", {})
    assert engine.summary(rt).state == "paused"
    engine.execute_command("resume", {})
    assert engine.execute_command("snapshot", {})["stacks"] == [stack_id]

    # new stack: the next frame of the same key goes to a new stack.
    result = engine.execute_command("new_stack", engine.validate_command("new_stack", {}))
    new_id = result["stack_id"]
    extra = tmp_path / "in" / "extra.fits"
    write_fits(extra, Simulator(sim_config(), seed=1).light(9))
    engine.process_path(extra)
    assert last_row(engine, extra).stack_id == new_id

    # reset: empty stack, rows inactive, outputs removed.
    engine.execute_command("reset", engine.validate_command("reset", {"stack_id": stack_id}))
    assert rt.session.n_accepted == 0 and engine.journal.counts(stack_id)["accepted"] == 0
    assert not (rt.folder / "stack.fits").exists()
    engine.close()
    # A restart keeps the reset (generation bumped: the old checkpoint is not trusted).
    again = Engine(make_config(tmp_path), tmp_path / "stacks")
    again.resume()
    assert again.runtime(stack_id).session.n_accepted == 0
    again.close()


def test_a_failing_command_resolves_its_future_and_the_worker_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from livestack.engine.worker import Worker, WorkQueue

    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    real = engine.execute_command
    calls = iter([RuntimeError("command bug")])

    def flaky(name, args):
        exc = next(calls, None)
        if exc is not None:
            raise exc
        return real(name, args)

    monkeypatch.setattr(engine, "execute_command", flaky)
    q = WorkQueue()
    worker = Worker(lambda: engine, q)
    worker.warm_up = False
    worker.start()
    try:
        worker.ready.set()
        with pytest.raises(RuntimeError, match="command bug"):
            q.put_command("pause", {}).result(timeout=60)
        assert q.put_command("resume", {}).result(timeout=60) == {"ok": True}
    finally:
        worker.request_stop()
        assert worker.finished.wait(60)
    assert worker.error is None
    engine.close()


# ------------------------------------------------------------------------- rebuilds


def test_viewers_see_the_old_stack_until_the_rebuild_swaps(tmp_path: Path,
                                                            frames: list[Path]) -> None:
    watch = copy_frames(frames[:6], tmp_path / "in")
    hub = RecordingHub()
    engine = Engine(make_config(tmp_path), tmp_path / "stacks", hub=hub)  # type: ignore[arg-type]
    for path in watch[:5]:
        engine.process_path(path)
    (stack_id,) = engine.runtimes
    rt = engine.runtimes[stack_id]
    old_session = rt.session
    _command(engine, "exclude_frame", file=watch[1].name)
    mark = len(hub.events)
    engine.process_path(watch[5])  # a live frame during the rebuild
    during = [e for e in hub.events[mark:] if e["type"] == "stack"]
    # ... goes into the old stack, which viewers keep getting (with the excluded frame).
    assert rt.session is old_session
    assert during and all(e["state"] == "rebuilding" for e in during)
    assert during[-1]["frames"] == 6
    assert hub.previews[-1][1] == hub.hub.stack(stack_id)["preview_version"]
    previews_before = len(hub.previews)
    _rebuild(engine)
    after = [e for e in hub.events if e["type"] == "stack"][-1]
    assert after["state"] == "running" and after["frames"] == 5  # 6 - 1 excluded
    assert len(hub.previews) == previews_before + 1  # the swap pushes the rebuilt preview
    engine.close()


def test_rebuild_leaves_out_a_frame_deleted_from_disk(tmp_path: Path,
                                                      frames: list[Path]) -> None:
    engine, watch, stack_id = _stacked(tmp_path, frames, 5)
    watch[3].unlink()  # the user tidied up
    _command(engine, "exclude_frame", file=watch[1].name)
    _rebuild(engine)
    rt = engine.runtimes[stack_id]
    assert rt.session.n_accepted == 3
    gone = last_row(engine, watch[3])
    assert gone.status == "failed" and gone.reason == "replay_missing"
    assert {r.path for r in engine.journal.rows_after(stack_id, 0, ("accepted",))} == {
        os.path.abspath(p) for p in (watch[0], watch[2], watch[4])}
    engine.close()


def test_closing_the_engine_stops_a_running_rebuild(tmp_path: Path,
                                                    frames: list[Path]) -> None:
    engine, watch, stack_id = _stacked(tmp_path, frames, 5)
    folder = engine.runtimes[stack_id].folder
    _command(engine, "exclude_frame", file=watch[1].name)
    process = engine.rebuilds[stack_id].process
    assert process is not None
    engine.close()
    assert process.poll() is not None and not engine.rebuilds
    assert not list(folder.glob(".livestack-integrate-*"))
    # The next start replays the journal: the exclusion holds.
    again = Engine(make_config(tmp_path), tmp_path / "stacks")
    again.resume()
    assert again.runtime(stack_id).session.n_accepted == 4
    assert not list(folder.glob("rebuild*"))
    again.close()


def test_a_pending_reference_survives_a_newer_command(tmp_path: Path,
                                                       frames: list[Path]) -> None:
    engine, watch, stack_id = _stacked(tmp_path, frames, 5)
    _command(engine, "set_reference", file=watch[3].name)
    _command(engine, "exclude_frame", file=watch[1].name)  # before the first rebuild swaps
    _rebuild(engine)
    rt = engine.runtimes[stack_id]
    assert rt.session.reference_file == os.path.abspath(watch[3])
    assert rt.session.n_accepted == 4
    # A reference whose file is gone is refused up front.
    watch[2].unlink()
    with pytest.raises(UsageError, match="no longer on disk"):
        engine.validate_command("set_reference", {"file": watch[2].name})
    engine.close()


def test_rejected_rows_are_not_read_again_after_a_rebuild(tmp_path: Path,
                                                          frames: list[Path]) -> None:
    watch = copy_frames(frames[:5], tmp_path / "in")
    engine = Engine(make_config(tmp_path), tmp_path / "stacks", background_checkpoints=False)
    for path in watch[:2]:
        engine.process_path(path)
    (rt,) = engine.runtimes.values()
    strict = config_from_dict({"pipeline": {"gate": {"min_stars": 100000}}})
    rt.session.gate.config = strict.pipeline.gate  # clouds: the next two are rejected
    for path in watch[2:4]:
        engine.process_path(path)
    rt.session.gate.config = engine.config.pipeline.gate
    engine.process_path(watch[4])
    assert engine.journal.counts(rt.stack_id)["rejected"] == 2
    _command(engine, "exclude_frame", file=watch[0].name)
    _rebuild(engine)
    assert rt.session.n_accepted == 2
    seq = load_checkpoint(rt.folder / CHECKPOINT_NAME)[1]["seq"]
    assert seq == engine.journal.last_seq(rt.stack_id)  # the rejected rows are covered
    assert engine.journal.rows_after(rt.stack_id, seq) == []
    engine.close()


def test_an_unusable_rebuild_result_keeps_the_old_stack(tmp_path: Path,
                                                        frames: list[Path]) -> None:
    hub = RecordingHub()
    engine, watch, stack_id = _stacked(tmp_path, frames, 4, hub=hub)
    rt = engine.runtimes[stack_id]
    old_session = rt.session
    _command(engine, "exclude_frame", file=watch[1].name)
    job = engine.rebuilds[stack_id]
    assert job.process is not None and job.process.wait(300) == 0
    (rt.folder / "rebuild.npz").write_bytes(b"torn")  # as if the disk lost it
    assert engine.rebuild_step()
    assert not engine.rebuilds and rt.session is old_session
    alerts = [e for e in hub.events if e["type"] == "alert"]
    assert alerts and alerts[-1]["code"] == "rebuild_failed"
    assert engine.summary(rt).state == "running"
    engine.close()


def test_the_worker_gives_up_a_rebuild_that_raises() -> None:
    from livestack.engine.worker import Worker

    class Broken:
        def __init__(self) -> None:
            self.abandoned: list[str] = []

        def rebuild_step(self) -> bool:
            raise RuntimeError("bug")

        def abandon_rebuilds(self, message: str) -> None:
            self.abandoned.append(message)

    broken = Broken()
    assert Worker._rebuild_step(broken)  # type: ignore[arg-type]
    assert broken.abandoned == ["internal error: bug"]


def test_rebuild_skips_a_row_rerouted_to_another_stack(tmp_path: Path,
                                                       frames: list[Path]) -> None:
    engine, watch, stack_id = _stacked(tmp_path, frames, 5)
    engine.execute_command("exclude_frame", engine.validate_command(
        "exclude_frame", {"stack_id": stack_id, "file": watch[1].name}))
    # Mid-rebuild, a row moves to another stack (what _reroute does).
    moved = last_row(engine, watch[3])
    assert moved.status == "accepted"
    engine.journal.ensure_stack(stack_id + "-other", {}, stack_id + "-other")
    engine.journal.finish(moved.id, moved.status, stack_id=stack_id + "-other",
                          transform=moved.transform, model=moved.model, seq=1)
    _rebuild(engine)
    rows = engine.journal.rows_after(stack_id, 0, ("accepted",))
    assert moved.id not in {r.id for r in rows}
    assert engine.runtimes[stack_id].session.n_accepted == len(rows) == 3
    engine.close()

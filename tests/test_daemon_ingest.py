"""The daemon's engine in-process: bad inputs end as journal rows, resume, routing, hub events.

The tests drive :class:`livestack.engine.core.Engine` directly (the code the worker
thread runs), with small simulated frames.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from livestack.config import config_from_dict
from livestack.engine.core import Engine
from livestack.sim import Simulator, write_calibration_set, write_fits
from livestack.storage.atomic import StagedFile
from livestack.storage.checkpoint import CHECKPOINT_NAME, load_checkpoint, stage_checkpoint
from livestack.storage.fitsio import read_frame
from tests.daemon_helpers import (
    RecordingHub,
    assert_same_image,
    copy_frames,
    frames,
    last_row,
    make_config,
    sha,
    sim_config,
)

__all__ = ["frames"]  # the module-scoped fixture, from tests.daemon_helpers


# ------------------------------------------------------------------------ bad input


def test_bad_inputs_end_as_journal_rows_while_the_stack_grows(
        tmp_path: Path, frames: list[Path], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    watch = tmp_path / "in"
    good = copy_frames(frames[:6], watch)
    # Masters (bias + dark) for 256x192: a 128x96 frame is then the wrong shape.
    calib = write_calibration_set(tmp_path / "calib", sim_config(), seed=1, n_bias=3,
                                  n_darks=3, n_flats=0)
    from livestack.storage.masters import build_masters_from_dirs

    build_masters_from_dirs(tmp_path / "masters", bias_dir=calib["bias"],
                            dark_dir=calib["darks"])
    config = config_from_dict({"masters": {"paths": [str(tmp_path / "masters")]},
                               "output": {"dir": str(tmp_path / "stacks"),
                                          "checkpoint_every_frames": 2}})
    bad: dict[str, Path] = {}
    bad["empty_file"] = watch / "zero.fits"
    bad["empty_file"].write_bytes(b"")
    blob = frames[6].read_bytes()
    bad["truncated"] = watch / "truncated.fits"
    bad["truncated"].write_bytes(blob[: len(blob) // 2])
    bad["not_fits"] = watch / "notes.fits"
    bad["not_fits"].write_bytes(b"observing log, not a FITS file\n" * 200)
    bad["not_2d"] = watch / "cube.fits"
    fits.PrimaryHDU(np.zeros((3, 192, 256), np.float32)).writeto(bad["not_2d"])
    bad["all_nan"] = watch / "nan.fits"
    hdu = fits.PrimaryHDU(np.full((192, 256), np.nan, np.float32))
    hdu.header["IMAGETYP"] = "Light Frame"
    hdu.writeto(bad["all_nan"])
    bad["master_shape_mismatch"] = watch / "small.fits"
    write_fits(bad["master_shape_mismatch"], Simulator(sim_config(width=128, height=96),
                                                        seed=2).light(0))
    bad["not_a_file"] = watch / "folder.fits"
    bad["not_a_file"].mkdir()
    bad["vanished"] = watch / "vanish.fits"
    shutil.copy2(frames[7], bad["vanished"])
    if os.geteuid() != 0:  # root reads anything; the folder above covers "unreadable" then
        bad["permission_denied"] = watch / "locked.fits"
        shutil.copy2(frames[6], bad["permission_denied"])
        bad["permission_denied"].chmod(0)

    import livestack.engine.ingest as ingest

    real_read = ingest.read_file_hashing

    def read_and_vanish(path: str, max_bytes: int | None = None,
                        **kwargs: Any) -> tuple[Any, Any]:
        # The one read of a FITS file (hash and decode) is where it can vanish.
        if Path(path).name == "vanish.fits":
            Path(path).unlink()  # the test's own copy disappears while being read
        return real_read(path, max_bytes, **kwargs)

    monkeypatch.setattr(ingest, "read_file_hashing", read_and_vanish)
    written: list[int] = []

    def enospc(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def writer(path: Path, arrays: dict, meta: dict) -> tuple[StagedFile, int]:
        written.append(int(meta["seq"]))
        staged, size = stage_checkpoint(path, arrays, meta)
        if len(written) == 2:  # the second checkpoint hits a full disk when it is synced
            commit = staged.commit

            def full_disk_commit(before_replace: Any = None) -> None:
                with pytest.MonkeyPatch.context() as m:
                    m.setattr(os, "fsync", enospc)
                    commit(before_replace)

            staged.commit = full_disk_commit  # type: ignore[method-assign]
        return staged, size

    before = {p: sha(p) for p in [*good, *bad.values()] if p.is_file()
              and p != bad["vanished"] and os.access(p, os.R_OK)}
    engine = Engine(config, tmp_path / "stacks", checkpoint_writer=writer,
                    background_checkpoints=False)
    order = [good[0], bad["empty_file"], good[1], bad["truncated"], bad["not_fits"], good[2],
             bad["not_2d"], bad["all_nan"], good[3], bad["master_shape_mismatch"],
             bad["not_a_file"], bad["vanished"], good[4], good[5]]
    if "permission_denied" in bad:
        order.insert(5, bad["permission_denied"])
    with caplog.at_level(logging.INFO, logger="livestack"):
        for path in order:
            engine.process_path(path)
        engine.finalize()
    for reason, path in bad.items():
        row = last_row(engine, path)
        assert (row.status, row.reason) == ("failed", reason), (path.name, row)
        assert row.message and str(path.name) in row.message
        lines = [r.getMessage() for r in caplog.records
                 if r.getMessage().startswith(f"{os.path.abspath(path)}: {reason}: ")]
        assert len(lines) == 1, (reason, [r.getMessage() for r in caplog.records])
    (stack_id,) = engine.runtimes
    rt = engine.runtimes[stack_id]
    counts = engine.journal.counts(stack_id)
    assert counts["accepted"] == rt.session.n_accepted >= 5
    assert all(last_row(engine, p).status in ("accepted", "rejected") for p in good)
    # The full disk: one log line, the previous checkpoint kept, later ones written.
    assert any("No space left on device" in r.getMessage() and "checkpoint" in
               r.getMessage() for r in caplog.records)
    assert len(written) >= 3
    meta = load_checkpoint(rt.folder / CHECKPOINT_NAME)[1]
    assert meta["seq"] == written[-1] == rt.last_seq
    assert (rt.folder / "stack.fits").is_file() and (rt.folder / "preview.jpg").is_file()
    with fits.open(rt.folder / "stack.fits") as hdul:
        assert hdul[0].header["NCOMBINE"] == counts["accepted"]
    engine.close()
    # The user's frames are byte-identical (and still there).
    assert {p: sha(p) for p in before} == before


def _second_frame_counting_opens(tmp_path: Path, frames: list[Path],
                                 monkeypatch: pytest.MonkeyPatch
                                 ) -> tuple[Engine, list[Path], list[str]]:
    """An engine that has stacked the first of two copied frames, and the list that
    records every path the FITS reader opens from now on."""
    import livestack.storage.fitsio as fitsio

    good = copy_frames(frames[:2], tmp_path / "in")
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    engine.process_path(good[0])  # the first frame loads what the engine needs once
    opened: list[str] = []
    real_open = fitsio._open

    def counting_open(path: Path) -> Any:
        opened.append(str(path))
        return real_open(path)

    monkeypatch.setattr(fitsio, "_open", counting_open)
    return engine, good, opened


def test_a_fits_frame_is_read_once_and_journaled_under_its_content_hash(
        tmp_path: Path, frames: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from livestack.storage.journal import sha256_file

    engine, good, opened = _second_frame_counting_opens(tmp_path, frames, monkeypatch)
    row = engine.process_path(good[1])
    engine.close()
    assert row is not None and row.status == "accepted"
    assert row.sha256 == sha256_file(good[1]) == sha(good[1])
    assert opened == []  # decoded from the bytes the hash read, not opened again


def test_a_fits_file_above_the_single_read_size_is_hashed_streaming_then_read(
        tmp_path: Path, frames: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import livestack.engine.ingest as ingest

    engine, good, opened = _second_frame_counting_opens(tmp_path, frames, monkeypatch)
    # Just below this frame's size: it must not be pulled whole into memory first.
    monkeypatch.setattr(ingest, "SINGLE_READ_MAX_BYTES", good[1].stat().st_size - 1)
    whole_reads: list[str] = []
    monkeypatch.setattr(ingest, "read_file_hashing",
                        lambda path, *_, **__: whole_reads.append(path))  # would fail it
    row = engine.process_path(good[1])
    engine.close()
    assert row is not None and row.status == "accepted"
    assert row.sha256 == sha(good[1])
    assert whole_reads == [] and opened == [str(good[1])]  # header checked, then read


def test_the_decode_while_the_hash_finishes_keeps_the_journals_order(
        tmp_path: Path, frames: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # The ingest decodes a FITS file's bytes before the duplicate check and mark_pending
    # (while the hash finishes); each outcome must still land where the decode used to.
    watch = tmp_path / "in"
    good = copy_frames(frames[:2], watch)
    blob = frames[6].read_bytes()
    truncated = watch / "truncated.fits"
    truncated.write_bytes(blob[: len(blob) // 2])
    copy = watch / "copy.fits"
    shutil.copy2(good[0], copy)
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    row = engine.process_path(truncated)
    assert row is not None and (row.status, row.reason) == ("failed", "truncated")
    assert row.sha256 == sha(truncated)  # a decode failure keeps its sha in the row
    row = engine.process_path(good[0])
    assert row is not None and row.status == "accepted"
    order: list[str] = []
    real_mark = engine.journal.mark_pending

    def marking(*args: Any) -> int:
        order.append("mark_pending")
        return real_mark(*args)

    def bug(path: str, data: Any = None, **kwargs: Any) -> Any:
        order.append("decode")
        raise ZeroDivisionError("a bug in the decoder")

    monkeypatch.setattr(engine.journal, "mark_pending", marking)
    monkeypatch.setattr(engine.reader, "read", bug)
    # A duplicate is ignored as before, whatever its decode gave: nothing is raised.
    row = engine.process_path(copy)
    assert row is not None and (row.status, row.reason) == ("ignored", "duplicate")
    order.clear()
    with pytest.raises(ZeroDivisionError, match="a bug in the decoder") as err:
        engine.process_path(good[1])
    assert order == ["decode", "mark_pending"]
    assert any(c.co_name == "bug" for c in _frames_of(err.value.__traceback__))
    # Raised with the row pending under the file's sha, as before: the worker records the
    # internal error in that row (a file without a row would crash again at every start).
    row = engine.fail_open_row(os.path.abspath(good[1]), "internal_error")
    engine.close()
    assert row is not None and (row.status, row.reason) == ("failed", "internal_error")
    assert row.sha256 == sha(good[1])


def _frames_of(tb: Any) -> list[Any]:
    """The code objects of a traceback, outermost first."""
    codes = []
    while tb is not None:
        codes.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    return codes


def test_calibration_frames_duplicates_and_touched_files(tmp_path: Path,
                                                         frames: list[Path]) -> None:
    watch = tmp_path / "in"
    good = copy_frames(frames[:3], watch)
    dark = watch / "dark_0001.fits"
    write_fits(dark, Simulator(sim_config(), seed=1).dark(0))
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    for path in good:
        engine.process_path(path)
    engine.process_path(dark)
    assert (last_row(engine, dark).status, last_row(engine, dark).reason) == \
        ("ignored", "calibration_frame")
    renamed = watch / "renamed copy.fits"
    shutil.copy2(good[0], renamed)
    os.utime(good[1], ns=(time.time_ns(), time.time_ns()))  # touched, same content
    before = engine.journal.counts()
    assert engine.process_path(good[1]) is None
    dup = engine.process_path(renamed)
    assert dup is not None and (dup.status, dup.reason) == ("ignored", "duplicate")
    after = engine.journal.counts()
    assert after["accepted"] == before["accepted"] and after["ignored"] == 2
    (rt,) = engine.runtimes.values()
    assert rt.session.n_accepted == after["accepted"]
    engine.close()


def test_internal_error_finishes_the_pending_row_and_the_worker_goes_on(
        tmp_path: Path, frames: list[Path], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from livestack.engine.worker import Worker, WorkQueue

    watch = copy_frames(frames[:2], tmp_path / "in")
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    real = engine.reader.select_masters
    calls = iter([RuntimeError("boom")])

    def flaky(info):  # a bug that hits the first frame only
        exc = next(calls, None)
        if exc is not None:
            raise exc
        return real(info)

    monkeypatch.setattr(engine.reader, "select_masters", flaky)
    worker = Worker(lambda: engine, WorkQueue())
    with caplog.at_level(logging.ERROR, logger="livestack.engine"):
        worker._process(engine, watch[0])
        worker._process(engine, watch[1])
    rows = engine.journal.rows(path=str(watch[0]))
    assert [(r.status, r.reason, r.sha256) for r in rows] == [
        ("failed", "internal_error", sha(watch[0]))]  # the one row, finished; no new row
    assert engine.journal.pending() == []
    assert last_row(engine, watch[1]).status == "accepted"
    assert any(r.exc_info and "internal_error" in r.getMessage() for r in caplog.records)
    assert engine.resume() == []  # nothing is retried (and crashes again) at the next start
    engine.close()


# --------------------------------------------------------------------------- resume


def test_resume_from_checkpoint_and_journal_equals_an_uninterrupted_run(
        tmp_path: Path, frames: list[Path]) -> None:
    watch = copy_frames(frames[:7], tmp_path / "in")
    whole = Engine(make_config(tmp_path / "a"), tmp_path / "a" / "stacks")
    for path in watch:
        whole.process_path(path)
    (expected,) = whole.runtimes.values()
    want = expected.session.product().image
    whole.close()

    out = tmp_path / "b" / "stacks"
    first = Engine(make_config(tmp_path / "b"), out)
    for path in watch[:5]:
        first.process_path(path)  # checkpoint after 3 frames; rows 4-5 only in the journal
    first.journal.mark_pending(os.path.abspath(watch[5]), 1, 1, sha(watch[5]))  # "crash"
    assert first.wait_checkpoints(30)
    first.journal.close()  # no finalize: as if killed

    again = Engine(make_config(tmp_path / "b"), out)
    pending = again.resume()
    assert pending == [os.path.abspath(watch[5])]
    (rt,) = again.runtimes.values()
    assert rt.last_seq == 5 and rt.session.n_accepted == again.journal.counts()["accepted"]
    for path in [*pending, watch[6]]:
        again.process_path(path)
    assert rt.session.n_accepted == expected.session.n_accepted
    assert_same_image(rt.session.product().image, want)
    counts = again.journal.counts()
    assert counts["pending"] == 0 and counts["accepted"] == rt.session.n_accepted
    assert len({r.path for r in again.journal.rows()}) == len(again.journal.rows()) == 7
    again.close()


def test_corrupt_checkpoint_falls_back_to_full_replay(tmp_path: Path,
                                                       frames: list[Path],
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    watch = copy_frames(frames[:4], tmp_path / "in")
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    for path in watch:
        engine.process_path(path)
    engine.finalize()
    (rt,) = engine.runtimes.values()
    want = rt.session.product().image
    (rt.folder / CHECKPOINT_NAME).write_bytes(b"garbage")
    engine.close()
    with caplog.at_level(logging.INFO, logger="livestack"):
        again = Engine(make_config(tmp_path), tmp_path / "stacks")
        again.resume()
    assert any("replaying the journal instead" in r.getMessage() for r in caplog.records)
    (rt2,) = again.runtimes.values()
    assert rt2.session.n_accepted == rt.session.n_accepted
    assert_same_image(rt2.session.product().image, want)
    again.close()


def test_checkpoint_thread_survives_a_bug_and_drain_returns(
        caplog: pytest.LogCaptureFixture) -> None:
    from livestack.engine.checkpoints import CheckpointJob, CheckpointThread

    written: list[str] = []

    def write(job: CheckpointJob) -> bool:
        if job.stack_id == "bad":
            raise KeyError("bug in the writer")
        written.append(job.stack_id)
        return True

    def job(stack_id: str) -> CheckpointJob:
        staged = StagedFile(Path("/nonexistent"), Path("/nonexistent.tmp"), "checkpoint")
        return CheckpointJob(stack_id, staged, 0, 0.0, 1, 1, 0)

    thread = CheckpointThread(write)
    with caplog.at_level(logging.ERROR, logger="livestack.engine"):
        thread.submit(job("bad"))
        assert thread.drain(60)
        thread.submit(job("good"))  # the thread is still there to write it
        assert thread.drain(60)
        assert thread.stop(60)
    assert written == ["good"]
    assert any(r.exc_info for r in caplog.records)


# -------------------------------------------------------------------------- routing


def test_two_targets_two_filters_make_four_stacks_and_a_slew_a_fifth(tmp_path: Path) -> None:
    watch = tmp_path / "in"
    targets = [("M 42", 83.82, -5.39), ("M 31", 10.68, 41.27)]
    paths = []
    for i in range(2):
        for name, ra, dec in targets:
            for filt in ("L", "R"):
                cfg = sim_config(object_name=name, filter_name=filt, ra_deg=ra, dec_deg=dec)
                path = watch / f"{name.replace(' ', '')}_{filt}_{i}.fits"
                watch.mkdir(exist_ok=True)
                write_fits(path, Simulator(cfg, seed=4).light(i))
                paths.append(path)
    slewed = watch / "M42_L_slew.fits"
    write_fits(slewed, Simulator(sim_config(ra_deg=85.82, dec_deg=-5.39), seed=5).light(0))
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    for path in paths:
        engine.process_path(path)
    assert len(engine.runtimes) == 4
    assert all(rt.seen == 2 for rt in engine.runtimes.values())
    engine.process_path(slewed)
    assert len(engine.runtimes) == 5
    new_id = last_row(engine, slewed).stack_id
    assert new_id is not None and new_id.endswith("-2")
    engine.finalize()
    for rt in engine.runtimes.values():
        assert rt.folder == tmp_path / "stacks" / rt.stack_id
        if rt.session.n_accepted:
            assert (rt.folder / "stack.fits").is_file()
            assert (rt.folder / "preview.jpg").is_file()
    engine.close()
    # A restart routes the same way (the router state is in the journal).
    again = Engine(make_config(tmp_path), tmp_path / "stacks")
    assert again.ingest.route(read_frame(paths[0])[1]) == last_row(again, paths[0]).stack_id
    again.close()


def test_hub_events_and_an_alert_after_five_rejections(tmp_path: Path,
                                                        frames: list[Path]) -> None:
    watch = copy_frames(frames[:7], tmp_path / "in")
    hub = RecordingHub()
    engine = Engine(make_config(tmp_path), tmp_path / "stacks", hub=hub)  # type: ignore[arg-type]
    for path in watch[:2]:
        engine.process_path(path)
    # A stricter gate from now on (as if clouds came): every frame is rejected.
    engine.config = config_from_dict({"pipeline": {"gate": {"min_stars": 100000}}})
    (rt,) = engine.runtimes.values()
    rt.session.gate.config = engine.config.pipeline.gate
    for path in watch[2:]:
        engine.process_path(path)
    kinds = [e["type"] for e in hub.events]
    frames_ev = [e for e in hub.events if e["type"] == "frame"]
    assert [e["verdict"] for e in frames_ev] == ["accepted"] * 2 + ["rejected"] * 5
    assert all(e["reason"] == "too_few_stars" for e in frames_ev[2:])
    alerts = [e for e in hub.events if e["type"] == "alert"]
    assert [a["code"] for a in alerts] == ["rejection_run"]
    assert kinds.index("alert") > len(kinds) - 3  # right after the fifth rejection
    stack = hub.hub.stack(rt.stack_id)
    assert stack is not None and stack["frames"] == 2 and stack["rejected"] == 5
    assert hub.previews and hub.previews[-1][1] == stack["preview_version"]
    assert len(hub.hub.frames(rt.stack_id)) == 7
    engine.close()


def test_reroute_checkpoints_the_old_stack_at_the_journal_seq(tmp_path: Path,
                                                            frames: list[Path]) -> None:
    watch = copy_frames(frames[:6], tmp_path / "in")
    engine = Engine(make_config(tmp_path, checkpoint_every_frames=1), tmp_path / "stacks",
                    background_checkpoints=False)
    for path in watch[:4]:
        engine.process_path(path)
    (old,) = engine.runtimes
    # Frames 5 and 6 are stacked into the old stack, then moved out of it by a reroute.
    for path in watch[4:]:
        engine.process_path(path)
    engine.redirects[old] = old + "-b"  # where the router now sends these frames
    for path in watch[4:]:
        row = last_row(engine, path)
        engine.journal.finish(row.id, "rejected", reason="no_match", stack_id=old,
                              seq=row.seq)
    engine.ingest.reroute(old, tuple(str(p) for p in watch[4:]))
    assert {last_row(engine, p).stack_id for p in watch[4:]} == {old + "-b"}
    seq = load_checkpoint(tmp_path / "stacks" / old / CHECKPOINT_NAME)[1]["seq"]
    assert seq == engine.journal.last_seq(old) == 4
    engine.close()
    again = Engine(make_config(tmp_path), tmp_path / "stacks")
    assert again.journal.rows_after(old, seq) == []  # a restart replays nothing
    rt = again.runtime(old)
    assert rt.last_seq == 4 and rt.session.n_accepted >= 1
    again.close()


@pytest.mark.parametrize("disk_full", [False, True])
def test_the_final_checkpoint_is_written_in_the_checkpoint_thread(
        tmp_path: Path, frames: list[Path], disk_full: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    import threading

    from livestack.errors import StorageError

    good = copy_frames(frames[:4], tmp_path / "in")
    staged_in: list[tuple[str, int]] = []

    def writer(path: Path, arrays: dict, meta: dict) -> tuple[StagedFile, int]:
        staged_in.append((threading.current_thread().name, int(meta["seq"])))
        if disk_full and threading.current_thread().name == "livestack-checkpoint":
            raise StorageError(f"{path}: cannot write checkpoint: No space left on device")
        return stage_checkpoint(path, arrays, meta)

    # No checkpoint during the frames: the only one is finalize's.
    engine = Engine(make_config(tmp_path, checkpoint_every_frames=100), tmp_path / "stacks",
                    checkpoint_writer=writer)
    for path in good:
        engine.process_path(path)
    with caplog.at_level(logging.ERROR, logger="livestack"):
        engine.finalize()  # waits for the checkpoint thread
    (rt,) = engine.runtimes.values()
    assert staged_in == [("livestack-checkpoint", rt.last_seq)]  # not in the worker
    assert (rt.folder / "stack.fits").is_file() and (rt.folder / "preview.jpg").is_file()
    if disk_full:  # one line naming the file; no checkpoint, no temp file left
        assert [r.getMessage() for r in caplog.records
                if "No space left" in r.getMessage()] == [
            f"{rt.folder / CHECKPOINT_NAME}: cannot write checkpoint: No space left on device "
            "(the previous checkpoint is kept; stacking goes on)"]
        assert not (rt.folder / CHECKPOINT_NAME).exists()
    else:
        _arrays, meta = load_checkpoint(rt.folder / CHECKPOINT_NAME)
        assert meta["seq"] == rt.last_seq and meta["n_accepted"] == rt.session.n_accepted == 4
    assert not [p for p in rt.folder.iterdir() if p.name.endswith(".tmp")]
    engine.close()

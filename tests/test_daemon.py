"""The daemon: bad inputs end as journal rows, resume, routing, commands, signals, systemd.

In-process tests drive :class:`livestack.engine.core.Engine` directly (the code the worker
thread runs); the subprocess test runs ``livestack run`` with a real ``NOTIFY_SOCKET``
and real signals. Frames are small simulated ones (256x192) so the file stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from livestack.config import Config, config_from_dict
from livestack.engine.core import Engine
from livestack.errors import UsageError
from livestack.pipeline.session import StackSession
from livestack.pipeline.types import Transform
from livestack.service.events import Event, event_to_dict
from livestack.sim import SimConfig, Simulator, write_calibration_set, write_fits, write_sequence
from livestack.storage.atomic import StagedFile
from livestack.storage.checkpoint import CHECKPOINT_NAME, load_checkpoint, stage_checkpoint
from livestack.storage.fitsio import read_frame

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

    import livestack.storage.fitsio as fitsio

    real_read = fitsio.read_frame

    def read_and_vanish(path: Path, *args: Any):
        if Path(path).name == "vanish.fits":
            Path(path).unlink()  # the test's own copy disappears while being read
        return real_read(path, *args)

    monkeypatch.setattr(fitsio, "read_frame", read_and_vanish)
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


# ------------------------------------------------------------- subprocess + systemd


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


def test_run_subprocess_systemd_notify_signals_and_outputs(tmp_path: Path,
                                                           frames: list[Path]) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    watch, out = tmp_path / "in", tmp_path / "stacks"
    d = Daemon(["run", "--watch", str(watch), "--output", str(out), "--port", "0"], env)
    try:
        url = d.wait_line(lambda s: "viewer" in s).split()[-1]
        # stdout is a pipe, not a terminal: the token is in a 0600 file, not in the output.
        token_file = Path(d.wait_line(lambda s: "operator token" in s).split()[-1])
        assert token_file == out / "operator-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 24
        messages = [sock.recv(4096).decode()]
        assert messages[0].startswith("READY=1")
        for src in frames[:3]:  # a camera writing into the watched folder
            shutil.copy2(src, watch / (src.name + ".part"))
            os.rename(watch / (src.name + ".part"), watch / src.name)
        wait_rows(out / "journal.sqlite", lambda c: c.get("accepted", 0) + c.get(
            "rejected", 0) == 3)
        # The hub summary follows the journal row; wait for it rather than race it.
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(url + "api/stacks", timeout=60) as resp:
                stacks = json.loads(resp.read())["stacks"]
            if sum(s["frames_seen"] for s in stacks) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert [s["frames"] for s in stacks] == [3]
        # Operator commands: refused without the token, executed by the worker with it.
        def command(name: str, auth: str | None, args: dict | None = None
                    ) -> tuple[int, dict]:
            req = urllib.request.Request(url + f"api/command/{name}",
                                         data=json.dumps(args or {}).encode(),
                                         method="POST",
                                         headers={"Content-Type": "application/json"})
            if auth:
                req.add_header("Authorization", f"Bearer {auth}")
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                return exc.code, {}

        assert command("pause", None)[0] in (401, 403)
        status, reply = command("pause", token)
        assert status == 200 and reply.get("ok") is True, reply
        with urllib.request.urlopen(url + "api/stacks", timeout=60) as resp:
            assert json.loads(resp.read())["stacks"][0]["state"] == "paused"
        assert command("resume", token)[0] == 200
        assert command("snapshot", token)[0] == 200  # writes stack.fits now
        stack_url = url + "api/stacks/" + stacks[0]["stack_id"] + "/stack.fits"
        with urllib.request.urlopen(stack_url, timeout=60) as resp:
            assert resp.read(6) == b"SIMPLE"
        # A status dropped by a full queue (the test was slow to read) comes with a later
        # watchdog ping as "WATCHDOG=1\nSTATUS=...": split datagrams into lines.
        deadline = time.monotonic() + 120
        while not (any(m.startswith("WATCHDOG=1") for m in messages) and any(
                m.startswith("STATUS=") and "3 stacked" in m for m in messages)):
            assert time.monotonic() < deadline, messages[-5:]
            messages.extend(sock.recv(4096).decode().splitlines())
        # Excluding a frame rebuilds in the background (a child process) and swaps.
        status, reply = command("exclude_frame", token, {"file": frames[1].name})
        assert status == 200 and reply.get("ok") is True, reply
        d.wait_line(lambda s: "rebuild (exclude_frame) done: 2 frames" in s, timeout_s=120)
        # Empty the notify queue (AF_UNIX datagram queues hold ~10 messages; a full one
        # makes the daemon's non-blocking notify drop STOPPING).
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(sock.recv(4096).decode())
        sock.settimeout(30)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        code = d.proc.wait(timeout=15)
        assert code == 0 and time.monotonic() - t0 < 10.0
        sock.settimeout(0.5)
        try:
            while True:
                messages.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        sock.close()
    kinds = [m.split("=", 1)[0] for m in messages if not m.startswith("STATUS=")]
    assert kinds.index("READY") < kinds.index("WATCHDOG") < kinds.index("STOPPING")
    (folder,) = {p.parent for p in out.rglob("stack.fits")}
    db = sqlite3.connect(out / "journal.sqlite")
    accepted = db.execute("SELECT COUNT(*) FROM frames WHERE status='accepted' AND active=1"
                          ).fetchone()[0]
    last_seq = db.execute("SELECT MAX(seq) FROM frames").fetchone()[0]
    db.close()
    with fits.open(folder / "stack.fits") as hdul:
        assert hdul[0].header["NCOMBINE"] == accepted == 2
        assert hdul[0].header["INTEGRAT"] == "batch+live"
    assert load_checkpoint(folder / CHECKPOINT_NAME)[1]["seq"] == last_seq
    assert (folder / "preview.jpg").is_file()
    text = "\n".join(d.drain())
    assert token not in text  # never printed nor logged


def test_lag_is_reported_and_second_sigint_exits_at_once(tmp_path: Path,
                                                         frames: list[Path]) -> None:
    watch = copy_frames(frames[:7], tmp_path / "in")
    env = {**os.environ, "LIVESTACK_TEST_PAUSE_AT": "accumulate"}
    env.pop("NOTIFY_SOCKET", None)
    d = Daemon(["run", "--watch", str(watch[0].parent), "--output", str(tmp_path / "out"),
                "--port", "0"], env)
    try:
        d.wait_line(lambda s: "paused at accumulate" in s)  # the worker is stuck mid-frame
        # Frames wait behind it: the lag is reported (nothing is dropped).
        if not any("falling behind:" in text for _, text in d.seen):
            d.wait_line(lambda s: "falling behind:" in s)
        d.proc.send_signal(signal.SIGINT)
        d.wait_line(lambda s: "SIGINT received" in s)
        d.proc.send_signal(signal.SIGINT)
        assert d.proc.wait(timeout=5) == 130
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
    # The interrupted frame is still pending (the next start processes it); the queued
    # ones were never touched and are picked up by the next start's folder scan.
    db = sqlite3.connect(tmp_path / "out" / "journal.sqlite")
    assert db.execute("SELECT status FROM frames").fetchall() == [("pending",)]
    db.close()


# ------------------------------------------------------------- in-process daemon


class _Records(logging.Handler):
    """Counts log records containing ``text``; ``wait(n)`` blocks until n were seen."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.count = 0
        self.cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            with self.cond:
                self.count += 1
                self.cond.notify_all()

    def wait(self, n: int, timeout_s: float = 60.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.count >= n, timeout_s), \
                f"fewer than {n} log records with {self.text!r}"


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


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_watchdog_pings_stop_when_the_observer_thread_dies(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    from livestack.service.watcher import _EnqueueHandler

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    received: queue.Queue[str] = queue.Queue()

    def read() -> None:  # keep reading: a full socket would block the daemon's sends
        with contextlib.suppress(OSError):
            while True:
                received.put(sock.recv(4096).decode())

    threading.Thread(target=read, name="test-notify-reader", daemon=True).start()
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # a ping every 0.5 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    refusals = _Records("the folder watcher has stopped")
    logging.getLogger("livestack.daemon").addHandler(refusals)
    config = config_from_dict({"watch": {"dir": str(tmp_path / "in")},
                               "output": {"dir": str(tmp_path / "stacks")},
                               "server": {"port": 0}})

    def until_mark() -> list[str]:
        """Messages sent before now: datagrams arrive in order, so send a mark and read
        up to it."""
        mark = f"TEST-MARK {time.monotonic()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.sendto(mark.encode(), str(sock_path))
        got = []
        while (message := received.get(timeout=30)) != mark:
            got.append(message)
        return got

    def scenario(daemon) -> None:
        while not received.get(timeout=30).startswith("WATCHDOG=1"):
            pass
        assert daemon.watcher.is_alive()

        def handler_bug(self, event) -> None:
            raise RuntimeError("a handler bug")  # watchdog's observer thread dies of it

        monkeypatch.setattr(_EnqueueHandler, "dispatch", handler_bug)
        (daemon.watch_dir / "trigger.fits").write_bytes(b"SIMPLE")
        refusals.wait(1)
        assert not daemon.watcher.is_alive()
        until_mark()
        refusals.wait(3)  # two whole watchdog periods later ...
        assert not [m for m in until_mark() if m.startswith("WATCHDOG=1")]  # ... no ping

    try:
        assert run_daemon(config, scenario) == 0
    finally:
        logging.getLogger("livestack.daemon").removeHandler(refusals)
        sock.close()


def test_periodic_rescan_picks_up_a_frame_whose_event_was_lost(
        tmp_path: Path, frames: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from livestack.service.watcher import _EnqueueHandler

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    # Every inotify event is lost (queue overflow): only the rescan can see new frames.
    monkeypatch.setattr(_EnqueueHandler, "dispatch", lambda self, event: None)
    config = config_from_dict({"watch": {"dir": str(tmp_path / "in"), "poll_interval_s": 0.1,
                                         "rescan_interval_s": 0.2},
                               "output": {"dir": str(tmp_path / "stacks")},
                               "server": {"port": 0}})

    def scenario(daemon) -> None:
        src = frames[0]
        shutil.copy2(src, daemon.watch_dir / (src.name + ".part"))
        os.rename(daemon.watch_dir / (src.name + ".part"), daemon.watch_dir / src.name)
        wait_rows(daemon.output_root / "journal.sqlite", lambda c: c.get("accepted") == 1)

    assert run_daemon(config, scenario) == 0
    db = sqlite3.connect(tmp_path / "stacks" / "journal.sqlite")
    assert db.execute("SELECT status FROM frames").fetchall() == [("accepted",)]
    db.close()


def test_warm_up_compiles_what_the_first_frame_needs_first() -> None:
    from livestack.engine.warmup import warm_up_steps

    config = Config()
    steps = list(warm_up_steps(config, with_masters=True))
    n = config.pipeline.stack.warmup_frames + 2
    assert steps == ["read", "masters", "first frame",
                     *[f"frame {i}" for i in range(1, n)], "preview", "no masters"]
    assert list(warm_up_steps(config, with_masters=False))[:2] == ["read", "first frame"]


# ------------------------------------------------------------- robustness (review fixes)


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


def test_files_in_the_output_folder_are_never_queued(tmp_path: Path) -> None:
    from livestack.daemon import Daemon as Service

    config = config_from_dict({"watch": {"dir": str(tmp_path)},
                               "output": {"dir": str(tmp_path / "stacks")}})
    service = Service(config)
    service._on_ready(tmp_path / "stacks" / "night" / "m31" / "stack.fits")
    service._on_ready(tmp_path / "light.fits")
    assert service.queue.get(0.0) == ("path", tmp_path / "light.fits")
    assert service.queue.get(0.0) is None


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "livestack.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def test_port_in_use_is_one_line_and_a_clean_exit(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _cli(["run", "--watch", str(tmp_path / "in"), "--output",
                     str(tmp_path / "out"), "--port", str(port)])
        _out, err = proc.communicate(timeout=120)
    assert proc.returncode == UsageError.exit_code
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "cannot listen" in line]
    assert lines == [f"livestack: cannot listen on 127.0.0.1:{port}: address already in use"]
    assert err.rstrip("\n").splitlines()[-1] == lines[0]


def test_sigterm_exits_in_time_when_the_worker_is_stuck(tmp_path: Path,
                                                        frames: list[Path]) -> None:
    watch = copy_frames(frames[:2], tmp_path / "in")
    env = {**os.environ, "LIVESTACK_TEST_PAUSE_AT": "accumulate"}  # stuck for 60 s
    env.pop("NOTIFY_SOCKET", None)
    d = Daemon(["run", "--watch", str(watch[0].parent), "--output", str(tmp_path / "out"),
                "--port", "0"], env)
    try:
        d.wait_line(lambda s: "paused at accumulate" in s, timeout_s=120)
        d.proc.send_signal(signal.SIGTERM)
        code = d.proc.wait(timeout=10.0)  # the stop limit; the worker would sleep 60 s
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
    assert code == 0
    assert any("did not finish in time" in text for text in d.drain())
    db = sqlite3.connect(tmp_path / "out" / "journal.sqlite")
    assert ("pending",) in db.execute("SELECT status FROM frames").fetchall()
    db.close()

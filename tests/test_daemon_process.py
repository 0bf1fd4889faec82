"""The daemon as a process: signals, shutdown, systemd notify and watchdog, the folder rescan.

The subprocess tests run ``livestack run`` with a real ``NOTIFY_SOCKET`` and real
signals; the in-process ones run :class:`livestack.daemon.Daemon` in the test's main
thread.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path

import pytest
from astropy.io import fits

from livestack.config import Config, config_from_dict
from livestack.errors import UsageError
from livestack.storage.checkpoint import CHECKPOINT_NAME, load_checkpoint
from tests.daemon_helpers import (
    Daemon,
    copy_frames,
    frames,
    run_daemon,
    wait_rows,
)

__all__ = ["frames"]  # the module-scoped fixture, from tests.daemon_helpers


# ------------------------------------------------------------- subprocess + systemd


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


# ---------------------------------------------------------------- in-process daemon


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


def test_files_in_the_output_folder_are_never_queued(tmp_path: Path) -> None:
    from livestack.daemon import Daemon as Service

    config = config_from_dict({"watch": {"dir": str(tmp_path)},
                               "output": {"dir": str(tmp_path / "stacks")}})
    service = Service(config)
    service._on_ready(tmp_path / "stacks" / "night" / "m31" / "stack.fits")
    service._on_ready(tmp_path / "light.fits")
    assert service.queue.get(0.0) == ("path", tmp_path / "light.fits")
    assert service.queue.get(0.0) is None


def test_warm_up_compiles_what_the_first_frame_needs_first() -> None:
    from livestack.engine.warmup import warm_up_steps

    config = Config()
    steps = list(warm_up_steps(config, with_masters=True))
    n = config.pipeline.stack.warmup_frames + 2
    assert steps == ["read", "masters", "first frame",
                     *[f"frame {i}" for i in range(1, n)], "preview", "no masters"]
    assert list(warm_up_steps(config, with_masters=False))[:2] == ["read", "first frame"]

"""SystemdNotifier against a real AF_UNIX datagram socket (what systemd listens on)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from livestack.service.notify import SystemdNotifier


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    sock.bind(address)
    sock.settimeout(5.0)
    yield sock, address
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"livestack-test-notify-{os.getpid()}"
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5.0)
    yield sock, "@" + name
    sock.close()


def receive_all(sock: socket.socket, n: int) -> list[str]:
    return [sock.recv(4096).decode() for _ in range(n)]


@pytest.mark.parametrize("which", ["path_socket", "abstract_socket"])
def test_messages_arrive_in_order(which: str, request: pytest.FixtureRequest) -> None:
    sock, address = request.getfixturevalue(which)
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    notifier.ready()
    notifier.watchdog()
    notifier.status("M_42-L-60s: 12 frames\n3 rejected")
    notifier.stopping()
    notifier.close()
    assert receive_all(sock, 4) == ["READY=1", "WATCHDOG=1",
                                    "STATUS=M_42-L-60s: 12 frames 3 rejected", "STOPPING=1"]


def test_nothing_sent_without_notify_socket(path_socket: tuple[socket.socket, str]) -> None:
    sock, _ = path_socket
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}):
        notifier = SystemdNotifier(env)
        assert not notifier.enabled
        notifier.ready()
        notifier.watchdog()
        notifier.stopping()
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_default_environment_is_os_environ(monkeypatch: pytest.MonkeyPatch,
                                           path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    SystemdNotifier().ready()
    assert sock.recv(4096) == b"READY=1"


def test_watchdog_interval() -> None:
    assert SystemdNotifier({}).watchdog_interval_s() is None
    assert SystemdNotifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s() == 15.0
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier(mine).watchdog_interval_s() == 15.0
    other = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert SystemdNotifier(other).watchdog_interval_s() is None
    assert SystemdNotifier({"WATCHDOG_USEC": "junk"}).watchdog_interval_s() is None
    assert SystemdNotifier({"WATCHDOG_USEC": "0"}).watchdog_interval_s() is None


def test_vanished_socket_does_not_raise(tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    notifier.ready()
    notifier.watchdog()
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1                     # logged once, not per ping


def test_a_notify_socket_nobody_reads_never_blocks(tmp_path: Path) -> None:
    sock_path = tmp_path / "full.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(sock_path))  # bound but never read: its queue fills up
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": str(sock_path)})
        done = threading.Event()

        def flood() -> None:
            for _ in range(5000):
                notifier.watchdog()
            done.set()

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        assert done.wait(timeout=30), "sending to a full notify socket blocked"
        notifier.close()
    finally:
        receiver.close()


def test_a_status_dropped_by_a_full_queue_travels_with_the_next_ping(
        path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    sent = 0
    while notifier._send("WATCHDOG=1"):  # nobody reads: fill the datagram queue
        sent += 1
        assert sent < 100_000
    notifier.status("M_42-L-60s: 3 stacked")  # dropped: the queue is full
    sock.setblocking(False)
    drained = []
    while True:
        try:
            drained.append(sock.recv(4096).decode())
        except BlockingIOError:
            break
    assert len(drained) == sent and not any("STATUS" in m for m in drained)
    sock.settimeout(5.0)
    notifier.watchdog()
    notifier.watchdog()
    notifier.close()
    assert receive_all(sock, 2) == ["WATCHDOG=1\nSTATUS=M_42-L-60s: 3 stacked", "WATCHDOG=1"]

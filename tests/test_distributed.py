"""``livestack integrate --scheduler``: the integration's work on a Dask cluster.

A ``distributed.LocalCluster`` of worker processes on 127.0.0.1 runs the unit tests;
``test_cli_on_dask_scheduler_and_two_workers`` starts ``dask scheduler`` and two
``dask worker`` processes and compares the CLI's output with the local engine's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livestack.cli import main
from livestack.errors import FrameReadError, UsageError
from livestack.multisession import plan_sessions
from livestack.pipeline.combine import IntegrateConfig
from livestack.restack import integrate_plan
from livestack.sessionplan import IntegrationPlan
from livestack.sim.nights import Night
from livestack.storage.stackfits import read_stack_fits
from tests.multinight import N_PER_NIGHT, require_distributed, write_two_nights

MB = 2**20
#: Small enough for several tiles at 384 x 288 x 16 frames (4 bands of 80 rows).
TILE_LIMIT_BYTES = 16 * MB
WORKER_LIMIT = "1GB"
READY_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def nights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Night, Night]:
    return write_two_nights(tmp_path_factory.mktemp("nights"))


@pytest.fixture(scope="module")
def plan(nights: tuple[Night, Night]) -> IntegrationPlan:
    a, b = nights
    return plan_sessions([a.stack_dir, b.stack_dir])[0]


@pytest.fixture(scope="module")
def local(plan: IntegrationPlan) -> Any:
    return integrate_plan(plan, IntegrateConfig(std_map=True),
                          memory_limit_bytes=TILE_LIMIT_BYTES)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    require_distributed()
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit=WORKER_LIMIT) as cluster, \
            Client(cluster) as c:
        yield c


def _assert_agrees(a: Any, b: Any) -> None:
    np.testing.assert_array_equal(np.isnan(a.image), np.isnan(b.image))
    np.testing.assert_allclose(a.image, b.image, rtol=1e-6, atol=0, equal_nan=True)
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-6, atol=0, equal_nan=True)
    for name in ("count", "rejected_low", "rejected_high"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def _wait_idle(client: Any, timeout_s: float = 30.0) -> int:
    """Wait (bounded) until the scheduler holds no task of ours; return how many remain."""
    deadline = time.monotonic() + timeout_s
    left = -1
    while time.monotonic() < deadline:
        left = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
        if left == 0:
            break
        time.sleep(0.1)
    return int(left)


def test_dask_result_agrees_with_the_local_engine(client: Any, plan: IntegrationPlan,
                                                  local: Any) -> None:
    from livestack.distributed import integrate_plan_dask

    events: list[tuple[str, int, int]] = []
    result = integrate_plan_dask(plan, IntegrateConfig(std_map=True), client=client,
                                 memory_limit_bytes=TILE_LIMIT_BYTES,
                                 progress=lambda *e: events.append(e))
    _assert_agrees(result, local)
    np.testing.assert_allclose(result.std, local.std, rtol=1e-6, equal_nan=True)
    assert result.header == local.header
    assert [r.file for r in result.records] == [r.file for r in local.records]
    register = [e for e in events if e[0] == "register"]
    combine = [e for e in events if e[0] == "combine"]
    assert [d for _, d, _ in register] == list(range(1, 2 * N_PER_NIGHT + 1))
    assert len(combine) >= 3 and combine[-1][1] == combine[-1][2]  # several tiles
    assert _wait_idle(client) == 0  # everything released on the cluster


def test_workers_calibrate_with_the_named_masters(client: Any, nights: tuple[Night, Night],
                                                  plan: IntegrationPlan,
                                                  tmp_path_factory: pytest.TempPathFactory
                                                  ) -> None:
    from livestack.distributed import MasterPaths, integrate_plan_dask
    from livestack.sim import write_calibration_set
    from livestack.storage.masters import masters_for_cli

    a, _ = nights
    cal = write_calibration_set(tmp_path_factory.mktemp("cal"), a.simulator.config, seed=5,
                                n_bias=0, n_darks=3, n_flats=0, simulator=a.simulator)
    here = integrate_plan(plan, masters=masters_for_cli(darks=cal["darks"]),
                          memory_limit_bytes=TILE_LIMIT_BYTES)
    there = integrate_plan_dask(plan, client=client, masters=MasterPaths(darks=str(cal["darks"])),
                                memory_limit_bytes=TILE_LIMIT_BYTES)
    _assert_agrees(there, here)
    assert "dark" in there.header["HISTORY"].split("masters:")[1]
    uncalibrated = integrate_plan(plan, memory_limit_bytes=TILE_LIMIT_BYTES)
    assert np.nanmean(np.abs(there.image - uncalibrated.image)) > 0.1  # darks did something


def _vm_hwm_bytes() -> int:
    """This process's peak resident set since its ``exec`` (``/proc/self/status``), bytes."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def test_worker_memory_stays_within_the_limit(client: Any, plan: IntegrationPlan) -> None:
    from livestack.distributed import integrate_plan_dask

    integrate_plan_dask(plan, client=client, memory_limit_bytes=TILE_LIMIT_BYTES)
    # The worker's own high-water mark (VmHWM, per address space): ru_maxrss would also
    # carry the RSS of the pytest process that spawned it (Linux keeps the larger one
    # across fork and exec), which earlier tests in the same run may have grown past 1 GB.
    peaks = client.run(_vm_hwm_bytes)
    limit = 2**30  # WORKER_LIMIT
    assert len(peaks) == 2 and all(0 < p <= limit for p in peaks.values()), peaks


def test_a_killed_worker_changes_nothing(client: Any, plan: IntegrationPlan,
                                         local: Any) -> None:
    from livestack.distributed import integrate_plan_dask, worker_pids

    client.wait_for_workers(2, timeout=READY_TIMEOUT_S)
    pids = worker_pids(client)
    victim = sorted(pids.values())[0]
    killed: list[int] = []

    def kill_after_three(stage: str, done: int, total: int) -> None:
        if stage == "register" and done == 3 and not killed:
            os.kill(victim, signal.SIGKILL)  # mid-run: it holds registered frames
            killed.append(victim)

    result = integrate_plan_dask(plan, IntegrateConfig(std_map=True), client=client,
                                 memory_limit_bytes=TILE_LIMIT_BYTES, progress=kill_after_three)
    assert killed == [victim]
    _assert_agrees(result, local)
    assert victim not in worker_pids(client).values()
    client.wait_for_workers(2, timeout=READY_TIMEOUT_S)  # the nanny restarted it


def test_ctrl_c_cancels_the_futures(client: Any, plan: IntegrationPlan) -> None:
    from livestack.distributed import integrate_plan_dask

    def interrupt(stage: str, done: int, total: int) -> None:
        if stage == "register" and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        integrate_plan_dask(plan, client=client, memory_limit_bytes=TILE_LIMIT_BYTES,
                            progress=interrupt)
    assert _wait_idle(client) == 0


def test_a_missing_frame_is_named_and_cancels_the_run(client: Any, plan: IntegrationPlan,
                                                      tmp_path: Path) -> None:
    from livestack.distributed import integrate_plan_dask

    gone = str(tmp_path / "gone.fits")
    frames = list(plan.frames)
    frames[5] = replace(frames[5], path=gone)
    broken = replace(plan, frames=tuple(frames))
    with pytest.raises(FrameReadError) as info:
        integrate_plan_dask(broken, client=client, memory_limit_bytes=TILE_LIMIT_BYTES)
    assert info.value.reason == "missing" and gone in str(info.value)
    assert _wait_idle(client) == 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def not_dask() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that answers with HTTP, not the Dask protocol."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" * 64)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.mark.parametrize("kind", ["closed", "malformed", "not-dask"])
def test_bad_scheduler_address_is_one_line_and_writes_nothing(
        nights: tuple[Night, Night], tmp_path: Path, kind: str, not_dask: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    require_distributed()
    import livestack.distributed

    monkeypatch.setattr(livestack.distributed, "CONNECT_TIMEOUT_S", 3.0)
    address = {"closed": f"tcp://127.0.0.1:{_closed_port()}", "malformed": "nonsense://x:1",
               "not-dask": not_dask}[kind]
    a, b = nights
    out = tmp_path / "out.fits"
    code = main(["integrate", str(a.stack_dir), str(b.stack_dir), "-o", str(out),
                 "--scheduler", address, "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("livestack:")]
    assert code != 0
    assert len(err) == 1 and err[0].startswith(f"livestack: --scheduler {address}: ")
    assert list(tmp_path.iterdir()) == []


def test_keep_registered_is_refused_with_a_scheduler(nights: tuple[Night, Night],
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    require_distributed()
    a, _ = nights
    code = main(["integrate", str(a.stack_dir), "-o", str(tmp_path / "out.fits"),
                 "--scheduler", "tcp://127.0.0.1:1", "--keep-registered", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err == ["livestack: --keep-registered cannot be used with "
                                 "--scheduler: the registered frames stay on the workers"]
    assert list(tmp_path.iterdir()) == []


def test_scheduler_without_dask_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from livestack.distributed import check_cluster_options, connect

    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails as if missing
    with pytest.raises(UsageError, match=r"livestack\[distributed\]"):
        check_cluster_options(object())
    with pytest.raises(UsageError, match=r"livestack\[distributed\]"):
        connect("tcp://127.0.0.1:1")


def _dask_cli() -> list[str]:
    return [sys.executable, "-c", "import sys; from dask.cli import run_cli; "
                                  "sys.argv[0] = 'dask'; run_cli()"]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


@pytest.mark.slow
def test_cli_on_dask_scheduler_and_two_workers(nights: tuple[Night, Night],
                                               tmp_path: Path) -> None:
    require_distributed()
    from distributed import Client

    a, b = nights
    scheduler_file = tmp_path / "scheduler.json"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(
            [*_dask_cli(), "scheduler", "--host", "127.0.0.1", "--port", "0",
             "--no-dashboard", "--scheduler-file", str(scheduler_file)],
            stdout=subprocess.DEVNULL, stderr=(logs / "scheduler.log").open("wb")))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not scheduler_file.exists() and time.monotonic() < deadline:
            assert procs[0].poll() is None, (logs / "scheduler.log").read_text()
            time.sleep(0.1)
        assert scheduler_file.exists(), "dask scheduler did not start"
        for k in range(2):
            procs.append(subprocess.Popen(
                [*_dask_cli(), "worker", "--scheduler-file", str(scheduler_file),
                 "--nworkers", "1", "--nthreads", "1", "--memory-limit", WORKER_LIMIT,
                 "--host", "127.0.0.1", "--no-dashboard"],
                stdout=subprocess.DEVNULL, stderr=(logs / f"worker{k}.log").open("wb")))
        with Client(scheduler_file=str(scheduler_file), timeout=READY_TIMEOUT_S) as c:
            c.wait_for_workers(2, timeout=READY_TIMEOUT_S)
            address = c.scheduler.address
        common = [str(a.stack_dir), str(b.stack_dir), "--no-progress", "--std-map",
                  "--memory-limit", "16MB"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cli = [sys.executable, "-m", "livestack.cli", "integrate"]
        on_dask = subprocess.run([*cli, *common, "--scheduler", address, "-o",
                                  str(tmp_path / "dask.fits")], capture_output=True,
                                 timeout=600, env=env, check=False)
        assert on_dask.returncode == 0, on_dask.stderr.decode()
        here = subprocess.run([*cli, *common, "-o", str(tmp_path / "local.fits")],
                              capture_output=True, timeout=600, env=env, check=False)
        assert here.returncode == 0, here.stderr.decode()
        _assert_agrees(read_stack_fits(tmp_path / "dask.fits"),
                       read_stack_fits(tmp_path / "local.fits"))
        assert b"16 frames integrated" in on_dask.stdout
    finally:
        _stop(procs[1:])
        _stop(procs[:1])

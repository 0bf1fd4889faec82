"""Issue 15: ``run --bias/--darks/--flats``, the uncalibrated warning, ``--lan``, one-line
folder errors, the kernel-compiling helper of a first start.

Subprocess tests run the real ``livestack`` command on small simulated frames.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from livestack import precompile, runopts
from livestack.cli import build_parser, cmd_run
from livestack.config import config_from_dict
from livestack.errors import UsageError
from livestack.sim import SimConfig, write_calibration_set, write_sequence
from tests.daemon_helpers import Daemon as RunProcess
from tests.daemon_helpers import wait_rows

SIM = SimConfig(width=200, height=150, n_stars=120)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livestack.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=_env())


# ------------------------------------------------------------------ point 5: folder errors


@pytest.mark.parametrize("kind", ["uncreatable", "a file", "below a file"])
def test_a_bad_watch_folder_is_one_line_without_traceback(tmp_path: Path, kind: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    watch = {"uncreatable": "/proc/nope", "a file": "afile",
             "below a file": "afile/sub"}[kind]
    proc = _run(["run", "--watch", watch, "--output", "out", "--port", "0"], cwd=tmp_path)
    assert proc.returncode == UsageError.exit_code, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    shown = watch if watch.startswith("/") else str(tmp_path / watch)
    assert line.startswith(f"livestack: {shown}: ") and "watch folder" in line, line
    assert afile.read_text() == "not a folder\n"  # the user's file is untouched


def test_an_output_folder_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    proc = _run(["run", "--watch", "in", "--output", "out", "--port", "0"], cwd=tmp_path)
    assert proc.returncode == UsageError.exit_code
    assert proc.stderr.strip() == (f"livestack: {tmp_path / 'out'}: the output folder is a "
                                   "file, not a folder")


# ---------------------------------------------- point 2: calibration from the command line


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four small lights and a raw calibration set (bias, darks, flats) of one camera."""
    root = tmp_path_factory.mktemp("night")
    write_sequence(root / "lights", SIM, seed=3, n_frames=4)
    folders = write_calibration_set(root / "calibration", SIM, 3, n_bias=3, n_darks=3,
                                    n_flats=3)
    return {"lights": root / "lights", **folders}


def _stack_with(tmp_path: Path, lights: Path, extra: list[str]) -> str:
    """``livestack run`` on a copy of the lights until all four are processed; stderr."""
    watch = tmp_path / "in"
    out = tmp_path / "out"
    proc = RunProcess(["run", "--watch", str(watch), "--output", str(out), "--port", "0",
                       *extra], _env())
    try:
        proc.wait_line(lambda s: "viewer" in s, timeout_s=120)
        for src in sorted(lights.glob("*.fits")):
            os.link(src, watch / src.name)
        wait_rows(out / "journal.sqlite",
                  lambda c: c.get("accepted", 0) + c.get("rejected", 0) == 4, timeout_s=120)
    finally:
        _stop(proc)
    return "\n".join(line for name, line in proc.seen if name == "err")


def _stop(proc: RunProcess) -> None:
    """SIGINT the daemon, wait for it, collect the lines it printed into ``proc.seen``."""
    if proc.proc.poll() is None:
        proc.proc.send_signal(signal.SIGINT)
        try:
            proc.proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.proc.kill()
            proc.proc.wait()
    while not proc.lines.empty():
        proc.seen.append(proc.lines.get())


def test_run_calibrates_from_raw_folders_and_warns_once_without_masters(
        tmp_path: Path, night: dict[str, Path]) -> None:
    # No masters: one clear warning, not one per frame.
    err = _stack_with(tmp_path / "plain", night["lights"], [])
    warnings = [line for line in err.splitlines() if "stacked uncalibrated" in line]
    assert len(warnings) == 1 and "--darks" in warnings[0], err
    # --bias/--darks/--flats with raw frames: masters built into the output, used, no warning.
    calibrated = tmp_path / "calibrated"
    err = _stack_with(calibrated, night["lights"], ["--bias", str(night["bias"]), "--darks",
                                   str(night["darks"]), "--flats", str(night["flats"])])
    assert "uncalibrated" not in err and "stacked with no" not in err, err
    (line,) = [s for s in err.splitlines() if "masters for 200x150 frames" in s]
    assert "bias x3" in line and "dark 60s" in line and "flat 'L' x3" in line, line
    built = sorted(p.name for p in (calibrated / "out" / runopts.RUN_MASTERS_DIR).iterdir())
    assert len(built) == 3 and all(name.startswith("master_") for name in built)


def test_run_masters_from_master_files_and_a_missing_folder(tmp_path: Path,
                                                            night: dict[str, Path]) -> None:
    from livestack.storage.masters import build_masters_from_dirs

    masters = build_masters_from_dirs(tmp_path / "m", bias_dir=night["bias"],
                                      dark_dir=night["darks"])
    dark = next(p for p in masters if "dark" in p.name)
    config = runopts.with_run_masters(config_from_dict({"output": {"dir": str(tmp_path / "o")}}),
                                      darks=dark, bias=tmp_path / "m")
    assert config.masters.paths == (str(tmp_path / "m"), str(dark))
    assert not (tmp_path / "o").exists()  # nothing built, nothing written
    # Only a dark: the light lacks a flat, and the warning says so.
    from livestack.pipeline.calibrate import MasterSet

    assert runopts.calibration_gap(MasterSet(description=("dark 60s -10.0C x3",))) == "no flat"
    assert runopts.calibration_gap(MasterSet(description=("bias x3",))) == \
        "no dark and no flat"
    assert runopts.calibration_gap(None) == "no master frames"
    proc = _run(["run", "--darks", str(tmp_path / "nope"), "--port", "0"], cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"livestack: {tmp_path / 'nope'}: no such dark file or folder"


# ------------------------------------------------------------------------- point 3: --lan


def test_lan_flag_serves_all_interfaces_and_prints_phone_urls(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = {}

    class FakeDaemon:  # the config cmd_run builds, without binding 0.0.0.0 in a test
        def __init__(self, config: object) -> None:
            seen["config"] = config

        def run(self) -> int:
            return 0

    import livestack.cli
    import livestack.daemon
    from livestack.daemon import Daemon

    monkeypatch.setattr(livestack.daemon, "Daemon", FakeDaemon)
    monkeypatch.setattr(livestack.cli, "configure_logging", lambda level: None)
    args = build_parser().parse_args(["run", "--lan", "--watch", str(tmp_path / "w"),
                                      "--output", str(tmp_path / "o")])
    assert cmd_run(args) == 0
    server = seen["config"].server  # type: ignore[attr-defined]
    assert server.host == "0.0.0.0" and server.allow_lan
    # The banner of a LAN daemon: one URL per address, and how the token works.
    (tmp_path / "o").mkdir()  # the token file goes there (stdout is not a terminal)
    out = io.StringIO()
    daemon = Daemon(seen["config"], out=out)  # type: ignore[arg-type]
    daemon.port = 8765
    monkeypatch.setattr(runopts, "lan_addresses", lambda: ["192.168.1.20", "10.0.0.5"])
    daemon._print_banner()
    text = out.getvalue()
    assert "http://192.168.1.20:8765/" in text and "http://10.0.0.5:8765/" in text
    assert "operator token" in text and "commands" in text


def test_lan_addresses_are_not_loopback() -> None:
    addrs = runopts.lan_addresses()
    assert all(not a.startswith("127.") and a.count(".") == 3 for a in addrs)
    lines = runopts.lan_banner(9000, token_from_config=True, addresses=[])
    assert "http://<this computer's address>:9000/" in "\n".join(lines)
    assert "server.token" in lines[-1]


# ------------------------------------------------------------- point 1: the compile helper


def test_precompile_helper_starts_only_with_a_cold_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert not precompile.cache_is_warm()
    for folder in precompile._cache_dirs():
        folder.mkdir(parents=True, exist_ok=True)
    for rel, folder in zip(precompile.KERNEL_MODULES, precompile._cache_dirs(), strict=True):
        (folder / f"{Path(rel).stem}.kernel-1.py311.nbi").write_bytes(b"")
    assert precompile.cache_is_warm()
    assert precompile.start() is None  # warm: nothing to do


# --------------------------------------------------------------------- point 7: quiet log


def test_requests_and_connections_log_nothing_at_info(tmp_path: Path) -> None:
    import urllib.request

    from websockets.sync.client import connect

    proc = RunProcess(["run", "--watch", str(tmp_path / "in"), "--output",
                       str(tmp_path / "out"), "--port", "0"], _env())
    try:
        url = proc.wait_line(lambda s: "viewer" in s, timeout_s=120).split()[-1]
        for path in ("", "app.js", "api/stacks", "healthz", "nope") * 4:
            try:
                urllib.request.urlopen(url + path, timeout=30).read()
            except OSError:  # the 404 of "nope"
                pass
        for _ in range(3):
            with connect(url.replace("http", "ws", 1) + "ws", open_timeout=30) as ws:
                assert '"hello"' in str(ws.recv(timeout=30))
    finally:
        _stop(proc)
    err = [line for name, line in proc.seen if name == "err"]
    chatter = ("connection open", "connection closed", "connection rejected", "HTTP ")
    assert err and not [line for line in err if any(c in line for c in chatter)], err
    assert len(err) <= 8, err  # start and stop lines only


def test_viewer_tally_summarises_a_period_with_viewers_only() -> None:
    from livestack.service.viewerlog import ViewerTally

    tally = ViewerTally(interval_s=600.0, start_s=0.0)
    assert tally.observe(10.0, 0) is None
    assert tally.observe(20.0, 2) is None
    assert tally.observe(30.0, 1) is None
    assert tally.observe(40.0, 3) is None  # two more arrived
    assert tally.observe(600.0, 1) == "viewers: 1 now, peak 3, 4 connected in the last 10 min"
    assert tally.observe(900.0, 0) is None
    # The last viewer left during this period: one more line, then silence.
    assert tally.observe(1200.0, 0) == "viewers: 0 now, peak 1, 0 connected in the last 10 min"
    assert tally.observe(1800.0, 0) is None


# ------------------------------------------------------ point 4: one source of key docs


REPO = Path(__file__).resolve().parent.parent


def test_committed_example_file_is_the_generated_one() -> None:
    from livestack.config import Config
    from livestack.config_docs import render

    committed = (REPO / "config" / "livestack.yaml").read_text(encoding="utf-8")
    assert committed == render(Config()), (
        "config/livestack.yaml is out of date: run "
        "`python -m livestack.config_docs > config/livestack.yaml`")


def test_every_key_is_documented_in_its_dataclass() -> None:
    from livestack.config import field_paths
    from livestack.config_docs import key_docs

    docs = key_docs()
    assert list(docs) == field_paths()
    undocumented = [key for key, text in docs.items() if len(text) < 10]
    assert not undocumented, f"add an Attributes entry for {undocumented}"


def test_attribute_sections_are_parsed_generically() -> None:
    from dataclasses import dataclass, field

    from livestack.config_docs import attribute_docs, render

    @dataclass(frozen=True)
    class Widget:
        """A made-up section, as another branch might add.

        Attributes
        ----------
        speed_px_s : float
            How fast, in pixels per second. A long explanation that goes on and on so
            that it must wrap.

            A second paragraph.
        low, high : int
            Both ends (shared text).

        Notes
        -----
        Not an attribute.
        """

        speed_px_s: float = 1.5
        low: int = field(default=1, metadata={"min": 0})
        high: int = 9

    docs = attribute_docs(Widget)
    assert docs == {"speed_px_s": "How fast, in pixels per second. A long explanation that "
                                  "goes on and on so that it must wrap.\n\nA second paragraph.",
                    "low": "Both ends (shared text).", "high": "Both ends (shared text)."}
    text = render(Widget(), header="h")
    assert "# A second paragraph.\nspeed_px_s: 1.5\n" in text
    assert "low: 1\n# Both ends (shared text).\nhigh: 9\n" in text


def test_config_show_prints_each_key_with_its_comment(tmp_path: Path) -> None:
    import yaml

    from livestack.config import config_from_dict

    path = tmp_path / "c.yaml"
    path.write_text("server: {port: 9001, token: hunter2}\nmasters: {paths: [/m]}\n")
    proc = _run(["config", "show", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout
    lines = proc.stdout.splitlines()
    port = lines.index("  port: 9001")
    assert lines[port - 1].startswith("  # TCP port"), lines[port - 1]
    assert "  paths:\n  - /m" in proc.stdout or "  paths: [/m]" in proc.stdout
    shown = yaml.safe_load(proc.stdout)
    shown["server"]["token"] = None
    assert config_from_dict(shown).server.port == 9001


# ---------------------------------------------------- points 8 and 9: README, dist name


def test_distribution_name_is_not_the_taken_one_and_the_readme_installs_it() -> None:
    import re  # (tomllib is Python >= 3.11 only)

    pyproject = (REPO / "pyproject.toml").read_text()
    match = re.search(r'^name = "([^"]+)"$', pyproject, re.M)
    assert match and match.group(1) != "livestack"  # PyPI's livestack is another package
    assert '\n[project.scripts]\nlivestack = "livestack.cli:main"\n' in pyproject
    readme = (REPO / "README.md").read_text()
    assert f"pip install {match.group(1)}" in readme
    # The two one-line newcomer commands stay.
    assert "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/livestack demo" \
        in readme
    assert ('python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && '
            '.venv/bin/python -m pytest -q') in readme
    for flag in ("--bias", "--darks", "--flats", "--lan", "/usr/local/bin/livestack",
                 ".venv/bin/activate", "60 frames", "stacks kept in"):
        assert flag in readme, flag


# ------------------------------- point 1: numpy paths of the first frame (no compile wait)


@pytest.mark.parametrize("nc", [1, 3])
def test_identity_warp_in_numpy_equals_the_shift_kernel_bit_for_bit(nc: int) -> None:
    import numpy as np

    from livestack.pipeline import kernels_warp as kw
    from livestack.pipeline.types import Transform
    from livestack.pipeline.warp import _SHIFT_BLOCK_ROWS, warp

    rng = np.random.default_rng(5)
    image = rng.normal(100.0, 10.0, (nc, 50, 70)).astype(np.float32)
    image[0, 3, 4], image[-1, 10, 11], image[0, 20, 20] = np.nan, np.inf, -0.0
    out, foot = np.empty_like(image), np.empty((50, 70), dtype=np.bool_)
    one = np.ones(1, dtype=np.float32)
    kw.warp_shift_kernel(image, 0, one, 0, one, out, foot, _SHIFT_BLOCK_ROWS)
    got = warp(image if nc == 3 else image[0], Transform.identity(), (50, 70))
    np.testing.assert_array_equal(got.footprint, foot)
    assert not foot[3, 4] and not foot[10, 11]
    assert np.array_equal(got.image.reshape(out.shape).view(np.uint32), out.view(np.uint32))


def test_first_frame_preview_in_numpy_matches_the_kernel_path() -> None:
    import numpy as np

    from livestack.pipeline.accumulate import RunningStack, StackConfig
    from livestack.pipeline.kernels_binning import block_mean_counted

    rng = np.random.default_rng(6)
    frame = rng.normal(500.0, 20.0, (61, 83)).astype(np.float32)
    foot = np.ones(frame.shape, dtype=np.bool_)
    foot[:, :9] = False  # an uncovered band, as after a shift
    frame[30, 40] = np.nan
    stack = RunningStack(frame.shape, StackConfig())
    stack.add(frame, foot, 1.3, 4.0)
    mean, _, _, count, _, _ = stack._planes()  # the replay kernel's provisional state
    expected = block_mean_counted(mean, count, 4)[0]
    got = stack.preview_mean(21)  # block factor ceil(83 / 21) = 4
    assert got.shape == expected.shape == (15, 20)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)
    assert np.isnan(got[:, :2]).all() and np.isfinite(got[:, 3:]).all()

"""The unit files in systemd/: accepted by `systemd-analyze verify` and saying what we need."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parents[2] / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
INSTALLED_EXE = "/usr/local/bin/livestack"


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections -> ordered (key, value) pairs; systemd allows repeated keys."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def require_systemd_analyze() -> str:
    if SYSTEMD_ANALYZE is None:
        msg = "systemd-analyze not found (Debian package 'systemd')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires it")
        pytest.skip(msg)
    return SYSTEMD_ANALYZE


@pytest.mark.parametrize(("unit_name", "load_as"), [
    ("livestack.service", "livestack.service"),
    ("livestack@.service", "livestack@cam1.service"),
])
def test_systemd_analyze_verify_accepts_unit(unit_name: str, load_as: str,
                                             tmp_path: Path) -> None:
    analyze = require_systemd_analyze()
    # verify insists that ExecStart exists: point it at a stub executable
    stub = tmp_path / "bin" / "livestack"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = (UNIT_DIR / unit_name).read_text()
    assert INSTALLED_EXE in text
    (tmp_path / unit_name).write_text(text.replace(INSTALLED_EXE, str(stub)))
    if load_as != unit_name:
        (tmp_path / load_as).write_text(text.replace(INSTALLED_EXE, str(stub)))
    result = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / load_as)],
                            capture_output=True, text=True, timeout=60, check=False)
    # unknown keys and bad values are only warnings on stderr, so look at stderr too
    ours = [line for line in result.stderr.splitlines() if "livestack" in line]
    assert result.returncode == 0, result.stderr
    assert ours == [], result.stderr


def test_systemd_analyze_rejects_a_broken_copy(tmp_path: Path) -> None:
    """Guard for the test above: verify does complain about what we look for."""
    analyze = require_systemd_analyze()
    text = (UNIT_DIR / "livestack.service").read_text()
    broken = text.replace("WatchdogSec=30", "WatchdogSecs=30").replace(
        INSTALLED_EXE, str(tmp_path / "missing" / "livestack"))
    (tmp_path / "livestack.service").write_text(broken)
    result = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "livestack.service")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "WatchdogSecs" in result.stderr


@pytest.mark.parametrize("unit_name", ["livestack.service", "livestack@.service"])
def test_unit_settings(unit_name: str) -> None:
    unit = parse_unit(UNIT_DIR / unit_name)
    svc = "Service"
    for key, expected in [("Type", "notify"), ("NotifyAccess", "main"), ("WatchdogSec", "30"),
                          ("Restart", "on-failure"), ("RestartSec", "5"),
                          ("User", "livestack"), ("Group", "livestack"),
                          ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                          ("PrivateTmp", "yes"), ("ProtectHome", "read-only"),
                          ("TimeoutStopSec", "15"), ("KillSignal", "SIGTERM"),
                          ("RestartPreventExitStatus", "2"), ("LimitNOFILE", "8192")]:
        assert values(unit, svc, key) == [expected], key
    assert values(unit, svc, "DynamicUser") == []          # frames are shared: fixed user
    assert values(unit, svc, "MemoryDenyWriteExecute") == []   # numba JIT needs W+X pages
    (exec_start,) = values(unit, svc, "ExecStart")
    envs = values(unit, svc, "Environment")
    (rw,) = values(unit, svc, "ReadWritePaths")
    if unit_name == "livestack.service":
        assert exec_start == f"{INSTALLED_EXE} run -c /etc/livestack/livestack.yaml"
        assert values(unit, svc, "StateDirectory") == ["livestack"]
        assert values(unit, svc, "CacheDirectory") == ["livestack"]
        assert "NUMBA_CACHE_DIR=/var/cache/livestack/numba" in envs
        assert rw.split() == ["/var/lib/livestack", "-/srv/astro"]
    else:
        assert exec_start == f"{INSTALLED_EXE} run -c /etc/livestack/%i.yaml"
        assert values(unit, svc, "StateDirectory") == ["livestack/%i"]
        assert values(unit, svc, "CacheDirectory") == ["livestack/%i"]
        assert "NUMBA_CACHE_DIR=/var/cache/livestack/%i/numba" in envs
        assert rw.split() == ["/var/lib/livestack/%i", "-/srv/astro"]
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]

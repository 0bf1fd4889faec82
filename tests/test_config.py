"""Configuration: YAML -> frozen dataclasses, one-line errors naming file and key path."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from livestack.config import (
    Config,
    config_from_dict,
    config_to_dict,
    dump_config,
    field_paths,
    load_config,
)
from livestack.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "livestack.yaml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "live.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file() -> None:
    config = load_config(None)
    assert config.watch.dir == "./incoming" and config.output.dir == "./stacks"
    assert (config.server.host, config.server.port, config.server.token) == ("127.0.0.1",
                                                                             8765, None)
    assert config.source is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.watch.dir = "x"  # type: ignore[misc]


def test_file_values_and_nested_pipeline_sections(tmp_path: Path) -> None:
    path = _write(tmp_path, """
watch: {dir: /data/in, polling: true, poll_interval_s: 2}
masters: {paths: [/m/bias.fits, /m/darks]}
pipeline:
  stack: {kappa_low: 2.5}
""")
    config = load_config(path)
    assert config.watch.dir == "/data/in" and config.watch.polling is True
    assert config.watch.poll_interval_s == 2.0 and isinstance(config.watch.poll_interval_s,
                                                              float)
    assert config.masters.paths == ("/m/bias.fits", "/m/darks")
    assert config.pipeline.stack.kappa_low == 2.5
    assert config.pipeline.stack.kappa_high == Config().pipeline.stack.kappa_high
    assert config.source == str(path)


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("watch: {dirr: x}", "watch.dirr", "unknown key"),
    ("colour: {a: 1}", "colour", "unknown key"),
    ("pipeline: {stack: {kappa_hi: 3}}", "pipeline.stack.kappa_hi", "unknown key"),
    ("server: {port: eighty}", "server.port", "expected an integer"),
    ("server: {port: 70000}", "server.port", "must be <= 65535"),
    ("watch: {polling: 1}", "watch.polling", "expected true or false"),
    ("output: {checkpoint_every_frames: 0}", "output.checkpoint_every_frames", "must be >= 1"),
    ("output: {checkpoint_every_s: 0}", "output.checkpoint_every_s", "must be > 0"),
    ("masters: {paths: /a/b}", "masters.paths", "expected list of"),
    ("log: {level: LOUD}", "log.level", "expected one of"),
    ("pipeline: {stack: {kappa_low: -1}}", "pipeline.stack.kappa_low", "must be > 0"),
    ("watch: 3", "watch", "expected a mapping"),
])
def test_bad_values_name_file_and_key_path(tmp_path: Path, text: str, key: str,
                                           problem: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message


def test_non_loopback_host_needs_allow_lan(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.host: '0\.0\.0\.0' is not a loopback"):
        load_config(_write(tmp_path, "server: {host: 0.0.0.0}"))
    assert load_config(_write(tmp_path, "server: {host: 0.0.0.0, allow_lan: true}"))
    assert load_config(None, {"server.host": "::1"}).server.host == "::1"


def test_recursive_watch_must_not_contain_the_output(tmp_path: Path) -> None:
    watch = tmp_path / "in"
    inside = {"watch.dir": str(watch), "output.dir": str(watch / "stacks")}
    with pytest.raises(ConfigError) as err:
        load_config(None, {**inside, "watch.recursive": True})
    message = str(err.value)
    assert "\n" not in message
    assert "output.dir" in message and "watch.dir" in message and "recursive" in message
    assert load_config(None, inside).watch.recursive is False  # not recursive: fine
    beside = {"watch.dir": str(watch), "output.dir": str(tmp_path / "instack"),
              "watch.recursive": True}  # a sibling whose name starts the same: fine
    assert load_config(None, beside).watch.recursive is True


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"live\.yaml: line \d+: invalid YAML"):
        load_config(_write(tmp_path, "watch: [unclosed"))
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_overrides_win_over_the_file_and_are_validated(tmp_path: Path) -> None:
    path = _write(tmp_path, "watch: {dir: /from/file}\nserver: {port: 9000}\n")
    config = load_config(path, {"watch.dir": "/from/cli", "server.port": None})
    assert config.watch.dir == "/from/cli" and config.server.port == 9000
    with pytest.raises(ConfigError, match=r"server\.port: must be >= 0"):
        load_config(path, {"server.port": -5})


def test_show_round_trips_and_redacts_the_token(tmp_path: Path) -> None:
    config = config_from_dict({"server": {"token": "s3cret"}, "watch": {"dir": "/w"}})
    text = dump_config(config)
    assert "s3cret" not in text and "<redacted>" in text
    plain = config_to_dict(config, redact_token=False)
    again = config_from_dict(plain)
    assert again == dataclasses.replace(config, source=None)


def test_example_file_loads_and_documents_every_key() -> None:
    config = load_config(EXAMPLE)
    assert dataclasses.replace(config, source=None) == Config(), \
        "config/livestack.yaml must show the defaults"
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))

    def has(path: str) -> bool:
        node = raw
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = [p for p in field_paths() if not has(p)]
    assert not missing, f"config/livestack.yaml lacks {missing}"
    # Every key carries a comment (on its line or the line(s) above).
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^\s*([a-z_0-9]+):\s*(\S.*)?$", line)
        if m and m.group(2) and not m.group(2).startswith("#"):
            above = lines[i - 1].strip() if i else ""
            assert "#" in line or above.startswith("#"), f"undocumented: {line!r}"


def test_cli_config_check_error_is_one_line_exit_2(tmp_path: Path) -> None:
    path = _write(tmp_path, "output: {fits_every_frames: -3}\n")
    proc = subprocess.run([sys.executable, "-m", "livestack.cli", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"livestack: {path}: output.fits_every_frames: "
                                   "must be >= 1, got -3")
    assert "Traceback" not in proc.stderr


def test_warp_kernel_is_one_of_the_warp_kernels(tmp_path: Path) -> None:
    from livestack.pipeline.warp import KERNELS

    assert Config().pipeline.warp.kernel == "auto"  # lanczos3 on mono, mitchell on colour
    config = load_config(_write(tmp_path, "pipeline: {warp: {kernel: mitchell}}\n"))
    assert config.pipeline.warp.kernel == "mitchell" and "mitchell" in KERNELS
    # Refused at load, naming the key, not at the first frame's warp.
    with pytest.raises(ConfigError, match=r"pipeline\.warp\.kernel: expected one of .*mitchell"):
        load_config(_write(tmp_path, "pipeline: {warp: {kernel: cubic}}\n"))

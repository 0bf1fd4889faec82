"""Every numeric config key has a range, and ``config check`` refuses values outside it.

The walk is generic (``field_paths()`` + the dataclass field metadata), so keys added
later are covered without touching this file; a numeric key without a range fails with a
message naming it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

import pytest

from livestack.config import Config, config_from_dict, field_paths
from livestack.errors import ConfigError


def _field(path: str) -> tuple[dataclasses.Field, Any]:
    """The dataclass field and its type hint for a dotted key path."""
    cls: Any = Config
    parts = path.split(".")
    for i, name in enumerate(parts):
        hints = typing.get_type_hints(cls)
        fld = next(f for f in dataclasses.fields(cls) if f.name == name)
        if i == len(parts) - 1:
            return fld, hints[name]
        cls = hints[name]
    raise AssertionError(path)


def _numeric_kind(tp: Any) -> type | None:
    """int or float when the hint is a number (optionally ``| None``), else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _numeric_kind(args[0]) if len(args) == 1 else None
    return tp if tp in (int, float) else None


def _nested(path: str, value: Any) -> dict:
    raw: dict = {}
    node = raw
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return raw


NUMERIC = [p for p in field_paths() if _numeric_kind(_field(p)[1]) is not None]


def test_the_walk_sees_the_known_numeric_keys() -> None:
    # Guards the walk itself: if the type inspection broke, the parametrised test below
    # would silently check nothing.
    for key in ("pipeline.preview.quality", "pipeline.preview.max_size_px", "server.port",
                "pipeline.detect.bin_factor", "output.fits_every_frames"):
        assert key in NUMERIC
    assert len(NUMERIC) >= 40


@pytest.mark.parametrize("key", NUMERIC)
def test_every_numeric_key_refuses_an_out_of_range_value(key: str) -> None:
    fld, tp = _field(key)
    kind = _numeric_kind(tp)
    lo, hi = fld.metadata.get("min"), fld.metadata.get("max")
    assert lo is not None or hi is not None, (
        f"config key {key} is numeric but has no range: give its dataclass field "
        "metadata=rng(lo, hi) (livestack.pipeline.ranges)")
    if lo is not None:
        bad = lo if fld.metadata.get("lo_open") else lo - 1
    else:
        bad = hi + 1
    bad = int(bad) if kind is int else float(bad)
    with pytest.raises(ConfigError) as info:
        config_from_dict(_nested(key, bad), source="cfg.yaml")
    message = str(info.value)
    assert message.startswith(f"cfg.yaml: {key}: ") and "\n" not in message, message


@pytest.mark.parametrize(("key", "value"), [
    ("pipeline.preview.quality", 0), ("pipeline.preview.quality", -5),
    ("pipeline.preview.quality", 500), ("pipeline.preview.max_size_px", -1)])
def test_preview_values_that_used_to_crash_the_worker_are_refused(key: str, value: int
                                                                   ) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(_nested(key, value))


def test_the_defaults_are_inside_their_ranges() -> None:
    config_from_dict({})  # builds every default through the same checks as a file
    for key in NUMERIC:
        fld, _tp = _field(key)
        default = fld.default
        if default is None or default is dataclasses.MISSING:
            continue
        config_from_dict(_nested(key, default))

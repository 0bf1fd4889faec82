"""YAML configuration -> validated, frozen dataclasses.

The file has the sections ``watch``, ``output``, ``server``, ``masters``, ``routing``,
``pipeline`` and ``log``. Every key is optional; a missing key takes the dataclass
default, so an empty file (or no file) is a valid configuration. An unknown key, a value
of the wrong type or out of range raises :class:`~livestack.errors.ConfigError` with a
one-line message ``FILE: section.key: problem``.

The ``pipeline`` section is built generically from the pipeline's own config dataclasses
(``livestack.pipeline.session.PipelineConfig`` and its sub-configs): field names and type
hints define what is accepted, and the sub-configs' ``__post_init__`` checks (raising
``ValueError`` or ``ConfigError``) are reported with the key path.

Range limits of this module's own sections live in field metadata (``min``, ``max``,
``choices``) so that validation and the documented example file stay in one place.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from livestack.errors import ConfigError
from livestack.pipeline.ranges import rng
from livestack.pipeline.session import PipelineConfig

#: Shown instead of the operator token by ``config show`` (the token never goes to logs).
REDACTED = "<redacted>"


def _rng(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    """Field metadata for an inclusive (or left-open) numeric range."""
    return rng(lo, hi, lo_open=lo_open)


@dataclass(frozen=True)
class WatchConfig:
    """Where frames arrive and how to notice them.

    Attributes
    ----------
    dir : str
        Folder the capture software writes into (created by ``livestack run`` if missing).
    polling : bool
        Poll instead of inotify (network shares, some container mounts).
    poll_interval_s : float
        Polling period in seconds; a file is ready when its size is stable over one period.
    recursive : bool
        Also watch sub-folders (capture software that writes one folder per night/target).
        ``output.dir`` must then not lie inside ``watch.dir`` (the daemon would stack its
        own stack.fits); files under ``output.dir`` are never taken as frames anyway.
    rescan_interval_s : float
        List the folder again this often, in seconds, to pick up frames whose events were
        lost (inotify queue overflow, network shares); 0 turns it off. A rescan costs one
        ``listdir`` plus one ``stat`` per file (about 1 ms per 1000 files).
    """

    dir: str = "./incoming"
    polling: bool = False
    poll_interval_s: float = field(default=1.0, metadata=_rng(0.05, 3600.0))
    recursive: bool = False
    rescan_interval_s: float = field(default=30.0, metadata=_rng(0.0, 86400.0))


@dataclass(frozen=True)
class OutputConfig:
    """Where stacks go and how often they are saved.

    Attributes
    ----------
    dir : str
        Output root: ``<dir>/journal.sqlite`` plus ``<dir>/<night>/<stack>/`` folders
        holding stack.fits, preview.jpg and checkpoint.npz.
    checkpoint_every_frames : int
        Write an accumulator checkpoint after this many processed frames of a stack.
        Measured with bench/bench_checkpoint.py at 26 MP mono: a checkpoint is 574 MB
        and takes 1.7 s, so every 20 frames costs < 2 % of the wall time at one frame
        per 5 s, and a crash replays at most 19 frames at the next start.
    checkpoint_every_s : float
        ... or when this many seconds have passed since the stack's last checkpoint
        (checked after each frame), whichever comes first.
    fits_every_frames : int
        Rewrite ``stack.fits`` after this many accepted frames (and on shutdown/snapshot).
    batch_fits_every_frames : int
        The same for ``livestack stack``; 0: only when the run ends. Its frames come back
        to back, and one rewrite of a 26 MP stack takes 1.2-3.6 s (bench/bench_stack_dense.py:
        120-250 ms per frame when it comes every 10 frames). A resumed run needs the
        journal and the checkpoints, not stack.fits, and rewrites stack.fits itself.
    preview_every_frames : int
        Render and push the preview after this many accepted frames ...
    preview_min_interval_s : float
        ... but not more often than this (frames arriving in a burst share one render).
    """

    dir: str = "./stacks"
    # Defaults from bench/bench_checkpoint.py: a 26 MP mono checkpoint is 574 MB and takes
    # 1.7 s (uncompressed; deflate takes 44 s). Every 20 frames costs < 2 % of the wall
    # time at 1 frame per 5 s, and a restart replays at most 19 frames (~6 s).
    checkpoint_every_frames: int = field(default=20, metadata=_rng(1, None))
    checkpoint_every_s: float = field(default=600.0, metadata=_rng(0.0, None, lo_open=True))
    fits_every_frames: int = field(default=10, metadata=_rng(1, None))
    batch_fits_every_frames: int = field(default=0, metadata=_rng(0, None))
    preview_every_frames: int = field(default=1, metadata=_rng(1, None))
    preview_min_interval_s: float = field(default=2.0, metadata=_rng(0.0, 3600.0))


@dataclass(frozen=True)
class ServerConfig:
    """The live view's HTTP + WebSocket server.

    Attributes
    ----------
    host : str
        Address to bind. Anything other than a loopback address needs ``allow_lan``.
    port : int
        TCP port (0 picks a free port; the chosen one is printed).
    token : str or None
        Operator token for commands (pause, reset, exclude a frame...). null: a random
        token is generated at each start. On a terminal it is printed once; otherwise
        (systemd sends stdout to the journal) it is written to
        ``<output.dir>/operator-token`` (mode 0600) and only that path is printed. It
        never appears in logs.
    allow_lan : bool
        Allow a non-loopback host (e.g. 0.0.0.0 for phones on the observatory LAN;
        ``livestack run --lan`` sets both and prints the URLs to open).
    max_viewers : int
        WebSocket viewers served at once; more are refused (503, close code 1013).
    max_connections : int
        Client connections held open at once; more are answered 503 at once. Also
        limited to the descriptor limit minus the descriptors open at start and
        ``fd_reserve``.
    fd_reserve : int
        File descriptors always kept free for frames, the journal and checkpoints.
    allowed_hosts : tuple of str
        Host names accepted in ``Host``/``Origin`` besides this machine's own names and
        IP addresses (a reverse proxy's public name); other requests get 421 / 403.
    """

    host: str = "127.0.0.1"
    port: int = field(default=8765, metadata=_rng(0, 65535))
    token: str | None = None
    allow_lan: bool = False
    max_viewers: int = field(default=100, metadata=_rng(1, 100_000))
    max_connections: int = field(default=256, metadata=_rng(2, 1_000_000))
    fd_reserve: int = field(default=64, metadata=_rng(16, 100_000))
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class MastersConfig:
    """Master calibration frames.

    Attributes
    ----------
    paths : tuple of str
        Master FITS files or folders holding them (searched for ``*.fits``/``*.fit``);
        build them with ``livestack masters build``. Empty: no calibration (a warning
        says so once). ``livestack run --bias/--darks/--flats`` replaces this list.
    temp_tolerance_c : float
        Largest sensor temperature difference (degrees Celsius) for a dark to match a light.
    """

    paths: tuple[str, ...] = ()
    temp_tolerance_c: float = field(default=3.0, metadata=_rng(0.0, 100.0))


@dataclass(frozen=True)
class RoutingConfig:
    """How frames are split into stacks.

    Attributes
    ----------
    slew_threshold_deg : float
        A pointing jump (RA/DEC) larger than this starts a new stack.
    failure_run : int
        This many consecutive alignment failures that agree among themselves start a new
        stack (a slew without RA/DEC in the headers).
    solved_jump_fraction : float
        A frame that does not align with its stack and whose own plate solve (or WCS
        header) puts its centre farther than this fraction of the field diagonal from the
        stack's solved centre starts a new stack, or returns to the stack already there: a
        re-point or meridian flip the headers did not report. Needs ``solver.enabled``.
    """

    slew_threshold_deg: float = field(default=0.5, metadata=_rng(0.0, 180.0, lo_open=True))
    failure_run: int = field(default=5, metadata=_rng(2, None))
    solved_jump_fraction: float = field(default=0.5, metadata=_rng(0.0, 10.0, lo_open=True))


@dataclass(frozen=True)
class RebuildConfig:
    """Background rebuilds of a live stack (``exclude_frame``, ``set_reference``).

    Attributes
    ----------
    memory_limit_mb : int
        Memory the rebuild's integration may use (as ``livestack integrate
        --memory-limit``), MiB; frames that do not fit go through a scratch file in the
        stack folder.
    nice : int
        Niceness the rebuild process adds to itself (0-19), so live frames come first.
    """

    memory_limit_mb: int = field(default=2048, metadata=_rng(64, None))
    nice: int = field(default=10, metadata=_rng(0, 19))


@dataclass(frozen=True)
class SolverConfig:
    """Offline plate solving of each stack's reference frame (astrometry.net).

    Attributes
    ----------
    enabled : bool
        Solve in the background and write a WCS into ``stack.fits``; off: no WCS.
    index_dir : str
        Folder of the astrometry.net index files (``index-*.fits``; Debian's
        ``astrometry-data-tycho2-*`` packages install into ``/usr/share/astrometry``).
    time_limit_s : float
        Time one solve may take, seconds (all its attempts together); the solver stops
        earlier on a confident match.
    """

    enabled: bool = True
    index_dir: str = "/usr/share/astrometry"
    time_limit_s: float = field(default=60.0, metadata=_rng(1.0, 3600.0))


@dataclass(frozen=True)
class LogConfig:
    """Logging.

    Attributes
    ----------
    level : str
        DEBUG, INFO, WARNING or ERROR.
    """

    level: str = field(default="INFO",
                       metadata={"choices": ("DEBUG", "INFO", "WARNING", "ERROR")})


@dataclass(frozen=True)
class FormatsConfig:
    """Reading non-FITS frames (camera RAW, TIFF/PNG/JPEG, XISF).

    Attributes
    ----------
    raw_black : str
        ``auto``: subtract the RAW black level per channel unless bias or dark masters
        are configured (they carry it); ``subtract`` or ``keep`` force it.
    utc_offset_h : float or None
        Hours the camera clock is ahead of UTC, for files whose shot time has no offset
        tag (null: the camera clock is UTC). -14 to 14.
    exposure_s : float or None
        Exposure in seconds of TIFF/PNG/JPEG frames without exposure metadata.
    """

    raw_black: str = field(default="auto", metadata={"choices": ("auto", "subtract", "keep")})
    utc_offset_h: float | None = field(default=None, metadata=_rng(-14.0, 14.0))
    exposure_s: float | None = field(default=None, metadata=_rng(0.0, None, lo_open=True))


@dataclass(frozen=True)
class Config:
    """The whole effective configuration.

    Attributes
    ----------
    watch, output, server, masters, routing, pipeline, rebuild, solver, log, formats
        The sections; see their classes.
    source : str or None
        File the values were read from (None: embedded defaults). Not a YAML key.
    """

    watch: WatchConfig = field(default_factory=WatchConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    masters: MastersConfig = field(default_factory=MastersConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    rebuild: RebuildConfig = field(default_factory=RebuildConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    log: LogConfig = field(default_factory=LogConfig)
    formats: FormatsConfig = field(default_factory=FormatsConfig)
    source: str | None = field(default=None, metadata={"internal": True})


# --------------------------------------------------------------------------------------
# generic builder


class _Invalid(Exception):
    """Internal: a problem at a key path, turned into ConfigError at the top."""

    def __init__(self, key_path: str, problem: str) -> None:
        super().__init__(f"{key_path}: {problem}")
        self.key_path = key_path
        self.problem = problem


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = _type_name(args[0]) if args else "value"
        return f"list of {inner}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({type(value).__name__})"


def _convert(value: Any, tp: Any, key_path: str) -> Any:
    """Check ``value`` (from YAML) against type hint ``tp`` and convert it."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise _Invalid(key_path, f"expected a mapping, got {_describe(value)}")
        return _build(tp, value, key_path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise _Invalid(key_path, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Invalid(key_path, f"expected {_type_name(tp)}, got null")
        problems = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key_path)
            except _Invalid as exc:
                problems.append(exc.problem)
        if len(problems) == 1:
            raise _Invalid(key_path, problems[0])
        raise _Invalid(key_path, f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Invalid(key_path, f"expected {_type_name(tp)}, got {_describe(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Invalid(key_path, f"expected a list of {len(args)} values, "
                                         f"got {len(value)}")
            items = [_convert(v, a, f"{key_path}[{i}]")
                     for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            inner = args[0] if args else Any
            items = [_convert(v, inner, f"{key_path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else list(items)
    if tp is type(None):
        if value is not None:
            raise _Invalid(key_path, f"expected null, got {_describe(value)}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise _Invalid(key_path, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(key_path, f"expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(key_path, f"expected a number, got {_describe(value)}")
        result = float(value)
        if result != result:  # NaN never makes sense as a setting
            raise _Invalid(key_path, "expected a number, got NaN")
        return result
    if tp is str:
        if not isinstance(value, str):
            raise _Invalid(key_path, f"expected a string, got {_describe(value)}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Invalid(key_path, f"expected {_type_name(tp)}, got {_describe(value)}")


def _check_metadata(value: Any, meta: typing.Mapping[str, Any], key_path: str) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise _Invalid(key_path, "expected one of " + ", ".join(map(str, choices))
                       + f", got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None:
            if meta.get("lo_open") and not value > lo:
                raise _Invalid(key_path, f"must be > {lo}, got {value}")
            if not meta.get("lo_open") and not value >= lo:
                raise _Invalid(key_path, f"must be >= {lo}, got {value}")
        if hi is not None and not value <= hi:
            raise _Invalid(key_path, f"must be <= {hi}, got {value}")


def _public_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls)
            if f.init and not f.name.startswith("_") and not f.metadata.get("internal")]


def _build(cls: type, raw: dict, prefix: str) -> Any:
    """Build dataclass ``cls`` from mapping ``raw``; ``prefix`` is the key path so far."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in _public_fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        key_path = f"{prefix}.{key}" if prefix else str(key)
        if not isinstance(key, str) or key not in fields:
            known = ", ".join(sorted(fields))
            raise _Invalid(key_path, f"unknown key (known: {known})")
        converted = _convert(value, hints[key], key_path)
        _check_metadata(converted, fields[key].metadata, key_path)
        kwargs[key] = converted
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise _Invalid(prefix or "(top)", str(exc)) from None
    except (ValueError, TypeError) as exc:
        # The pipeline's sub-configs check cross-field rules in __post_init__.
        raise _Invalid(prefix or "(top)", str(exc)) from None


def config_from_dict(raw: dict | None, *, source: str | None = None) -> Config:
    """Build a :class:`Config` from a parsed YAML mapping.

    Parameters
    ----------
    raw : dict or None
        The parsed document (None or empty: all defaults).
    source : str or None
        File name used in error messages (``"<defaults>"`` when None).

    Raises
    ------
    ConfigError
        ``SOURCE: section.key: problem`` for an unknown key, wrong type or bad range,
        or a non-loopback ``server.host`` without ``server.allow_lan``, or ``output.dir``
        inside ``watch.dir`` with ``watch.recursive``.
    """
    label = source if source is not None else "<defaults>"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of sections, "
                          f"got {type(raw).__name__}")
    try:
        config: Config = _build(Config, raw, "")
    except _Invalid as exc:
        raise ConfigError(f"{label}: {exc.key_path}: {exc.problem}") from None
    if not config.server.allow_lan and not is_loopback(config.server.host):
        raise ConfigError(f"{label}: server.host: {config.server.host!r} is not a loopback "
                          "address; set server.allow_lan: true to serve the network")
    if config.watch.recursive and is_within(config.output.dir, config.watch.dir):
        raise ConfigError(f"{label}: output.dir: {config.output.dir!r} is inside watch.dir "
                          f"{config.watch.dir!r} and watch.recursive is true; the daemon "
                          "would stack its own stack.fits")
    return dataclasses.replace(config, source=source)


def is_within(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """True when ``path`` is ``folder`` or lies below it (symlinks resolved, relative
    paths taken from the current directory; the paths need not exist)."""
    real_path, real_folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real_path, real_folder]) == real_folder


def is_loopback(host: str) -> bool:
    """Return True when ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _set_path(raw: dict, dotted: str, value: Any, label: str) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{label}: {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load the configuration file and apply command-line overrides.

    Parameters
    ----------
    path : str, Path or None
        YAML file; None uses the embedded defaults.
    overrides : dict or None
        Dotted key path -> value, e.g. ``{"watch.dir": "/data", "server.port": 0}``.
        They win over the file and are validated like file values.

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        The file cannot be read or parsed, or a value is invalid (one line naming the
        file and the key path).
    """

    raw: Any = {}
    label = "<defaults>"
    if path is not None:
        label = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{label}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{label}: cannot read: {exc}") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{label}: {where}invalid YAML: {problem}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{label}: the top level must be a mapping of sections")
    if overrides:
        raw = _deep_copy(raw)
        for dotted, value in overrides.items():
            if value is not None:
                _set_path(raw, dotted, value, label)
    return config_from_dict(raw, source=label if path is not None else None)


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw


def config_to_dict(config: Any, *, redact_token: bool = True) -> dict[str, Any]:
    """Return the configuration as plain YAML-able data (tuples become lists).

    Parameters
    ----------
    config : Config (or any config dataclass)
    redact_token : bool
        Replace a set ``server.token`` by ``<redacted>``.
    """
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in _public_fields(type(value))}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    out = plain(config)
    if redact_token and isinstance(config, Config) and config.server.token is not None:
        out["server"]["token"] = REDACTED
    return out


def dump_config(config: Config) -> str:
    """The effective configuration as YAML (the token redacted)."""

    header = f"# effective configuration (source: {config.source or 'embedded defaults'})\n"
    return header + yaml.safe_dump(config_to_dict(config), sort_keys=False,
                                   default_flow_style=False)


def field_paths(cls: type = Config, prefix: str = "") -> list[str]:
    """All leaf key paths of the configuration, e.g. ``["watch.dir", ...]``."""
    out: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in _public_fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            out.extend(field_paths(tp, path))
        else:
            out.append(path)
    return out

"""Command line: ``livestack run | demo | stack | simulate | masters | config``.

This is the only module that configures logging and turns errors into exit codes:
a :class:`~livestack.errors.LivestackError` ends the command with its one-line message
on stderr and its ``exit_code`` (no traceback); any other exception keeps its traceback.
Each subcommand imports what it runs inside its handler, deliberately: this module alone
imports in about 65 ms, the config and pipeline modules (numba, astropy, scipy) in about
1 s, so ``livestack --help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from livestack.errors import LivestackError, UsageError
from livestack.service.logthrottle import RepeatFilter

log = logging.getLogger("livestack")

#: Frame file suffixes ``livestack stack`` picks up from folders.
FRAME_SUFFIXES = (".fits", ".fit", ".fts", ".fz", ".fits.gz", ".fit.gz", ".fts.gz", ".cr2",
                  ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".dng", ".tif", ".tiff",
                  ".png", ".jpg", ".jpeg", ".xisf")


def _size(text: str) -> tuple[int, int]:
    """Parse ``WxH`` into ``(width, height)``."""
    try:
        w, h = text.lower().split("x")
        width, height = int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16x16, got {text!r}")
    return width, height


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and a one-line message (its default, kept explicit)."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(2, f"livestack: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    from livestack import __version__

    parser = _Parser(prog="livestack",
                     description="Live stacking for astrophotography: watch, align, stack, "
                                 "stream.")
    parser.add_argument("--version", action="version", version=f"livestack {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    # -v/-q also after the command (`livestack run -v`); SUPPRESS keeps the top-level value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="warnings and errors only")
    sub = _subparsers(parser, "command", "COMMAND", common)

    run = sub.add_parser("run", help="watch a folder and stack frames as they arrive")
    run.add_argument("-c", "--config", help="YAML configuration (default: embedded defaults)")
    run.add_argument("--watch", metavar="DIR", help="folder the camera writes into")
    run.add_argument("--output", metavar="DIR", help="output root (stacks and journal)")
    run.add_argument("--host", help="address of the live view (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="port of the live view (0: any free port)")
    run.add_argument("--polling", action="store_true", default=None,
                     help="poll the folder instead of inotify (network shares)")
    run.add_argument("--bias", metavar="P", help="master bias file, or a folder of biases")
    run.add_argument("--darks", metavar="P", help="master dark(s) or a folder of darks")
    run.add_argument("--flats", metavar="P", help="master flat(s) or a folder of flats")
    run.add_argument("--lan", action="store_true",
                     help="serve phones on the local network (all interfaces); prints the "
                          "URLs to open")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="simulated camera + daemon: a live stack in seconds")
    demo.add_argument("--frames", type=_count, default=60, help="frames to simulate (60)")
    demo.add_argument("--interval", type=_positive_float, default=2.0,
                      help="seconds between frames (2)")
    demo.add_argument("--port", type=int, default=8765, help="port of the live view (8765)")
    demo.add_argument("--size", type=_size, default=(1024, 768), help="frame size WxH")
    demo.add_argument("--output", metavar="DIR", help="output root (default: a temp folder)")
    demo.set_defaults(func=cmd_demo)

    stack = sub.add_parser("stack", help="stack existing files (reprocess a night)")
    stack.add_argument("inputs", nargs="+", metavar="LIGHT_DIR_OR_FILES")
    stack.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    stack.add_argument("-c", "--config", help="YAML configuration")
    stack.add_argument("--bias", metavar="P", help="master bias file, or a folder of biases")
    stack.add_argument("--darks", metavar="P", help="master dark(s) or a folder of darks")
    stack.add_argument("--flats", metavar="P", help="master flat(s) or a folder of flats")
    stack.add_argument("--no-progress", action="store_true", help="no progress bar")
    stack.set_defaults(func=cmd_stack)

    sim = sub.add_parser("simulate", help="write a realistic simulated frame sequence")
    sim.add_argument("out_dir", metavar="OUT_DIR")
    sim.add_argument("--frames", type=_count, default=20)
    sim.add_argument("--interval", type=_positive_float, default=0.0,
                     help="seconds between frames (0: as fast as possible)")
    sim.add_argument("--size", type=_size, default=None, help="frame size WxH")
    sim.add_argument("--seed", type=int, default=None)
    sim.add_argument("--fwhm", type=_positive_float, default=None, help="star FWHM in pixels")
    sim.add_argument("--bayer", default=None, help="CFA pattern, e.g. RGGB (default: mono)")
    sim.add_argument("--satellites", type=_positive_float, default=None,
                     help="fraction of frames with a satellite trail")
    sim.add_argument("--rotation", type=float, default=None,
                     help="field rotation in degrees per frame")
    sim.add_argument("--calibration", action="store_true",
                     help="also write bias/dark/flat frames (in sub-folders)")
    sim.set_defaults(func=cmd_simulate)

    masters = sub.add_parser("masters", help="master calibration frames")
    msub = _subparsers(masters, "masters_command", "ACTION", common)
    build = msub.add_parser("build", help="build master bias/dark/flat/dark-flat frames")
    build.add_argument("--bias", metavar="DIR")
    build.add_argument("--darks", metavar="DIR")
    build.add_argument("--flats", metavar="DIR")
    build.add_argument("--darkflats", metavar="DIR")
    build.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    build.set_defaults(func=cmd_masters_build)

    config = sub.add_parser("config", help="check or show the configuration")
    csub = _subparsers(config, "config_command", "ACTION", common)
    check = csub.add_parser("check", help="validate a configuration file")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_config_check)
    show = csub.add_parser("show", help="print the effective configuration as YAML")
    show.add_argument("file", nargs="?", metavar="FILE")
    show.set_defaults(func=cmd_config_show)

    recover = sub.add_parser("recover", help="rebuild a corrupt journal from the stacks")
    recover.add_argument("output", metavar="OUTPUT", help="the output folder (output.dir)")
    recover.add_argument("--watch", metavar="DIR", help="watch folder, to count the frames "
                                                        "no stack lists")
    recover.add_argument("--force", action="store_true", help="rebuild an intact journal too")
    recover.set_defaults(func=cmd_recover)

    # `livestack integrate ...` (exact re-integration of a journal's frames) is registered
    # here by livestack.integrate_cli when that module exists; see issue 5.
    _add_integrate(sub)
    from livestack import solve_cli

    solve_cli.add_parser(sub)
    return parser


def _subparsers(parser: argparse.ArgumentParser, dest: str, metavar: str,
                common: argparse.ArgumentParser) -> Any:
    """Required sub-commands whose parsers all accept the ``common`` options."""
    sub = parser.add_subparsers(dest=dest, metavar=metavar, parser_class=_Parser)
    sub.required = True
    real_add = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("parents", [common])
        return real_add(name, **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign,assignment]
    return sub


def _add_integrate(sub: Any) -> None:
    """Let the integration command register itself (a separate module owns it)."""
    try:
        from livestack import integrate_cli
    except ImportError:
        return
    integrate_cli.add_parser(sub)


# --------------------------------------------------------------------------------------
# logging


def configure_logging(level: str) -> None:
    """One line per record on stderr: ``HH:MM:SS LEVEL message``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s",
                                           datefmt="%H:%M:%S"))
    handler.addFilter(RepeatFilter())  # a flood of identical lines (EMFILE) stays small
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter (websockets handshakes, watchdog events) only when debugging.
    for noisy in ("websockets", "watchdog", "asyncio", "numba", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _level(args: argparse.Namespace, configured: str = "INFO") -> str:
    if getattr(args, "verbose", False):
        return "DEBUG"
    if getattr(args, "quiet", False):
        return "WARNING"
    return configured


# --------------------------------------------------------------------------------------
# commands


def cmd_run(args: argparse.Namespace) -> int:
    """``livestack run``: the daemon."""
    from livestack.config import load_config

    overrides = {"watch.dir": args.watch, "output.dir": args.output,
                 "server.host": args.host, "server.port": args.port,
                 "watch.polling": args.polling}
    if args.lan:
        from livestack.runopts import LAN_HOST

        overrides.update({"server.host": args.host or LAN_HOST, "server.allow_lan": True})
    config = load_config(args.config, overrides)
    configure_logging(_level(args, config.log.level))
    if args.bias or args.darks or args.flats:  # as `livestack stack`; wins over the config
        from livestack.runopts import with_run_masters

        config = with_run_masters(config, bias=_opt_path(args.bias),
                                  darks=_opt_path(args.darks), flats=_opt_path(args.flats))
    from livestack.daemon import Daemon

    return Daemon(config).run()


#: The demo's sky and camera (``SimConfig`` fields): a rich star field (~220 stars
#: detected at 1024x768), an alt-az mount's slow field rotation on top of the drift so that
#: alignment visibly works, and a gentle sky gradient. Vignetting and dust donuts stay: the
#: demo's masters remove them. Satellites cross some frames (the stack's outlier rejection
#: removes the trails) and clouds pass over two (the gate rejects them: the scattered light
#: trips background_jump), all within the first two minutes at the default interval.
DEMO_SKY: dict[str, Any] = {"flux_powerlaw_index": 1.0, "rotation_deg_per_frame": 0.05,
                            "gradient_fraction": 0.05,
                            "satellite_frames": (6, 13, 21, 30, 42, 51),
                            "cloud_frames": (10, 37), "cloud_transparency": 0.25}
#: Star centres per megapixel in the demo (2000 on a 1024x768 frame).
DEMO_STARS_PER_MPIX = 2543.0
#: Raw bias, dark and flat frames simulated for the demo's masters (each kind).
DEMO_CALIBRATION_FRAMES = 6


def _demo_masters(folder: Path, sim: Any, simulator: Any) -> Path:
    """Simulate a calibration set in ``folder`` and build its masters; return their folder."""
    from livestack.sim import write_calibration_set
    from livestack.storage.masters import build_masters_from_dirs

    n = DEMO_CALIBRATION_FRAMES
    raw = write_calibration_set(folder / "raw", sim, 1, n_bias=n, n_darks=n, n_flats=n,
                                simulator=simulator)
    masters = folder / "masters"
    build_masters_from_dirs(masters, bias_dir=raw["bias"], dark_dir=raw["darks"],
                            flat_dir=raw["flats"])
    shutil.rmtree(folder / "raw", ignore_errors=True)
    return masters


def cmd_demo(args: argparse.Namespace) -> int:
    """``livestack demo``: the simulator writes frames while the daemon stacks them.

    A calibration set (bias, darks, flats) of the same simulated camera is written first
    and its masters calibrate the lights, as at a real telescope.
    """
    from livestack.config import load_config

    configure_logging(_level(args))
    from livestack import precompile

    helper = precompile.start()  # a first start compiles kernels while masters are built
    width, height = args.size
    from livestack.sim import SimConfig, Simulator, write_sequence

    n_stars = max(100, round(DEMO_STARS_PER_MPIX * width * height / 1e6))
    sim = SimConfig(width=width, height=height, n_stars=n_stars, **DEMO_SKY)
    simulator = Simulator(sim, seed=1)
    watch_dir = Path(tempfile.mkdtemp(prefix="livestack-demo-incoming-"))
    calibration = Path(tempfile.mkdtemp(prefix="livestack-demo-calibration-"))
    output = Path(args.output) if args.output else Path(
        tempfile.mkdtemp(prefix="livestack-demo-stacks-"))
    stop = threading.Event()
    try:
        masters = _demo_masters(calibration, sim, simulator)
        print(f"demo: master bias, dark and flat built from {DEMO_CALIBRATION_FRAMES} "
              f"simulated frames each, in {masters}", flush=True)
        config = load_config(None, {"watch.dir": str(watch_dir), "output.dir": str(output),
                                    "server.port": args.port,
                                    "output.preview_min_interval_s": 0.5,
                                    "masters.paths": [str(masters)],
                                    # The simulated sky's stars are random, not a catalogue's:
                                    # a plate solve can only fail, and costs a core for a minute.
                                    "solver.enabled": False})

        def camera() -> None:
            write_sequence(watch_dir, sim, seed=1, n_frames=args.frames,
                           interval_s=args.interval, mode="rename", stop=stop,
                           simulator=simulator)

        from livestack.daemon import Daemon

        daemon = Daemon(config)
        thread = threading.Thread(target=camera, name="livestack-demo-camera", daemon=True)
        print(f"demo: simulated camera writes {args.frames} frames, one every "
              f"{args.interval:g} s, into {watch_dir}", flush=True)
        thread.start()
        try:
            code = daemon.run()
        finally:
            stop.set()
            thread.join(timeout=5.0)
    finally:
        shutil.rmtree(watch_dir, ignore_errors=True)
        shutil.rmtree(calibration, ignore_errors=True)
        precompile.stop(helper)
        print(f"demo: stacks kept in {output}", flush=True)
    return code


def _progress_bar(stream: Any) -> Callable[[int, int, Any], None]:
    """A plain-text progress bar on ``stream`` (``\\r`` updates, no dependency)."""
    start = time.monotonic()
    tally = {"accepted": 0, "rejected": 0, "failed": 0, "ignored": 0}

    def update(done: int, total: int, row: Any) -> None:
        if row is not None and row.status in tally:
            tally[row.status] += 1
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.monotonic() - start
        eta = elapsed / done * (total - done) if done else 0.0
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}  "
                     f"accepted {tally['accepted']}  rejected {tally['rejected']}  "
                     f"failed {tally['failed']}  eta {eta:4.0f} s ")
        if done == total:
            stream.write("\n")
        stream.flush()

    return update


def _opt_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _collect_frames(inputs: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir()
                                if p.is_file() and p.name.lower().endswith(FRAME_SUFFIXES)
                                and not p.name.startswith((".", "~"))))
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{item}: no such file or folder")
    if not files:
        raise UsageError("no frames found in " + ", ".join(inputs))
    return files


def cmd_stack(args: argparse.Namespace) -> int:
    """``livestack stack``: existing files through the same pipeline, DATE-OBS order."""
    from livestack.config import load_config

    config = load_config(args.config, {"output.dir": args.output})
    configure_logging(_level(args, config.log.level))
    if not args.verbose:  # per-frame lines would break the progress bar
        logging.getLogger("livestack.daemon").setLevel(logging.WARNING)
    files = _collect_frames(args.inputs)
    masters = None
    if args.bias or args.darks or args.flats:
        from livestack.storage.calibration import open_masters

        masters = open_masters(bias=_opt_path(args.bias), darks=_opt_path(args.darks),
                               flats=_opt_path(args.flats),
                               temp_tolerance_c=config.masters.temp_tolerance_c)
    from livestack.daemon import stack_files

    progress = None if args.no_progress else _progress_bar(sys.stderr)
    engine = stack_files(config, files, Path(args.output), masters=masters, progress=progress)
    for stack_id, rt in engine.runtimes.items():
        print(f"{stack_id}: {rt.session.n_accepted} stacked, {rt.rejected} rejected, "
              f"{rt.failed} failed -> {rt.folder}")
    counts = engine.final_counts
    print(f"journal: {engine.output_root / 'journal.sqlite'} ({counts['accepted']} accepted, "
          f"{counts['rejected']} rejected, {counts['failed']} failed, "
          f"{counts['ignored']} ignored)")
    return 0 if engine.runtimes else 1


def cmd_simulate(args: argparse.Namespace) -> int:
    """``livestack simulate``: write a frame sequence as a camera would."""
    configure_logging(_level(args))
    from livestack.sim import SimConfig, write_calibration_set, write_sequence

    seed = 0 if args.seed is None else args.seed
    options: dict[str, Any] = {}
    if args.size is not None:
        options["width"], options["height"] = args.size
    for name, value in (("fwhm_px", args.fwhm), ("rotation_deg_per_frame", args.rotation),
                        ("bayer_pattern", args.bayer.upper() if args.bayer else None)):
        if value is not None:
            options[name] = value
    if args.satellites:
        import numpy as np

        rng = np.random.default_rng(seed)
        hits = np.flatnonzero(rng.random(args.frames) < min(args.satellites, 1.0))
        options["satellite_frames"] = tuple(int(i) for i in hits)
    sim = SimConfig(**options)  # ConfigError names the bad value
    out = Path(args.out_dir)
    if args.calibration:
        folders = write_calibration_set(out / "calibration", sim, seed)
        for kind, folder in folders.items():
            print(f"{kind}: {folder}")
    paths = write_sequence(out, sim, seed, args.frames, interval_s=args.interval)
    print(f"wrote {len(paths)} frames to {out}")
    return 0


def cmd_masters_build(args: argparse.Namespace) -> int:
    """``livestack masters build``."""
    configure_logging(_level(args))
    if not (args.bias or args.darks or args.flats or args.darkflats):
        raise UsageError("masters build: give at least one of --bias, --darks, --flats, "
                         "--darkflats")
    from livestack.storage.masters import build_masters_from_dirs

    written = build_masters_from_dirs(Path(args.output), bias_dir=_opt_path(args.bias),
                                      dark_dir=_opt_path(args.darks),
                                      flat_dir=_opt_path(args.flats),
                                      darkflat_dir=_opt_path(args.darkflats))
    for path in written:
        print(path)
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    """``livestack recover OUTPUT``: see :mod:`livestack.recover`."""
    configure_logging(_level(args, "WARNING"))
    from livestack.recover import recover

    report = recover(Path(args.output), Path(args.watch) if args.watch else None,
                     force=args.force)
    for line in report.lines():
        print(f"recover: {line}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """``livestack config check FILE``."""
    from livestack.config import load_config

    load_config(args.file)
    print(f"{args.file}: OK")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """``livestack config show [FILE]``."""
    from livestack.config import load_config
    from livestack.config_docs import render

    config = load_config(args.file)  # each key under its documentation (config_docs)
    source = config.source or "embedded defaults"
    sys.stdout.write(render(config, header=f"effective configuration (source: {source})"))
    return 0


# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``livestack`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LivestackError as exc:
        print(f"livestack: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("livestack: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `livestack config show | head`: the reader went away; not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

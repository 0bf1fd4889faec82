"""``livestack integrate``: exact re-integration of a stack from its journal.

``livestack.cli`` calls :func:`add_parser` to register the sub-command; the parsed
arguments carry ``func=run``. :func:`run` raises
:class:`~livestack.errors.LivestackError` subclasses for user errors (``cli.main``
prints their one-line message, no traceback) and returns the exit code otherwise.
Heavy modules (numpy, numba, astropy) are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from livestack.errors import UsageError

COMBINE = ("mean", "median", "max", "min")
REJECT = ("winsorized", "sigma", "linear-fit", "percentile", "minmax", "none")
WEIGHTS = ("noise", "fwhm", "stars", "none")
NORMALIZE = ("additive-scaling", "multiplicative-scaling", "additive", "none")
#: Resampling kernels for ``--interpolation`` (``livestack.pipeline.warp.KERNELS`` and its
#: ``AUTO``, which are not imported here so that building the parser stays light).
INTERPOLATION = ("auto", "nearest", "bilinear", "bicubic", "lanczos3", "mitchell")
#: Default (low, high) limits per rejection method: sigmas, fractions of the median, counts.
DEFAULT_LIMITS: dict[str, tuple[float, float]] = {
    "winsorized": (3.0, 3.0), "sigma": (3.0, 3.0), "linear-fit": (5.0, 5.0),
    "percentile": (0.2, 0.1), "minmax": (1.0, 1.0), "none": (0.0, 0.0),
}
DEFAULT_OUTPUT_NAME = "integrated.fits"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Parse a memory size such as ``2GB``, ``512M``, ``1.5 GiB`` or ``1000000`` (bytes).

    Units are binary (``1 GB = 2**30`` bytes), as memory is counted.

    Raises
    ------
    UsageError
        On anything else, or a size below 1 MB.
    """
    match = _SIZE.match(text)
    if match is None or (match.group(3) and not match.group(2) and match.group(3).lower() != "b"):
        raise UsageError(f"--memory-limit: expected a size like 2GB or 512MB, got {text!r}")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value < 2**20:
        raise UsageError(f"--memory-limit: {text!r} is below 1 MB")
    return int(value)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``integrate`` on an ``add_subparsers()`` object; return its parser."""
    p = subparsers.add_parser(
        "integrate", help="re-stack a session exactly from its journal (batch rejection)",
        description="Recalibrate the accepted raw frames of a stack, register them with "
                    "their stored transforms and combine them with batch outlier "
                    "rejection, tile by tile within a memory limit.")
    p.add_argument("stack_dir", metavar="STACK_DIR", nargs="+",
                   help="a stack folder written by 'livestack run' or 'livestack stack'; "
                        "several (nights of one target and filter) are integrated together "
                        "onto the first one's reference")
    p.add_argument("-o", "--output", metavar="OUT.fits",
                   help=f"output FITS (default STACK_DIR/{DEFAULT_OUTPUT_NAME})")
    p.add_argument("--combine", choices=COMBINE, default="mean",
                   help="mean (weighted), median, max (star trails) or min (default mean)")
    p.add_argument("--reject", choices=REJECT, default="winsorized",
                   help="outlier rejection (default winsorized)")
    p.add_argument("--low", type=float, metavar="SIGMA",
                   help="low limit: sigmas (winsorized/sigma/linear-fit), fraction of the "
                        "median (percentile) or count (minmax); default per method")
    p.add_argument("--high", type=float, metavar="SIGMA", help="high limit, as --low")
    p.add_argument("--weights", choices=WEIGHTS, default="noise",
                   help="frame weights for the mean (default noise)")
    p.add_argument("--normalize", choices=NORMALIZE,
                   help="normalisation onto the reference (default: the stack's, "
                        "additive-scaling)")
    p.add_argument("--interpolation", choices=INTERPOLATION,
                   help="resampling kernel for registration, overriding pipeline.warp.kernel "
                        "(default: the config's, auto: lanczos3 for mono stacks, mitchell "
                        "for colour ones): lanczos3 keeps stars sharpest; "
                        "bilinear (as Siril 1.0 registers) gives lower per-pixel noise but "
                        "softer stars; bicubic lies between; mitchell smooths the noise "
                        "almost as much as bilinear with two thirds of its blur; nearest "
                        "copies whole pixels (no smoothing, but up to half a pixel misplaced)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[],
                   metavar="FILE_OR_GLOB", help="leave these frames out (paths, names, globs)")
    p.add_argument("--select", metavar="EXPR",
                   help="keep frames by journal metrics, e.g. 'fwhm_px < 3.2 and stars > 200'")
    p.add_argument("--reference", metavar="FILE",
                   help="register onto this frame instead of the stack's reference")
    p.add_argument("--memory-limit", default="2GB", metavar="SIZE",
                   help="memory for frames and tiles, e.g. 2GB, 512MB (default 2GB)")
    p.add_argument("--keep-registered", metavar="DIR",
                   help="also write the calibrated, registered frames as FITS there")
    p.add_argument("--std-map", action="store_true",
                   help="add a per-pixel standard deviation extension")
    p.add_argument("-c", "--config", help="YAML configuration (pipeline settings, masters)")
    p.add_argument("--bias", metavar="P",
                   help="master bias file, or a folder of biases (instead of the session's "
                        "recorded calibration)")
    p.add_argument("--darks", metavar="P", help="master dark(s) or a folder of darks (idem)")
    p.add_argument("--flats", metavar="P", help="master flat(s) or a folder of flats (idem)")
    p.add_argument("--no-calibration", action="store_true",
                   help="integrate without calibration frames, even when the session "
                        "recorded its masters")
    p.add_argument("--scratch", metavar="DIR",
                   help="folder for the scratch file (default: the output's folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="run the work on this Dask scheduler's workers (needs the extra "
                        "livestack[distributed]; every worker must see the frames and "
                        "masters at the same paths)")
    p.set_defaults(func=run)
    return p


def _masters(args: argparse.Namespace, config: Any, err: TextIO,
             stack_dirs: list[str]) -> Any:
    """The masters to calibrate with (storage.calibration.session_masters).

    The session's recorded calibration by default; ``--bias/--darks/--flats`` win (a line
    says when they differ from the recorded ones); ``--no-calibration`` turns it off.
    Sessions that recorded nothing (older journals) use ``masters.paths`` of the
    configuration, as before.

    Raises
    ------
    MasterError
        A recorded master is missing or changed, or a given one cannot be opened.
    UsageError
        ``--no-calibration`` together with master flags.
    """
    from livestack.storage.calibration import open_masters, session_masters

    flags = bool(args.bias or args.darks or args.flats)
    if args.no_calibration and flags:
        raise UsageError("integrate: --no-calibration cannot be combined with "
                         "--bias/--darks/--flats")
    recorded, root = _recorded(stack_dirs)
    given = None
    if flags:
        given = open_masters(bias=args.bias, darks=args.darks, flats=args.flats,
                             temp_tolerance_c=config.masters.temp_tolerance_c)
    elif not recorded and not args.no_calibration and config.masters.paths:
        given = open_masters(paths=config.masters.paths,
                             temp_tolerance_c=config.masters.temp_tolerance_c)

    def note(line: str) -> None:
        err.write(f"livestack integrate: {line}\n")

    masters = session_masters(recorded, root, given=given,
                              no_calibration=args.no_calibration, note=note)
    if masters is None and not args.no_calibration:
        err.write("livestack integrate: no masters given and none recorded by the session "
                  "(--bias/--darks/--flats or masters.paths in -c CONFIG): frames are "
                  "integrated without calibration frames\n")
    return masters


def _recorded(stack_dirs: list[str]) -> tuple[dict[str, list[dict[str, str]]], Path | None]:
    """The recorded masters of every frame of the sessions, and the first output root.

    Raises
    ------
    UsageError, JournalError
        As :func:`~livestack.sessionplan.load_session`.
    """
    from livestack.sessionplan import load_session

    recorded: dict[str, list[dict[str, str]]] = {}
    root = None
    for folder in stack_dirs:
        session = load_session(folder)
        recorded.update(session.recorded_masters())
        root = root or session.root
    return recorded, root


def _progress(stream: TextIO) -> Callable[[str, int, int], None]:
    start = time.monotonic()

    def update(stage: str, done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.monotonic() - start
        stream.write(f"\r{stage:8s} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
                     f"  {elapsed:5.0f} s ")
        if done == total:
            stream.write("\n")
        stream.flush()

    return update


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``livestack integrate`` with parsed arguments; return the exit code.

    Raises
    ------
    UsageError
        Bad options, a bad ``--select``, a reference not in the session, an
        ``--exclude`` matching nothing, a too small ``--memory-limit``.
    FrameError
        A raw frame listed in the journal is missing, changed or unusable (named).
    ConfigError, MasterError, JournalError, StorageError
        From the configuration, masters, journal or output.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    memory_limit = parse_size(args.memory_limit)
    low_default, high_default = DEFAULT_LIMITS[args.reject]
    from livestack.pipeline.combine import IntegrateConfig

    try:
        config = IntegrateConfig(
            combine=args.combine, reject=args.reject,
            low=low_default if args.low is None else args.low,
            high=high_default if args.high is None else args.high,
            weights=args.weights, std_map=args.std_map)
    except ValueError as exc:
        raise UsageError(f"integrate: {exc}") from None

    from livestack.config import load_config
    from livestack.restack import integrate_plan, sigterm_interrupts

    settings = load_config(args.config)
    pipeline = settings.pipeline
    if args.interpolation is not None:
        from dataclasses import replace

        pipeline = replace(pipeline, warp=replace(pipeline.warp, kernel=args.interpolation))
    from livestack.multisession import add_provenance, plan_sessions

    stack_dirs = [args.stack_dir] if isinstance(args.stack_dir, str) else list(args.stack_dir)
    masters = None  # opened here first only to register several sessions onto each other
    if args.scheduler:
        from livestack.distributed import check_cluster_options, master_paths

        check_cluster_options(args)  # no Dask or unsupported options: before any work
        recorded = None
        if not (args.bias or args.darks or args.flats or args.no_calibration):
            from livestack.storage.calibration import RecordedMasters

            by_frame, root = _recorded(stack_dirs)
            if by_frame:  # hash-checked here, on the client
                recorded = RecordedMasters(root or Path("."), by_frame)
        paths = master_paths(args, settings, err, recorded)  # the workers open them
        masters = paths.open() if len(stack_dirs) > 1 else None
    elif len(stack_dirs) > 1:
        masters = _masters(args, settings, err, stack_dirs)
    plan, sessions, session = plan_sessions(stack_dirs, exclude=args.exclude,
                                            select=args.select, reference=args.reference,
                                            masters=masters, pipeline=pipeline)
    output = Path(args.output) if args.output else (
        session.folder or Path(stack_dirs[0])) / DEFAULT_OUTPUT_NAME
    if not output.parent.is_dir():
        raise UsageError(f"-o {output}: folder {output.parent} does not exist")
    scratch = Path(args.scratch) if args.scratch else output.parent
    if not args.scheduler and len(stack_dirs) == 1:
        masters = _masters(args, settings, err, stack_dirs)

    with sigterm_interrupts():
        if args.scheduler:
            from livestack.distributed import run_on_cluster

            product = run_on_cluster(args, plan, config, pipeline, settings, memory_limit,
                                     None if args.no_progress else _progress(err))
        else:
            product = integrate_plan(
                plan, config, pipeline=pipeline, normalize=args.normalize,
                masters=masters, memory_limit_bytes=memory_limit,
                keep_registered_dir=args.keep_registered, scratch_dir=scratch,
                progress=None if args.no_progress else _progress(err),
                formats=settings.formats)
        add_provenance(product, sessions)
        from livestack.service.solving import integration_wcs
        from livestack.storage.stackfits import write_stack_fits

        integration_wcs(session, plan, product.header)  # the live stack's WCS, if solved
        write_stack_fits(output, product)

    _summary(out, plan, product, output)
    return 0


def _summary(out: TextIO, plan: Any, product: Any, output: Path) -> None:
    import numpy as np

    count = np.asarray(product.count, dtype=np.int64)
    low = int(np.sum(product.rejected_low, dtype=np.int64))
    high = int(np.sum(product.rejected_high, dtype=np.int64))
    samples = int(count.sum()) + low + high
    share = 100.0 / max(samples, 1)
    out.write(f"{plan.stack_id}: {len(plan.frames)} frames integrated, "
              f"{len(plan.excluded)} excluded; rejected {share * low:.2f}% low, "
              f"{share * high:.2f}% high -> {output}\n")


__all__ = ["DEFAULT_LIMITS", "INTERPOLATION", "add_parser", "parse_size", "run"]

"""Compile the numeric kernels in a second process while the daemon starts.

On a fresh install numba compiles every kernel on first use, one after the other, in
the worker thread: about 40 s of CPU before the first frames are stacked (20 s for what
the first frame needs alone). The compiler holds the GIL, so a thread cannot help; a
second process can, since numba's on-disk cache (``cache=True``) is shared: a kernel
compiled and saved by the helper is loaded, not compiled, when the daemon first calls it.

The daemon's own warm-up (``livestack.engine.warmup.warm_up_steps``) walks the pipeline from
the front (FITS decoding, calibration, detection, ...). This helper walks the first
frame's kernels from the back (accumulation, preview, shift warp, normalisation), then the
ones later frames need (affine warp of rotated frames, the kappa-sigma seeding, the
hot-pixel finder). The two meet in the middle. The first frame itself needs neither the
shift warp nor the warm-up replay: its identity warp and its preview are numpy (see
``pipeline.warp.warp`` and ``RunningStack.preview_mean``), so the daemon compiles only
decoding, calibration, detection, normalisation and the hold kernel before showing it.
``bench/bench_cold_start.py`` measures the effect.

Run as ``python -m livestack.precompile``; :func:`start` launches it and
:func:`cache_is_warm` tells when it is not needed. The helper is best effort: it writes
nothing but numba's cache, and its failure changes nothing but the
time the daemon's first frames take.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: The kernel modules whose numba cache the helper fills (relative to the package).
KERNEL_MODULES = ("pipeline/kernels_accumulate.py", "pipeline/kernels_warp.py",
                  "pipeline/kernels_twopass.py", "pipeline/kernels_detect.py",
                  "pipeline/kernels_binning.py", "pipeline/kernels_normalize.py",
                  "pipeline/kernels_cosmetic.py", "pipeline/kernels_calibrate.py",
                  "pipeline/kernels_demosaic.py")


def _cache_dirs() -> list[Path]:
    """Folders where numba keeps the index files of our kernel modules."""
    root = Path(__file__).resolve().parent
    custom = os.environ.get("NUMBA_CACHE_DIR")
    dirs = []
    for rel in KERNEL_MODULES:
        source = root / rel
        if custom:
            # numba's layout under NUMBA_CACHE_DIR: <folder name>_<sha1 of its path>.
            folder = os.path.dirname(os.path.abspath(source))
            digest = hashlib.sha1(folder.encode()).hexdigest()
            dirs.append(Path(custom) / f"{os.path.basename(folder)}_{digest}")
        else:
            dirs.append(source.parent / "__pycache__")
    return dirs


def cache_is_warm() -> bool:
    """True when every kernel module has at least one cached kernel (nothing to do).

    A partly filled cache (an older version's kernels) still counts as warm: the helper
    is for the very first start, where every kernel is missing.
    """
    root = Path(__file__).resolve().parent
    for rel, folder in zip(KERNEL_MODULES, _cache_dirs(), strict=True):
        stem = Path(rel).stem
        try:
            if not any(folder.glob(f"{stem}.*.nbi")):
                return False
        except OSError:
            return False
    return root.exists()


#: The helper this process launched (one at a time: ``livestack demo`` starts it before
#: building its masters, the daemon it runs then finds it running).
_helper: subprocess.Popen[bytes] | None = None


def start(*, force: bool = False) -> subprocess.Popen[bytes] | None:
    """Launch the helper process unless it runs already or the kernels are cached.

    Parameters
    ----------
    force : bool
        Launch even when :func:`cache_is_warm` says the cache is filled.

    Returns
    -------
    subprocess.Popen or None
        The helper (its output discarded), or None when not needed or it cannot start.
    """
    global _helper
    if _helper is not None and _helper.poll() is None:
        return _helper
    if not force and cache_is_warm():
        return None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "livestack.precompile"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        log.debug("kernel precompile helper not started: %s", exc)
        return None
    log.info("first start: compiling the numeric kernels (once per install) ...")
    _helper = proc
    return proc


def stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = 2.0) -> None:
    """End the helper if it still runs (the daemon stops before it finished)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def steps() -> Iterator[str]:
    """Compile the kernels from the back of the first frame's pipeline; yield step names.

    Tiny synthetic float32 arrays of the dtypes and layouts the pipeline passes, so that
    the compiled signatures are the ones the daemon looks up.
    """
    # Lazy, deliberately: the daemon and ``livestack demo`` import this module only to
    # start the helper; the pipeline (and numba) load in the helper process.
    from livestack.pipeline.accumulate import RunningStack, StackConfig
    from livestack.pipeline.cosmetic import find_isolated_hot_pixels
    from livestack.pipeline.normalize import apply_normalization, frame_stats
    from livestack.pipeline.types import Normalization, OutputMap, Transform
    from livestack.pipeline.warp import warp

    rng = np.random.default_rng(0)
    ny, nx = 96, 128
    frames = [rng.normal(100.0, 5.0, size=(ny, nx)).astype(np.float32) for _ in range(6)]
    foot = np.ones((ny, nx), dtype=np.bool_)
    stack = RunningStack((ny, nx), StackConfig())
    stack.add(frames[0], foot, 1.0, 5.0)
    stack.add(frames[1], foot, 1.0, 5.0)  # two held frames: the kernels' preview path
    stack.preview_mean(64)
    yield "hold + preview"
    shifted = np.array([[1.0, 0.0, 0.4], [0.0, 1.0, 0.3]])  # the identity is numpy
    warp(frames[0], Transform(shifted), (ny, nx))
    # The live stack's warps map their output (normalisation, level): the shift path
    # does it in a pass of its own.
    gains = np.ones(1, dtype=np.float32)
    warp(frames[0], Transform(shifted), (ny, nx),
         post=OutputMap(gains, 0.0 * gains, np.full(1, np.inf, dtype=np.float32)))
    yield "shift warp"
    norm = Normalization(scale=1.0, location=100.0, reference_location=100.0, weight=1.0)
    apply_normalization(frames[0], foot, norm, out=frames[0].copy())
    frame_stats(frames[0], None)
    yield "normalisation"
    angle = np.radians(0.5)
    rotated = Transform(np.array([[np.cos(angle), -np.sin(angle), 0.7],
                                  [np.sin(angle), np.cos(angle), 0.3]]))
    warp(frames[1], rotated, (ny, nx))  # the two-pass kernel (0.15-5 degrees)
    tiny = np.radians(0.05)
    warp(frames[1], Transform(np.array([[np.cos(tiny), -np.sin(tiny), 0.7],
                                        [np.sin(tiny), np.cos(tiny), 0.3]])), (ny, nx))
    yield "affine warp"  # both kernels: the 2-D one takes rotations under 0.15 degrees
    for frame in frames[2:]:
        stack.add(frame, foot, 1.0, 5.0)
    stack.preview_mean(64)
    yield "kappa-sigma stack"
    find_isolated_hot_pixels(frames[0], 8.0, None)
    yield "hot pixels"
    # Large frames (>= 8 MP) take detection's peak pass, which the daemon's small warm-up
    # frames never reach: run the large-frame path on a small frame.
    from livestack.pipeline.detect import DetectConfig, measure

    field = frames[2].copy()
    yy, xx = np.mgrid[0:ny, 0:nx]
    for x, y in rng.uniform(16, min(ny, nx) - 16, size=(12, 2)):
        field += (3000.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0)).astype(np.float32)
    measure(field, DetectConfig(auto_bin_min_mpix=0.0))
    yield "detection peak pass"
    # The default demosaic (auto: RCD or, above 8 MP, Malvar) takes about 30 s to compile:
    # the daemon's own warm-up leaves it to the first colour frame, so compile both here,
    # off the frame path.
    from livestack.pipeline.debayer import debayer

    for method in ("rcd", "malvar"):
        debayer(frames[0], "RGGB", method)
        yield f"demosaic ({method})"
    # Colour frames warp with Mitchell by default (pipeline.warp.kernel: auto): its
    # two-pass and 2-D kernels are compiled per kind.
    warp(frames[1], rotated, (ny, nx), "mitchell")
    warp(frames[1], Transform(np.array([[np.cos(tiny), -np.sin(tiny), 0.7],
                                        [np.sin(tiny), np.cos(tiny), 0.3]])), (ny, nx),
         "mitchell")
    yield "colour warp (mitchell)"
    # Then the front half, in case the daemon has not reached it yet (a frame waiting
    # behind a slow FITS read, say); kernels already cached just load.
    from livestack.config import Config
    from livestack.engine.warmup import warm_up_steps

    for name in warm_up_steps(Config(), with_masters=True):
        yield f"daemon warm-up: {name}"


def main() -> int:
    """Run every step; exit 0, or 1 when a step failed."""
    t0 = time.perf_counter()
    run: Callable[[], Iterator[str]] = steps
    try:
        for name in run():
            print(f"{time.perf_counter() - t0:6.1f} s  {name}", flush=True)
    except (ValueError, TypeError, ImportError, OSError) as exc:
        print(f"precompile: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

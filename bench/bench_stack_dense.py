"""``livestack stack`` end to end on a dense, rotating field: ms per frame, stages, peak RSS.

Issue 16's measurement, as a user runs it: simulate a dense field (``--stars``, default 9000 at
26 MP) that rotates by ``--rotation-deg`` over the run and drifts, with darks; then run the real
command ``livestack stack LIGHTS --darks DARKS -o OUT`` in a child process twice, on the first
``--short`` frames and on the first ``--long`` frames. The steady per-frame cost is

    (wall(long) - wall(short)) / (long - short)

which removes the start-up (imports, JIT cache load, masters) and the final write. The child's
peak RSS comes from ``wait4`` (``ru_maxrss``). The per-stage table is the median of the
journal's own stage timings (``frames.metrics.timings_ms``) over the long run's frames after the
first. The baseline in the same run is the naive loop peers use: astropy ``getdata``, dark
subtraction, ``astroalign.register`` on the full frame, and a running mean (``--naive``
frames, in its own child process so its RSS is its own).

Usage::

    python bench/bench_stack_dense.py                                  # 26 MP mono, 9000 stars
    python bench/bench_stack_dense.py --colour                         # 26 MP OSC (RGGB)
    python bench/bench_stack_dense.py --size 9576x6388 --stars 20000 --naive 0   # 61 MP
    python bench/bench_stack_dense.py --size 1500x1000 --stars 600 --long 5      # quick check

Frames are cached under ``--cache`` (default: a folder in the system temp dir keyed by the
arguments), so a second run skips the simulation.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOURNAL = "journal.sqlite"
#: The ``livestack`` console script's body, so the bench needs no installed script on PATH.
_CLI = "import sys; from livestack.cli import main; sys.exit(main())"


def generate(folder: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Simulate the lights (and darks) once into ``folder``; return (lights, darks)."""
    from livestack.sim import SimConfig, write_sequence
    from livestack.sim.sequence import write_calibration_set

    width, height = (int(v) for v in args.size.lower().split("x"))
    lights, darks = folder / "lights", folder / "calib" / "darks"
    done = folder / "done"
    if done.exists():
        return lights, darks
    n = max(args.long, args.naive)
    config = SimConfig(width=width, height=height, n_stars=args.stars, exposure_s=60.0,
                       drift_px_per_frame=(1.3, -0.7),
                       rotation_deg_per_frame=args.rotation_deg / max(1, n - 1),
                       satellite_frames=(3,), cosmic_rays_per_frame=20.0,
                       bayer_pattern="RGGB" if args.colour else None)
    lights.mkdir(parents=True, exist_ok=True)
    write_sequence(lights, config, args.seed, n)
    write_calibration_set(folder / "calib", config, args.seed, n_bias=0, n_darks=5, n_flats=0)
    done.write_text("ok\n")
    return lights, darks


def run_stack(files: list[Path], darks: Path, out: Path) -> tuple[float, int]:
    """Run ``livestack stack`` on ``files``; return (wall seconds, peak RSS in bytes)."""
    cmd = [sys.executable, "-c", _CLI, "stack", *map(str, files), "--darks", str(darks),
           "-o", str(out), "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall_s = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"livestack stack failed ({proc.returncode}):\n{stderr[-2000:]}")
    return wall_s, usage.ru_maxrss * 1024


def stage_medians(out: Path) -> dict[str, float]:
    """Median ms per stage over the accepted frames after the first, from the journal."""
    journals = list(out.rglob(JOURNAL))
    if not journals:
        return {}
    with sqlite3.connect(f"file:{journals[0]}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT metrics FROM frames WHERE status = 'accepted' AND metrics "
                          "IS NOT NULL ORDER BY id").fetchall()
    per_stage: dict[str, list[float]] = {}
    for (text,) in rows[1:]:
        for stage, ms in json.loads(text).get("timings_ms", {}).items():
            per_stage.setdefault(stage, []).append(float(ms))
    return {stage: statistics.median(values) for stage, values in per_stage.items()}


def naive(files: list[Path], darks: Path) -> None:
    """The peers' loop (child mode): print a JSON line with ms per frame after the first."""
    import astroalign
    import numpy as np
    from astropy.io import fits

    dark = np.median([fits.getdata(p).astype(np.float32) for p in sorted(darks.glob("*.fits"))],
                     axis=0)
    reference = fits.getdata(files[0]).astype(np.float32) - dark
    # Colour frames: the naive loop registers the raw mosaic, as a naive script would.
    total = reference.astype(np.float64)
    times = []
    for path in files[1:]:
        t0 = time.perf_counter()
        frame = fits.getdata(path).astype(np.float32) - dark
        try:
            aligned, _ = astroalign.register(frame, reference)
        except astroalign.MaxIterError:
            continue
        total += aligned
        times.append((time.perf_counter() - t0) * 1e3)
    import resource
    print(json.dumps({"ms": statistics.median(times) if times else float("nan"),
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run_naive(files: list[Path], darks: Path) -> dict[str, float]:
    """Run :func:`naive` in a child process."""
    cmd = [sys.executable, __file__, "--naive-child", str(darks), *map(str, files)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"naive loop failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="6248x4176", help="WxH of the frames")
    parser.add_argument("--stars", type=int, default=9000)
    parser.add_argument("--rotation-deg", type=float, default=0.5,
                        help="field rotation over the whole run, degrees")
    parser.add_argument("--colour", action="store_true", help="RGGB one-shot-colour frames")
    parser.add_argument("--short", type=int, default=2)
    parser.add_argument("--long", type=int, default=8)
    parser.add_argument("--naive", type=int, default=3, help="frames for the naive loop (0: skip)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the (short, long) pair")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--naive-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_child:
        naive([Path(p) for p in args.naive_child[1:]], Path(args.naive_child[0]))
        return 0
    if not 1 <= args.short < args.long:
        parser.error("need 1 <= --short < --long")
    key = f"dense_{args.size}_{args.stars}_{args.rotation_deg}_{int(args.colour)}_{args.seed}_" \
          f"{max(args.long, args.naive)}"
    cache = args.cache or Path(tempfile.gettempdir()) / "livestack-bench" / key
    t0 = time.perf_counter()
    lights, darks = generate(cache, args)
    files = sorted(lights.glob("*.fits"))
    print(f"frames: {args.size}, {args.stars} stars, {args.rotation_deg} deg rotation, "
          f"{'RGGB' if args.colour else 'mono'}, darks; cache {cache} "
          f"({time.perf_counter() - t0:.0f} s)")

    rows = []
    stages: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ls-dense-") as tmp:
        # Untimed: fills the JIT cache so that no timed run pays the compilation.
        run_stack(files[:1], darks, Path(tmp) / "prime")
    for run in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="ls-dense-") as tmp:
            short_s, _ = run_stack(files[:args.short], darks, Path(tmp) / "short")
            long_s, rss = run_stack(files[:args.long], darks, Path(tmp) / "long")
            stages = stage_medians(Path(tmp) / "long")
        ms = (long_s - short_s) / (args.long - args.short) * 1e3
        rows.append((run + 1, ms, rss, short_s, long_s))
    base = run_naive(files[:args.naive], darks) if args.naive >= 2 else None

    print()
    print("| run | ms/frame | vs naive | peak RSS (GB) | wall short / long (s) |")
    print("|---|---|---|---|---|")
    for run, ms, rss, short_s, long_s in rows:
        ratio = f"{base['ms'] / ms:.1f}x" if base else "-"
        print(f"| {run} | {ms:.0f} | {ratio} | {rss / 1e9:.2f} | {short_s:.1f} / {long_s:.1f} |")
    if base:
        print(f"| naive astroalign loop | {base['ms']:.0f} | 1.0x | {base['rss'] / 1e9:.2f} | - |")
    print()
    print("| stage (journal, median of frames 2..N) | ms |")
    print("|---|---|")
    for stage, ms in stages.items():
        print(f"| {stage} | {ms:.1f} |")
    print(f"| sum | {sum(stages.values()):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

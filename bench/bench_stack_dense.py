"""``livestack stack`` end to end on a dense, rotating field: ms per frame, stages, peak RSS.

Issue 16's measurement, as a user runs it: simulate a dense field (``--stars``, default 9000 at
26 MP) that rotates by ``--rotation-deg`` over the run and drifts, with darks; then run the real
command ``livestack stack LIGHTS --darks DARKS -o OUT`` in a child process twice, on the first
``--short`` frames and on the first ``--long`` frames. The steady per-frame cost is

    (wall(long) - wall(short)) / (long - short)

which removes the start-up (imports, JIT cache load, masters) and the final write. Both runs
carry those fixed costs, whose run-to-run spread (+-1 s at 26 MP) moves this difference by
+-70 ms per frame over 14 frames, so each run also prints the *steady* ms per frame: the
spacing of the journal's accepted times within the long run, from the 6th frame on (after the
warm-up replay; :func:`steady_ms`). Every run's frames are read once, untimed, just before
it (:func:`warm`), as a live session finds a just-written frame in the page cache. The child's
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
    python bench/bench_stack_dense.py --repeat 3 --baseline /tmp/main-tree       # vs another tree
    python bench/bench_stack_dense.py --solver                         # with the plate solve

The plate solver is off by default (``solver.enabled: false`` in a config the bench writes):
the solve is a once-per-stack background job, measured by ``bench/bench_solve.py``, and a
synthetic sky cannot be solved, so ``stack``'s final wait for it (``solve-field`` giving up at
its time limit, then a second attempt on the deeper stack in the long run only) would land in
the (long - short) difference and measure the solver, not the frames. ``--solver`` keeps it on.

Each run also prints the CPU time per frame (the same difference of the child's user +
system time), which a shared machine's load moves far less than the wall time. Each run
prints how many frames it accepted and rejected (a rejected frame skips warp and
accumulate, which flatters ms/frame). ``--baseline TREE`` runs every (short, long) pair also
with ``PYTHONPATH=TREE`` (another checkout's ``livestack``, e.g. ``git archive main``
unpacked), interleaved with this tree's runs, and prints this tree's ms/frame as a ratio
against it in the same run.

Frames are cached under ``--cache`` (default: a folder in the system temp dir keyed by the
arguments), so a second run skips the simulation.

Until the fix of 2026-12-07 the child ran in the caller's working directory, where
``python -c`` finds ``livestack`` before ``PYTHONPATH``: run from the repository root, every
``--baseline`` column measured this tree against itself (the naive loop and the absolute
figures were right). The ratios printed by earlier sessions are void; these are not.

Issue 16's figures (quiet 2-core machine, load 1.1-1.6 from the bench itself; baseline
``git archive 22136d7 livestack``, this session's start; ms per frame as (long - short) /
(long - short frames), steady ms per frame, CPU ms per frame, peak RSS)::

    python bench/bench_stack_dense.py --repeat 2 --long 16 --naive 2 --baseline /tmp/s9start
    run 1   22136d7 419 / 279 / 557 / 1.18 GB   main 175 / 206 / 361 / 1.18 GB
    run 2   22136d7 326 / 270 / 460 / 1.18 GB   main 156 / 195 / 326 / 1.18 GB
    naive astroalign loop 2502 ms per frame, 1.86 GB

    python bench/bench_stack_dense.py --size 9576x6388 --stars 20000 --repeat 2 --naive 2 \
        --baseline /tmp/s9start                                        # 61 MP
    run 1   22136d7 805 / 646 / 1098 / 2.38 GB  main 328 / 494 / 655 / 2.39 GB
    run 2   22136d7 899 / 616 / 1386 / 2.38 GB  main 621 / 386 / 1094 / 2.39 GB
    naive astroalign loop 5106 ms per frame, 4.28 GB

The issue's own protocol (8 frames - 2 frames) / 6 divides the spread of two ~10 s
start-ups by 6 (+-170 ms per frame) and charges the stack's one-off costs (the warm-up
replay at frame 4, the final checkpoint of a grown state) to those 6 frames; it scatters
108-245 ms (``--repeat 4 --naive 0``) around a steady cost near 200 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


#: ``stack``'s configuration when the solver is off (the bench's default).
SOLVER_OFF = "solver:\n  enabled: false\n"


def run_stack(files: list[Path], darks: Path, out: Path, config: Path | None = None,
              tree: Path | None = None) -> tuple[float, int, float]:
    """Run ``livestack stack`` on ``files``; return (wall s, peak RSS bytes, CPU s).

    CPU is the child's user + system time (all its threads, from ``wait4``).

    ``config`` is passed as ``-c``; ``tree`` (a folder holding a ``livestack`` package)
    is put first on the child's ``PYTHONPATH`` so that its code runs instead of this one's.
    """
    cmd = [sys.executable, "-c", _CLI, "stack", *map(str, files), "--darks", str(darks),
           "-o", str(out), "--no-progress"]
    if config is not None:
        cmd += ["-c", str(config)]
    # ``python -c`` puts the working directory first on sys.path, ahead of PYTHONPATH: run
    # from the repository root, the child imported this tree's livestack even when given
    # another one (every baseline before this fix measured this tree against itself). So
    # the child runs in the output's folder, with the tree named first on its path.
    here = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str((tree or here).resolve()), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            cwd=out.parent)
    _, status, usage = os.wait4(proc.pid, 0)
    wall_s = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"livestack stack failed ({proc.returncode}):\n{stderr[-2000:]}")
    return wall_s, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def warm(paths: list[Path]) -> None:
    """Read ``paths`` (files, or every file under a folder) once, untimed, so that the
    timed run finds them in the page cache.

    A live session reads a frame the camera has just written, so its pages are cached.
    The bench's frames were written long before, and this VM's memory reclaim (DAMON
    ``pageout``) evicts pages idle for about a minute: without this, the timed runs also
    measured 11-13 MB of disk reads per 52 MB frame (73-266 ms, ``bench_frame_account``).
    """
    buf = bytearray(1 << 22)
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    for path in filter(Path.is_file, files):
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


#: Frames before the steady state: the warm-up (4 held frames, replayed at the 4th) and one.
STEADY_FROM = 5


def steady_ms(out: Path) -> float:
    """Steady-state ms per frame inside one run: the spacing of the journal's accepted
    times from frame ``STEADY_FROM`` on (process start, masters, JIT cache load, warm-up
    replay and the final write excluded; NaN with fewer than 3 such frames).

    ``(long - short) / n`` carries the noise of two runs' fixed costs (+-1 s on 26 MP,
    i.e. +-70 ms per frame over 14 frames); this spacing does not.
    """
    journals = list(out.rglob(JOURNAL))
    if not journals:
        return float("nan")
    with sqlite3.connect(f"file:{journals[0]}?mode=ro", uri=True) as db:
        times = [float(t) for (t,) in db.execute(
            "SELECT updated FROM frames WHERE status = 'accepted' ORDER BY updated")]
    times = times[STEADY_FROM:]
    if len(times) < 3:
        return float("nan")
    return (times[-1] - times[0]) / (len(times) - 1) * 1e3


def verdict_counts(out: Path) -> dict[str, int]:
    """Frames per journal status (accepted, rejected, failed, ...) of one run."""
    journals = list(out.rglob(JOURNAL))
    if not journals:
        return {}
    with sqlite3.connect(f"file:{journals[0]}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT status, COUNT(*) FROM frames GROUP BY status").fetchall()
    return {str(status): int(n) for status, n in rows}


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
    parser.add_argument("--solver", action="store_true",
                        help="keep the plate solver on (default: off, see the docstring)")
    parser.add_argument("--baseline", type=Path,
                        help="also run each pair with PYTHONPATH=BASELINE (another tree), "
                             "interleaved, and print ratios against it")
    parser.add_argument("--naive-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_child:
        naive([Path(p) for p in args.naive_child[1:]], Path(args.naive_child[0]))
        return 0
    if not 1 <= args.short < args.long:
        parser.error("need 1 <= --short < --long")
    if args.baseline is not None and not (args.baseline / "livestack").is_dir():
        parser.error(f"--baseline {args.baseline}: no livestack package there")
    key = f"dense_{args.size}_{args.stars}_{args.rotation_deg}_{int(args.colour)}_{args.seed}_" \
          f"{max(args.long, args.naive)}"
    cache = args.cache or Path(tempfile.gettempdir()) / "livestack-bench" / key
    t0 = time.perf_counter()
    lights, darks = generate(cache, args)
    files = sorted(lights.glob("*.fits"))
    print(f"frames: {args.size}, {args.stars} stars, {args.rotation_deg} deg rotation, "
          f"{'RGGB' if args.colour else 'mono'}, darks; cache {cache} "
          f"({time.perf_counter() - t0:.0f} s)")
    print("plate solver: " + ("on (the final wait for the background solve is timed)"
                              if args.solver else
                              "off (a once-per-stack background job, measured by "
                              "bench/bench_solve.py; a synthetic sky cannot be solved)"))
    print(f"load average at start: {os.getloadavg()[0]:.2f}")

    trees: list[tuple[str, Path | None]] = [("this tree", None)]
    if args.baseline is not None:
        trees.insert(0, (f"baseline {args.baseline}", args.baseline))
    rows = []
    stages: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ls-dense-") as tmp:
        config = None
        if not args.solver:
            config = Path(tmp) / "solver-off.yaml"
            config.write_text(SOLVER_OFF)
        for i, (_label, tree) in enumerate(trees):
            # Untimed, on the long run's frames: fills the JIT cache (including the kernels
            # only later frames call: rotated warp, clipping) so no timed run compiles.
            run_stack(files[:args.long], darks, Path(tmp) / f"prime{i}", config, tree)
        for run in range(args.repeat):
            for label, tree in trees:
                out = Path(tmp) / f"run{run}-{len(rows)}"
                warm([*files[:args.short], darks])
                short_s, _, short_cpu = run_stack(files[:args.short], darks, out / "short",
                                                  config, tree)
                warm([*files[:args.long], darks])
                long_s, rss, long_cpu = run_stack(files[:args.long], darks, out / "long",
                                                  config, tree)
                stages[label] = stage_medians(out / "long")
                counts = verdict_counts(out / "long")
                steady = steady_ms(out / "long")
                # A 26 MP pair writes ~1 GB (stacks, checkpoints, masters): free it now,
                # or --repeat 5 with a baseline filled the disk of a small /tmp.
                shutil.rmtree(out)
                ms = (long_s - short_s) / (args.long - args.short) * 1e3
                cpu_ms = (long_cpu - short_cpu) / (args.long - args.short) * 1e3
                rows.append((run + 1, label, ms, rss, short_s, long_s, counts,
                             os.getloadavg()[0], cpu_ms, steady))
    base = run_naive(files[:args.naive], darks) if args.naive >= 2 else None

    print()
    # CPU ms/frame: the same difference of the children's user + system time. On a shared
    # machine it moves far less with the load than the wall time does; work moved to a
    # second thread (overlap) shortens the wall time only, not the CPU time.
    print("| run | tree | ms/frame | vs baseline | steady ms/frame | vs baseline | CPU ms/frame "
          "| CPU vs baseline | vs naive | peak RSS (GB) | wall short / long (s) "
          "| long run: accepted / rejected / failed | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    baseline_ms: dict[int, tuple[float, float, float]] = {}
    for run, label, ms, rss, short_s, long_s, counts, load, cpu_ms, steady in rows:
        if args.baseline is not None and label != "this tree":
            baseline_ms[run] = (ms, cpu_ms, steady)
        paired = label == "this tree" and run in baseline_ms
        vs_base = f"{ms / baseline_ms[run][0]:.2f}x" if paired else "-"
        vs_cpu = f"{cpu_ms / baseline_ms[run][1]:.2f}x" if paired else "-"
        vs_steady = f"{steady / baseline_ms[run][2]:.2f}x" if paired else "-"
        ratio = f"{base['ms'] / ms:.1f}x" if base else "-"
        print(f"| {run} | {label} | {ms:.0f} | {vs_base} | {steady:.0f} | {vs_steady} | "
              f"{cpu_ms:.0f} | {vs_cpu} | {ratio} | "
              f"{rss / 1e9:.2f} | {short_s:.1f} / {long_s:.1f} | {counts.get('accepted', 0)} / "
              f"{counts.get('rejected', 0)} / {counts.get('failed', 0)} | {load:.2f} |")
    if base:
        print(f"| naive | astroalign loop | {base['ms']:.0f} | - | - | - | - | - | 1.0x | "
              f"{base['rss'] / 1e9:.2f} | - | - | - |")
    print()
    labels = list(stages)
    print("| stage (journal, median of accepted frames 2..N, last run) | "
          + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    names = list(dict.fromkeys(name for table in stages.values() for name in table))
    for name in [*names, "sum"]:
        cells = [f"{sum(stages[lb].values()):.1f}" if name == "sum" else
                 (f"{stages[lb][name]:.1f}" if name in stages[lb] else "-") for lb in labels]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Several sessions integrated locally versus on a Dask cluster of local worker processes.

Generates ``--sessions`` simulated nights of ``--frames`` lights each (same sky and sensor,
different drift, noise and dates; ``livestack.sim.nights``) once into ``--dir`` (reused on
later runs), then runs, each in a fresh child process so that ``ru_maxrss`` is the run's
own peak:

* ``local``: :func:`livestack.restack.integrate_plan` (the default engine, the baseline);
* ``dask``: :func:`livestack.distributed.integrate_plan_dask` on a
  ``distributed.LocalCluster`` of ``--workers`` single-threaded worker processes on
  127.0.0.1, each with ``memory_limit = --memory-limit``.

Both use ``--memory-limit`` for their tile heights, no masters, winsorized 3/3 rejection.
The table gives seconds per frame (the planning, i.e. reading the journals and
registering the sessions onto each other, is shown apart), the ratio to the local run,
the peak RSS of every process (client, each worker) and the largest pixel difference.

    python bench/bench_multisession.py --width 1536 --height 1024 --frames 10   # quick
    python bench/bench_multisession.py --frames 100                             # the issue's
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

WIDTH, HEIGHT = 6248, 4176  # 26 MP


def generate(folder: Path, sessions: int, frames: int, width: int, height: int
             ) -> list[Path]:
    """Write (or reuse) the nights; return their stack folders."""
    from livestack.sim import SimConfig
    from livestack.sim.nights import write_night

    # dense enough that every session finds stars to register onto the first one
    stars = max(3000, min(20000, width * height // 150))
    base = SimConfig(width=width, height=height, n_stars=stars,
                     satellite_frames=(2,), cosmic_rays_per_frame=20.0,
                     drift_px_per_frame=(0.9, 0.6), dither_px=4.0)
    dirs = []
    for k in range(sessions):
        night = folder / f"night{k}"
        stack_id = f"2026-01-{15 + 2 * k}/bench"
        marker = night / "done.json"
        if marker.exists():
            dirs.append(Path(json.loads(marker.read_text())["stack_dir"]))
            continue
        t0 = time.perf_counter()
        config = replace(base, drift_px_per_frame=(0.9 - 1.2 * k, 0.6 + 0.2 * k),
                         read_noise_e=3.5 + 2.0 * k, sky_e_per_s=15.0 + 10.0 * k,
                         start_time_utc=f"2026-01-{15 + 2 * k}T21:00:00",
                         satellite_frames=(100 * k + 2,))
        made = write_night(night, config, 5, frames, stack_id=stack_id, start_index=100 * k)
        marker.write_text(json.dumps({"stack_dir": str(made.stack_dir)}))
        print(f"  generated {stack_id}: {frames} frames in {time.perf_counter() - t0:.0f} s",
              flush=True)
        dirs.append(made.stack_dir)
    return dirs


def child(mode: str, limit_bytes: int, workers: int, out: Path, dirs: list[str]) -> None:
    """Run one engine; print a JSON line with timings and peaks; save the image."""
    from livestack.multisession import plan_sessions
    from livestack.restack import integrate_plan

    t0 = time.perf_counter()
    plan = plan_sessions(dirs)[0]
    t_plan = time.perf_counter() - t0
    peaks: dict[str, int] = {}
    if mode == "local":
        t0 = time.perf_counter()
        product = integrate_plan(plan, memory_limit_bytes=limit_bytes)
        seconds = time.perf_counter() - t0
    else:
        from distributed import Client, LocalCluster

        from livestack.distributed import integrate_plan_dask

        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=None,
                          memory_limit=limit_bytes) as cluster, Client(cluster) as client:
            client.wait_for_workers(workers)
            t0 = time.perf_counter()
            product = integrate_plan_dask(plan, client=client, memory_limit_bytes=limit_bytes)
            seconds = time.perf_counter() - t0
            got = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            peaks = {f"worker {i + 1}": int(v) for i, v in enumerate(got.values())}
    peaks = {"client": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **peaks}
    np.save(out, product.image)
    print(json.dumps({"plan_s": t_plan, "seconds": seconds, "frames": len(plan.frames),
                      "peaks": peaks}))


def _run(mode: str, args: argparse.Namespace, dirs: list[Path], folder: Path) -> dict[str, Any]:
    out = folder / f"{mode}.npy"
    run = subprocess.run([sys.executable, __file__, "--child", mode, "--memory-limit",
                          args.memory_limit, "--workers", str(args.workers), "--out", str(out),
                          *map(str, dirs)], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        print(run.stderr, file=sys.stderr)
        raise SystemExit(f"{mode} run failed")
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    result["image"] = np.load(out)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--frames", type=int, default=100, help="frames per session")
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--height", type=int, default=HEIGHT)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="2GB", help="per process")
    parser.add_argument("--dir", default=None,
                        help="data folder (default /tmp/livestack-bench-multi-WxH-SxF)")
    parser.add_argument("--generate-only", action="store_true",
                        help="write the sessions and stop (the runs can then be timed apart)")
    parser.add_argument("--child", choices=("local", "dask"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("dirs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from livestack.integrate_cli import parse_size

    limit = parse_size(args.memory_limit)
    if args.child:
        child(args.child, limit, args.workers, Path(args.out), args.dirs)
        return 0
    folder = Path(args.dir or f"/tmp/livestack-bench-multi-{args.width}x{args.height}-"
                              f"{args.sessions}x{args.frames}")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"generating/reusing {args.sessions} x {args.frames} frames of "
          f"{args.width}x{args.height} in {folder} ...", flush=True)
    dirs = generate(folder, args.sessions, args.frames, args.width, args.height)
    if args.generate_only:
        return 0
    local = _run("local", args, dirs, folder)
    dask = _run("dask", args, dirs, folder)
    n = local["frames"]
    mib = 2**20
    ref = local["image"]
    diff = np.nanmax(np.abs(dask["image"] - ref) / np.maximum(np.abs(ref), 1e-3))
    print()
    print(f"| {args.sessions} sessions x {args.frames} frames, {args.width}x{args.height}, "
          f"--memory-limit {args.memory_limit} | s/frame | ratio to local | peak RSS per "
          "process (MiB) |")
    print("|---|---|---|---|")
    for name, r in (("local engine (baseline)", local),
                    (f"Dask, {args.workers} local worker processes", dask)):
        peaks = ", ".join(f"{k} {v / mib:.0f}" for k, v in r["peaks"].items())
        print(f"| {name} | {r['seconds'] / n:.3f} | {r['seconds'] / local['seconds']:.2f} | "
              f"{peaks} |")
    print()
    print(f"planning (journals + cross-session registration), local run: {local['plan_s']:.1f} s;"
          f" largest relative pixel difference Dask vs local: {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A live rebuild (exclude a frame) with the integration engine, while frames keep arriving.

The daemon's :class:`~livestack.engine.core.Engine` stacks ``--frames`` simulated frames; then the
operator excludes one. The integration runs in a child process (``rebuild.nice``) while the
worker goes on stacking ``--live`` more frames into the old stack. Printed:

* per-frame worker time (median) before the rebuild and while it runs, and their ratio
  (the cost of the background rebuild to the live stack, on this machine's 2 cores);
* command -> integrated, and command -> swapped (the catch-up replays the live frames);
* the child's peak RSS (``getrusage(RUSAGE_CHILDREN)``) against ``rebuild.memory_limit_mb``;
* the old way, measured in the same run for comparison: replaying every frame through the
  live pipeline (what the rebuild did before it used the engine).

The rebuilt image is checked against ``integrate_session`` with the frame excluded
(bit-identical when no frame arrives during the rebuild; here live frames do arrive, so the
check is on the frame count).

    python bench/bench_rebuild.py                          # 4096x3072 (12.6 MP), 24 + 6 frames
    python bench/bench_rebuild.py --size 6248x4176 --frames 30 --live 8     # 26 MP
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="4096x3072", help="WIDTHxHEIGHT of the frames")
    parser.add_argument("--frames", type=int, default=24, help="frames before the command")
    parser.add_argument("--live", type=int, default=6, help="frames during the rebuild")
    parser.add_argument("--memory-limit-mb", type=int, default=2048)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: temp)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    from livestack.config import config_from_dict
    from livestack.engine.core import Engine
    from livestack.pipeline.session import StackSession
    from livestack.pipeline.types import Transform
    from livestack.sim import SimConfig, write_sequence
    from livestack.storage.fitsio import read_frame

    work = args.dir or Path(tempfile.mkdtemp(prefix="livestack-bench-rebuild-"))
    frames_dir = work / "frames"
    n_total = args.frames + args.live
    sim = SimConfig(width=width, height=height, n_stars=max(300, width * height // 20000),
                    flux_powerlaw_index=1.0,
                    drift_px_per_frame=(0.7, 0.4), dither_px=2.0)
    print(f"writing {n_total} frames of {width}x{height} to {frames_dir} ...", flush=True)
    paths = sorted(frames_dir.glob("*.fits")) if frames_dir.is_dir() else []
    if len(paths) < n_total:
        paths = write_sequence(frames_dir, sim, seed=1, n_frames=n_total)
    paths = paths[:n_total]
    config = config_from_dict({"rebuild": {"memory_limit_mb": args.memory_limit_mb},
                               "output": {"checkpoint_every_frames": 1000,
                                          "fits_every_frames": 1000}})
    out = work / "stacks"
    if out.exists():  # a previous run's journal would take the frames for duplicates
        shutil.rmtree(out)
    engine = Engine(config, out, background_checkpoints=False)

    def timed(path: Path) -> float:
        t0 = time.perf_counter()
        engine.process_path(path)
        return time.perf_counter() - t0

    engine.process_path(paths[0])  # JIT and first-frame costs out of the way
    before = [timed(p) for p in paths[1:args.frames]]
    (stack_id,) = engine.runtimes
    rt = engine.runtimes[stack_id]
    victim = paths[args.frames // 2].name

    t_cmd = time.perf_counter()
    engine.execute_command("exclude_frame",
                           engine.validate_command("exclude_frame", {"file": victim}))
    during = []
    for path in paths[args.frames:]:
        during.append(timed(path))
        if engine.rebuilds:
            engine.rebuild_step()  # as the worker does after each frame
    t_integrated = None
    while engine.rebuilds:
        job = engine.rebuilds[stack_id]
        if job.session is None:
            engine.rebuild_step(wait_s=600)
            if t_integrated is None and stack_id in engine.rebuilds:
                t_integrated = time.perf_counter()
        else:
            engine.rebuild_step()
    t_swap = time.perf_counter()
    child_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    n_stack = rt.session.n_accepted
    engine.close()

    # The old way: replay every active frame through the live pipeline.
    from livestack.storage.journal import Journal

    journal = Journal(out / "journal.sqlite")
    active = journal.rows_after(stack_id, 0, ("accepted",))
    journal.close()
    t0 = time.perf_counter()
    replay = StackSession(stack_id, config.pipeline)
    for row in active[:args.frames - 1]:
        raw, info, _ = read_frame(Path(row.path))
        tr = Transform.from_list(row.transform, row.model or "similarity") if row.transform \
            else None
        replay.process(raw, info, None, stored_transform=tr)
    replay_s = time.perf_counter() - t0

    med_before = statistics.median(before) * 1e3
    med_during = statistics.median(during) * 1e3
    integrated_s = (t_integrated or t_swap) - t_cmd
    print()
    print(f"{width}x{height}, {args.frames} frames, 1 excluded, {args.live} live frames "
          f"during the rebuild; stack now {n_stack} frames")
    print("| measure | value |")
    print("|---|---|")
    print(f"| live frame, worker time, median before the rebuild | {med_before:.0f} ms |")
    print(f"| live frame, worker time, median during the rebuild | {med_during:.0f} ms "
          f"(ratio {med_during / med_before:.2f}) |")
    print(f"| command -> integration done ({args.frames - 1} frames) | {integrated_s:.1f} s "
          f"({integrated_s / (args.frames - 1):.2f} s/frame, while stacking live) |")
    print(f"| command -> swapped (after catching up {args.live} frames) | "
          f"{t_swap - t_cmd:.1f} s |")
    print(f"| rebuild process peak RSS | {child_rss_mb:.0f} MB (limit "
          f"{args.memory_limit_mb} MB) |")
    print(f"| old way: replay {args.frames - 1} frames through the live pipeline | "
          f"{replay_s:.1f} s (worker busy all along) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

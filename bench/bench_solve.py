"""Plate solving: solve time with and without hints, and the live stack's cost while it runs.

Table 1 -- ``solve-field`` on our own star list (livestack's detector), per field and hint
set, as the daemon runs it (niced child, early stop at odds 1e9, ``--time-limit``):

* ``oscaar``: ``../shared/data/oscaar_tres1/lights/tres1-050.fit`` (real, 1092x736 at
  2.37"/px, 0.72 x 0.49 deg);
* ``tycho-26mp``: a 6244x4168 (26 MP) field at 1.2"/px (2.1 x 1.4 deg) rendered from the
  Tycho-2 stars of ``index-tycho2-07`` (so it has a known true WCS).

Hint sets: position+scale (RA/Dec within a field, scale +-10 %), scale only, none (blind).
Times are wall seconds; the ratio is against the hinted solve of the same field, same run.

Table 2 -- per-frame worker ms of the daemon's Engine on oscaar frames, without a solve and
while a blind solve of the oscaar field runs in the background (the worst case: a search
that only ends at the time limit), alternating runs on the same frames; ratio against the
baseline. The solve runs twice: free, and registered with the engine's ``ChildPause`` as
the daemon runs it (stopped while a frame is processed, continued when the worker is
idle). Between frames the bench does what the worker does when its queue is empty
(``engine.idle()``, the SIGCONT) and waits ``--gap`` seconds, the camera's next exposure.

    python bench/bench_solve.py                    # both tables
    python bench/bench_solve.py --frames 12 --time-limit 120
    python bench/bench_solve.py --only-frames      # Table 2 only
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OSCAAR = REPO.parent / "shared" / "data" / "oscaar_tres1" / "lights"
INDEX_DIR = "/usr/share/astrometry"


def _fields(synthetic: bool = True
            ) -> list[tuple[str, object, tuple[int, int], float, tuple[float, float]]]:
    """(name, stars, shape, true scale, true centre) of each benchmark field."""
    import numpy as np

    from livestack.pipeline.detect import detect_stars
    from livestack.sim.tycho import read_index_stars, render_field, tan_cards
    from livestack.storage.fitsio import read_frame

    fields = []
    if (OSCAAR / "tres1-050.fit").exists():
        image, info, _ = read_frame(OSCAAR / "tres1-050.fit")
        fields.append(("oscaar", detect_stars(image)[0], info.shape, 2.374, (286.007, 36.667)))
    else:
        print(f"({OSCAAR} not found: the real-data rows are left out)")
    if not synthetic:
        return fields
    catalogue = read_index_stars(Path(INDEX_DIR) / "index-tycho2-07.littleendian.fits")
    shape = (4168, 6244)
    cards = tan_cards(83.8, -5.4, 1.2, shape, rotation_deg=20.0)
    image = render_field(catalogue, cards, shape, rng=np.random.default_rng(1))
    fields.append(("tycho-26mp", detect_stars(image)[0], shape, 1.2, (83.8, -5.4)))
    return fields


def solve_table(time_limit_s: float) -> list[tuple[str, object, tuple[int, int]]]:
    from livestack.storage.solver import SolveHints, solve_stars

    fields = _fields()
    print(f"\nTable 1: solve time (wall s; time limit {time_limit_s:.0f} s; under the "
          "machine's current load)")
    print(f"{'field':<12} {'stars':>5} {'hints':<15} {'solved':<7} {'time_s':>7} "
          f"{'ratio':>6}  index")
    for name, stars, shape, scale, (ra, dec) in fields:
        diag_deg = (shape[0] ** 2 + shape[1] ** 2) ** 0.5 * scale / 3600
        sets = [("position+scale", SolveHints(ra + 0.3 * diag_deg, dec - 0.2 * diag_deg,
                                              2 * diag_deg, scale * 0.9, scale * 1.1)),
                ("scale", SolveHints(None, None, 5.0, scale * 0.9, scale * 1.1)),
                ("none (blind)", SolveHints())]
        base = None
        for label, hints in sets:
            result = solve_stars(stars, shape, hints, index_dir=INDEX_DIR,  # type: ignore[arg-type]
                                 time_limit_s=time_limit_s)
            base = base or result.elapsed_s
            print(f"{name:<12} {result.n_stars:>5} {label:<15} {result.solved!s:<7} "
                  f"{result.elapsed_s:>7.1f} {result.elapsed_s / base:>6.1f}  {result.index}",
                  flush=True)
    return [(n, s, sh) for n, s, sh, _, _ in fields]


def frame_table(fields: list, n_frames: int, time_limit_s: float, repeat: int,
                gap_s: float) -> None:
    from dataclasses import replace

    from livestack.config import Config, SolverConfig
    from livestack.daemon import Engine
    from livestack.storage.solver import ChildPause, SolveHints, solve_stars

    if not OSCAAR.is_dir():
        print("\nTable 2 needs ../shared/data/oscaar_tres1")
        return
    frames = sorted(OSCAAR.glob("*.fit"))[: n_frames + 2]
    config = replace(Config(), solver=replace(SolverConfig(), enabled=False))
    work = Path(tempfile.mkdtemp(prefix="livestack-bench-solve-"))
    _name, stars, shape = fields[0]
    still_running = True

    def run(paths: list[Path], root: Path, solve: str) -> list[float]:
        """Per-frame ms; ``solve`` is "none", "free" or "paused" (the daemon's way)."""
        nonlocal still_running
        engine = Engine(config, root, background_checkpoints=True)
        stop, done = threading.Event(), threading.Event()
        # Background solving is switched off in these engines (no hints in the oscaar
        # headers would mean a blind solve); the solve runs are one blind search of the
        # oscaar field, which fails only at the time limit: the longest a solve can
        # occupy a core. "paused" registers it with the engine's ChildPause.
        pause = engine.solving.pause if solve == "paused" else ChildPause()

        def search() -> None:
            solve_stars(stars, shape, SolveHints(), index_dir=INDEX_DIR,
                        time_limit_s=time_limit_s, cancel=stop, pause=pause)
            done.set()

        thread = threading.Thread(target=search, daemon=True)
        times = []
        try:
            if solve != "none":
                thread.start()
                pause.registered.wait(30)
                time.sleep(1.0)  # let solve-field load its indexes and start searching
            for path in paths:
                t0 = time.perf_counter()
                engine.process_path(path)  # its first step stops a paused-mode solve
                times.append((time.perf_counter() - t0) * 1e3)
                engine.idle()  # the worker's idle tick: the solve runs again
                time.sleep(gap_s)
            if solve != "none":
                still_running &= not done.is_set()
        finally:
            stop.set()
            if solve != "none":
                thread.join(30)
            engine.close()
        return times

    try:
        run(frames[:2], work / "warm", "none")  # numba compiles here, not in the rows
        # Alternating runs (baseline, free, paused, baseline, ...) on the same frames, so
        # that the other load on the machine hits all alike.
        half = frames[2:2 + n_frames]
        rows: dict[str, list[float]] = {"none": [], "free": [], "paused": []}
        for i in range(repeat):
            for mode in rows:
                rows[mode] += run(half, work / f"{mode}{i}", mode)
        b = statistics.median(rows["none"])
        print(f"\nTable 2: per-frame worker ms, {repeat} x {n_frames} oscaar frames per row, "
              f"{gap_s:g} s idle between frames (median; the solve ran through every "
              f"solve run: {still_running})")
        print(f"{'run':<40} {'median_ms':>9} {'ratio':>6}")
        labels = {"none": "no solve (baseline)",
                  "free": "blind oscaar solve running",
                  "paused": "same, stopped while a frame runs"}
        for mode, label in labels.items():
            m = statistics.median(rows[mode])
            print(f"{label:<40} {m:>9.1f} {m / b:>6.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-limit", type=float, default=90.0, help="seconds per solve")
    parser.add_argument("--frames", type=int, default=10, help="frames per Table 2 run")
    parser.add_argument("--repeat", type=int, default=2, help="alternations in Table 2")
    parser.add_argument("--gap", type=float, default=1.0,
                        help="idle seconds between Table 2 frames")
    parser.add_argument("--only-frames", action="store_true", help="Table 2 only")
    args = parser.parse_args()
    from livestack.storage.solver import solver_problem

    problem = solver_problem(INDEX_DIR)
    if problem is not None:
        print(problem)
        return 1
    if args.only_frames:
        fields = [(n, s, sh) for n, s, sh, _, _ in _fields(synthetic=False)]
    else:
        fields = solve_table(args.time_limit)
    frame_table(fields, args.frames, args.time_limit, args.repeat, args.gap)
    return 0


if __name__ == "__main__":
    sys.exit(main())

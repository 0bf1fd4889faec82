"""CPU of three per-frame steps outside the warp, this tree against another, interleaved.

The steps issue 16 found costly on a 26 MP ``bench_stack_dense.py`` frame besides warp and
detection, each timed on the cached frames in a child process per tree:

* ``read + hash``: what the ingest does to get the journal's SHA-256 and the pixels. In a
  tree with ``read_file_sha256`` one read whose bytes are hashed and decoded, else the
  streaming ``sha256_file`` and then ``read_frame`` reading the file again;
* ``saturation level``: ``kernels_saturation.max_and_count`` on the frame (``raw_saturation``
  without a SATURATE card);
* ``accumulate``: ``kernels_accumulate.add_clip`` of the frame into a state that already
  holds the earlier frames (one numba thread, so the CPU is not split across cores).

Rounds alternate the trees (baseline first), so a change of the machine's load hits both.
It prints the median wall ms and CPU ms (user / sys) per step and tree, and the CPU ratio.

    python bench/bench_frame_cpu.py --baseline /tmp/main-tree            # 26 MP mono cache
    python bench/bench_frame_cpu.py --baseline DIR --rounds 3 --cache DIR
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEPS = ("read + hash", "saturation level", "accumulate")


def _timed(fn: Callable[[], Any]) -> tuple[Any, list[float]]:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return out, [(time.perf_counter() - t0) * 1e3, (r1.ru_utime - r0.ru_utime) * 1e3,
                 (r1.ru_stime - r0.ru_stime) * 1e3]


def child(cache: Path, frames: int) -> dict[str, list[list[float]]]:
    """Time the steps on the first ``frames`` lights with the ``livestack`` on sys.path."""
    import numba
    import numpy as np

    import livestack.storage.journal as jn
    from livestack.pipeline import kernels_accumulate as ka
    from livestack.pipeline import kernels_saturation as ks
    from livestack.storage.fitsio import read_frame

    numba.set_num_threads(1)
    files = sorted((cache / "lights").glob("*.fits"))[:frames]

    def read(path: Path) -> Any:
        if hasattr(jn, "read_file_sha256"):
            data, _sha = jn.read_file_sha256(path)
            return read_frame(path, data)[0]
        jn.sha256_file(path)
        return read_frame(path)[0]

    cells: dict[str, list[list[float]]] = {step: [] for step in STEPS}
    state: list[Any] = []
    coef = ka.clip_coefficients(3.0)
    noise_sq, sky = np.full(1, 400.0), np.full(1, 1000.0)
    for i, path in enumerate(files):
        image, cell = _timed(functools.partial(read, path))
        cells["read + hash"].append(cell)
        cells["saturation level"].append(_timed(functools.partial(ks.max_and_count, image))[1])
        planes = image[None]
        if not state:
            state = [np.zeros(planes.shape, np.float32) for _ in range(3)] + \
                    [np.zeros(planes.shape, np.uint16) for _ in range(3)]
        rows = np.zeros((planes.shape[1], 2), np.int64)
        add = functools.partial(ka.add_clip, planes, np.isfinite(image), 1.0, noise_sq, noise_sq,
                                sky, 5.0, coef, coef, *state, rows)
        cell = _timed(add)[1]
        if i >= 2:  # the first frames take the one- and two-sample paths
            cells["accumulate"].append(cell)
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir())
                        / "livestack-bench" / "dense_6248x4176_9000_0.5_0_16_8",
                        help="a bench_stack_dense.py cache (lights/)")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", type=Path,
                        help="another tree's folder holding livestack/ (e.g. git archive main)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.cache, args.frames)))
        return 0
    if args.baseline is None or not (args.baseline / "livestack").is_dir():
        parser.error("--baseline DIR: a folder holding another tree's livestack/")
    here = Path(__file__).resolve().parents[1]
    trees = [("baseline", args.baseline.resolve()), ("this tree", here)]
    results: dict[str, dict[str, list[list[float]]]] = {label: {s: [] for s in STEPS}
                                                        for label, _ in trees}
    loads = []
    for _ in range(args.rounds):
        for label, tree in trees:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            for light in sorted((args.cache / "lights").glob("*.fits"))[:args.frames]:
                light.read_bytes()  # in the page cache for both trees (none from the disk)
            cmd = [sys.executable, __file__, "--child", "--cache", str(args.cache),
                   "--frames", str(args.frames)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            for step, cells in json.loads(out.stdout.strip().splitlines()[-1]).items():
                results[label][step].extend(cells)
            loads.append(os.getloadavg()[0])
    print(f"{args.frames} frames of {args.cache.name}, {args.rounds} rounds per tree, "
          f"interleaved; load {min(loads):.2f}-{max(loads):.2f}; medians; one numba thread")
    print("| step | baseline wall ms | baseline CPU user / sys ms | this tree wall ms "
          "| this tree CPU user / sys ms | CPU ratio |")
    print("|---|---|---|---|---|---|")
    for step in STEPS:
        med = {label: [statistics.median(c[j] for c in results[label][step]) for j in range(3)]
               for label, _ in trees}
        base, this = med["baseline"], med["this tree"]
        ratio = (this[1] + this[2]) / max(base[1] + base[2], 1e-9)
        print(f"| {step} | {base[0]:.1f} | {base[1]:.0f} / {base[2]:.0f} | {this[0]:.1f} | "
              f"{this[1]:.0f} / {this[2]:.0f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

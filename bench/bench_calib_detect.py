"""The calibrate and detect stages of one real ``livestack stack`` frame, timed alone.

Runs ``livestack stack`` in this process on the first ``--frame + 1`` cached frames of
``bench/bench_stack_dense.py`` (solver off), keeps the arguments that
``StackSession`` gave ``calibrate_frame`` and ``detect_frame`` for frame ``--frame``, then
calls each ``--repeat`` times, alternately: ``calibrate_frame`` in place on a fresh copy of
the raw frame (as the live worker calls it), and ``detect_frame`` on its luminance. Prints
the median and minimum wall and CPU ms (``getrusage``: all threads) of each.

Compare two trees by running it with each on ``PYTHONPATH``, alternately, several times
(the machine is shared: the CPU columns move less with the load than the wall ones)::

    PYTHONPATH=/work/main    python bench/bench_calib_detect.py --label main
    PYTHONPATH=/work/s9calib python bench/bench_calib_detect.py --label s9calib

Measured (issue 16, s9calib against main, 26 MP mono, cache
``dense_6248x4176_9000_0.5_0_16_12``, frame 3, 10 repeats, main/branch alternated three
times, load average 6.2-6.7 on the 2 shared cores), median CPU ms (min), then wall::

    | tree    | calibrate_frame CPU | detect_frame CPU | calibrate wall | detect wall |
    |---------|---------------------|------------------|----------------|-------------|
    | main    | 43-83 (39-49)       | 42-53 (38-43)    | 68-185         | 63-122      |
    | s9calib | 23-27 (21-22)       | 35-51 (33-35)    | 34-55          | 51-98       |
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir())
                        / "livestack-bench" / "dense_6248x4176_9000_0.5_0_16_12",
                        help="a bench_stack_dense.py cache (lights/, calib/darks/)")
    parser.add_argument("--frame", type=int, default=3, help="which light (not the first)")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--label", default="tree")
    args = parser.parse_args()

    import numpy as np

    import livestack.pipeline.session as ses
    from livestack.cli import main as cli_main

    calls = [0]
    saved: dict[str, Any] = {}
    calibrate_frame, detect_frame = ses.calibrate_frame, ses.detect_frame

    def cal_spy(raw: Any, info: Any, masters: Any, config: Any, **kw: Any) -> Any:
        if calls[0] == args.frame:
            saved["cal"] = (raw.copy(), info, masters, config)
        return calibrate_frame(raw, info, masters, config, **kw)

    def det_spy(lum: Any, info: Any, config: Any) -> Any:
        if calls[0] == args.frame:
            saved["det"] = (lum.copy(), info, config)
        calls[0] += 1
        return detect_frame(lum, info, config)

    ses.calibrate_frame = cal_spy
    ses.detect_frame = det_spy
    with tempfile.TemporaryDirectory(prefix="ls-calib-detect-") as tmp:
        config = Path(tmp) / "solver-off.yaml"
        config.write_text("solver:\n  enabled: false\n")
        lights = sorted((args.cache / "lights").glob("*.fits"))[:args.frame + 1]
        cli_main(["stack", *map(str, lights), "--darks", str(args.cache / "calib" / "darks"),
                  "-o", str(Path(tmp) / "out"), "--no-progress", "-c", str(config)])
    ses.calibrate_frame, ses.detect_frame = calibrate_frame, detect_frame
    if "cal" not in saved or "det" not in saved:
        raise SystemExit(f"frame {args.frame} was not calibrated and detected")
    raw0, info, masters, pipeline = saved["cal"]
    lum, dinfo, dconfig = saved["det"]
    buf = np.empty_like(raw0)

    def calibrate() -> None:
        np.copyto(buf, raw0)  # outside the timer
        t0, c0 = time.perf_counter(), _cpu_s()
        calibrate_frame(buf, info, masters, pipeline, overwrite_raw=True)
        cells["calibrate_frame"].append(((time.perf_counter() - t0) * 1e3,
                                         (_cpu_s() - c0) * 1e3))

    def detect() -> None:
        t0, c0 = time.perf_counter(), _cpu_s()
        detect_frame(lum, dinfo, dconfig)
        cells["detect_frame"].append(((time.perf_counter() - t0) * 1e3,
                                      (_cpu_s() - c0) * 1e3))

    cells: dict[str, list[tuple[float, float]]] = {"calibrate_frame": [], "detect_frame": []}
    for _ in range(2):  # warm caches and kernels
        calibrate()
        detect()
    cells = {"calibrate_frame": [], "detect_frame": []}
    for _ in range(args.repeat):
        calibrate()
        detect()
    for name, rows in cells.items():
        wall = [w for w, _ in rows]
        cpu = [c for _, c in rows]
        print(f"{args.label:10s} {name:16s} wall {statistics.median(wall):6.1f} "
              f"(min {min(wall):5.1f})  CPU {statistics.median(cpu):6.1f} (min {min(cpu):5.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

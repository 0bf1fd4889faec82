"""End-to-end per-frame cost of the livestack pipeline against the naive path, same run.

For each frame: read FITS -> StackSession.process (calibrate, detect, gate, register, warp,
normalise, accumulate) -> JPEG preview of the stack. The naive path is what most peers do:
astropy getdata, ``astroalign.register`` on full images, a running numpy mean, and a
full-resolution PNG preview. Each path runs in its own subprocess so that peak RSS is its own.

Usage::

    python bench/bench_pipeline.py                      # 26 MP (6248x4176), 24 frames, 3 naive
    python bench/bench_pipeline.py --size 9576x6388 --frames 8 --naive-frames 0   # 61 MP
    python bench/bench_pipeline.py --size 1024x768 --frames 10                   # quick check
    python bench/bench_pipeline.py --frames 8 --dense --cache /tmp/dense26       # issue 16

``--dense`` simulates the field of issue 16: 22000 stars of which ~8000 are detected, and
1.5 degrees of rotation over the run (``--rotation-deg``), so the rotated warp and
detection on a crowded field are what is timed.

Prints a table of median milliseconds per stage, the total, the process CPU time per frame
(``cpu``: both cores' time, less sensitive than wall time to other load on the machine),
the naive total and the ratio,
peak RSS after 20 frames and at the end, and the one-time JIT compile cost on its own line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def generate(out_dir: Path, width: int, height: int, n_frames: int, seed: int,
             dense: bool = False, rotation_deg: float | None = None) -> list[Path]:
    """Write ``n_frames`` simulated 16-bit lights (drift + rotation) and return their paths.

    ``rotation_deg`` is the rotation over the whole run (default 0.01 degrees per frame);
    ``dense`` renders ~20 times the stars, bright enough that ~8000 are detected at 26 MP.
    """
    from livestack.sim import SimConfig, write_sequence

    n_stars = max(300, int(width * height / 5000))
    extra: dict[str, float] = {}
    if dense:
        n_stars = int(22000 * width * height / (6248 * 4176))
        extra["faintest_flux_e"] = 4000.0
    per_frame = 0.01 if rotation_deg is None else rotation_deg / max(n_frames - 1, 1)
    config = SimConfig(width=width, height=height, n_stars=n_stars, exposure_s=60.0,
                       drift_px_per_frame=(1.3, -0.7), rotation_deg_per_frame=per_frame,
                       satellite_frames=(3,), cosmic_rays_per_frame=20.0, **extra)
    return write_sequence(out_dir, config, seed, n_frames)


def run_ours(paths: list[Path], reuse_buffer: bool = True) -> dict[str, object]:
    """Process every frame with livestack; return per-stage timings and RSS."""
    from livestack.pipeline.session import PipelineConfig, StackSession, WarpConfig
    from livestack.storage.fitsio import read_frame

    # One-time JIT: process a tiny synthetic frame first so compile cost is reported apart.
    t0 = time.perf_counter()
    _warm_up_jit()
    jit_s = time.perf_counter() - t0

    # The default config unless asked: the script also times older trees without the key.
    config = (PipelineConfig() if reuse_buffer
              else PipelineConfig(warp=WarpConfig(reuse_buffer=False)))
    session = StackSession("bench", config)
    rows: list[dict[str, float]] = []
    rss_at_20 = float("nan")
    verdicts: list[str] = []
    for i, path in enumerate(paths):
        t_start = time.perf_counter()
        c_start = time.process_time()
        raw, info, _header = read_frame(path)
        t_read = time.perf_counter()
        outcome = session.process(raw, info, None)
        t_proc = time.perf_counter()
        jpeg = session.preview_jpeg() if session.has_image() else b""
        t_prev = time.perf_counter()
        verdicts.append(outcome.verdict if outcome.verdict == "accepted" else
                        f"{outcome.verdict}:{outcome.reason}")
        row = {"read": (t_read - t_start) * 1e3}
        row.update(outcome.timings_ms)
        row["preview"] = (t_prev - t_proc) * 1e3
        row["total"] = (t_prev - t_start) * 1e3
        row["cpu"] = (time.process_time() - c_start) * 1e3
        row["jpeg_kb"] = len(jpeg) / 1024
        rows.append(row)
        del raw
        if i + 1 == 20:
            rss_at_20 = _rss_mb()
    return {"rows": rows, "rss_at_20_mb": rss_at_20, "rss_end_mb": _rss_mb(), "jit_s": jit_s,
            "verdicts": verdicts}


def _warm_up_jit() -> None:
    """Run every numba kernel once on small arrays (compiles or loads the cache)."""
    from livestack.pipeline.session import PipelineConfig, StackSession
    from livestack.sim import SimConfig, Simulator

    sim = Simulator(SimConfig(width=512, height=384, n_stars=400, flux_powerlaw_index=1.0),
                    seed=1)
    session = StackSession("warmup", PipelineConfig())
    from livestack.storage.headers import parse_frame_info

    for i in range(3):
        frame = sim.light(i)
        info = parse_frame_info(frame.header, f"warm{i}.fits", frame.data.shape)
        session.process(frame.data.astype("float32"), info, None)
    if not session.has_image():
        raise RuntimeError("JIT warm-up frames were not accepted")
    session.preview_jpeg()


def run_naive(paths: list[Path]) -> dict[str, object]:
    """The naive pipeline: astropy read, astroalign.register, numpy running mean, full PNG."""
    import io

    import astroalign
    import numpy as np
    from astropy.io import fits
    from PIL import Image

    rows: list[dict[str, float]] = []
    reference = None
    total = None
    n = 0
    for path in paths:
        t0 = time.perf_counter()
        data = fits.getdata(path).astype(np.float32)
        t1 = time.perf_counter()
        if reference is None:
            reference = data
            registered = data
        else:
            try:
                registered, _footprint = astroalign.register(data, reference)
            except (astroalign.MaxIterError, ValueError):
                registered = data
        t2 = time.perf_counter()
        total = registered.astype(np.float64) if total is None else total + registered
        n += 1
        mean = total / n
        t3 = time.perf_counter()
        lo, hi = np.percentile(mean, [1, 99.5])
        img = (np.clip((mean - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        t4 = time.perf_counter()
        rows.append({"read": (t1 - t0) * 1e3, "register+warp": (t2 - t1) * 1e3,
                     "accumulate": (t3 - t2) * 1e3, "preview": (t4 - t3) * 1e3,
                     "total": (t4 - t0) * 1e3})
    return {"rows": rows, "rss_end_mb": _rss_mb()}


def _median(rows: list[dict[str, float]], key: str, skip: int) -> float:
    values = [r[key] for r in rows[skip:] if key in r]
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="6248x4176", help="WxH of the frames")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--naive-frames", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dense", action="store_true",
                        help="a crowded field (~8000 detected stars at 26 MP)")
    parser.add_argument("--rotation-deg", type=float,
                        help="rotation over the run (default 0.01 deg per frame; "
                             "1.5 with --dense)")
    parser.add_argument("--data", type=Path, help="reuse a folder of frames instead of simulating")
    parser.add_argument("--cache", type=Path,
                        help="simulate into this folder once and reuse it on later runs")
    parser.add_argument("--no-warp-buffer", action="store_true",
                        help="pipeline.warp.reuse_buffer off (a fresh warp output per frame)")
    parser.add_argument("--mode", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--paths-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.mode:  # child process
        paths = [Path(p) for p in json.loads(args.paths_file.read_text())]
        result = (run_ours(paths, not args.no_warp_buffer) if args.mode == "ours"
                  else run_naive(paths))
        print(json.dumps(result))
        return 0

    width, height = (int(v) for v in args.size.lower().split("x"))
    rotation = args.rotation_deg if args.rotation_deg is not None else (
        1.5 if args.dense else None)
    with tempfile.TemporaryDirectory(prefix="lsbench-") as tmp:
        tmp_path = Path(tmp)
        cached = args.cache and args.cache.is_dir() and any(args.cache.glob("*.fits"))
        if args.data or cached:
            folder = args.data or args.cache
            paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".fits", ".fit"))
        elif args.cache:
            paths = generate(args.cache, width, height, args.frames, args.seed, args.dense,
                             rotation)
        else:
            t0 = time.perf_counter()
            paths = generate(tmp_path / "frames", width, height, args.frames, args.seed,
                             args.dense, rotation)
            print(f"simulated {len(paths)} frames of {width}x{height} in "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        results = {}
        for mode, subset in (("ours", paths), ("naive", paths[: args.naive_frames])):
            if not subset:
                continue
            listing = tmp_path / f"{mode}.json"
            listing.write_text(json.dumps([str(p) for p in subset]))
            extra = ["--no-warp-buffer"] if args.no_warp_buffer else []
            proc = subprocess.run([sys.executable, __file__, "--mode", mode, "--paths-file",
                                   str(listing), *extra], capture_output=True, text=True,
                                  check=False, env=dict(os.environ))
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])

    ours = results["ours"]
    rows = ours["rows"]
    skip = 2 if len(rows) > 4 else 0  # the first frames build the reference and the warm-up
    mp = width * height / 1e6
    print(f"\nlivestack pipeline, {width}x{height} ({mp:.1f} MP), {len(rows)} frames, "
          f"{os.cpu_count()} cores; median over frames {skip + 1}..{len(rows)}")
    print(f"JIT compile / cache load (once per install): {ours['jit_s']:.2f} s")
    stages = ["read", "calibrate", "debayer", "detect", "register", "warp", "normalize",
              "accumulate", "preview", "total", "cpu"]
    print(f"{'stage':<12}{'livestack ms':>14}{'naive ms':>12}{'ratio':>8}")
    naive_rows = results.get("naive", {}).get("rows", [])
    naive_map = {"read": "read", "register": "register+warp", "accumulate": "accumulate",
                 "preview": "preview", "total": "total"}
    for stage in stages:
        ours_ms = _median(rows, stage, skip)
        if ours_ms != ours_ms:  # NaN: stage not run (e.g. debayer on mono)
            continue
        naive_ms = _median(naive_rows, naive_map[stage], 1) if stage in naive_map and naive_rows \
            else float("nan")
        ratio = naive_ms / ours_ms if naive_ms == naive_ms and ours_ms > 0 else float("nan")
        print(f"{stage:<12}{ours_ms:>14.1f}{naive_ms:>12.1f}{ratio:>8.1f}")
    print(f"peak RSS: livestack {ours['rss_at_20_mb']:.0f} MB after 20 frames, "
          f"{ours['rss_end_mb']:.0f} MB after {len(rows)}; naive "
          f"{results.get('naive', {}).get('rss_end_mb', float('nan')):.0f} MB")
    accepted = sum(1 for v in ours["verdicts"] if v == "accepted")
    others = [v for v in ours["verdicts"] if v != "accepted"]
    print(f"verdicts: {accepted} accepted; others: {others}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Warp cost and quality: livestack's numba kernels vs OpenCV's warpAffine, at 26 MP.

Speed: a 6248x4176 float32 frame (noise + ``--stars`` point stars, default 6000) warped
onto the same grid with a similarity transform (``--rotation`` degrees, default 1.0, +
sub-pixel shift: the general path) and with a pure translation (the separable fast path);
median of ``--repeat`` runs after a warm-up, numba and OpenCV both on ``--threads``
threads. ``cpu rot`` is the process CPU time of the rotated warp (all threads, page
faults included). The JIT compile time (first call, fresh
cache or not) is printed on its own line. The ratio column is against OpenCV linear of the
same run.

Quality (same for every size): FWHM 2.5 px, beta 3.5 Moffat stars on a jittered grid
with random sub-pixel phases, warped with four transforms (two shifts, two small
rotations) and compared with a direct noiseless render at the target positions:

* ``peak``: mean ratio of the warped star's peak pixel to the direct render's;
* ``cen p95``: 95th percentile of the windowed-centroid (XWIN) error in px;
* ``mom max``: largest first-moment (flux-weighted centroid) error along x in px at
  phases k/16 of a pure x shift (OpenCV cubic's ~0.05 px offset shows up here).

The row ``livestack lanczos3+clamp`` is lanczos3 with the saturation handling of issue 9
(``livestack.pipeline.saturation``: finding the level and mask, the warp, then the clamp
near steep and saturated pixels); the frame then carries 300 saturated 3x3 cores. Its
ratio against ``livestack lanczos3`` in the same run is the per-frame cost of the fix.

The row ``livestack lanczos3 out=`` passes the previous call's result back as ``out=``
(what ``StackSession`` does from frame to frame, issue 16) instead of allocating a new
100 MB output per frame; its ratios against ``livestack lanczos3`` (wall and CPU) are
printed last.

The last table (``--two-pass-only`` prints just it) times the two-pass kernel that
``warp`` uses for bicubic/Lanczos3 rotations up to ~5 degrees against the 2-D kernel it
replaced, called directly and alternately on the same frame (``--rotations``, mono and
colour, 1 and ``--threads`` threads): median ns per output pixel, wall and process CPU,
and their ratios (two-pass / 2-D) within the same run.

``--compare A B ...`` (``--compare-only`` prints just it) times ``warp`` with those kernels
alternately on the same frame, mono and colour (3 planes), for a pure shift, a 0.1 degree
rotation (the 2-D kernel) and each of ``--rotations`` (the two-pass kernel): median ms per
frame, wall and process CPU, and the ratios to the first kernel in the same run. Measured
on s8mitchell (load 2-3 on 2 cores shared with other engineers), ``--compare-only --compare
bicubic mitchell --repeat 9``, 26 MP, ms per frame (wall; process CPU within 3 % of it):

| transform | planes | bicubic | mitchell | mitchell / bicubic |
|---|---|---|---|---|
| shift | 1 | 25 | 25 | 1.00 |
| rot 0.10 (2-D) | 1 | 56 | 53 | 0.96 |
| rot 0.50 (2-pass) | 1 | 96 | 89 | 0.93 |
| rot 2.00 (2-pass) | 1 | 112 | 101 | 0.90 |
| shift | 3 | 98 | 113 | 1.16 |
| rot 0.10 (2-D) | 3 | 192 | 184 | 0.96 |
| rot 0.50 (2-pass) | 3 | 285 | 259 | 0.91 |
| rot 2.00 (2-pass) | 3 | 322 | 293 | 0.91 |

Both are 4x4-tap cubics on the same code paths; Mitchell's weights take 11 multiply-adds,
Keys' about 15. The shift path is the same code for both (weights computed once per
frame), so its 1.16 is the machine's noise. Over four such runs (3 to 11 repeats, load 2
to 7, the first before the weights were rewritten in multiply-add form) the CPU ratio
mitchell / bicubic ranged 0.89-1.08 on the two-pass path and 0.95-1.24 on the 2-D one:
the same cost within this machine's noise. In the main table (``--repeat 3 --rotations
1``, same machine) mitchell's quality at FWHM 2.5 px is peak 0.906 (bilinear 0.883,
bicubic 0.963, lanczos3 0.996), cen p95 0.022 px, mom max 0.0000 (it reproduces linear
functions, as bilinear and Keys a = -0.5 do).

    /work/venv/bin/python bench/bench_warp.py [--size 6248x4176] [--repeat 5] [--threads 2]
    python bench/bench_warp.py --two-pass-only --repeat 5 --rotations 0.5,2
    python bench/bench_warp.py --compare-only --compare bicubic mitchell --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livestack.pipeline.types import Transform
from livestack.pipeline.warp import warp
from tests.pipeline.test_detect import render_stars

KERNELS = ("nearest", "bilinear", "bicubic", "lanczos3", "mitchell")

Warper = Callable[[NDArray[np.float32], Transform, tuple[int, int]], NDArray[np.float32]]


def ours(kernel: str) -> Warper:
    def run(img: NDArray[np.float32], t: Transform, shape: tuple[int, int]
            ) -> NDArray[np.float32]:
        return warp(img, t, shape, kernel).image
    return run


def ours_clamped() -> Warper:
    """lanczos3 plus the saturation level, mask and clamp, as ``StackSession`` runs them."""
    from livestack.pipeline.saturation import SaturationConfig, clamp_ringing, frame_saturation
    from livestack.pipeline.types import FrameInfo

    config = SaturationConfig()

    def run(img: NDArray[np.float32], t: Transform, shape: tuple[int, int]
            ) -> NDArray[np.float32]:
        # The timing frame's white level is known (65535, as SATURATE would say); the
        # small quality frames take their own maximum, so that every star's edges are
        # steep enough to be clamped and the peak/centroid columns show the clamp's effect.
        level = 65535.0 if img.size > 1_000_000 else float(img.max())
        info = FrameInfo("bench", "light", img.shape, saturation_adu=level,
                         saturation_source="SATURATE")
        sat = frame_saturation(img, img, info, config)
        warped = warp(img, t, shape, "lanczos3")
        return clamp_ringing(warped, img, t, sat, config)[0].image
    return run


def ours_reused() -> Warper:
    """lanczos3 writing into the previous call's arrays (``out=``), as the live stack does."""
    from livestack.pipeline.types import Warped

    buffers: dict[tuple[int, ...], Warped] = {}

    def run(img: NDArray[np.float32], t: Transform, shape: tuple[int, int]
            ) -> NDArray[np.float32]:
        key = (*img.shape[:-2], *shape)
        result = warp(img, t, shape, "lanczos3", out=buffers.get(key))
        buffers[key] = result
        # No copy: quality() uses each result before its next call, timed() never.
        return result.image
    return run


def opencv(flag_name: str) -> Warper:
    import cv2

    flag = getattr(cv2, flag_name)

    def run(img: NDArray[np.float32], t: Transform, shape: tuple[int, int]
            ) -> NDArray[np.float32]:
        return np.asarray(cv2.warpAffine(img, t.matrix, (shape[1], shape[0]), flags=flag))
    return run


def xwin(img: NDArray[np.float32], x: float, y: float, sigma: float = 1.06,
         r: int = 6) -> tuple[float, float]:
    cx, cy = x, y
    for _ in range(40):
        ix, iy = round(cx), round(cy)
        st = img[iy - r:iy + r + 1, ix - r:ix + r + 1].astype(np.float64)
        gy, gx = np.mgrid[iy - r:iy + r + 1, ix - r:ix + r + 1]
        w = np.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * sigma**2)) * st
        cx += 2 * ((w * gx).sum() / w.sum() - cx)
        cy += 2 * ((w * gy).sum() / w.sum() - cy)
    return cx, cy


def quality(fn: Warper, seed: int = 3) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    shape = (220, 260)
    ys, xs = np.mgrid[20:200:20, 20:240:20]
    xy = np.column_stack([xs.ravel(), ys.ravel()]).astype(np.float64)
    xy += rng.uniform(-3, 3, xy.shape)
    flux = np.full(len(xy), 5000.0)
    direct = render_stars(shape, xy, flux, radius_px=10)
    peaks: list[float] = []
    errs: list[float] = []
    for rot in (0.0, 0.0, 1.3, -0.7):
        t = Transform.from_params(rng.uniform(-6, 6), rng.uniform(-6, 6), rot)
        frame = render_stars(shape, t.inverse().apply(xy), flux, radius_px=10)
        out = fn(frame, t, shape)
        for x, y in xy:
            ix, iy = round(x), round(y)
            sl = np.s_[iy - 2:iy + 3, ix - 2:ix + 3]
            peaks.append(float(out[sl].max() / direct[sl].max()))
            wx, wy = xwin(out, x, y)
            dx, dy = xwin(direct, x, y)
            errs.append(float(np.hypot(wx - dx, wy - dy)))
    # First moment along x for phases k/16 of a pure shift.
    small = (64, 64)
    truth = render_stars(small, np.array([[32.0, 32.0]]), np.array([1000.0]))
    cols = np.arange(20, 45)
    x_true = float((truth[20:45, 20:45].sum(axis=0) * cols).sum() / truth[20:45, 20:45].sum())
    worst = 0.0
    for k in range(1, 16):
        phase = k / 16
        t = Transform.from_params(3 + phase, 0.0)
        frame = render_stars(small, np.array([[29.0 - phase, 32.0]]), np.array([1000.0]))
        out = fn(frame, t, small)[20:45, 20:45].astype(np.float64)
        x_est = float((out.sum(axis=0) * cols).sum() / out.sum())
        worst = max(worst, abs(x_est - x_true))
    return float(np.mean(peaks)), float(np.percentile(errs, 95)), worst


def timed(fn: Warper, img: NDArray[np.float32], t: Transform, repeat: int
          ) -> tuple[float, float]:
    """Median wall and process-CPU milliseconds of ``fn`` after a warm-up."""
    fn(img, t, img.shape)  # warm-up
    times = []
    cpu = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        c0 = time.process_time()
        fn(img, t, img.shape)
        cpu.append(time.process_time() - c0)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times), 1000.0 * statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="6248x4176", help="WIDTHxHEIGHT")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stars", type=int, default=6000)
    ap.add_argument("--rotation", type=float, default=1.0, help="degrees")
    ap.add_argument("--rotations", default="0.5,2",
                    help="degrees, comma-separated, for the two-pass vs 2-D table")
    ap.add_argument("--two-pass-only", action="store_true",
                    help="print only the two-pass vs 2-D kernel table")
    ap.add_argument("--compare", nargs="+", choices=KERNELS, default=["bicubic", "mitchell"],
                    help="kernels timed alternately against the first (the last table)")
    ap.add_argument("--compare-only", action="store_true",
                    help="print only the --compare table")
    args = ap.parse_args()
    nx, ny = (int(v) for v in args.size.lower().split("x"))
    rotations = [float(r) for r in args.rotations.split(",")]
    if args.two_pass_only:
        paired_two_pass(nx, ny, rotations, args.threads, args.repeat)
        return
    if args.compare_only:
        paired_kernels(nx, ny, args.compare, rotations, args.threads, args.repeat)
        return

    import numba

    numba.set_num_threads(args.threads)
    t0 = time.perf_counter()
    probe = np.zeros((32, 32), np.float32)
    for kernel in KERNELS:
        warp(probe, Transform.from_params(0.3, 0.2, 0.5), (32, 32), kernel)
        warp(probe, Transform.from_params(0.3, 0.2), (32, 32), kernel)
    print(f"numba JIT compile / cache load, all kernels: {time.perf_counter() - t0:.2f} s")

    rng = np.random.default_rng(0)
    img = rng.normal(1000.0, 10.0, (ny, nx)).astype(np.float32)
    ys, xs = rng.integers(10, ny - 10, args.stars), rng.integers(10, nx - 10, args.stars)
    img[ys, xs] += rng.uniform(100, 20000, args.stars).astype(np.float32)
    for y, x in zip(rng.integers(10, ny - 10, 300), rng.integers(10, nx - 10, 300), strict=True):
        img[y - 1:y + 2, x - 1:x + 2] = 65535.0  # saturated cores for the clamp row
    rot = Transform.from_params(3.37, -2.81, args.rotation)
    shift = Transform.from_params(3.37, -2.81)

    rows: list[tuple[str, Warper]] = [(f"livestack {k}", ours(k)) for k in KERNELS]
    rows.append(("livestack lanczos3 out=", ours_reused()))
    rows.append(("livestack lanczos3+clamp", ours_clamped()))
    try:
        import cv2

        cv2.setNumThreads(args.threads)
        rows += [("opencv INTER_LINEAR", opencv("INTER_LINEAR")),
                 ("opencv INTER_CUBIC", opencv("INTER_CUBIC")),
                 ("opencv INTER_LANCZOS4", opencv("INTER_LANCZOS4"))]
        base_name = "opencv INTER_LINEAR"
    except ImportError:
        base_name = "livestack bilinear"
        print("(opencv not installed: no OpenCV rows)")

    results = []
    for name, fn in rows:
        ms_rot, cpu_rot = timed(fn, img, rot, args.repeat)
        ms_shift, _cpu = timed(fn, img, shift, args.repeat)
        peak, cen, mom = quality(fn)
        results.append((name, ms_rot, ms_shift, peak, cen, mom, cpu_rot))
    base = next(r[1] for r in results if r[0] == base_name)
    print(f"\n{nx}x{ny} float32, {args.stars} stars, rotation {args.rotation} deg, "
          f"{args.threads} threads, median of {args.repeat} after warm-up; quality at "
          "FWHM 2.5 px")
    print(f"{'method':24s} {'ms rot':>8s} {'cpu rot':>8s} {'ms shift':>9s} "
          f"{'x ' + base_name[-12:]:>16s} {'peak':>6s} {'cen p95':>8s} {'mom max':>8s}")
    for name, ms_rot, ms_shift, peak, cen, mom, cpu_rot in results:
        print(f"{name:24s} {ms_rot:8.1f} {cpu_rot:8.1f} {ms_shift:9.1f} {ms_rot / base:16.2f} "
              f"{peak:6.3f} {cen:8.4f} {mom:8.4f}")
    plain = next(r for r in results if r[0] == "livestack lanczos3")
    fixed = next(r for r in results if r[0] == "livestack lanczos3+clamp")
    print(f"saturation clamp cost: x{fixed[1] / plain[1]:.2f} (rotation), "
          f"x{fixed[2] / plain[2]:.2f} (shift) of lanczos3 alone, same run")
    paired_out_buffer(img, rot, shift, max(args.repeat, 7))
    del img
    paired_two_pass(nx, ny, rotations, args.threads, args.repeat)
    paired_kernels(nx, ny, args.compare, rotations, args.threads, args.repeat)


def paired_out_buffer(img: NDArray[np.float32], rot: Transform, shift: Transform,
                      repeat: int) -> None:
    """lanczos3 with a fresh output against ``out=`` the previous result, alternately.

    Prints the median wall and CPU ms of each and the minor page faults per call (the
    kernel's zero-filling of a fresh 100 MB output, which ``out=`` skips).
    """
    import resource

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    print(f"\nout= buffer, lanczos3, fresh and reused alternately, median of {repeat}")
    print(f"{'transform':10s} {'fresh ms':>9s} {'out= ms':>8s} {'ratio':>6s} {'fresh cpu':>10s} "
          f"{'out= cpu':>9s} {'ratio':>6s} {'fresh faults':>13s} {'out= faults':>12s}")
    for name, t in (("rotation", rot), ("shift", shift)):
        buffer = warp(img, t, img.shape, "lanczos3")
        stats: dict[str, list[tuple[float, float, int]]] = {"fresh": [], "out": []}
        for _ in range(repeat):
            for kind in ("fresh", "out"):
                f0 = faults()
                c0 = time.process_time()
                t0 = time.perf_counter()
                if kind == "fresh":
                    result = warp(img, t, img.shape, "lanczos3")
                else:
                    buffer = warp(img, t, img.shape, "lanczos3", out=buffer)
                wall = time.perf_counter() - t0
                cpu = time.process_time() - c0
                stats[kind].append((wall, cpu, faults() - f0))
                if kind == "fresh":
                    del result  # freed as the live stack frees each frame's output
        med = {k: [statistics.median(x[i] for x in v) for i in range(3)]
               for k, v in stats.items()}
        fw, fc, ff = med["fresh"]
        ow, oc, of = med["out"]
        print(f"{name:10s} {1e3 * fw:9.1f} {1e3 * ow:8.1f} {ow / fw:6.2f} {1e3 * fc:10.1f} "
              f"{1e3 * oc:9.1f} {oc / fc:6.2f} {ff:13.0f} {of:12.0f}")


def paired_two_pass(nx: int, ny: int, rotations: list[float], threads: int,
                    repeat: int) -> None:
    """Lanczos3: the two-pass kernel against the 2-D kernel, alternately, same frame.

    Prints per (rotation, planes, threads) the median ns per output pixel (all planes
    counted once: a pixel of a colour frame is 3 samples) of each kernel, wall and CPU,
    and the two-pass / 2-D ratios.
    """
    import numba

    from livestack.pipeline import kernels_twopass as kt
    from livestack.pipeline import kernels_warp as kw

    rng = np.random.default_rng(1)
    mono = rng.normal(1000.0, 10.0, (1, ny, nx)).astype(np.float32)
    ys, xs = rng.integers(10, ny - 10, 6000), rng.integers(10, nx - 10, 6000)
    mono[0, ys, xs] += rng.uniform(100, 20000, 6000).astype(np.float32)
    thread_counts = sorted({1, threads})
    print(f"\ntwo-pass vs 2-D lanczos3 kernel, {nx}x{ny}, alternately, median of {repeat} "
          "after a warm-up; ns per output pixel")
    print(f"{'rot deg':>7s} {'planes':>6s} {'threads':>7s} {'2-D ns':>7s} {'2-pass':>7s} "
          f"{'ratio':>6s} {'2-D cpu':>8s} {'2-p cpu':>8s} {'ratio':>6s}")
    for planes in (1, 3):
        img = mono if planes == 1 else np.ascontiguousarray(np.repeat(mono, 3, axis=0))
        out = np.empty_like(img)
        foot = np.empty((ny, nx), np.bool_)
        for rot in rotations:
            inv = np.ascontiguousarray(
                Transform.from_params(3.37, -2.81, rot).inverse().matrix)
            kernels = {
                "2d": lambda inv=inv, img=img, out=out, foot=foot: kw.warp_affine_kernel(
                    img, inv, kw.LANCZOS3, out, foot),
                "tp": lambda inv=inv, img=img, out=out, foot=foot: kt.warp_two_pass_kernel(
                    img, inv, kw.LANCZOS3, out, foot),
            }
            for n_threads in thread_counts:
                numba.set_num_threads(n_threads)
                stats: dict[str, list[tuple[float, float]]] = {k: [] for k in kernels}
                for fn in kernels.values():
                    fn()  # warm-up (and compile)
                for _ in range(repeat):
                    for name, fn in kernels.items():
                        c0 = time.process_time()
                        t0 = time.perf_counter()
                        fn()
                        stats[name].append((time.perf_counter() - t0,
                                            time.process_time() - c0))
                med = {k: [1e9 * statistics.median(x[i] for x in v) / (nx * ny)
                           for i in range(2)] for k, v in stats.items()}
                (w2, c2), (wt, ct) = med["2d"], med["tp"]
                print(f"{rot:7.2f} {planes:6d} {n_threads:7d} {w2:7.2f} {wt:7.2f} "
                      f"{wt / w2:6.2f} {c2:8.2f} {ct:8.2f} {ct / c2:6.2f}")
    numba.set_num_threads(threads)


def paired_kernels(nx: int, ny: int, names: list[str], rotations: list[float], threads: int,
                   repeat: int) -> None:
    """``warp`` with each kernel of ``names``, alternately on the same frame.

    Prints per (transform, planes) the median wall and process-CPU ms per frame of each
    kernel and its ratio to the first one's, all in the same run (the kernels take turns
    in every round, so a load that comes and goes hits them alike).
    """
    import numba

    numba.set_num_threads(threads)
    rng = np.random.default_rng(2)
    mono = rng.normal(1000.0, 10.0, (ny, nx)).astype(np.float32)
    ys, xs = rng.integers(10, ny - 10, 6000), rng.integers(10, nx - 10, 6000)
    mono[ys, xs] += rng.uniform(100, 20000, 6000).astype(np.float32)
    transforms = {"shift": Transform.from_params(3.37, -2.81),
                  "rot 0.10 (2-D)": Transform.from_params(3.37, -2.81, 0.1)}
    for rot in rotations:
        transforms[f"rot {rot:.2f} (2-pass)"] = Transform.from_params(3.37, -2.81, rot)
    base = names[0]
    print(f"\nwarp kernels alternately, {nx}x{ny}, {threads} threads, median of {repeat} "
          "after a warm-up; ms per frame (wall / process CPU), ratio to " + base)
    print("| transform | planes | " + " | ".join(f"{n} wall | {n} cpu" for n in names)
          + " | " + " | ".join(f"{n} / {base} wall | cpu" for n in names[1:]) + " |")
    print("|---|---|" + "---|---|" * len(names) + "---|---|" * (len(names) - 1))
    for planes in (1, 3):
        img = mono if planes == 1 else np.ascontiguousarray(np.repeat(mono[None], 3, axis=0))
        for label, t in transforms.items():
            for name in names:
                warp(img, t, (ny, nx), name)  # warm-up (and compile)
            stats: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
            for _ in range(repeat):
                for name in names:
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    warp(img, t, (ny, nx), name)
                    stats[name].append((time.perf_counter() - t0, time.process_time() - c0))
            med = {n: (1e3 * statistics.median(x[0] for x in v),
                       1e3 * statistics.median(x[1] for x in v)) for n, v in stats.items()}
            cells = " | ".join(f"{med[n][0]:.0f} | {med[n][1]:.0f}" for n in names)
            ratios = " | ".join(f"{med[n][0] / med[base][0]:.2f} | "
                                f"{med[n][1] / med[base][1]:.2f}" for n in names[1:])
            print(f"| {label} | {planes} | {cells} | {ratios} |")
        del img


if __name__ == "__main__":
    main()

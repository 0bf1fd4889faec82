"""Star detection and registration cost and accuracy at 26 MP, on a dense rotating field,
before and after issue 16, in the same run.

A 6248x4176 float32 star field (``--stars`` Moffat stars, default 9000, FWHM ``--fwhm``
px, beta 3.5, power-law fluxes, sky 1000 ADU, noise 10 ADU) is rendered twice: the
reference, and a frame moved by a similarity transform (``--rotation`` degrees, default
1.0, and (15.3, -8.7) px). Each row times the old path and the new one alternately (so
machine load hits both alike) and prints the median ms of each and their ratio:

* ``detect_stars`` / ``measure``: before = sep.extract on the 4x4 frame, the sky by
  sep.Background on the 4x4 frame and the numpy refinement (``tests/oracles.py``);
  after = the peak pass (``kernels_binning.peak_score_kernel``), the sky on an 8x8 grid
  and the numba refinement (``kernels_detect``). Result columns: stars found, centroid
  RMS against the truth (bright isolated stars), FWHM, elongation, sky and noise;
* ``refine`` alone: the numpy oracle against the kernel on the same candidates;
* ``register`` with each path's stars: ms and the error against the true transform
  (RMS over a grid covering the frame);
* ``measure: trail test``: measure without the satellite-trail test (old) and with it
  (new), on the frame and on the frame crossed by a satellite trail (600 ADU/px): the
  trail test's cost and what it changes;
* baseline in the same run: ``astroalign.find_transform`` on the 50 brightest (x, y)
  of each frame, which recomputes the reference's invariants.

    .venv/bin/python bench/bench_detect_register.py [--size 6248x4176] [--repeat 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livestack.pipeline import detect
from livestack.pipeline.detect import DetectConfig, detect_stars, measure
from livestack.pipeline.register import RegisterConfig, Registrar
from livestack.pipeline.types import StarList, Transform
from tests.oracles import refine_numpy
from tests.pipeline.test_detect import render_stars


@contextmanager
def old_refinement() -> Iterator[None]:
    """Detection's refinement as it was before issue 16: the numpy version."""
    saved = detect._refine
    detect._refine = refine_numpy
    try:
        yield
    finally:
        detect._refine = saved


@contextmanager
def no_trail_test() -> Iterator[None]:
    """Detection without the satellite-trail test (``detect._on_trail`` drops nothing)."""
    saved = detect._on_trail
    detect._on_trail = lambda x, *_args: np.zeros(len(x), dtype=bool)
    try:
        yield
    finally:
        detect._on_trail = saved


def paired(old: Callable[[], Any], new: Callable[[], Any], repeat: int,
           before: Callable[[], Any] = old_refinement) -> tuple[float, float, Any, Any]:
    """Median ms of ``old`` and ``new`` run alternately after a warm-up, and their results;
    ``old`` runs inside the context ``before()`` (default: the old refinement)."""
    with before():
        r_old = old()
    r_new = new()
    t_old: list[float] = []
    t_new: list[float] = []
    for _ in range(repeat):
        with before():
            t0 = time.perf_counter()
            r_old = old()
            t_old.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r_new = new()
        t_new.append(time.perf_counter() - t0)
    return (1000.0 * statistics.median(t_old), 1000.0 * statistics.median(t_new), r_old,
            r_new)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    result = fn()  # warm-up (JIT, imports)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times), result


def centroid_rms(stars: StarList, truth_xy: NDArray[np.float64], bright: NDArray[np.bool_],
                 isolated: NDArray[np.bool_]) -> float:
    dist, idx = cKDTree(truth_xy).query(stars.xy)
    ok = (dist < 1.0) & bright[idx] & isolated[idx]
    return float(np.sqrt(np.mean(dist[ok] ** 2))) if ok.any() else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="6248x4176", help="WIDTHxHEIGHT")
    ap.add_argument("--stars", type=int, default=9000)
    ap.add_argument("--fwhm", type=float, default=3.0)
    ap.add_argument("--rotation", type=float, default=1.0, help="degrees")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    nx, ny = (int(v) for v in args.size.lower().split("x"))

    import numba

    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(7)
    xy_ref = np.column_stack([rng.uniform(-50, nx + 50, args.stars),
                              rng.uniform(-50, ny + 50, args.stars)])
    flux = 800.0 * (1.0 + rng.pareto(1.3, args.stars))
    centre = np.array([nx / 2.0, ny / 2.0])
    th = math.radians(args.rotation)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    shift = np.array([15.3, -8.7])
    t_true = Transform(np.hstack([rot, (centre + shift - rot @ centre)[:, None]]))
    xy_frm = t_true.inverse().apply(xy_ref)

    t0 = time.perf_counter()
    radius = max(8, math.ceil(5 * args.fwhm))
    ref = render_stars((ny, nx), xy_ref, flux, fwhm_px=args.fwhm, radius_px=radius,
                       oversample=3)
    frm = render_stars((ny, nx), xy_frm, flux, fwhm_px=args.fwhm, radius_px=radius,
                       oversample=3)
    ref = (ref + 1000.0 + rng.normal(0, 10, ref.shape)).astype(np.float32)
    frm = (frm + 1000.0 + rng.normal(0, 10, frm.shape)).astype(np.float32)
    print(f"rendered two {nx}x{ny} frames with {args.stars} stars in "
          f"{time.perf_counter() - t0:.1f} s")

    nn, _ = cKDTree(xy_frm).query(xy_frm, k=2)
    isolated = nn[:, 1] > 4 * args.fwhm
    bright = flux > 20000  # SNR > ~150 per star
    cfg = DetectConfig()
    print(f"\n{nx}x{ny}, {args.stars} stars, FWHM {args.fwhm} px, rotation "
          f"{args.rotation} deg, {args.threads} numba threads, median of {args.repeat} "
          "after warm-up, old and new alternately")
    print(f"{'step':26s} {'old ms':>8s} {'new ms':>8s} {'speed-up':>9s}  result (old | new)")

    def row(name: str, ms_old: float, ms_new: float, result: str) -> None:
        print(f"{name:26s} {ms_old:8.1f} {ms_new:8.1f} {ms_old / ms_new:8.2f}x  {result}")

    ms_old, ms_new, (s_old, *_), (s_new, *_) = paired(
        lambda: detect_stars_legacy(frm, cfg), lambda: detect_stars(frm, cfg), args.repeat)
    row("detect_stars (auto bin)", ms_old, ms_new,
        f"{len(s_old)} | {len(s_new)} stars, centroid RMS "
        f"{centroid_rms(s_old, xy_frm, bright, isolated):.4f} | "
        f"{centroid_rms(s_new, xy_frm, bright, isolated):.4f} px")
    ms_old, ms_new, (st_old, m_old), (st_new, m_new) = paired(
        lambda: detect._measure(frm, cfg, legacy=True), lambda: measure(frm, cfg), args.repeat)
    row("measure (+ Moffat fits)", ms_old, ms_new,
        f"FWHM {m_old.fwhm_px:.4f} | {m_new.fwhm_px:.4f} px (true {args.fwhm}), "
        f"elongation {m_old.elongation:.4f} | {m_new.elongation:.4f}")
    print(f"{'':26s} {'':8s} {'':8s} {'':9s}  sky {m_old.background_adu:.2f} | "
          f"{m_new.background_adu:.2f} ADU (true 1000), noise {m_old.noise_adu:.3f} | "
          f"{m_new.noise_adu:.3f} ADU (true 10), SNR {m_old.snr:.1f} | {m_new.snr:.1f}")

    # The refinement alone, on the candidates of the new path.
    det = detect._detect(frm, cfg)
    xy0 = det.stars.xy + rng.uniform(-1.5, 1.5, det.stars.xy.shape)
    sky = np.full(len(xy0), 1000.0)

    def refine() -> Any:  # detect._refine is looked up per call: paired swaps it
        return detect._refine(frm, xy0[:, 0], xy0[:, 1], sky, 1.3, 4, None)

    ms_old, ms_new, r_old, r_new = paired(refine, refine, args.repeat)
    same = bool(np.array_equal(r_old["keep"], r_new["keep"]))
    row(f"refine ({len(xy0)} stars)", ms_old, ms_new,
        f"same cuts: {same}, max |dxy| "
        f"{float(np.max(np.abs(r_old['xy'][r_new['keep']] - r_new['xy'][r_new['keep']]))):.1e}"
        " px")

    # The satellite-trail test (pipeline/trails.py): the same measure without it (old)
    # and with it (new), on the frame and on the frame crossed by a satellite trail.
    ms_old, ms_new, (st_a, m_a), (st_b, m_b) = paired(
        lambda: measure(frm, cfg), lambda: measure(frm, cfg), args.repeat, no_trail_test)
    row("measure: trail test", ms_old, ms_new,
        f"same stars: {bool(np.array_equal(st_a.xy, st_b.xy))}, elongation "
        f"{m_a.elongation:.4f} | {m_b.elongation:.4f}")
    from livestack.sim.sky import Trail, render_trail

    sat = frm.copy()
    trail_mask = np.zeros(sat.shape, dtype=bool)
    render_trail(sat, trail_mask, Trail(0.45 * nx, 0.55 * ny, 162.0, 600.0, 1.8))
    ms_old, ms_new, (st_a, m_a), (st_b, m_b) = paired(
        lambda: measure(sat, cfg), lambda: measure(sat, cfg), args.repeat, no_trail_test)
    near = ndimage.binary_dilation(trail_mask, iterations=3)

    def on_trail(stars: StarList) -> int:
        ij = np.rint(stars.xy).astype(np.intp)
        return int(np.count_nonzero(near[ij[:, 1], ij[:, 0]]))

    row("measure: trail test, +sat.", ms_old, ms_new,
        f"elongation {m_a.elongation:.4f} | {m_b.elongation:.4f}, stars on the trail "
        f"{on_trail(st_a)}/{len(st_a)} | {on_trail(st_b)}/{len(st_b)}")
    for name, image in (("frame", frm), ("+sat.", sat)):
        ms_test, n_cand = trail_test_ms(image, cfg, args.repeat)
        print(f"{'  of which the trail test':26s} {'':8s} {ms_test:8.2f} {'':9s}  {name}: "
              f"{n_cand} candidates tested")

    ref_stars, _ = measure(ref)
    registrar = Registrar(ref_stars, ref, RegisterConfig())
    ys, xs = np.mgrid[0:ny:100, 0:nx:100]
    grid = np.column_stack([xs.ravel(), ys.ravel()]).astype(np.float64)
    ms_old, ms_new, est_old, est_new = paired(lambda: registrar.register(st_old),
                                              lambda: registrar.register(st_new), args.repeat)

    def grid_err(est: Transform) -> float:
        return float(np.sqrt(np.mean(np.sum((est.apply(grid) - t_true.apply(grid)) ** 2,
                                            axis=1))))

    row("register (each path's)", ms_old, ms_new,
        f"grid RMS error {grid_err(est_old):.4f} | {grid_err(est_new):.4f} px, "
        f"{est_old.n_matches} | {est_new.n_matches} pairs")
    try:
        import astroalign

        def baseline() -> Any:
            return astroalign.find_transform(st_new.xy[:50], ref_stars.xy[:50])

        ms_aa, _ = timed(baseline, args.repeat)
        print(f"{'astroalign.find_transform':26s} {ms_aa:8.1f}  (baseline for register: "
              f"{ms_aa / ms_new:.1f}x slower)")
    except ImportError:
        print("(astroalign not installed: no baseline row)")


def trail_test_ms(image: NDArray[np.float32], config: DetectConfig,
                  repeat: int) -> tuple[float, int]:
    """Median ms of ``detect._on_trail`` (the trail test on the peak pass's catalogue)
    inside :func:`measure`, and the number of candidates it tested."""
    saved = detect._on_trail
    times: list[float] = []
    sizes: list[int] = []

    def timed_test(x: NDArray[np.float64], *args: Any) -> NDArray[np.bool_]:
        t0 = time.perf_counter()
        out = saved(x, *args)
        times.append(time.perf_counter() - t0)
        sizes.append(len(x))
        return out

    detect._on_trail = timed_test
    try:
        for _ in range(repeat + 1):
            measure(image, config)
    finally:
        detect._on_trail = saved
    n_calls = len(times) // (repeat + 1)  # the probe and the final pass share one call
    per_measure = [sum(times[i:i + n_calls]) for i in range(n_calls, len(times), n_calls)]
    return 1000.0 * statistics.median(per_measure), max(sizes)


def detect_stars_legacy(image: NDArray[np.float32], config: DetectConfig
                        ) -> tuple[StarList, float, float]:
    """:func:`detect_stars` on the path before issue 16."""
    det = detect._detect(image, config, legacy=True)
    return det.stars, det.background_adu, det.noise_adu


if __name__ == "__main__":
    main()

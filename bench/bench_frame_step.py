"""Live stack vs ``livestack integrate`` on one synthetic night: agreement, efficiency, time.

A night with vignetting, amp glow and hot pixels is stacked live (``livestack stack`` with raw
bias/dark/flat folders), then re-stacked with the integration engine in several ways, all in
this run:

* ``stored``: the recorded masters and the journal's per-frame normalisation (the default);
* ``measured``: the recorded masters, normalisation measured again (stars detected);
* ``no-calibration``: no masters.

For each it prints the noise efficiency ``(sigma_frame^2 / N) / sigma_residual^2`` (against the
simulator's truth, fixed patterns count as noise), the largest relative difference of the
per-frame weights and scales from the live stack's, the median pixel difference from the
live stack in sky sigma (``--reject sigma``), and the integration's wall time as a ratio to
the ``measured`` one.

Usage::

    python bench/bench_frame_step.py                       # 1024x768, 12 frames
    python bench/bench_frame_step.py --size 2048x1536 --frames 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray


def _sky_sigma(image: NDArray[np.float32], truth: NDArray[np.float32],
               full: NDArray[np.bool_]) -> float:
    sky = full & (truth < np.percentile(truth[full], 60))
    res = (image - truth)[sky]
    return float(1.4826 * np.median(np.abs(res - np.median(res))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    from astropy.io import fits

    from livestack.batch import stack_files
    from livestack.config import load_config
    from livestack.pipeline.combine import IntegrateConfig
    from livestack.restack import integrate_session
    from livestack.sessionplan import load_session
    from livestack.sim import SimConfig, Simulator, write_calibration_set, write_sequence
    from livestack.storage.calibration import RecordedMasters, open_masters
    from livestack.storage.journal import Journal

    n = args.frames
    cfg = SimConfig(width=width, height=height, n_stars=max(250, width * height // 2000),
                    flux_powerlaw_index=1.0, drift_px_per_frame=(0.9, 0.5), dither_px=0.0,
                    cosmic_rays_per_frame=2.0, vignetting=0.3, amp_glow_e_per_s=2.0)
    with tempfile.TemporaryDirectory(prefix="bench-frame-step-") as tmp:
        base = Path(tmp)
        sim = Simulator(cfg, seed=args.seed)
        lights = write_sequence(base / "lights", cfg, seed=args.seed, n_frames=n, simulator=sim)
        cal = write_calibration_set(base / "cal", cfg, seed=args.seed, n_bias=5, n_darks=5,
                                    n_flats=5, simulator=sim)
        out = base / "out"
        config = load_config(None, {"output.dir": str(out), "solver.enabled": False})
        t0 = time.perf_counter()
        engine = stack_files(config, lights, out, masters=open_masters(
            bias=cal["bias"], darks=cal["darks"], flats=cal["flats"]))
        live_s = time.perf_counter() - t0
        (stack_id, rt), = engine.runtimes.items()
        with fits.open(rt.folder / "stack.fits") as hdul:
            live_image = np.asarray(hdul[0].data, dtype=np.float32)
            live_count = np.asarray(hdul["COUNT"].data)
        journal = Journal(out / "journal.sqlite")
        rows = sorted(journal.rows(stack_id=stack_id, status="accepted"), key=lambda r: r.seq)
        journal.close()
        truth = sim.noiseless_reference()
        frame_noise = float(rows[0].metrics["noise_adu"])

        def efficiency(image: NDArray[np.float32], count: NDArray[Any]) -> float:
            return (frame_noise ** 2 / n) / _sky_sigma(image, truth, count >= n) ** 2

        session = load_session(rt.folder)
        recorded = RecordedMasters(out, session.recorded_masters())
        results: dict[str, dict[str, float]] = {}
        for name, masters, reuse in (("measured", recorded, False), ("stored", recorded, True),
                                     ("no-calibration", None, True)):
            t0 = time.perf_counter()
            product = integrate_session(rt.folder, IntegrateConfig(reject="sigma"),
                                        masters=masters, reuse_norm=reuse,
                                        scratch_dir=base / "scratch")
            seconds = time.perf_counter() - t0
            norms = product.frame_norms or []
            pairs = list(zip(norms, rows, strict=True))
            weight_dev = max(abs(g["weight"] / r.weight - 1.0) for g, r in pairs)
            scale_dev = max(float(np.max(np.abs(np.asarray(g["scale"])
                                                / np.asarray(r.norm["scale"]) - 1.0)))
                            for g, r in pairs)
            both = (live_count >= n) & (product.count >= n)
            sigma = _sky_sigma(live_image, truth, both)
            median = float(np.median((product.image - live_image)[both])) / sigma
            results[name] = {"eff": efficiency(product.image, product.count), "s": seconds,
                             "w": weight_dev, "k": scale_dev, "med": median}
        live_eff = efficiency(live_image, live_count)

    print(f"\nlive vs integrate --reject sigma, {width}x{height}, {n} frames "
          f"(live stack: {live_s:.1f} s)")
    print(f"{'path':16s} {'efficiency':>10s} {'max |dw/w|':>11s} {'max |dk/k|':>11s} "
          f"{'median diff':>12s} {'time ratio':>10s}")
    print(f"{'live':16s} {live_eff:10.3f} {'-':>11s} {'-':>11s} {'-':>12s} {'-':>10s}")
    ref_s = results["measured"]["s"]
    for name, r in results.items():
        print(f"{name:16s} {r['eff']:10.3f} {r['w']:11.2e} {r['k']:11.2e} "
              f"{r['med']:+11.4f}s {r['s'] / ref_s:10.2f}")
    print("median diff in sky sigma of the live stack; time ratio against 'measured'")


if __name__ == "__main__":
    main()

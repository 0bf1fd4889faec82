"""Benchmark: FITS read and calibration at 26 MP (6248x4176 16-bit, one IMX571 frame).

Prints the median milliseconds of the naive way and of livestack's way, run in
the same process on the same data, with their ratio:

* read: ``astropy.io.fits.getdata`` (uint16, then float32) vs ``read_frame``
  (header blocks + one numba decode pass to native float32);
* calibrate: ``calibrate_numpy`` (numpy temporaries) vs ``calibrate`` (one fused
  numba kernel, rows in parallel), with bias+dark, flat and 0.1% defects, into
  a fresh array and into a reused ``out=`` buffer;
* debayer: vectorised numpy bilinear vs the numba kernel.

The numba kernels are warmed up first; the first call's time (JIT compile, or
loading the on-disk cache; ``--cold`` forces a compile) is printed on its own
line.

Usage::

    python bench/bench_read_calibrate.py [--repeat 7] [--ny 4176 --nx 6248] [--cold]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from astropy.io import fits

# The oracles in tests/ are importable when run as `python bench/...` from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_ms(func: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _first_call_ms(func: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    func()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--ny", type=int, default=4176)
    parser.add_argument("--nx", type=int, default=6248)
    parser.add_argument("--cold", action="store_true",
                        help="compile the kernels from scratch (empty numba cache) to time the JIT")
    args = parser.parse_args()
    if args.cold:
        cache_dir = tempfile.mkdtemp(prefix="livestack-numba-")
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
        os.environ["NUMBA_CACHE_DIR"] = cache_dir
    # Imported here so that --cold takes effect before numba loads.
    from livestack.pipeline import kernels_calibrate as kc
    from livestack.pipeline import kernels_demosaic as kd
    from livestack.pipeline.calibrate import MasterSet, calibrate
    from livestack.pipeline.debayer import debayer
    from livestack.storage import kernels_fits as kf
    from livestack.storage.fitsio import read_frame
    from tests.oracles import calibrate_numpy, debayer_numpy

    shape = (args.ny, args.nx)
    rng = np.random.default_rng(42)
    raw16 = rng.normal(1200.0, 40.0, shape).clip(0, 65535).astype(np.uint16)
    subtract = rng.normal(1000.0, 5.0, shape).astype(np.float32)
    flat = rng.uniform(0.8, 1.1, shape).astype(np.float32)
    defects = rng.random(shape) < 0.001
    masters = MasterSet(subtract, flat, defects, ("bench",))

    with tempfile.TemporaryDirectory(prefix="livestack-bench-") as tmp:
        path = Path(tmp) / "frame.fits"
        fits.PrimaryHDU(raw16).writeto(path)

        first = {
            "read_frame (decode kernel)": _first_call_ms(lambda: read_frame(path)),
            "calibrate (fused kernel)": _first_call_ms(
                lambda: calibrate(raw16[:64, :64], MasterSet(subtract[:64, :64], flat[:64, :64],
                                                             defects[:64, :64]))),
            "debayer (bilinear kernel)": _first_call_ms(
                lambda: debayer(raw16[:64, :64], "RGGB", "bilinear")),
        }
        raw, _, _ = read_frame(path)
        rows: list[tuple[str, float, float]] = []
        rows.append(("read FITS -> float32",
                     _median_ms(lambda: fits.getdata(path).astype(np.float32), args.repeat),
                     _median_ms(lambda: read_frame(path), args.repeat)))
        rows.append(("read FITS (astropy uint16 only)",
                     _median_ms(lambda: fits.getdata(path), args.repeat),
                     _median_ms(lambda: read_frame(path), args.repeat)))
        rows.append(("calibrate sub+flat+defects",
                     _median_ms(lambda: calibrate_numpy(raw, masters), args.repeat),
                     _median_ms(lambda: calibrate(raw, masters), args.repeat)))
        buffer = np.empty_like(raw)
        rows.append(("calibrate, reused out= buffer",
                     _median_ms(lambda: calibrate_numpy(raw, masters), args.repeat),
                     _median_ms(lambda: calibrate(raw, masters, out=buffer), args.repeat)))
        rows.append(("debayer bilinear",
                     _median_ms(lambda: debayer_numpy(raw, "RGGB"), max(1, args.repeat // 2)),
                     _median_ms(lambda: debayer(raw, "RGGB", "bilinear"), args.repeat)))
        np.testing.assert_allclose(calibrate(raw, masters), calibrate_numpy(raw, masters),
                                   rtol=1e-6, atol=1e-3)

    import numba

    print(f"frame {shape[1]}x{shape[0]} ({shape[0] * shape[1] / 1e6:.1f} MP), "
          f"numba {numba.__version__}, {numba.get_num_threads()} threads, "
          f"repeat {args.repeat}")
    for name, ms in first.items():
        stats = {"read_frame (decode kernel)": kf.decode_be_int16,
                 "calibrate (fused kernel)": kc.calibrate_fused,
                 "debayer (bilinear kernel)": kd.debayer_bilinear}[name].stats
        source = "cache load" if stats.cache_hits else "JIT compile"
        print(f"first call {name}: {ms:.0f} ms ({source})")
    print()
    print(f"{'stage':34s} {'baseline ms':>12s} {'livestack ms':>13s} {'ratio':>7s}")
    for name, base, fast in rows:
        print(f"{name:34s} {base:12.1f} {fast:13.1f} {base / fast:6.1f}x")


if __name__ == "__main__":
    main()

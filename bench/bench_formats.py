"""Benchmark: decode time per frame for each supported format at 24 MP (6000x4000, 16-bit).

One synthetic Bayer frame (sky + noise, RGGB) is written as plain FITS (the baseline),
``.fits.gz``, DNG (pidng, uncompressed), 16-bit TIFF, 16-bit PNG, XISF and 8-bit JPEG
(quality 95, stretched so the sky noise spans ~25 levels),
and the same frame debayered (as a camera's software saves colour frames) as 16-bit RGB
TIFF, 16-bit RGB PNG (imagecodecs), RGB XISF and 8-bit RGB JPEG (``... rgb`` rows, three
samples a pixel: 72 M values at 24 MP);
then each file is read with :func:`livestack.storage.formats.read_frame` (the reader the
daemon uses) ``--repeat`` times. Printed: file size, median ms per frame and the ratio
to the plain FITS read measured in the same run. The first read of each format is
a warm-up (numba's FITS decode kernel, imports) and is not counted.

Usage::

    python bench/bench_formats.py [--repeat 5] [--ny 4000 --nx 6000]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from livestack.sim.camera import SimFrame
from livestack.sim.fitswrite import write_fits
from livestack.sim.formatwrite import rgb_frame, write_frame
from livestack.storage.formats import ReadOptions, read_frame


def _frame(ny: int, nx: int) -> SimFrame:
    rng = np.random.default_rng(1)
    yy = np.linspace(0.0, 1.0, ny, dtype=np.float32)[:, None]
    sky = 1200.0 + 300.0 * yy + rng.normal(0.0, 25.0, (ny, nx)).astype(np.float32)
    data = np.clip(sky, 0, 65535).astype(np.uint16)
    header: dict[str, object] = {
        "SIMPLE": True, "BITPIX": 16, "NAXIS": 2, "NAXIS1": nx, "NAXIS2": ny, "EXTEND": True,
        "BZERO": 32768, "BSCALE": 1, "IMAGETYP": "Light Frame", "EXPTIME": 60.0,
        "DATE-OBS": "2026-01-15T21:00:00.000", "GAIN": 100, "BAYERPAT": "RGGB",
        "ROWORDER": "TOP-DOWN"}
    return SimFrame(data=data, header=header, truth=None)


def _median_ms(path: Path, repeat: int) -> float:
    options = ReadOptions(exposure_s=60.0)
    read_frame(path, options)  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        read_frame(path, options)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ny", type=int, default=4000)
    parser.add_argument("--nx", type=int, default=6000)
    args = parser.parse_args()
    frame = _frame(args.ny, args.nx)
    with tempfile.TemporaryDirectory(prefix="bench_formats_") as tmp:
        folder = Path(tmp)
        files = {"fits": folder / "f.fits"}
        write_fits(files["fits"], frame)
        files["fits.gz"] = folder / "f.fits.gz"
        files["fits.gz"].write_bytes(gzip.compress(files["fits"].read_bytes(), 6))
        for fmt, suffix in (("dng", ".dng"), ("tiff", ".tiff"), ("png", ".png"),
                            ("xisf", ".xisf")):
            files[fmt] = write_frame(folder / f"f{suffix}", frame, fmt)
        # The JPEG writer keeps the top 8 bits: stretch first so the noise survives
        # (a near-constant JPEG would decode unrealistically fast).
        stretched = np.clip((frame.data.astype(np.float32) - 1000.0) * 160.0, 0, 65535)
        stretched_frame = SimFrame(stretched.astype(np.uint16), frame.header, None)
        files["jpeg"] = write_frame(folder / "f.jpg", stretched_frame, "jpeg")
        rgb = rgb_frame(frame, "bilinear")  # the pixels matter, not the demosaic's quality
        for fmt, suffix in (("tiff", ".tiff"), ("png", ".png"), ("xisf", ".xisf")):
            files[f"{fmt} rgb"] = write_frame(folder / f"rgb{suffix}", rgb, fmt)
        files["jpeg rgb"] = write_frame(folder / "rgb.jpg", rgb_frame(stretched_frame,
                                                                       "bilinear"), "jpeg")
        mp = args.ny * args.nx / 1e6
        print(f"decode per frame, {args.nx}x{args.ny} ({mp:.1f} MP), median of {args.repeat}")
        print(f"{'format':<10}{'size MB':>10}{'ms/frame':>12}{'x FITS':>10}")
        del frame, rgb, stretched, stretched_frame  # free ~0.5 GB before timing
        base = None
        for fmt, path in files.items():
            ms = _median_ms(path, args.repeat)
            base = ms if base is None else base
            print(f"{fmt:<10}{path.stat().st_size / 1e6:>10.1f}{ms:>12.1f}{ms / base:>10.2f}",
                  flush=True)


if __name__ == "__main__":
    main()

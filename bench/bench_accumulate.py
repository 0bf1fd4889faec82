"""Benchmark the running stack against a numpy Welford + kappa-sigma baseline.

Prints two tables:

1. Speed and memory at full size (default 6248 x 4176 = 26 MP mono): milliseconds per
   ``add`` after the warm-up for the numpy baseline and for :class:`RunningStack`'s fused
   kernel, bytes of state, plus the preview stretch + JPEG and ``frame_stats`` costs.
2. Rejection quality on the same clean frames (a 1024 x 1024 field with stars, Poisson
   noise and 10 % FWHM jitter): false-rejection rate per side after the warm-up of the
   naive online kappa-sigma (running mean/std, from the 5th frame) and of RunningStack.

Run: ``/work/venv/bin/python bench/bench_accumulate.py [--ny 4176 --nx 6248 --repeat 6]``.
Timings on a shared machine are inflated; ratios within one run are what matter, and the
CPU time (all threads) of ``add()`` is less sensitive to the load than its wall time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numpy.typing import NDArray

from livestack.pipeline.accumulate import RunningStack, StackConfig
from livestack.pipeline.normalize import frame_stats
from livestack.pipeline.stretch import auto_stretch, encode_jpeg


class NumpyWelfordClip:
    """The naive baseline: float32 Welford state, kappa-sigma against the running std."""

    def __init__(self, shape: tuple[int, int], kappa: float = 3.0, min_n: int = 4) -> None:
        self.n = np.zeros(shape, np.float32)
        self.mean = np.zeros(shape, np.float32)
        self.m2 = np.zeros(shape, np.float32)
        self.kappa = np.float32(kappa)
        self.min_n = min_n

    def add(self, x: NDArray[np.float32]) -> tuple[int, int]:
        std = np.sqrt(self.m2 / np.maximum(self.n - 1, 1))
        d = x - self.mean
        tested = self.n >= self.min_n
        lo = tested & (d < -self.kappa * std)
        hi = tested & (d > self.kappa * std)
        acc = ~(lo | hi)
        self.n += acc
        self.mean += np.where(acc, d / np.maximum(self.n, 1), 0)
        self.m2 += np.where(acc, d * (x - self.mean), 0)
        return int(lo.sum()), int(hi.sum())

    @property
    def nbytes(self) -> int:
        return self.n.nbytes + self.mean.nbytes + self.m2.nbytes


def speed_table(ny: int, nx: int, repeat: int) -> None:
    rng = np.random.default_rng(0)
    shape = (ny, nx)
    npix = ny * nx
    print(f"generating frames {nx} x {ny} ({npix / 1e6:.1f} MP) ...", flush=True)
    base = (1000.0 + 30.0 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    frames = [base + np.float32(rng.normal(0, 1)) for _ in range(3)]
    frames.append(np.roll(base, 7, axis=1))
    fp = np.ones(shape, bool)

    naive = NumpyWelfordClip(shape)
    stack = RunningStack(shape, StackConfig())
    peak = 0
    t_warm = []
    for i in range(stack.config.warmup_frames):
        naive.add(frames[i % len(frames)])
        t0 = time.perf_counter()
        stack.add(frames[i % len(frames)], fp, 1.0, 30.0)
        t_warm.append((time.perf_counter() - t0) * 1e3)
        peak = max(peak, stack.state_nbytes())
    t_naive, t_kernel, cpu_naive, cpu_kernel = [], [], [], []
    for i in range(repeat):
        frame = frames[i % len(frames)]
        t0, c0 = time.perf_counter(), time.process_time()
        naive.add(frame)
        t1, c1 = time.perf_counter(), time.process_time()
        stack.add(frame, fp, 1.0, 30.0)
        t2, c2 = time.perf_counter(), time.process_time()
        t_naive.append((t1 - t0) * 1e3)
        t_kernel.append((t2 - t1) * 1e3)
        cpu_naive.append((c1 - c0) * 1e3)
        cpu_kernel.append((c2 - c1) * 1e3)
    naive_ms, kernel_ms = float(np.median(t_naive)), float(np.median(t_kernel))
    naive_cpu_ms, kernel_cpu_ms = float(np.median(cpu_naive)), float(np.median(cpu_kernel))

    t_stretch, t_jpeg, t_stats, t_median = [], [], [], []
    image = stack.mean()
    for _ in range(max(3, repeat // 2)):
        t0 = time.perf_counter()
        pixels = auto_stretch(image)
        t1 = time.perf_counter()
        encode_jpeg(pixels)
        t2 = time.perf_counter()
        frame_stats(frames[0], fp)
        t3 = time.perf_counter()
        np.median(frames[0])
        t4 = time.perf_counter()
        t_stretch.append((t1 - t0) * 1e3)
        t_jpeg.append((t2 - t1) * 1e3)
        t_stats.append((t3 - t2) * 1e3)
        t_median.append((t4 - t3) * 1e3)

    print(f"\n{'':38s} {'baseline':>12s} {'livestack':>12s} {'ratio':>8s}")
    print(f"{'add() wall ms (median, after warm-up)':38s} {naive_ms:12.1f} {kernel_ms:12.1f} "
          f"{naive_ms / kernel_ms:7.1f}x")
    print(f"{'add() CPU ms, all threads (median)':38s} {naive_cpu_ms:12.1f} {kernel_cpu_ms:12.1f} "
          f"{naive_cpu_ms / kernel_cpu_ms:7.1f}x")
    print(f"{'state MB after warm-up':38s} {naive.nbytes / 1e6:12.0f} "
          f"{stack.state_nbytes() / 1e6:12.0f} {'':8s}")
    print(f"{'state bytes / pixel':38s} {naive.nbytes / npix:12.1f} "
          f"{stack.state_nbytes() / npix:12.1f}   (baseline has no rejection maps)")
    print(f"{'peak stack MB (warm-up held)':38s} {'':12s} {peak / 1e6:12.0f}")
    print(f"{'warm-up add() ms: hold / replay':38s} {'':12s} "
          f"{np.median(t_warm[1:-1]):6.1f} / {t_warm[-1]:4.0f}   (replay once, at frame K)")
    print(f"{'frame_stats ms (vs full np.median)':38s} {np.median(t_median):12.1f} "
          f"{np.median(t_stats):12.1f} {np.median(t_median) / np.median(t_stats):7.1f}x")
    print(f"{'preview: stretch + JPEG ms':38s} {'':12s} "
          f"{np.median(t_stretch):7.1f} + {np.median(t_jpeg):4.1f}")


def quality_table(n_frames: int = 40, size: int = 1024) -> None:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    sky = 800.0 + 60.0 * x / size + 40.0 * y / size
    n_stars = size * size // 1500
    xy = np.column_stack([rng.uniform(6, size - 6, n_stars), rng.uniform(6, size - 6, n_stars)])
    flux = 10 ** rng.uniform(2.5, 5.5, n_stars)

    def render(fwhm: float) -> NDArray[np.float64]:
        img = sky.copy()
        sig = fwhm / 2.3548
        r = int(np.ceil(4 * sig)) + 1
        for (x0, y0), f in zip(xy, flux, strict=True):
            xs = np.arange(max(round(x0) - r, 0), min(round(x0) + r + 1, size))
            ys = np.arange(max(round(y0) - r, 0), min(round(y0) + r + 1, size))
            g = np.exp(-((xs[None, :] - x0) ** 2 + (ys[:, None] - y0) ** 2) / (2 * sig * sig))
            img[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] += f * g / (2 * np.pi * sig * sig)
        return img

    naive = NumpyWelfordClip((size, size))
    stack = RunningStack((size, size))
    fp = np.ones((size, size), bool)
    warm = stack.config.warmup_frames
    totals = np.zeros((2, 2))
    for i in range(n_frames):
        expected = render(3.0 * (1 + 0.1 * rng.standard_normal()))
        frame = (rng.poisson(expected) + rng.normal(0, 5.0, expected.shape)).astype(np.float32)
        a = naive.add(frame)
        b = stack.add(frame, fp, 1.0, frame_stats(frame).noise_adu)
        if i >= warm:
            totals[0] += a
            totals[1] += b
    samples = size * size * (n_frames - warm)
    rates = totals / samples
    print(f"\nfalse rejection per side after warm-up, {n_frames} clean frames {size}x{size} "
          f"({n_stars} stars, FWHM jitter 10 %)")
    print(f"{'':24s} {'low':>8s} {'high':>8s}")
    print(f"{'naive online clip':24s} {rates[0, 0]:8.3%} {rates[0, 1]:8.3%}")
    print(f"{'RunningStack':24s} {rates[1, 0]:8.3%} {rates[1, 1]:8.3%}")
    print(f"{'ratio naive / ours':24s} {rates[0, 0] / rates[1, 0]:7.1f}x "
          f"{rates[0, 1] / rates[1, 1]:7.1f}x   (Gaussian tail at 3 sigma: 0.135 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ny", type=int, default=4176)
    parser.add_argument("--nx", type=int, default=6248)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--frames", type=int, default=40)
    args = parser.parse_args()
    speed_table(args.ny, args.nx, args.repeat)
    quality_table(args.frames)


if __name__ == "__main__":
    main()

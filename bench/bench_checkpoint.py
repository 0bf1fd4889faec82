"""What does an accumulator checkpoint cost at 26 MP? (ms and MB, uncompressed vs compressed)

The arrays have the shapes, dtypes and kind of content of ``StackSession.state()`` for a
mono 6248x4176 stack past its warm-up: ``RunningStack`` planes ``mean``, ``m2``, ``wsum``
(float32), ``count``, ``rej_lo``, ``rej_hi`` (uint16), plus the reference luminance
(float32) and its star list. Content is realistic for compression: noisy sky with stars in
the float planes, a constant count with a ragged edge, sparse rejections.

Each variant is written with the production writer (temp file, fsync, rename, fsync dir)
and read back with the production loader (which checks every CRC). The baseline row is a
plain ``ndarray.tofile`` of the same bytes plus fsync (the disk's floor), measured in the
same run.

    /work/venv/bin/python bench/bench_checkpoint.py [--size 6248x4176] [--repeat 3] [--dir D]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from livestack.storage.checkpoint import load_checkpoint, save_checkpoint, stage_checkpoint


def make_state(ny: int, nx: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Arrays shaped like ``StackSession.state()`` for a mono stack of 40 frames."""
    rng = np.random.default_rng(seed)
    sky = (1000.0 + rng.normal(0.0, 3.0, size=(ny, nx))).astype(np.float32)
    ys, xs = rng.integers(0, ny, 3000), rng.integers(0, nx, 3000)
    sky[ys, xs] += rng.uniform(50, 20000, 3000).astype(np.float32)
    count = np.full((ny, nx), 40, dtype=np.uint16)
    count[:, :25] = 37                               # dither edge
    rej = (rng.random((ny, nx)) < 0.01).astype(np.uint16)
    return {
        "stack.mean": sky[None],
        "stack.m2": (rng.gamma(2.0, 200.0, size=(ny, nx)).astype(np.float32))[None],
        "stack.wsum": np.full((1, ny, nx), 39.2, dtype=np.float32),
        "stack.count": count[None],
        "stack.rej_lo": rej[None],
        "stack.rej_hi": np.roll(rej, 7, axis=1)[None],
        "stack.noise_sq_sum": np.array([360.0]),
        "ref.luminance": (sky + rng.normal(0, 10, size=(ny, nx)).astype(np.float32)),
        "ref.xy": rng.uniform(0, nx, size=(500, 2)),
        "ref.flux": rng.uniform(100, 1e5, 500),
        "ref.fwhm_px": rng.uniform(2, 3, 500),
        "ref.elongation": rng.uniform(1, 1.2, 500),
    }


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="6248x4176")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="folder on the disk to test (temp)")
    args = parser.parse_args()
    nx, ny = (int(v) for v in args.size.lower().split("x"))
    arrays = make_state(ny, nx)
    raw_mb = sum(a.nbytes for a in arrays.values()) / 1e6
    meta = {"stack_id": "bench", "seq": 40, "generation": 0,
            "session": {"records": [{"file": f"/x/light_{i:04d}.fits"} for i in range(40)]}}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        rows = []
        base_ms = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            with open(folder / "floor.bin", "wb") as fh:
                for a in arrays.values():
                    a.tofile(fh)
                fh.flush()
                os.fsync(fh.fileno())
            base_ms.append((time.perf_counter() - t0) * 1e3)
        base = statistics.median(base_ms)
        rows.append(("tofile+fsync (floor)", base, raw_mb, float("nan")))
        for compress in (False, True):
            path = folder / f"checkpoint-{int(compress)}.npz"
            write_ms, read_ms = [], []
            size = 0
            for _ in range(args.repeat if not compress else 1):
                t0 = time.perf_counter()
                size = save_checkpoint(path, arrays, meta, compress=compress)
                write_ms.append((time.perf_counter() - t0) * 1e3)
                _drop_cache(path)
                t0 = time.perf_counter()
                load_checkpoint(path)
                read_ms.append((time.perf_counter() - t0) * 1e3)
            rows.append((f"save_checkpoint compress={compress}", statistics.median(write_ms),
                         size / 1e6, statistics.median(read_ms)))
        # What the live worker waits for, and the memory it adds: before, a copy of the
        # state (the thread then wrote it); now, the write into a temp file straight from
        # the state (the thread then fsyncs and renames it).
        copy_ms, stage_ms = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            snapshot = {k: v.copy() for k, v in arrays.items()}
            copy_ms.append((time.perf_counter() - t0) * 1e3)
            del snapshot
            t0 = time.perf_counter()
            staged, _ = stage_checkpoint(folder / "staged.npz", arrays, meta)
            stage_ms.append((time.perf_counter() - t0) * 1e3)
            staged.commit()
    print(f"checkpoint of a {nx}x{ny} mono stack ({raw_mb:.0f} MB of arrays), "
          f"median of {args.repeat}")
    print(f"{'variant':34s} {'write ms':>9s} {'MB':>8s} {'load ms':>8s} {'x floor':>8s}")
    for name, ms, mb, load in rows:
        print(f"{name:34s} {ms:9.0f} {mb:8.1f} {load:8.0f} {ms / base:8.2f}")
    print()
    copy, stage = statistics.median(copy_ms), statistics.median(stage_ms)
    print(f"{'worker blocked per checkpoint':34s} {'ms':>9s} {'extra MB':>9s} {'x copy':>8s}")
    print(f"{'copy the state (before)':34s} {copy:9.0f} {raw_mb:9.0f} {1.0:8.2f}")
    print(f"{'stage_checkpoint, no copy (now)':34s} {stage:9.0f} {0.0:9.0f} {stage / copy:8.2f}")


if __name__ == "__main__":
    main()

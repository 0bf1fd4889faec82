"""Read, SHA-256 and decode of a FITS frame: one after the other, or overlapped.

The ingest needs a frame's SHA-256 (the journal's identity) before it may stack the frame,
and the pixels. Three ways to get both from one read of each cached light of
``bench/bench_stack_dense.py`` (26 MP, 52 MB, in the page cache), interleaved frame by
frame so that the machine's load hits all three alike:

* ``serial``: read the file into a buffer, hash it (``hashlib.sha256``, one core, ~29 ms at
  26 MP with SHA-NI), then decode it (``read_frame``): the ingest before the overlap;
* ``hash during read``: :func:`~livestack.storage.journal.read_file_sha256` (a helper thread
  hashes each 4 MiB chunk while the next is read), then decode;
* ``hash during read + decode``: :func:`~livestack.storage.journal.read_file_hashing`, decode
  while the hash finishes, then wait for it: what ``Ingest.process_path`` does.

It prints the median wall and CPU ms (user / system, whole process) of each and the wall
ratio against ``serial``, with the load average. The overlap only pays where a core is idle:
when other processes keep the second core busy (this machine's load from other runs is
often 1.5-4 on 2 cores), the hash thread waits for it and the wall time does not move. So it
also prints the main thread's own CPU time (``time.thread_time``): the steps the frame
waits for, i.e. the wall time once the hash has a core of its own (the hash thread's share
of the CPU is what moved off that path).

    python bench/bench_read_overlap.py                    # 26 MP mono cache, 8 frames x 5
    python bench/bench_read_overlap.py --rounds 10 --cache DIR

Measured on this 2-core machine while other sessions' benches ran (8 frames x 3-5 rounds
per line; wall ms serial -> hash during read -> hash during read + decode, and the main
thread's CPU)::

    load 1.5-1.6   wall 68.7 -> 70.4 -> 71.5 ms (1.02x, 1.04x)
    load 2.3-2.8   wall 107.5 -> 88.6 -> 99.6 ms (0.82x, 0.93x)
    load 2.3-3.2   wall 117.4 -> 112.8 -> 112.2 ms (0.96x, 0.96x); main thread 69 -> 36 -> 34 ms
    load 4.3-4.4   wall 94.5 -> 94.1 -> 97.4 ms (1.00x, 1.03x)
    7 more runs    wall 0.78-1.08x, main thread 0.39-0.59x of serial's 60-67 ms
                   (load 2-3; one of them at nice -10: 0.96x / 0.98x, so no idle core)

The main thread's CPU halves (the 29 ms hash left it), the total CPU is unchanged, and the
wall time follows only when a core is free: here even two separate processes hashing at
once got ~0.4 core each, so the other sessions held the second core. In the ingest itself
(``bench_frame_account.py``, 6 runs per tree at load 3.1-5.2) read + hash + decode took a
median 75 ms against 105 ms.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

WAYS = ("serial", "hash during read", "hash during read + decode")


def _serial(path: Path) -> tuple[Any, str]:
    """The ingest's read before the overlap: whole file, then its hash, then decode."""
    from livestack.storage.fitsio import read_frame

    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = np.empty(size + 1, dtype=np.uint8)
        view = buf.data
        got = 0
        while got < len(buf):
            n = fh.readinto(view[got:])
            if not n:
                break
            got += n
        del view
    data = buf[:got]
    sha = hashlib.sha256(data.data).hexdigest()
    return read_frame(path, data)[0], sha


def _hash_during_read(path: Path) -> tuple[Any, str]:
    from livestack.storage.fitsio import read_frame
    from livestack.storage.journal import read_file_sha256

    data, sha = read_file_sha256(path)
    return read_frame(path, data)[0], sha


def _hash_during_read_and_decode(path: Path) -> tuple[Any, str]:
    from livestack.storage.fitsio import read_frame
    from livestack.storage.journal import read_file_hashing

    data, pending = read_file_hashing(path)
    image = read_frame(path, data)[0]
    return image, pending.hexdigest()


def _timed(fn: Callable[[Path], tuple[Any, str]], path: Path) -> tuple[str, list[float]]:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    c0 = time.thread_time()
    _image, sha = fn(path)
    main_ms = (time.thread_time() - c0) * 1e3
    wall_ms = (time.perf_counter() - t0) * 1e3
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return sha, [wall_ms, (r1.ru_utime - r0.ru_utime) * 1e3, (r1.ru_stime - r0.ru_stime) * 1e3,
                 main_ms]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir())
                        / "livestack-bench" / "dense_6248x4176_9000_0.5_0_16_8",
                        help="a bench_stack_dense.py cache (lights/)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    files = sorted((args.cache / "lights").glob("*.fits"))[:args.frames]
    if not files:
        raise SystemExit(f"no lights in {args.cache / 'lights'}")
    ways = dict(zip(WAYS, (_serial, _hash_during_read, _hash_during_read_and_decode),
                    strict=True))
    for path in files:  # page cache, and the decode kernel compiled or loaded
        path.read_bytes()
    _serial(files[0])
    cells: dict[str, list[list[float]]] = {way: [] for way in WAYS}
    loads = []
    for _ in range(args.rounds):
        for path in files:
            shas = set()
            for way, fn in ways.items():
                sha, cell = _timed(fn, path)
                shas.add(sha)
                cells[way].append(cell)
            if len(shas) != 1:
                raise SystemExit(f"{path}: the ways disagree on the SHA-256: {shas}")
        loads.append(os.getloadavg()[0])
    print(f"{len(files)} frames of {args.cache.name} x {args.rounds} rounds, interleaved; "
          f"load {min(loads):.2f}-{max(loads):.2f}; medians")
    print("| way | wall ms | CPU user / sys ms | main thread CPU ms | wall vs serial "
          "| main thread CPU vs serial |")
    print("|---|---|---|---|---|---|")
    base = [statistics.median(c[j] for c in cells["serial"]) for j in range(4)]
    for way in WAYS:
        med = [statistics.median(c[j] for c in cells[way]) for j in range(4)]
        print(f"| {way} | {med[0]:.1f} | {med[1]:.0f} / {med[2]:.0f} | {med[3]:.0f} "
              f"| {med[0] / base[0]:.2f}x | {med[3] / base[3]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

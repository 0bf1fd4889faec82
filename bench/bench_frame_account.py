"""Where each ms of a ``livestack stack`` frame goes: wall and CPU per step, in process.

Runs ``livestack stack`` in this process on the cached frames of
``bench/bench_stack_dense.py`` (solver off) with timers wrapped around every step of
``Ingest.process_path``: the file checks, the SHA-256 (``sha256``: a streaming read of the
file; ``read file+sha256``: the one read of a plain FITS file whose bytes the reader then
decodes; in a tree that hashes in a helper thread while it reads, ``read file, hashing`` is
that read and ``sha256 wait`` the wait for the hash's end after the decode), the journal
calls, the read and decode, ``StackSession.process`` (and its own
stage timers) and the outputs after the frame. For each it prints the median wall ms and the CPU ms
(user / system, from ``getrusage``) over the accepted frames from ``--from`` on, then what
is left of ``process_path`` outside them. Where a step's wall time exceeds its CPU time, the
last columns say why: kB read from the disk (``ru_inblock``: page cache misses), voluntary
context switches (the process waited: I/O, a lock) and involuntary ones (another process or
a kernel thread took the core).

The CPU columns are the whole process's: work of another thread (e.g.
the checkpoint writer) lands in the step that runs meanwhile.
Compare two trees by running this script with each on ``PYTHONPATH``, one after the other.

    python bench/bench_frame_account.py                       # 26 MP mono cache, frames 6..8
    python bench/bench_frame_account.py --frames 8 --from 5 --cache DIR
    python bench/bench_frame_account.py --detail     # also the parts of calibrate / normalize

``--detail`` adds a row for each function the ``calibrate`` and ``normalize`` stages call
(``part ...``; they nest inside the stages). The last column counts minor page faults
(``ru_minflt``): fresh memory the kernel maps (and zeroes) for the step.

Measured (issue 16, the ingest's buffer pool, ``livestack/engine/buffers.py``): 26 MP mono,
cache ``dense_6248x4176_9000_0.5_0_16_12``, ``--frames 12 --from 5`` (medians of frames
5-11), main and the pool branch alternated three times (A/B/A/B/A/B) on the shared 2-core
machine, load average 2.1-2.6 (other engineers' jobs)::

    PYTHONPATH=/work/main   python bench/bench_frame_account.py \
        --cache /tmp/livestack-bench/dense_6248x4176_9000_0.5_0_16_12 --frames 12 --from 5
    PYTHONPATH=/work/s8pool python bench/bench_frame_account.py ...   # the same

    | step (per frame) | main: CPU user / sys ms | pool: CPU user / sys ms | page faults |
    |---|---|---|---|
    | read file+sha256 | 29-31 / 12-16 | 29-30 / 8-10 | 478 -> 0 |
    | read+decode | 7-9 / 8-12 | 7-10 / 0 | 444 -> 2 |
    | session.process | 296-323 / 8-13 | 297-311 / 0-4 | 956 -> 1-9 |
    | process_path | 339-364 / 41-61 (sum 388-425) | 336-353 / 11-13 (sum 348-364) | 1879 -> 5-15 |

The page faults of the file's bytes, the decoded frame, the warp output and the saturation
maps are gone; the system time left in ``read file+sha256`` is the copy out of the page
cache. The wall time of read+decode went from 10-27 ms to 6-8 ms; the other wall times
moved with the load (process_path 248-532 ms on main, 231-445 ms with the pool) and say
little here. An earlier round at load 5.5-7 gave the same picture: system time 48-59 ->
11-18 ms per frame, faults 1880 -> 4-29. (Measured before s8overlap was merged: its
steps below split ``read file+sha256`` into the read and the hash wait.)

Issue 16, the overlap of the hash and the parallel ``frame_stats`` (branch s8overlap against
main, ``--frames 10 --from 4 --detail`` run A/B/A/B three times, 6 runs per tree, load
3.1-5.2 on 2 cores from other sessions; medians of the runs' medians, wall / CPU ms)::

    step                         main          s8overlap
    read file+sha256             57.3 / 46     -
    read file, hashing           -             34.1 / 33
    sha256 wait                  -             1.4 / 1
    read+decode                  48.8 / 38     40.5 / 34
    read + hash + decode (sum)   104.6 / 84    75.2 / 69
    stage normalize              41.8 / 30     29.6 / 25
      part frame_stats           19.8 / 14     10.9 / 7
    process_path                 614.5 / 484   467.8 / 451   (load-dominated)

The other stages did not change (their differences are the load's). Once more at load
1.7-2.8 (A/B/A/B, wall ms of the two runs per tree; main's runs read 0.9-1.4 MB of the
frame from the disk, pages the VM had evicted)::

    read + hash + decode (sum)   79.2, 76.3    44.7, 59.1
    part frame_stats             16.8, 13.6    3.5, 5.2
    stage normalize              32.6, 23.3    17.2, 23.1
    process_path                 356.0, 277.1  274.7, 424.8   (the last at load 2.8)
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_stack_dense import warm

#: Steps directly inside ``Ingest.process_path`` (they do not nest in one another).
TOP = ("check_entry", "journal.seen", "sha256", "read file+sha256", "read file, hashing",
       "sha256 wait", "journal.already_done", "journal.mark_pending",
       "read+decode", "select_masters", "route", "runtime", "session.process", "after_frame")

#: [wall ms, user ms, sys ms, disk reads kB, voluntary / involuntary switches, minor faults]
Cell = list[float]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir())
                        / "livestack-bench" / "dense_6248x4176_9000_0.5_0_16_8",
                        help="a bench_stack_dense.py cache (lights/, calib/darks/)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--from", dest="first", type=int, default=5,
                        help="first frame index in the medians (after the warm-up)")
    parser.add_argument("--detail", action="store_true",
                        help="time the parts of the calibrate and normalize stages")
    parser.add_argument("--cold", action="store_true",
                        help="do not read the frames once before the run (see the docstring)")
    args = parser.parse_args()

    import livestack.engine.core as core
    import livestack.engine.ingest as ing
    import livestack.engine.reader as rd
    import livestack.pipeline.frame as frm
    import livestack.pipeline.session as ses
    import livestack.storage.journal as jn
    from livestack.cli import main as cli_main

    frame = [-1]
    cells: dict[int, dict[str, Cell]] = defaultdict(lambda: defaultdict(lambda: [0.0] * 7))
    verdicts: dict[int, str] = {}

    def record(label: str, t0: float, r0: resource.struct_rusage) -> None:
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cell = cells[frame[0]][label]
        cell[0] += (time.perf_counter() - t0) * 1e3
        cell[1] += (r1.ru_utime - r0.ru_utime) * 1e3
        cell[2] += (r1.ru_stime - r0.ru_stime) * 1e3
        cell[3] += (r1.ru_inblock - r0.ru_inblock) / 2  # 512-byte blocks
        cell[4] += r1.ru_nvcsw - r0.ru_nvcsw
        cell[5] += r1.ru_nivcsw - r0.ru_nivcsw
        cell[6] += r1.ru_minflt - r0.ru_minflt

    def wrap(owner: Any, name: str, label: str, *, new_frame: bool = False) -> None:
        if not hasattr(owner, name):  # an older tree (compared on PYTHONPATH) lacks the step
            return
        orig: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(orig)
        def timed(*a: Any, **k: Any) -> Any:
            if new_frame:
                frame[0] += 1
            t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            try:
                return orig(*a, **k)
            finally:
                record(label, t0, r0)

        setattr(owner, name, timed)

    # The session's own stage timer: each lap also records the CPU since the last lap.
    timer_init, timer_lap = ses._Timer.__init__, ses._Timer.lap

    def init(self: Any) -> None:
        timer_init(self)
        self.bench_r = resource.getrusage(resource.RUSAGE_SELF)

    def lap(self: Any, stage: str) -> None:
        t0, r0 = self._t, self.bench_r
        timer_lap(self, stage)
        record(f"  stage {stage}", t0, r0)
        self.bench_r = resource.getrusage(resource.RUSAGE_SELF)

    ses._Timer.__init__ = init  # type: ignore[method-assign]
    ses._Timer.lap = lap  # type: ignore[method-assign]
    process = ses.StackSession.process

    def session_process(self: Any, *a: Any, **k: Any) -> Any:
        outcome = process(self, *a, **k)
        verdicts[frame[0]] = outcome.verdict
        return outcome

    ses.StackSession.process = session_process  # type: ignore[method-assign]
    for owner, name, label in (
            (ing, "check_entry", "check_entry"), (ing, "sha256_file", "sha256"),
            (ing, "read_file_sha256", "read file+sha256"),
            (ing, "read_file_hashing", "read file, hashing"),
            (jn.PendingSha256 if hasattr(jn, "PendingSha256") else None, "hexdigest",
             "sha256 wait"),
            (jn.Journal, "seen", "journal.seen"),
            (jn.Journal, "already_done", "journal.already_done"),
            (jn.Journal, "mark_pending", "journal.mark_pending"),
            (rd.FrameReader, "read", "read+decode"),
            (rd.FrameReader, "select_masters", "select_masters"),
            (ing.Ingest, "route", "route"), (core.Engine, "runtime", "runtime"),
            (ses.StackSession, "process", "session.process"),
            (ing.Ingest, "_after_outcome", "after_frame")):
        wrap(owner, name, label)
    wrap(ing.Ingest, "process_path", "process_path", new_frame=True)
    if args.detail:
        # calibrate_saturated: raw_saturation and calibrate in one (the raw frame read
        # once, issue 16); a tree has either it or the two.
        for owner, name in ((frm, "raw_saturation"), (frm, "calibrate"),
                            (frm, "calibrate_saturated"),
                            (frm, "calibrated_saturation"), (frm, "find_isolated_hot_pixels"),
                            (frm, "correct_defects"), (frm, "subtract_gradient"),
                            (frm, "frame_stats"), (frm, "normalization"),
                            (frm, "star_scale"), (ses, "apply_normalization"),
                            (ses.StackSaturation, "apply")):
            wrap(owner, name, f"    part {name}")

    with tempfile.TemporaryDirectory(prefix="ls-account-") as tmp:
        config = Path(tmp) / "solver-off.yaml"
        config.write_text("solver:\n  enabled: false\n")
        lights = sorted((args.cache / "lights").glob("*.fits"))[:args.frames]
        if not args.cold:
            # A live session reads a frame just written, from the page cache; the cached
            # frames were written long ago and the VM evicts idle pages (bench_stack_dense).
            warm([*lights, args.cache / "calib" / "darks"])
        cli_main(["stack", *map(str, lights), "--darks", str(args.cache / "calib" / "darks"),
                  "-o", str(Path(tmp) / "out"), "--no-progress", "-c", str(config)])

    chosen = [i for i in range(args.first, args.frames) if verdicts.get(i) == "accepted"]
    if not chosen:
        raise SystemExit("no accepted frame in the chosen range")
    print(f"frames {chosen} (accepted), medians; CPU = whole process (all threads)")
    print("| step | wall ms | CPU user / sys ms | disk read kB | switches vol / invol "
          "| page faults |")
    print("|---|---|---|---|---|---|")
    labels = [*TOP, *sorted({k for i in chosen for k in cells[i] if k.startswith("  stage")}),
              *sorted({k for i in chosen for k in cells[i] if k.startswith("    part")})]
    for label in labels:
        med = [statistics.median(cells[i][label][j] for i in chosen) for j in range(7)]
        print(f"| {label} | {med[0]:.1f} | {med[1]:.0f} / {med[2]:.0f} | {med[3]:.0f} "
              f"| {med[4]:.0f} / {med[5]:.0f} | {med[6]:.0f} |")
    rest = statistics.median(cells[i]["process_path"][0] - sum(cells[i][k][0] for k in TOP)
                             for i in chosen)
    print(f"| rest of process_path | {rest:.1f} | - | - | - | - |")
    total = [statistics.median(cells[i]["process_path"][j] for i in chosen) for j in range(7)]
    print(f"| process_path | {total[0]:.1f} | {total[1]:.0f} / {total[2]:.0f} | {total[3]:.0f} "
          f"| {total[4]:.0f} / {total[5]:.0f} | {total[6]:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

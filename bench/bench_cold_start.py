"""Cold start of ``livestack demo``: time to the first stacked frame from an empty numba cache.

Runs ``livestack demo --port 0 --frames F --interval 2`` as a subprocess three times:

* ``before``: the baseline revision (``git archive REV`` into a temp folder, put first on
  ``PYTHONPATH``), with an empty ``NUMBA_CACHE_DIR``;
* ``after``: this checkout, with another empty ``NUMBA_CACHE_DIR`` (the kernel-compiling
  helper of :mod:`livestack.precompile` starts);
* ``warm``: this checkout again, reusing the ``after`` cache (the floor).

For each it prints the wall time from launch to the first ``accepted`` log line, to the
first ``preview.jpg`` (the first stacked frame the viewer shows) and to the 5th accepted
frame (the kappa-sigma stack has replaced the warm-up), and the CPU time (user + sys) the
demo process and its children (the helper) had used by then, read from ``/proc``. Ratios
are against ``before`` in the same run; on a machine shared with other jobs the absolute
seconds are inflated.

``--kernels`` prints instead where a cold start's compile time goes (which lever could
pay): each warm-up step of the daemon and each kernel's compile seconds and signature
count, from numba's compile events, in a fresh process with an empty cache.

Run: ``.venv/bin/python bench/bench_cold_start.py [--baseline 75f71ca] [--frames 8]``
and ``.venv/bin/python bench/bench_cold_start.py --kernels``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int, *, tree: bool = True) -> float:
    """User + sys CPU seconds of ``pid`` and (``tree``) its live descendants (/proc)."""
    total = 0.0
    parents = {pid}
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        # fields[1] = ppid, [11] = utime, [12] = stime (clock ticks)
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) * TICK_S)
    changed = tree
    while changed:
        changed = False
        for child, (ppid, _) in stats.items():
            if ppid in parents and child not in parents:
                parents.add(child)
                changed = True
    for p in parents:
        if p in stats:
            total += stats[p][1]
    return total


def run_demo(pythonpath: str | None, cache: Path, frames: int, timeout_s: float
             ) -> dict[str, float]:
    """Launch the demo, return wall/CPU at the 1st and 5th accepted frame."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = Path(tempfile.mkdtemp(prefix="bench-cold-out-"))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "livestack.cli", "demo", "--port", "0",
                             "--frames", str(frames), "--interval", "2", "--output", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=out)  # not the checkout: PYTHONPATH decides
    result: dict[str, float] = {}
    which = subprocess.run([sys.executable, "-c", "import livestack; print(livestack.__file__)"],
                           env=env, cwd=out, capture_output=True, text=True).stdout.strip()
    print(f"  running {which}", file=sys.stderr, flush=True)
    accepted = 0
    done = threading.Event()

    def watch_preview() -> None:
        # The first preview.jpg: what the viewer shows as the first stacked frame.
        while not done.is_set() and proc.poll() is None:
            if next(out.rglob("preview.jpg"), None) is not None:
                result["wall_preview"] = time.monotonic() - t0
                result["cpu_preview"] = _cpu_s(proc.pid)
                result["main_preview"] = _cpu_s(proc.pid, tree=False)
                return
            time.sleep(0.05)

    threading.Thread(target=watch_preview, daemon=True).start()
    timer = threading.Timer(timeout_s, lambda: (done.set(), proc.send_signal(signal.SIGINT)))
    timer.start()
    assert proc.stderr is not None
    for line in proc.stderr:
        if ": accepted:" in line:
            accepted += 1
            if accepted in (1, 5):
                result[f"wall{accepted}"] = time.monotonic() - t0
                result[f"cpu{accepted}"] = _cpu_s(proc.pid)
            if accepted == 5:
                break
    timer.cancel()
    done.set()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    subprocess.run(["rm", "-rf", str(out)], check=False)
    return result


#: Runs in a fresh interpreter: compile events of the daemon's warm-up steps.
_KERNEL_PROBE = """
import json, time
from numba.core import event
starts, spans = {}, []
class Listener(event.Listener):
    def on_start(self, ev):
        starts[id(ev.data["dispatcher"]), str(ev.data["args"])] = time.perf_counter()
    def on_end(self, ev):
        key = (id(ev.data["dispatcher"]), str(ev.data["args"]))
        spans.append((ev.data["dispatcher"].py_func.__qualname__,
                      time.perf_counter() - starts.pop(key, time.perf_counter()), step))
event.register("numba:compile", Listener())
from livestack.config import Config
from livestack.engine.warmup import warm_up_steps
steps, step, last = [], "read", time.perf_counter()
it = warm_up_steps(Config(), with_masters=True)
while True:
    name = next(it, None)
    if name is None:
        break
    now = time.perf_counter()
    steps.append((name, now - last))
    last = now
    step = "next"
print(json.dumps({"steps": steps, "spans": spans}))
"""


def kernel_table() -> None:
    """Print the warm-up steps' and each kernel's compile seconds (empty cache)."""
    import json

    with tempfile.TemporaryDirectory(prefix="bench-kernels-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-c", _KERNEL_PROBE], env=env, check=True,
                             capture_output=True, text=True, cwd=cache).stdout
        wall = time.monotonic() - t0
    data = json.loads(out.splitlines()[-1])
    total = sum(t for _, t in data["steps"])
    print(f"\ndaemon warm-up steps from an empty cache ({wall:.1f} s with imports)")
    print(f"{'step':16} {'s':>6} {'share':>6}")
    for name, secs in data["steps"]:
        print(f"{name:16} {secs:6.1f} {secs / total:6.0%}")
    per: dict[str, list[float]] = {}
    for name, secs, _ in data["spans"]:
        per.setdefault(name, []).append(secs)
    print(f"\n{'kernel (nested compiles counted in their caller too)':56} {'n sig':>5} {'s':>6}")
    for name, times in sorted(per.items(), key=lambda kv: -sum(kv[1]))[:24]:
        print(f"{name[:56]:56} {len(times):5d} {sum(times):6.2f}")
    # numba's own overloads (np.empty, min, ...) compile per signature whatever we do.
    ours = {k: t for k, t in per.items()
            if not k.startswith(("ol_", "_ol_", "array_", "check_", "init_prange"))}
    extra = sum(sum(sorted(t)[:-1]) for t in ours.values() if len(t) > 1)
    print(f"\nseconds spent on 2nd and later signatures of a kernel: {extra:.1f} "
          f"of {total:.1f} (the most 'fewer signatures' could save)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="75f71ca", help="git revision of 'before'")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--kernels", action="store_true",
                        help="where the compile time goes, instead of the demo runs")
    args = parser.parse_args()
    if args.kernels:
        kernel_table()
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        base = Path(tmp) / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        rows = [("before", str(base), Path(tmp) / "cache-before"),
                ("after", str(REPO), Path(tmp) / "cache-after"),
                ("warm", str(REPO), Path(tmp) / "cache-after")]
        results = {}
        for name, path, cache in rows:
            cache.mkdir(exist_ok=True)
            results[name] = run_demo(path, cache, args.frames, args.timeout)
            print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    ref = results["before"]
    print(f"\ncold start of `livestack demo` (baseline {args.baseline}); seconds from launch")
    keys = ("wall1", "cpu1", "wall_preview", "cpu_preview", "main_preview", "wall5", "cpu5")
    print("cpu: the demo and its helper; main: the demo process alone")
    print(f"{'run':8} {'1st accepted':>13} {'cpu':>6} {'1st preview':>12} {'cpu':>6} {'main':>6}"
          f" {'5th accepted':>13} {'cpu':>6} {'preview ratio':>14}")
    for name, res in results.items():
        cells = [f"{res[k]:.1f}" if k in res else "-" for k in keys]
        ratio = (f"{res['wall_preview'] / ref['wall_preview']:.2f}"
                 if "wall_preview" in res and "wall_preview" in ref else "-")
        print(f"{name:8} {cells[0]:>13} {cells[1]:>6} {cells[2]:>12} {cells[3]:>6}"
              f" {cells[4]:>6} {cells[5]:>13} {cells[6]:>6} {ratio:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

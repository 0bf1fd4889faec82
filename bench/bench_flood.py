"""Descriptor flood (issue 14): frames keep being stacked while ~1010 anonymous WebSocket
clients hammer a daemon that runs under ``ulimit -n 256`` (loopback, ~1-2 min, stops by
itself).

Two runs of the real ``livestack run`` subprocess, each with its soft and hard
RLIMIT_NOFILE set to ``--nofile`` (256, like ``ulimit -n 256``):

* **baseline**: ``--frames`` simulated frames are written into the watch folder, nobody
  connects;
* **flood**: the same frames, while a client (this process, its own descriptor limit
  raised) opens ``--clients`` WebSocket connections without a token, ``--rounds`` times
  over, keeping the ones the server accepts open.

Printed per run: frames accepted / failed (the journal), wall time until the last frame's
verdict, from the journal (and its ratio to the baseline of the same invocation), viewers at the end
(``/healthz``), connections refused, bytes of log written. The flood passes when every
frame is accepted, the viewer count sits at ``server.max_viewers``, and the log stays
small (identical lines are rate-limited).

    .venv/bin/python bench/bench_flood.py [--frames 12] [--clients 1010] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from livestack.sim import SimConfig, write_sequence

MAX_VIEWERS = 50
MAX_CONNECTIONS = 150
FD_RESERVE = 64
HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             b"Sec-WebSocket-Version: 13\r\n\r\n")


def _limit(nofile: int) -> None:  # runs in the child before exec (like `ulimit -n`)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


def _counts(journal: Path) -> dict[str, int]:
    if not journal.exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)
        try:
            return dict(db.execute("SELECT status, COUNT(*) FROM frames GROUP BY status"))
        finally:
            db.close()
    except sqlite3.OperationalError:
        return {}


def _last_verdict(journal: Path) -> float:
    """Wall-clock time of the last final verdict in the journal."""
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)
    try:
        return float(db.execute("SELECT MAX(updated) FROM frames WHERE status!='pending'"
                                ).fetchone()[0] or 0.0)
    finally:
        db.close()


def _reasons(journal: Path) -> list[str]:
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)
    try:
        return [f"{r}: {m}" for r, m in db.execute(
            "SELECT reason, message FROM frames WHERE status!='accepted'")]
    finally:
        db.close()


async def _client(port: int, held: list[asyncio.StreamWriter], tally: dict[str, int]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        tally["connect_error"] += 1
        return
    try:
        writer.write(HANDSHAKE)
        status = await asyncio.wait_for(reader.readline(), 10)
    except (OSError, asyncio.TimeoutError):
        tally["no_answer"] += 1
        writer.close()
        return
    if status.startswith(b"HTTP/1.1 101"):
        tally["upgraded"] += 1
        held.append(writer)  # a viewer that never reads (it holds its descriptor)
    else:
        code = status.split()[1].decode() if len(status.split()) > 1 else "none"
        tally[f"http_{code}"] = tally.get(f"http_{code}", 0) + 1
        writer.close()


async def _flood(port: int, clients: int, rounds: int, held: list[asyncio.StreamWriter]
                 ) -> dict[str, int]:
    tally = {"upgraded": 0, "connect_error": 0, "no_answer": 0}
    for _ in range(rounds):  # bounded: rounds x clients attempts, all concurrent per round
        await asyncio.gather(*(_client(port, held, tally) for _ in range(clients)))
    return tally


def run(frames: list[Path], nofile: int, clients: int, rounds: int, flood: bool,
        timeout_s: float) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="livestack-flood-"))
    watch, out = root / "in", root / "out"
    watch.mkdir()
    cfg = root / "livestack.yaml"
    cfg.write_text(json.dumps({
        "watch": {"dir": str(watch)}, "output": {"dir": str(out)},
        "server": {"port": 0, "max_viewers": MAX_VIEWERS,
                   "max_connections": MAX_CONNECTIONS, "fd_reserve": FD_RESERVE}}))
    log_path = root / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "livestack.cli", "run", "-c", str(cfg)],
                                stdout=subprocess.PIPE, stderr=log, text=True,
                                preexec_fn=lambda: _limit(nofile))
    try:
        port = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            if "viewer" in line:
                port = int(line.rsplit(":", 1)[1].strip().rstrip("/"))
                break
        assert port, "the daemon printed no viewer URL"
        loop = asyncio.new_event_loop()
        held: list[asyncio.StreamWriter] = []
        tally: dict[str, int] = {}
        t0 = time.time()  # wall clock: compared with the journal's row timestamps
        for src in frames:  # the camera: write then rename, as capture software does
            shutil.copy2(src, watch / (src.name + ".part"))
            os.replace(watch / (src.name + ".part"), watch / src.name)
        if flood:
            tally = loop.run_until_complete(_flood(port, clients, rounds, held))
        deadline = time.monotonic() + timeout_s
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            counts = _counts(out / "journal.sqlite")
            if sum(v for k, v in counts.items() if k != "pending") >= len(frames):
                break
            time.sleep(0.2)
        wall_s = _last_verdict(out / "journal.sqlite") - t0
        if proc.poll() is not None:
            kept = Path(tempfile.gettempdir()) / "bench_flood_daemon.log"
            shutil.copy(log_path, kept)
            raise RuntimeError(f"the daemon exited with {proc.returncode}; its log: {kept}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as resp:
            viewers = json.loads(resp.read())["viewers"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            metrics = resp.read().decode()
        refused = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("livestack_connections_refused_total"))
        reasons = _reasons(out / "journal.sqlite")
        for writer in held:
            writer.close()
        loop.close()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = {"accepted": counts.get("accepted", 0), "failed": counts.get("failed", 0),
              "pending": counts.get("pending", 0), "wall_s": wall_s, "viewers": viewers,
              "refused": int(refused), "log_bytes": log_path.stat().st_size, "tally": tally,
              "exit": proc.returncode, "reasons": reasons}
    shutil.rmtree(root, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--clients", type=int, default=1010)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nofile", type=int, default=256)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 384), metavar=("W", "H"))
    parser.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the client side needs many
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    staging = Path(tempfile.mkdtemp(prefix="livestack-flood-frames-"))
    try:
        frames = write_sequence(staging, SimConfig(width=args.size[0], height=args.size[1]),
                                seed=1, n_frames=args.frames)
        results = {}
        for name, flood in (("baseline", False), ("flood", True)):
            results[name] = run(frames, args.nofile, args.clients, args.rounds, flood,
                                args.timeout_s)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    base = results["baseline"]["wall_s"]
    print(f"daemon under RLIMIT_NOFILE {args.nofile}; {args.frames} frames "
          f"{args.size[0]}x{args.size[1]}; flood: {args.rounds} x {args.clients} anonymous "
          f"WebSocket clients; max_viewers {MAX_VIEWERS}, max_connections "
          f"{MAX_CONNECTIONS}, fd_reserve {FD_RESERVE}")
    print(f"{'run':<9} {'accepted':>8} {'failed':>6} {'pending':>7} {'last s':>7} "
          f"{'ratio':>6} {'viewers':>7} {'refused':>7} {'log KB':>7} exit")
    for name, r in results.items():
        print(f"{name:<9} {r['accepted']:>8} {r['failed']:>6} {r['pending']:>7} "
              f"{r['wall_s']:>7.1f} {r['wall_s'] / base:>6.2f} {r['viewers']:>7} "
              f"{r['refused']:>7} {r['log_bytes'] / 1024:>7.1f} {r['exit']}")
    print(f"flood client outcomes: {results['flood']['tally']}")
    for name, r in results.items():
        for line in r["reasons"][:5]:  # type: ignore[index]
            print(f"{name}: not accepted: {line[:160]}")
    flood = results["flood"]
    ok = (flood["accepted"] == args.frames and flood["failed"] == 0
          and flood["viewers"] == MAX_VIEWERS and flood["log_bytes"] < 256 * 1024)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The composition root: watcher -> queue -> worker (engine) -> server.

:class:`Daemon` is the long-running service: the asyncio loop in the main thread runs the
live server, signal handling, the systemd watchdog and status; one worker thread
(:class:`~livestack.engine.worker.Worker`) runs the :class:`~livestack.engine.core.Engine`;
the watcher's callback only enqueues. What happens to a file, and the crash-safety
invariants, are in :mod:`livestack.engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from livestack import __version__, precompile
from livestack.config import is_loopback, is_within
from livestack.engine.core import Engine
from livestack.engine.worker import Worker, WorkQueue
from livestack.errors import UsageError
from livestack.runopts import ensure_folder, lan_banner
from livestack.service.events import AlertEvent
from livestack.service.guard import PathRedactor
from livestack.service.hub import Hub
from livestack.service.metrics import Metrics
from livestack.storage.atomic import atomic_write
from livestack.storage.entries import unjournaled

if TYPE_CHECKING:
    from livestack.config import Config
    from livestack.engine.checkpoints import CheckpointWriter

log = logging.getLogger("livestack.daemon")

#: File (mode 0600, in the output root) holding a generated operator token when stdout is
#: not a terminal.
TOKEN_NAME = "operator-token"
#: Queue depth / oldest waiting age that raise a lag ``alert``.
LAG_ALERT_FRAMES = 5
LAG_ALERT_AGE_S = 60.0
#: How long an operator command waits for the worker before answering "queued".
COMMAND_WAIT_S = 5.0
#: Shutdown budget: systemd's default stop timeout is longer, but the spec says 10 s.
SHUTDOWN_S = 9.0


class Daemon:
    """The long-running service (``livestack run`` / ``livestack demo``).

    Parameters
    ----------
    config : Config
    out : text stream
        Where the "where to look" lines go (stdout).
    checkpoint_writer : callable, optional
        Injected into the engine (tests).
    """

    def __init__(self, config: Config, *, out: TextIO | None = None,
                 checkpoint_writer: CheckpointWriter | None = None) -> None:
        self.config = config
        self.out = out or sys.stdout
        self.watch_dir = Path(os.path.abspath(config.watch.dir))
        self.output_root = Path(os.path.abspath(config.output.dir))
        self.hub = Hub()
        self.hub.redact = PathRedactor([self.watch_dir, self.output_root])  # issue 14
        self.metrics = Metrics()
        self.metrics.describe("livestack_oldest_pending_seconds", "gauge",
                              "Age of the oldest frame waiting for the worker.")
        self.metrics.describe("livestack_checkpoint_failures_total", "counter",
                              "Checkpoint writes that failed (disk full, ...).")
        self.queue = WorkQueue()
        self._checkpoint_writer = checkpoint_writer
        self.worker = Worker(self._make_engine, self.queue)
        self.token = config.server.token or secrets.token_urlsafe(24)
        self.port: int | None = None
        #: The folder watcher (a ``FrameWatcher``) once started.
        self.watcher: Any = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        self._lagging = False
        #: Set once :meth:`run`'s event loop is up (:meth:`request_stop` works from then on).
        self.loop_started = threading.Event()

    def _make_engine(self) -> Engine:
        engine = Engine(self.config, self.output_root, hub=self.hub, metrics=self.metrics,
                        checkpoint_writer=self._checkpoint_writer)
        engine.watch_root = self.watch_dir
        return engine

    # -- the Commands protocol of the live server (called on the event loop) ------------

    def run_command(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Validate an operator command and queue it for the worker.

        Raises
        ------
        UsageError
            Unknown command or bad arguments (the server answers with a refusal).
        """
        engine = self.worker.engine
        if engine is None:
            raise UsageError("the daemon is still starting; try again")
        checked = engine.validate_command(name, args or {})
        if name == "pause":       # effective at once, even while a frame is processed
            engine.paused = True
        future = self.queue.put_command(name, checked)
        try:
            # Called in a thread by the server: waiting here never blocks the event loop.
            return future.result(timeout=COMMAND_WAIT_S)
        except FutureTimeout:
            return {"ok": True, "command": name, "queued": True}

    def stack_file(self, stack_id: str, name: str) -> Path | None:
        """``stack.fits`` / ``preview.jpg`` of a stack, if written."""
        engine = self.worker.engine
        return engine.stack_file(stack_id, name) if engine is not None else None

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code (0 on a clean stop)."""
        return asyncio.run(self._main())

    def request_stop(self) -> None:
        """Stop as on SIGTERM (from any thread): finish the frame, checkpoint, return 0.

        Used by ``livestack demo`` and tests; a no-op before :meth:`run` has started.
        """
        loop, stop = self._loop, self._stop
        if loop is None or stop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed: nothing to stop
            loop.call_soon_threadsafe(stop.set)
        self.worker.request_stop()

    def _on_ready(self, path: Path) -> None:
        # Called from the watcher thread: enqueue only.
        self._enqueue(path)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1 and signum == signal.SIGINT:
            os.write(2, b"livestack: second interrupt, exiting now\n")
            os._exit(130)
        if self._signals == 1:
            log.info("%s received: finishing the current frame, then stopping",
                     signal.Signals(signum).name)
            assert self._stop is not None
            self._stop.set()
            self.worker.request_stop()  # also cuts a long resume short (it is resumable)

    async def _main(self) -> int:
        from livestack.service.notify import SystemdNotifier

        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._loop = loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.loop_started.set()
        notifier = SystemdNotifier()
        ensure_folder(self.watch_dir, "watch folder")  # UsageError: one line, no traceback
        ensure_folder(self.output_root, "output folder")
        self.worker.start()
        helper = precompile.start()  # first start only: kernels compile in a 2nd process
        server: Any = None
        tasks: list[asyncio.Task[None]] = []
        code = 1
        try:
            server = await self._start(notifier, tasks)
            await self._stop.wait()
            code = 0
        finally:
            # -- shutdown (also after a failed start): STOPPING, stop intake, let the
            # worker finish + checkpoint within the deadline, else abandon it (its frame
            # stays pending and is processed at the next start).
            code = await self._shutdown(notifier, server, tasks, code)
            precompile.stop(helper)
        return code

    async def _start(self, notifier: Any, tasks: list[asyncio.Task[None]]) -> Any:
        """Resume, start the watcher and the server, report READY; return the server.

        Raises
        ------
        UsageError
            The server's address cannot be bound (port in use, ...).
        """
        from livestack.service.server import LiveServer
        from livestack.service.viewerlog import summary_loop as viewer_summary_loop
        from livestack.service.watcher import FrameWatcher

        assert self._stop is not None
        # Journal open + resume; polled so a stop request is never stuck behind it.
        while not await self._wait_event(self.worker.resumed, 0.2):
            if self._stop.is_set():
                return None
        if self.worker.error is not None:
            raise self.worker.error
        watcher = FrameWatcher(self.watch_dir, self._on_ready, polling=self.config.watch.polling,
                               poll_interval_s=self.config.watch.poll_interval_s,
                               recursive=self.config.watch.recursive)
        self.watcher = watcher
        existing = watcher.start()
        engine = self.worker.engine
        if engine is not None:  # frames journaled by earlier runs are not work (nor lag)
            fresh = await asyncio.to_thread(unjournaled, engine.journal, existing)
            if len(fresh) < len(existing):
                log.info("%d file(s) in the watch folder are already in the journal; %d new",
                         len(existing) - len(fresh), len(fresh))
            existing = fresh
        for path in existing:
            self._enqueue(path)
        host, port = self.config.server.host, self.config.server.port
        sc = self.config.server
        server = LiveServer(self.hub, self, self.metrics, host=host, port=port,
                            token=self.token, max_viewers=sc.max_viewers,
                            max_connections=sc.max_connections, fd_reserve=sc.fd_reserve,
                            allowed_hosts=sc.allowed_hosts)
        try:
            self.port = await server.start()
        except OSError as exc:
            shown = f"[{host}]" if ":" in host else host
            # asyncio wraps strerror in "error while attempting to bind ..."; keep the cause.
            reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
            raise UsageError(f"cannot listen on {shown}:{port}: {reason}") from None
        self._print_banner()
        notifier.ready()
        notifier.status(self._status_text())
        self.worker.ready.set()
        tasks.append(asyncio.create_task(self._status_loop(notifier)))
        tasks.append(asyncio.create_task(self._watch_worker()))
        tasks.append(asyncio.create_task(viewer_summary_loop(server)))  # one line now and then
        watchdog_s = notifier.watchdog_interval_s()
        if watchdog_s is not None:
            tasks.append(asyncio.create_task(self._watchdog_loop(notifier, watchdog_s)))
        if self.config.watch.rescan_interval_s > 0:
            tasks.append(asyncio.create_task(self._rescan_loop(
                watcher, self.config.watch.rescan_interval_s)))
        return server

    async def _shutdown(self, notifier: Any, server: Any, tasks: list[asyncio.Task[None]],
                        code: int) -> int:
        """Stop everything within ``SHUTDOWN_S``; return the exit code."""
        deadline = time.monotonic() + SHUTDOWN_S
        notifier.stopping()
        notifier.status("stopping: saving the stacks")
        for task in tasks:
            task.cancel()
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop, 2.0)
        self.worker.request_stop()
        # Polled, never a blocking wait in a thread: asyncio.run() joins its executor
        # threads at exit, so a stuck worker would keep the process alive past the limit.
        finished = await self._wait_event(self.worker.finished,
                                          max(0.1, deadline - time.monotonic() - 0.5))
        if not finished:
            log.error("the worker did not finish in time; its frame stays pending and is "
                      "processed at the next start")
        elif self.worker.error is not None:
            code = 1
        if server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.stop(), max(0.1, deadline - time.monotonic()))
        engine = self.worker.engine
        if engine is not None and finished:
            engine.close()
        elif engine is not None:
            engine.terminate_rebuilds()  # no orphan rebuild process outlives the daemon
            engine.solving.terminate()  # nor a solve-field (maybe stopped mid-frame)
        log.info("stopped")
        return code

    @staticmethod
    async def _wait_event(event: threading.Event, timeout_s: float | None = None) -> bool:
        """Wait for a thread's ``event`` without tying up an executor thread."""
        t_end = None if timeout_s is None else time.monotonic() + timeout_s
        while not event.is_set():
            if t_end is not None and time.monotonic() >= t_end:
                return False
            await asyncio.sleep(0.05)
        return True

    def _enqueue(self, path: Path) -> None:
        """Queue a file for the worker unless it lies in the output folder (our own
        ``stack.fits`` is never a frame, whatever the watch settings)."""
        if is_within(path, self.output_root):
            log.debug("%s: in the output folder; not a frame", path)
            return
        self.queue.put_path(path)

    async def _watch_worker(self) -> None:
        """Stop the daemon if the worker thread dies (systemd restarts us)."""
        await self._wait_event(self.worker.finished)
        if self._stop is not None and not self._stop.is_set():
            self._signals += 1
            self._stop.set()

    def _print_banner(self) -> None:
        host = self.config.server.host
        shown = f"[{host}]" if ":" in host else host
        lines = [
            f"livestack {_version()} ready",
            f"  watching  {self.watch_dir}",
            f"  output    {self.output_root}",
            f"  viewer    http://{shown}:{self.port}/",
        ]
        if self.config.server.token is None and _is_tty(self.out):
            lines.append(f"  operator token (shown once): {self.token}")
        elif self.config.server.token is None:
            # Not a terminal (systemd sends stdout to the journal): the token goes to a
            # file only its owner can read, never into logs.
            path = self.output_root / TOKEN_NAME
            _write_private(path, self.token + "\n")
            lines.append(f"  operator token: in {path}")
        else:
            lines.append("  operator token: from the configuration (server.token)")
        if self.config.server.allow_lan and not is_loopback(host) and self.port is not None:
            lines += lan_banner(self.port, self.config.server.token is not None)
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()

    def _status_text(self) -> str:
        engine = self.worker.engine
        if engine is None:
            return "starting"
        depth = self.queue.depth()
        parts = []
        for rt in list(engine.runtimes.copy().values())[-3:]:  # the worker may add one
            parts.append(f"{rt.stack_id}: {rt.session.n_accepted} stacked, "
                         f"{rt.rejected} rejected")
        text = "; ".join(parts) if parts else "waiting for frames"
        if engine.paused:
            text = "paused; " + text
        text += f"; queue {depth}"
        if depth:
            text += f" (oldest {self.queue.oldest_age_s():.0f} s)"
        return text

    async def _status_loop(self, notifier: Any) -> None:
        last = ""
        while True:
            depth, age = self.queue.depth(), self.queue.oldest_age_s()
            self.metrics.set_gauge("livestack_queue_depth", depth)
            self.metrics.set_gauge("livestack_oldest_pending_seconds", age)
            lagging = depth >= LAG_ALERT_FRAMES or age >= LAG_ALERT_AGE_S
            if lagging and not self._lagging:
                msg = (f"falling behind: {depth} frames waiting, oldest for {age:.0f} s "
                       "(none is dropped)")
                log.warning("%s", msg)
                self.hub.publish(AlertEvent("warning", "lag", msg))
            elif self._lagging and depth == 0:
                self.hub.publish(AlertEvent("info", "lag_cleared", "caught up: no frame waiting"))
            self._lagging = lagging if lagging else (self._lagging and depth > 0)
            status = self._status_text()
            if status != last:
                notifier.status(status)
                last = status
            await asyncio.sleep(1.0)

    async def _watchdog_loop(self, notifier: Any, interval_s: float) -> None:
        limit_s = interval_s * 2
        while True:
            await asyncio.sleep(interval_s)
            # Ping only while the worker shows signs of life (idle beats every 0.5 s; a
            # frame or a checkpoint may take longer, but never the whole watchdog period)
            # and the watcher still runs (watchdog's observer thread dies if a handler
            # raises; without it no new frame would ever be seen). systemd then restarts us.
            if not self.worker.alive(limit_s):
                log.error("worker heartbeat is %.0f s old; not pinging the watchdog",
                          time.monotonic() - self.worker.heartbeat)
            elif self.watcher is not None and not self.watcher.is_alive():
                log.error("the folder watcher has stopped; not pinging the watchdog")
            else:
                notifier.watchdog()

    async def _rescan_loop(self, watcher: Any, interval_s: float) -> None:
        """List the watch folder every ``interval_s`` (frames whose events were lost)."""
        while True:
            await asyncio.sleep(interval_s)
            watcher.rescan()  # only enqueues: the listing happens in the watcher thread


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (atomically, via a temp file).

    Raises
    ------
    StorageError
        The file cannot be written.
    """
    with atomic_write(path, mode=0o600) as (fd, _tmp), \
            os.fdopen(fd, "w", closefd=False) as fh:
        fh.write(text)


def _version() -> str:
    return __version__

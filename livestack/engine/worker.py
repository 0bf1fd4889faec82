"""The worker thread and its queue: files and operator commands, one at a time.

The watcher and the server only enqueue (:class:`WorkQueue`); :class:`Worker` owns the
engine: it resumes, then serves commands before files, advances rebuilds and runs the
idle cadence and the JIT warm-up when no file waits. A bug hit by one frame or command is
recorded and logged; the night goes on.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livestack.engine.warmup import warm_up_steps
from livestack.errors import DescriptorsExhaustedError, JournalError, LivestackError
from livestack.resilience import retry_transient
from livestack.service.limits import is_fd_exhaustion

if TYPE_CHECKING:
    from livestack.engine.core import Engine

log = logging.getLogger("livestack.engine")

#: Longest JIT warm-up / single frame the watchdog tolerates before it stops pinging.
WARM_UP_LIMIT_S = 900.0
FRAME_LIMIT_S = 300.0


class WorkQueue:
    """Thread-safe FIFO of file paths plus a priority lane of commands.

    Remembers when each path was enqueued, for the lag report.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._paths: collections.deque[tuple[Path, float]] = collections.deque()
        self._commands: collections.deque[tuple[str, dict[str, Any], Future[dict[str, Any]]]]
        self._commands = collections.deque()

    def put_path(self, path: Path) -> None:
        """Enqueue a file (from any thread; never blocks)."""
        with self._cond:
            self._paths.append((path, time.monotonic()))
            self._cond.notify()

    def put_command(self, name: str, args: dict[str, Any]) -> Future[dict[str, Any]]:
        """Enqueue a command (served before files); its result arrives in the future."""
        future: Future[dict[str, Any]] = Future()
        with self._cond:
            self._commands.append((name, args, future))
            self._cond.notify()
        return future

    def wake(self) -> None:
        """Wake a waiting :meth:`get`."""
        with self._cond:
            self._cond.notify_all()

    def get(self, timeout_s: float, *, paths: bool = True
            ) -> tuple[str, Any] | None:
        """Next ``("command", (name, args, future))`` or ``("path", Path)``; None on timeout."""
        with self._cond:
            deadline = time.monotonic() + timeout_s
            while True:
                if self._commands:
                    return "command", self._commands.popleft()
                if paths and self._paths:
                    return "path", self._paths.popleft()[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def depth(self) -> int:
        """Files waiting."""
        with self._cond:
            return len(self._paths)

    def oldest_age_s(self) -> float:
        """Seconds the oldest waiting file has waited (0 when none)."""
        with self._cond:
            return time.monotonic() - self._paths[0][1] if self._paths else 0.0


class Worker(threading.Thread):
    """The one thread that runs the engine: resume, then files and commands."""

    def __init__(self, engine_factory: Callable[[], Engine], queue: WorkQueue,
                 on_started: Callable[[Engine], None] | None = None) -> None:
        super().__init__(name="livestack-worker", daemon=True)
        self._factory = engine_factory
        self.queue = queue
        self.engine: Engine | None = None
        self._on_started = on_started
        self.stop_requested = threading.Event()
        self.heartbeat = time.monotonic()
        self.busy_since: float | None = None
        #: Deadline of a known long step (JIT warm-up) during which the worker counts as alive.
        self.long_step_until = 0.0
        self.error: BaseException | None = None
        #: Run the JIT warm-up steps between frames (tests of the worker may turn it off).
        self.warm_up = True
        self.resumed = threading.Event()
        self.ready = threading.Event()   # set by the daemon after READY
        self.finished = threading.Event()

    def alive(self, limit_s: float) -> bool:
        """True when the worker beat within ``limit_s``, or is in a step known to be long
        (JIT warm-up), or has been on one frame for less than ``FRAME_LIMIT_S``."""
        now = time.monotonic()
        if now - self.heartbeat < limit_s or now < self.long_step_until:
            return True
        busy = self.busy_since
        return busy is not None and now - busy < FRAME_LIMIT_S

    def _beat(self) -> None:
        self.heartbeat = time.monotonic()

    def request_stop(self) -> None:
        """Finish the current frame, then checkpoint and end."""
        self.stop_requested.set()
        self.queue.wake()

    def _warm_up_step(self, steps: Iterator[str]) -> Iterator[str] | None:
        """Run one warm-up step; return None when the warm-up is over."""
        # A first start compiles the kernels: seconds each here, minutes on a Raspberry Pi.
        self.long_step_until = time.monotonic() + WARM_UP_LIMIT_S
        t0 = time.perf_counter()
        try:
            name = next(steps, None)
        except OSError as exc:
            if not is_fd_exhaustion(exc):
                raise
            # Kernels import modules while compiling; without a descriptor the warm-up
            # stops here and the first frames compile what they need instead.
            log.warning("warm-up stopped: %s", exc.strerror)
            return None
        finally:
            self.long_step_until = 0.0
        if name is None:
            return None
        log.debug("warm-up step %r: %.0f ms", name, (time.perf_counter() - t0) * 1e3)
        return steps

    def run(self) -> None:
        try:
            self.engine = engine = self._factory()
            if self._on_started is not None:
                self._on_started(engine)
            for path in engine.resume(self.stop_requested.is_set):
                self.queue.put_path(Path(path))
            self.resumed.set()
            # Warm the JIT only once the daemon has reported READY (it competes for CPU),
            # one step at a time while no frame waits (see warm_up_steps).
            while not (self.ready.wait(0.5) or self.stop_requested.is_set()):
                self.heartbeat = time.monotonic()
            rebuild_moving = False
            warm_up: Iterator[str] | None = warm_up_steps(
                engine.config, with_masters=engine.masters is not None) if self.warm_up else None
            while not self.stop_requested.is_set():
                self.heartbeat = time.monotonic()
                # No idle tick while a rebuild catches up or warm-up steps remain.
                item = self.queue.get(0.0 if warm_up is not None or rebuild_moving else 0.5,
                                      paths=not engine.paused)
                if item is None:
                    if self._rebuild_step(engine):
                        rebuild_moving = True
                        continue
                    rebuild_moving = False
                    try:
                        engine.idle()
                    except OSError as exc:  # a preview or checkpoint without a descriptor
                        if not is_fd_exhaustion(exc):
                            raise
                        log.warning("idle work deferred: %s", exc.strerror)
                    if warm_up is not None:
                        warm_up = self._warm_up_step(warm_up)
                    continue
                kind, payload = item
                self.busy_since = time.monotonic()
                if kind == "command":
                    name, args, future = payload
                    try:
                        future.set_result(engine.execute_command(name, args))
                    except LivestackError as exc:
                        future.set_exception(exc)
                    except Exception as exc:
                        # A bug in a command: the caller gets the error, the night goes on.
                        log.exception("command %s failed: %s", name, exc)
                        future.set_exception(exc)
                else:
                    self._process(engine, payload)
                    if engine.rebuilds:
                        self._rebuild_step(engine)
                self.busy_since = None
            engine.finalize()
        except BaseException as exc:  # recorded and logged; the daemon then exits with 1
            self.error = exc
            log.critical("worker stopped: %s", exc, exc_info=not isinstance(exc, LivestackError))
        finally:
            self.resumed.set()
            self.finished.set()

    @staticmethod
    def _rebuild_step(engine: Engine) -> bool:
        """One rebuild step; a rebuild that breaks is given up, the live stack goes on."""
        try:
            return engine.rebuild_step()
        except JournalError:
            raise
        except LivestackError as exc:  # e.g. a retry that cannot write its request
            engine.abandon_rebuilds(str(exc))
            return True
        except Exception as exc:
            # A bug in a rebuild must not end an unattended night: traceback in the log,
            # the old stack keeps going.
            log.exception("rebuild step failed: %s", exc)
            engine.abandon_rebuilds(f"internal error: {exc}")
            return True

    def _process(self, engine: Engine, path: Path) -> None:
        def step() -> None:
            try:
                engine.process_path(path)
            except OSError as exc:  # any descriptor shortage the engine did not name
                if not is_fd_exhaustion(exc):
                    raise
                raise DescriptorsExhaustedError(f"{path}: {exc.strerror}") from None

        try:
            retry_transient(step, stop=self.stop_requested, alert=engine.alert,
                            beat=self._beat)
        except LivestackError:
            raise
        except Exception as exc:
            # A bug hit by one frame must not end an unattended night: record the frame
            # with the full traceback in the log and keep stacking the next ones.
            # The row made by mark_pending gets the final status: a new row would leave it
            # pending and the file would be retried (and crash again) at every start.
            log.exception("%s: internal_error: %s", path, exc)
            spath = os.path.abspath(path)
            try:
                engine.fail_open_row(spath, f"{spath}: {type(exc).__name__}: {exc}")
            except LivestackError as jexc:
                log.error("%s: cannot record the internal error: %s", spath, jexc)


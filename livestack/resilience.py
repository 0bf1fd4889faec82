"""Riding out temporary shortages: no file descriptor free, no disk space for the journal.

Neither says anything about the frame being processed, so neither may become its final
verdict. The worker calls :func:`retry_transient` with the frame's whole processing step:
intake pauses (the queue keeps every path), an ``alert`` tells the viewers why, the step
is retried with exponential backoff, and when it succeeds a second alert says intake has
resumed. A stop request ends the wait; the frame then has no row or a ``pending`` one, and
the next start processes it again.

The engine guarantees the step can be repeated: a transient error strikes either before
the frame touched the stack, or (the journal write after accumulation) after the engine
rolled its in-memory stack back to the journal (:meth:`Engine.forget_runtime`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from livestack.errors import TransientError

__all__ = ["retry_transient"]

_log = logging.getLogger("livestack.engine")

#: First wait and longest wait between attempts, in seconds.
FIRST_DELAY_S = 0.25
MAX_DELAY_S = 30.0


def retry_transient(step: Callable[[], object], *, stop: threading.Event,
                    alert: Callable[[str, str, str], None],
                    beat: Callable[[], None] = lambda: None,
                    first_delay_s: float = FIRST_DELAY_S,
                    max_delay_s: float = MAX_DELAY_S) -> bool:
    """Run ``step`` until it does not raise :class:`TransientError`.

    Parameters
    ----------
    step : callable
        The repeatable work (processing one frame).
    stop : threading.Event
        Set when the daemon stops: the wait ends and False is returned.
    alert : callable
        ``alert(level, code, message)``: called once when the shortage starts and once
        when it is over.
    beat : callable
        Called before every wait (the worker's heartbeat: a long shortage must not look
        like a hung worker to the systemd watchdog).
    first_delay_s, max_delay_s : float
        Backoff: the wait doubles from the first to the longest.

    Returns
    -------
    bool
        True once ``step`` has run without a transient error; False if stopped first.

    Raises
    ------
    LivestackError
        Any non-transient error of ``step`` (unchanged).
    """
    delay = first_delay_s
    first: TransientError | None = None
    attempts = 0
    while True:
        try:
            step()
        except TransientError as exc:
            attempts += 1
            if first is None:
                first = exc
                alert("error", exc.code, f"intake paused: {exc}; retrying until it clears "
                                         "(no frame is dropped)")
            beat()
            if stop.wait(delay):
                _log.info("stopping while %s; the frame is processed at the next start",
                          exc.code.replace("_", " "))
                return False
            delay = min(delay * 2, max_delay_s)
            continue
        if first is not None:
            alert("info", f"{first.code}_cleared",
                  f"intake resumed after {attempts} retr{'y' if attempts == 1 else 'ies'}")
        return True

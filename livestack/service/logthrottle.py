"""A logging filter that rate-limits repeated log lines.

A descriptor flood made asyncio log one traceback per failed ``accept()``: 188 MB of log
in 70 s. :class:`RepeatFilter` lets through the first ``burst`` records of one kind (same
logger, level, formatted message and exception type) per ``window_s`` seconds and drops
the rest; the first record of that kind let through after the window says how many were
dropped. The kind includes the formatted message, so one frame's line never hides
another frame's: only identical lines are rate-limited.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["RepeatFilter"]

_Key = tuple[str, int, str, str]


class RepeatFilter(logging.Filter):
    """Rate-limit records of the same kind.

    Parameters
    ----------
    burst : int
        Records of one kind let through per window.
    window_s : float
        Window length in seconds.
    max_kinds : int
        Kinds remembered (least recently seen forgotten first), bounding memory.
    clock : callable
        Monotonic clock in seconds (tests inject one).
    """

    def __init__(self, burst: int = 10, window_s: float = 60.0, *, max_kinds: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if burst < 1 or not window_s > 0:
            raise ValueError("burst must be >= 1 and window_s > 0")
        self.burst = burst
        self.window_s = window_s
        self.max_kinds = max_kinds
        self._clock = clock
        # kind -> [window start, records in window, records dropped since last shown]
        self._kinds: OrderedDict[_Key, list[float]] = OrderedDict()
        #: Records dropped so far (all kinds).
        self.dropped_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, record.levelno, record.getMessage(), exc)
        now = self._clock()
        state = self._kinds.get(key)
        if state is None:
            state = self._kinds[key] = [now, 0.0, 0.0]
            if len(self._kinds) > self.max_kinds:
                self._kinds.popitem(last=False)
        else:
            self._kinds.move_to_end(key)
        if now - state[0] >= self.window_s:
            state[0], state[1] = now, 0.0
        state[1] += 1
        if state[1] > self.burst:
            state[2] += 1
            self.dropped_total += 1
            return False
        if state[2]:
            record.msg = f"{record.getMessage()} [{int(state[2])} identical line(s) suppressed]"
            record.args = None
            state[2] = 0.0
        return True

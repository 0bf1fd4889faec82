"""A one-line summary of the live view's audience now and then, instead of a log line per
HTTP request or WebSocket connection (those are DEBUG records).

:class:`ViewerTally` is the pure part (fed the viewer count with a clock reading);
:func:`summary_loop` samples a server's count on the event loop and logs its lines.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger("livestack.service.viewers")

#: Seconds between summaries (only when someone watched during the period).
SUMMARY_INTERVAL_S = 600.0
#: Seconds between samples of the viewer count.
SAMPLE_INTERVAL_S = 1.0


class _CountsViewers(Protocol):
    @property
    def viewer_count(self) -> int: ...


class ViewerTally:
    """Peak and arrivals of viewers over a period; a summary line at the period's end.

    Parameters
    ----------
    interval_s : float
        Length of a period in seconds.
    start_s : float
        Clock reading (monotonic seconds) at which the first period starts.
    """

    def __init__(self, interval_s: float = SUMMARY_INTERVAL_S, start_s: float = 0.0) -> None:
        self.interval_s = interval_s
        self._period_start = start_s
        self._last = 0
        self._peak = 0
        self._arrivals = 0

    def observe(self, now_s: float, count: int) -> str | None:
        """Record the viewer count at ``now_s``; return a summary when a period ends.

        Returns
        -------
        str or None
            ``"viewers: 2 now, peak 3, 4 connected in the last 10 min"``, or None when the
            period has not ended or nobody watched during it.
        """
        if count > self._last:
            self._arrivals += count - self._last
        self._last = count
        self._peak = max(self._peak, count)
        if now_s - self._period_start < self.interval_s:
            return None
        watched = self._peak > 0
        line = (f"viewers: {count} now, peak {self._peak}, {self._arrivals} connected in the "
                f"last {_span(now_s - self._period_start)}")
        self._period_start = now_s
        self._peak = count
        self._arrivals = 0
        return line if watched else None


def _span(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


async def summary_loop(server: _CountsViewers, interval_s: float = SUMMARY_INTERVAL_S,
                       sample_s: float = SAMPLE_INTERVAL_S) -> None:
    """Log :class:`ViewerTally`'s lines at INFO until cancelled."""
    loop = asyncio.get_running_loop()
    tally = ViewerTally(interval_s, loop.time())
    while True:
        await asyncio.sleep(sample_s)
        line = tally.observe(loop.time(), server.viewer_count)
        if line is not None:
            log.info("%s", line)

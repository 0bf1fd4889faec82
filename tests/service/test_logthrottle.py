"""Issue 14, point 1: identical log lines are rate-limited (188 MB of accept() tracebacks
in 70 s before); different lines, such as one per frame, never hide each other."""

from __future__ import annotations

import io
import logging

from livestack.service.logthrottle import RepeatFilter


def _logger(flt: RepeatFilter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(flt)
    logger = logging.getLogger(f"test.logthrottle.{id(flt)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_a_flood_of_identical_tracebacks_stays_small() -> None:
    now = [0.0]
    flt = RepeatFilter(burst=5, window_s=60.0, clock=lambda: now[0])
    logger, stream = _logger(flt)
    for _ in range(100_000):
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            logger.error("socket.accept() out of system resource", exc_info=True)
    assert stream.getvalue().count("out of system resource") == 5
    assert flt.dropped_total == 100_000 - 5
    assert len(stream.getvalue()) < 5_000
    now[0] = 61.0  # the next window: one line that says how many were dropped
    try:
        raise OSError(24, "Too many open files")
    except OSError:
        logger.error("socket.accept() out of system resource", exc_info=True)
    assert "[99995 identical line(s) suppressed]" in stream.getvalue()


def test_different_lines_are_never_suppressed() -> None:
    flt = RepeatFilter(burst=2, window_s=60.0, clock=lambda: 0.0)
    logger, stream = _logger(flt)
    for i in range(50):
        logger.warning("%s: fwhm_jump: FWHM jumped", f"/frames/light_{i:03d}.fits")
    assert stream.getvalue().count("fwhm_jump") == 50 and flt.dropped_total == 0

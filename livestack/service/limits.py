"""File-descriptor budget: connection caps with a reserve for frames, journal, checkpoints.

About 1010 WebSocket clients used to exhaust the 1024 descriptors systemd gives a service
by default; frames arriving meanwhile failed with ``EMFILE``. The server now caps its
connections at ``min(server.max_connections, soft RLIMIT_NOFILE - descriptors open at start
- server.fd_reserve)``, so the worker always finds descriptors for the frame it reads, the
journal and a checkpoint; and a frame that still meets ``EMFILE``/``ENFILE`` is retried
(:func:`is_fd_exhaustion`), never recorded as failed.
"""

from __future__ import annotations

import errno
import logging
import os

__all__ = ["connection_cap", "is_fd_exhaustion", "nofile_limits", "open_fd_count"]

_log = logging.getLogger(__name__)

#: Listen backlog of the live server, which is also how many connections asyncio accepts
#: in one go (its default, 100, let one burst overrun the cap by 100 descriptors).
ACCEPT_BACKLOG = 16

#: Errors that mean "no descriptor right now" (this process / the whole system).
FD_EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


def is_fd_exhaustion(exc: BaseException) -> bool:
    """True when ``exc`` is an OSError for a full descriptor table (a transient state)."""
    return isinstance(exc, OSError) and exc.errno in FD_EXHAUSTION_ERRNOS


def nofile_limits() -> tuple[int, int]:
    """The soft and hard RLIMIT_NOFILE (``(1024, 1024)`` where it cannot be read)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 1024, 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return int(soft), int(hard)


def open_fd_count() -> int:
    """Descriptors this process has open now (0 when ``/proc/self/fd`` is unavailable)."""
    try:
        return max(0, len(os.listdir("/proc/self/fd")) - 1)  # minus listdir's own
    except OSError:
        return 0


def connection_cap(max_connections: int, fd_reserve: int) -> int:
    """The number of client connections the server may hold open at once.

    Parameters
    ----------
    max_connections : int
        Configured cap (``server.max_connections``).
    fd_reserve : int
        Descriptors kept free for frames, the journal, checkpoints and rebuilds
        (``server.fd_reserve``).

    Returns
    -------
    int
        ``min(max_connections, soft limit - open now - fd_reserve - 2 * ACCEPT_BACKLOG)``,
        at least 1.
    """
    soft, _hard = nofile_limits()
    # asyncio accepts up to ACCEPT_BACKLOG sockets per loop iteration before the first of
    # them is refused and closed: they need descriptors beyond the cap.
    budget = soft - open_fd_count() - fd_reserve - 2 * ACCEPT_BACKLOG
    return max(1, min(max_connections, budget))

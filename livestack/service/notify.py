"""Tell systemd how the service is doing (sd_notify protocol), with no dependency.

systemd passes ``NOTIFY_SOCKET`` (an ``AF_UNIX`` datagram socket path, or an abstract name
starting with ``@``) to services with ``Type=notify``, and ``WATCHDOG_USEC`` (plus
``WATCHDOG_PID``) when ``WatchdogSec=`` is set. Each message is one datagram of
newline-separated ``KEY=value`` lines. Outside systemd nothing is sent and every method is a
cheap no-op, so the daemon calls them unconditionally.

Typical use in the daemon::

    notifier = SystemdNotifier()
    ...                              # open journal, start watcher and server
    notifier.ready()
    interval = notifier.watchdog_interval_s()   # ping from the event loop while healthy
    notifier.status("M_42-L-60s: 37 frames, 3 rejected")
    notifier.stopping()
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Send sd_notify messages to the socket named by ``NOTIFY_SOCKET``.

    Parameters
    ----------
    environ : mapping, optional
        Environment to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from;
        defaults to ``os.environ``.

    Attributes
    ----------
    enabled : bool
        True when a usable ``NOTIFY_SOCKET`` is set (``vsock:`` addresses are not supported
        and leave the notifier disabled).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.enabled: bool = self._address is not None
        self._watchdog_usec = _watchdog_usec(env)
        self._sock: socket.socket | None = None
        self._warned = False
        #: The last status line, while systemd has not received it: the daemon sends a status
        #: only when it changes, so a dropped datagram (a full socket queue) would otherwise
        #: leave ``systemctl status`` stale until the next change.
        self._pending_status: str | None = None

    def ready(self) -> None:
        """Report that start-up finished (``READY=1``): systemd marks the unit active."""
        self._send("READY=1")

    def stopping(self) -> None:
        """Report that a clean shutdown started (``STOPPING=1``)."""
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """Set the one-line status shown by ``systemctl status`` (``STATUS=...``).

        Newlines in ``text`` are replaced by spaces (they would start a new field).
        """
        line = "STATUS=" + " ".join(text.splitlines())
        self._pending_status = None if self._send(line) else line

    def watchdog(self) -> None:
        """Ping the service watchdog (``WATCHDOG=1``); call it more often than WatchdogSec.

        A status line that could not be delivered travels with the ping.
        """
        if self._pending_status is None:
            self._send("WATCHDOG=1")
        elif self._send("WATCHDOG=1\n" + self._pending_status):
            self._pending_status = None

    def watchdog_interval_s(self) -> float | None:
        """Recommended ping period in seconds: half of ``WATCHDOG_USEC``.

        Returns
        -------
        float or None
            None when no watchdog is configured for this process.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2e6

    def close(self) -> None:
        """Close the datagram socket (idempotent; a later message reopens it)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: str) -> bool:
        """Send one datagram; True when it was handed to the socket."""
        if self._address is None:
            return True
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never block the event loop on a notify socket nobody drains: a full queue
                # raises BlockingIOError (an OSError) and the message is dropped.
                self._sock.setblocking(False)
            self._sock.sendto(message.encode("utf-8"), self._address)
            return True
        except OSError as exc:        # systemd gone or socket removed: never crash the daemon
            if not self._warned:
                log.warning("cannot notify systemd at %r: %s", self._address, exc)
                self._warned = True
            self.close()
            return False


def _socket_address(value: str) -> str | bytes | None:
    """Translate ``NOTIFY_SOCKET`` into a ``sendto`` address, or None if unusable."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8")   # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None        # "vsock:CID:PORT" and relative paths are not supported


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """``WATCHDOG_USEC`` as int when it is meant for this process, else None."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None                     # the watchdog belongs to another process
    return usec

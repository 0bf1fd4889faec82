"""Who may talk to the live server, and what anonymous viewers may see.

Three rules the server applies before serving anything:

* **Host check** (DNS rebinding): a request is served only when its ``Host`` header names
  this server: an IP literal (a rebinding attack needs a DNS name), ``localhost``, this
  machine's host name (with or without ``.local``) or a name listed in
  ``server.allowed_hosts``. Anything else gets ``421 Misdirected Request``.
* **Origin check** (cross-site WebSocket and command requests): a browser sends
  ``Origin`` with every WebSocket upgrade and ``POST``; it must name the same host and
  port the request was sent to (``Host``), or a host listed in ``server.allowed_hosts``.
  Non-browser clients send no ``Origin`` and are not affected (commands still need the
  operator token).
* **No absolute server paths** reach viewers: :class:`PathRedactor` rewrites paths under
  the watch and output folders to paths relative to them, and any other absolute path in
  a ``file``/``reference``/``path`` field to its base name. Operator commands accept these
  names (``exclude_frame``/``set_reference`` match a frame by base name).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

__all__ = ["HostPolicy", "PathRedactor", "split_host"]

#: Fields whose value is a file path.
_PATH_KEYS = frozenset({"file", "reference", "path"})


def split_host(value: str) -> tuple[str, str]:
    """Split a ``Host`` header (``name[:port]``, ``[v6][:port]``) into lower-case host and port.

    Parameters
    ----------
    value : str

    Returns
    -------
    tuple of str
        ``(host, port)``; the port is ``""`` when absent. The host of a malformed value is
        ``""`` (never allowed).
    """
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return "", ""
        host, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            return "", ""
        return host, rest[1:]
    host, _, port = value.partition(":")
    if port and not port.isdigit():
        return "", ""
    return host, port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostPolicy:
    """The Host and Origin rules of the module docstring.

    Parameters
    ----------
    allowed_hosts : iterable of str
        Extra host names (``server.allowed_hosts``), e.g. a reverse proxy's public name.
    """

    def __init__(self, allowed_hosts: Iterable[str] = ()) -> None:
        names = {"localhost"}
        hostname = socket.gethostname().lower()  # no DNS query: the kernel's name
        if hostname:
            names.update({hostname, f"{hostname}.local"})
        names.update(h.strip().lower() for h in allowed_hosts if h.strip())
        self._names = frozenset(names)
        self._extra = frozenset(h.strip().lower() for h in allowed_hosts if h.strip())

    def host_allowed(self, host_header: str | None) -> bool:
        """True when ``Host`` names this server (see the module docstring)."""
        if not host_header:
            return False
        host, _port = split_host(host_header)
        if not host:
            return False
        return _is_ip(host) or host in self._names

    def origin_allowed(self, origin: str | None, host_header: str | None) -> bool:
        """True when ``Origin`` is absent (not a browser) or names the requested host.

        ``Origin: null`` (sandboxed frames, ``file:`` pages) is refused.
        """
        if origin is None:
            return True
        try:
            parts = urlsplit(origin.strip())
            origin_host = (parts.hostname or "").lower()
            origin_port = parts.port
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not origin_host:
            return False
        if origin_host in self._extra:
            return True
        if not host_header:
            return False
        host, port = split_host(host_header)
        default = 443 if parts.scheme == "https" else 80
        return origin_host == host and (origin_port or default) == (int(port) if port
                                                                      else default)


    def screen(self, method: str, path: str, host: str | None, origin: str | None, *,
               viewers: int, max_viewers: int) -> tuple[HTTPStatus, str, str] | None:
        """Refuse a request before it is routed.

        Returns
        -------
        tuple or None
            ``(status, message, metric reason)``, or None to serve the request.
        """
        if not self.host_allowed(host):
            return HTTPStatus.MISDIRECTED_REQUEST, "unknown Host (see server.allowed_hosts)", \
                "host"
        is_ws = path == "/ws"
        if (is_ws or method == "POST") and not self.origin_allowed(origin, host):
            return HTTPStatus.FORBIDDEN, "cross-origin request refused", "origin"
        if is_ws and viewers >= max_viewers:
            return HTTPStatus.SERVICE_UNAVAILABLE, "too many viewers", "viewers"
        return None


class PathRedactor:
    """Rewrite absolute paths in hub records so viewers never see server paths.

    Parameters
    ----------
    roots : iterable of str or PathLike
        Folders (watch, output) whose paths become relative to them.
    """

    def __init__(self, roots: Iterable[str | os.PathLike[str]]) -> None:
        clean = {os.path.abspath(r).rstrip(os.sep) for r in roots}
        # Longest first: a root inside another one wins.
        self._roots = sorted((r for r in clean if r), key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(r + os.sep) for r in self._roots)
                                   ) if self._roots else None

    def path(self, value: str) -> str:
        """A path as a viewer may see it (relative to a root, else its base name)."""
        if not os.path.isabs(value):
            return value
        for root in self._roots:
            if value.startswith(root + os.sep):
                return value[len(root) + 1:]
        return os.path.basename(value)

    def text(self, value: str) -> str:
        """A sentence with every root prefix removed."""
        return self._pattern.sub("", value) if self._pattern is not None else value

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Return a copy of ``record`` (JSON-able) with paths redacted, recursively."""
        return {k: self._value(k, v) for k, v in record.items()}

    def _value(self, key: str, value: Any) -> Any:
        if isinstance(value, str):
            return self.path(value) if key in _PATH_KEYS else self.text(value)
        if isinstance(value, Mapping):
            return self(value)
        if isinstance(value, list):
            return [self._value(key, v) for v in value]
        return value

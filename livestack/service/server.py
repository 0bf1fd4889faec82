"""Live server: the viewer page, a small JSON API and the ``/ws`` event stream on one port.

Built on ``websockets.asyncio.server.serve``. Plain ``GET`` requests are answered
from ``process_request``; the WebSocket handshake continues only for ``/ws``.
websockets' handshake parser refuses request bodies and answers with an
in-memory body under the open timeout, so the two requests it cannot serve are
answered by :class:`_LiveConnection` before websockets sees them:
``POST /api/command/{name}`` (JSON body) and ``GET /api/stacks/{id}/stack.fits``
(streamed with ``loop.sendfile``, hundreds of MB at 26 MP).

HTTP routes
-----------
``GET /``                                 viewer page (``?mode=outreach`` for outreach mode)
``GET /static/<name>``                    files of ``livestack/service/static`` only
``GET /api/stacks``                       ``{"seq": n, "stacks": [summary, ...]}``
``GET /api/stacks/{id}``                  ``{"stack": summary, "frames": [frame, ...]}``
``GET /api/stacks/{id}/preview.jpg``      latest preview JPEG (``X-Preview-Version`` header)
``GET /api/stacks/{id}/stack.fits``       the stack FITS file, streamed; 404 if none yet
``GET /healthz``                          ``{"status": "ok", ...}``
``GET /metrics``                          Prometheus text format 0.0.4
``POST /api/command/{name}``              ``Authorization: Bearer <token>``, JSON object body
                                          (the command's args; empty body = ``{}``)

Stack ids contain a ``/`` (``"2026-01-15/M_42-L-60s"``). Send them URL-encoded as
one path segment (``/api/stacks/2026-01-15%2FM_42-L-60s/preview.jpg``, i.e.
``encodeURIComponent(id)``); the unencoded form also works.

WebSocket ``/ws``
-----------------
Every text message is ``{"v": 1, "type": ..., "data": ...}``. The server sends
``hello`` (data: :meth:`Hub.snapshot` plus ``"commands"`` and ``"run_id"``, a random
id of this server run: preview versions restart when it changes), then ``frame``,
``stack`` and ``alert`` events in publish order (each with ``seq``; their keys are
defined in :mod:`livestack.service.events`), ``gap``
(``{"dropped": n}``: the viewer was too slow and lost the ``n`` oldest events;
refetch ``/api/stacks``) and ``command_result``
(``{"v":1,"type":"command_result","id":..,"ok":true,"data":{..}}`` or
``{..,"ok":false,"error":"operator token required"}``).

Binary messages carry previews: a 4-byte big-endian length ``L``, ``L`` bytes
of UTF-8 JSON ``{"stack_id", "version", "mime"}``, then the JPEG. A preview
follows the ``stack`` event announcing its version; each viewer has a
latest-only preview slot, so a slow viewer skips old previews.

Clients send ``{"v":1,"type":"command","id":..,"name":"pause","args":{},"token":"..."}``.
Messages over 64 KiB close the connection with 1009, binary or malformed JSON
with 1003, an unknown ``type`` or a bad envelope with 1008; other viewers are
not affected.

Operator commands (``pause``, ``resume``, ``reset``, ``new_stack``,
``set_reference``, ``exclude_frame``, ``snapshot``) require the operator token
(compared with :func:`hmac.compare_digest`; an empty token disables commands)
and run in a thread via ``asyncio.to_thread``. The token is never logged:
websockets' debug logging (which dumps headers and frames) is switched off for
this server.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hmac
import json
import logging
import os
import re
import secrets
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from typing import IO, Any
from urllib.parse import unquote

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from livestack.errors import LivestackError, UsageError
from livestack.service.guard import HostPolicy
from livestack.service.hub import COMMANDS, Commands, Hub, envelope, to_jsonable
from livestack.service.limits import ACCEPT_BACKLOG, connection_cap
from livestack.service.metrics import Metrics

_log = logging.getLogger(__name__)

__all__ = ["COMMANDS", "Commands", "LiveServer"]


#: Largest WebSocket message accepted from a client, in bytes (bigger -> close 1009).
MAX_MESSAGE_BYTES = 64 * 1024
#: JSON events buffered per viewer before the oldest are dropped.
MAX_EVENTS_PER_VIEWER = 256
#: Command replies a client may leave unread before it is disconnected (1008).
MAX_UNREAD_REPLIES = 16
#: Largest HTTP request head / command body read by the pre-router, in bytes.
MAX_HTTP_HEAD_BYTES = 16 * 1024
MAX_HTTP_BODY_BYTES = 64 * 1024
#: Largest preview file read from disk when the hub has none.
MAX_PREVIEW_FILE_BYTES = 64 * 1024 * 1024

_TOKEN_REQUIRED = "operator token required"
_TOKEN_INVALID = "invalid operator token"
_COMMANDS_DISABLED = "operator commands are disabled (no token configured)"

_STATIC_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; connect-src 'self' ws: wss:; "
    "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'"
)


# -- small HTTP helpers ------------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    """An HTTP response with an in-memory body."""

    status: HTTPStatus
    body: bytes
    content_type: str = "application/json; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def _json_reply(status: HTTPStatus, payload: Any, *extra: tuple[str, str]) -> _Reply:
    body = json.dumps(to_jsonable(payload), separators=(",", ":"), allow_nan=False).encode()
    return _Reply(status, body, headers=(("Cache-Control", "no-store"), *extra))


def _error_reply(status: HTTPStatus, message: str, *extra: tuple[str, str]) -> _Reply:
    return _json_reply(status, {"ok": False, "error": message}, *extra)


def _base_headers(reply: _Reply) -> list[tuple[str, str]]:
    headers = [
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Server", "livestack"),
        ("Connection", "close"),
        ("Content-Type", reply.content_type),
        ("Content-Length", str(len(reply.body))),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
    ]
    headers.extend(reply.headers)
    return headers


def _serialize_head(status: HTTPStatus, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _valid_stack_id(stack_id: str) -> bool:
    """Accept ``night/slug`` style ids; refuse traversal, control characters, backslashes."""
    if not 0 < len(stack_id) <= 256 or "\\" in stack_id:
        return False
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in stack_id):
        return False
    return all(part not in ("", ".", "..") for part in stack_id.split("/"))


def _split_stack_path(path: str) -> tuple[str, str] | None:
    """Split ``/api/stacks/<id>[/<leaf>]`` into ``(stack_id, leaf)``; None if invalid.

    ``path`` is the raw (percent-encoded) path without the query. Segments are
    decoded one by one, so ``%2F`` inside a segment stays part of the id.
    """
    prefix = "/api/stacks/"
    if not path.startswith(prefix):
        return None
    segments = [unquote(s, errors="strict") for s in path[len(prefix) :].split("/")]
    leaf = ""
    if len(segments) >= 2 and segments[-1] in ("preview.jpg", "stack.fits"):
        leaf = segments.pop()
    stack_id = "/".join(segments)
    return (stack_id, leaf) if _valid_stack_id(stack_id) else None


def _safe_split_stack_path(path: str) -> tuple[str, str] | None:
    try:
        return _split_stack_path(path)
    except UnicodeDecodeError:
        return None


@dataclass
class _Head:
    """The parts of an HTTP request head the pre-router needs."""

    method: str
    target: str
    headers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def _parse_head(raw: bytes) -> _Head | None:
    """Parse a request line and headers (``raw`` excludes the blank line); None if invalid."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0") or not parts[1].startswith("/"):
        return None
    head = _Head(parts[0], parts[1])
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        head.headers.setdefault(name.lower(), []).append(value.strip())
    return head


def _bearer_token(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


class _NoDebugLogger(logging.LoggerAdapter):
    """Logger adapter for websockets that never enables DEBUG.

    websockets logs raw request headers and frame contents at DEBUG level, which
    would include the operator token. With DEBUG reported as disabled, websockets
    never formats those records.
    """

    def isEnabledFor(self, level: int) -> bool:
        return level > logging.DEBUG and self.logger.isEnabledFor(level)

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        # websockets' INFO lines (each connection opened/closed, each plain HTTP answer
        # "connection rejected (200 OK)") are DEBUG here; viewerlog summarises them.
        if level == logging.INFO:
            if self.logger.isEnabledFor(logging.DEBUG):
                self.logger.log(logging.DEBUG, msg, *args, **kwargs)
            return
        super().log(level, msg, *args, **kwargs)


# -- per-viewer sink + sender ------------------------------------------------------------


class _Viewer:
    """One WebSocket viewer: bounded event queue, latest-only previews, one sender task.

    All methods run on the event loop thread. The hub calls :meth:`on_event` and
    :meth:`on_preview` without awaiting anything; only the sender task awaits the
    socket, so a slow viewer only slows itself.
    """

    def __init__(
        self, ws: ServerConnection, hub: Hub, metrics: Metrics, *, max_events: int
    ) -> None:
        self._ws = ws
        self._hub = hub
        self._metrics = metrics
        self._events: deque[str] = deque()
        self._replies: deque[str] = deque()
        self._max_events = max_events
        self._announced: dict[str, int] = {}
        self._sent: dict[str, int] = {}
        self._dropped = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, hello: str, previews: Mapping[str, int]) -> None:
        """Queue ``hello`` and the current previews, then start the sender task."""
        self._replies.append(hello)  # first out, and never dropped like events can be
        self._announced.update(previews)
        self._wake.set()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Cancel the sender task and wait for it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def on_event(self, text: str, announce: tuple[str, int] | None) -> None:
        if len(self._events) >= self._max_events:
            self._events.popleft()
            self._dropped += 1
            self._metrics.inc("livestack_ws_events_dropped_total")
        self._events.append(text)
        if announce is not None:
            stack_id, version = announce
            if version > self._announced.get(stack_id, -1):
                self._announced[stack_id] = version
        self._wake.set()

    def on_preview(self, stack_id: str, version: int) -> None:
        if self._announced.get(stack_id, -1) > self._sent.get(stack_id, -1):
            self._wake.set()

    @property
    def unread_replies(self) -> int:
        """Command replies queued but not yet written to the socket."""
        return len(self._replies)

    def reply(self, text: str) -> None:
        """Queue a command reply (never dropped; one per client request)."""
        self._replies.append(text)
        self._wake.set()

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while (message := self._next_message()) is not None:
                    await self._ws.send(message)
        except ConnectionClosed:
            return

    def _next_message(self) -> str | bytes | None:
        if self._replies:
            return self._replies.popleft()
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            return envelope("gap", {"dropped": dropped})
        if self._events:
            return self._events.popleft()
        # Previews go last: their announcing `stack` event has been sent already.
        for stack_id, announced in self._announced.items():
            sent = self._sent.get(stack_id, -1)
            if announced <= sent:
                continue
            preview = self._hub.latest_preview(stack_id)
            # A stored preview newer than the announcement waits for its own `stack` event.
            if preview is None or not sent < preview.version <= announced:
                continue
            self._sent[stack_id] = preview.version
            self._metrics.inc("livestack_ws_previews_sent_total")
            return preview.message
        return None


# -- the connection pre-router -----------------------------------------------------------


class _LiveConnection(ServerConnection):
    """ServerConnection that reads the request head before websockets does.

    Requests websockets can serve (``GET``: static files, API, ``/ws``) are handed
    to its handshake unchanged. ``POST`` requests (a body, and commands that may
    run longer than the open timeout) and ``stack.fits`` downloads (streamed) are
    answered here by :meth:`LiveServer._serve_custom`.

    ``live_server`` is set on a per-server subclass created by :meth:`LiveServer.start`.
    """

    live_server: LiveServer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Skip ServerConnection.connection_made on purpose: it starts websockets'
        # handshake task at once, and that task aborts the socket after the open
        # timeout. It is started in _hand_to_websockets() instead.
        Connection.connection_made(self, transport)
        self._route = "pending"  # -> "websockets" | "body" | "custom"
        self._prelude = bytearray()
        self._head: _Head | None = None
        self._body_needed = 0
        self._deadline: asyncio.TimerHandle | None = self.loop.call_later(
            self.live_server.open_timeout_s, self._on_deadline
        )
        self.live_server._pending.add(self)
        self.live_server._connections += 1
        if self.live_server._connections > self.live_server.connection_cap:
            # Over the cap (descriptors are kept for frames): answer at once, read nothing.
            self.live_server._refused("connections")
            self._reply_and_close(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections",
                                  ("Retry-After", "10"))

    def data_received(self, data: bytes) -> None:
        if self._route == "websockets":
            super().data_received(data)
            return
        if self._route == "custom":
            return  # the request is complete; ignore pipelined bytes
        self._prelude += data
        if self._route == "body":
            self._maybe_dispatch()
            return
        end = self._prelude.find(b"\r\n\r\n")
        if end < 0:
            if len(self._prelude) > MAX_HTTP_HEAD_BYTES:
                self._reply_and_close(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "head too large")
            return
        head = _parse_head(bytes(self._prelude[:end]))
        refusal = self.live_server._screen(head)
        if refusal is not None:
            self._reply_and_close(*refusal)
            return
        assert head is not None  # _screen refuses a malformed head
        if not self.live_server._is_custom_route(head):
            self._hand_to_websockets()
            return
        if head.header("transfer-encoding") is not None:
            self._reply_and_close(HTTPStatus.NOT_IMPLEMENTED, "transfer codings are not supported")
            return
        lengths = set(head.headers.get("content-length", ["0"]))
        length_text = lengths.pop() if len(lengths) == 1 else ""
        if not length_text.isdigit():
            self._reply_and_close(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
            return
        if int(length_text) > MAX_HTTP_BODY_BYTES:
            self._reply_and_close(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
            return
        del self._prelude[: end + 4]
        self._head = head
        self._body_needed = int(length_text)
        self._route = "body"
        self._maybe_dispatch()

    # asyncio.Protocol allows bool | None; websockets narrowed it to None.
    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self._route == "websockets":
            return super().eof_received()
        # Keep the socket open for the answer of a complete custom request
        # (a client may half-close after its body); otherwise let it close.
        return True if self._route == "custom" else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self.live_server._pending.discard(self)
        self.live_server._connections -= 1
        super().connection_lost(exc)

    def _maybe_dispatch(self) -> None:
        if len(self._prelude) < self._body_needed:
            return
        assert self._head is not None
        body = bytes(self._prelude[: self._body_needed])
        self._prelude.clear()
        self._route = "custom"
        self._cancel_deadline()
        self.live_server._pending.discard(self)
        self.live_server._spawn_custom(self, self._head, body)

    def _hand_to_websockets(self) -> None:
        self._route = "websockets"
        self._cancel_deadline()
        self.live_server._pending.discard(self)
        # What ServerConnection.connection_made would have done, now that we know.
        handler_task = self.loop.create_task(self.server.handler(self))
        self.server.handler_tasks.add(handler_task)
        data, self._prelude = bytes(self._prelude), bytearray()
        super().data_received(data)

    def _reply_and_close(self, status: HTTPStatus, message: str,
                         *extra: tuple[str, str]) -> None:
        self._route = "custom"
        self._cancel_deadline()
        self.live_server._pending.discard(self)
        reply = _error_reply(status, message, *extra)
        self.transport.write(_serialize_head(status, _base_headers(reply)) + reply.body)
        self.transport.close()

    def _on_deadline(self) -> None:
        self._deadline = None
        if self._route in ("pending", "body"):
            self.live_server._pending.discard(self)
            self.transport.abort()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


# -- the server --------------------------------------------------------------------------


class LiveServer:
    """HTTP + WebSocket live server on one port.

    Parameters
    ----------
    hub : Hub
        Event and state bridge fed by the worker thread.
    commands : Commands
        Operator actions and stack files (the daemon).
    metrics : Metrics
        Registry rendered at ``/metrics``; the server adds viewer/delivery metrics.
    host : str
        Bind address; the default serves this machine only.
    port : int
        TCP port; 0 picks a free one (see :meth:`start`).
    token : str
        Operator token for commands; empty disables commands.
    ping_interval_s, ping_timeout_s : float
        WebSocket keepalive: a viewer that does not answer a ping within the
        timeout is disconnected.
    open_timeout_s, close_timeout_s : float
        Limits for the opening handshake (and reading an HTTP request) and the
        closing handshake.
    max_message_bytes : int
        Largest incoming WebSocket message.
    max_events_per_viewer : int
        Events buffered per viewer before the oldest are dropped.
    max_viewers, max_connections, fd_reserve : int
        Viewer and connection caps (more get ``503``); :meth:`start` lowers the connection
        cap so ``fd_reserve`` descriptors stay free (:mod:`livestack.service.limits`).
    allowed_hosts : tuple of str
        Extra names for the Host/Origin checks (:class:`~livestack.service.guard.HostPolicy`).
    """

    def __init__(
        self,
        hub: Hub,
        commands: Commands,
        metrics: Metrics,
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        token: str,
        ping_interval_s: float = 20.0,
        ping_timeout_s: float = 20.0,
        open_timeout_s: float = 10.0,
        close_timeout_s: float = 5.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_events_per_viewer: int = MAX_EVENTS_PER_VIEWER,
        max_viewers: int = 100,
        max_connections: int = 256,
        fd_reserve: int = 64,
        allowed_hosts: tuple[str, ...] = (),
    ) -> None:
        self._hub = hub
        self._commands = commands
        self._metrics = metrics
        self._host = host
        self._port = port
        self._token = token.encode("utf-8")
        self._ping_interval_s = ping_interval_s
        self._ping_timeout_s = ping_timeout_s
        self.open_timeout_s = open_timeout_s
        self._close_timeout_s = close_timeout_s
        self._max_message_bytes = max_message_bytes
        self._max_events = max_events_per_viewer
        self._server: Server | None = None
        self._static: dict[str, tuple[bytes, str]] = {}
        self._viewers: set[_Viewer] = set()
        self._pending: set[_LiveConnection] = set()
        self._custom: set[_LiveConnection] = set()
        self._custom_tasks: set[asyncio.Task[None]] = set()
        self._max_viewers = max_viewers
        self._max_connections = max_connections
        self._fd_reserve = fd_reserve
        self._policy = HostPolicy(allowed_hosts)
        self._connections = 0
        #: Connections held open at once (set by :meth:`start` from the descriptor budget).
        self.connection_cap = max_connections
        #: Random id of this server run, sent in ``hello``: preview versions restart at 1
        #: when the daemon restarts, so a reconnecting viewer must forget the ones it saw.
        self.run_id = secrets.token_hex(8)

    @property
    def viewer_count(self) -> int:
        """Number of connected WebSocket viewers."""
        return len(self._viewers)

    async def start(self) -> int:
        """Bind and start serving.

        Returns
        -------
        int
            The bound TCP port (the ephemeral one when ``port`` was 0).

        Raises
        ------
        OSError
            If the address cannot be bound.
        RuntimeError
            If the server is already started.
        """
        if self._server is not None:
            raise RuntimeError("LiveServer already started")
        self._static = _load_static()
        self.connection_cap = connection_cap(self._max_connections, self._fd_reserve)
        if self.connection_cap < self._max_connections:
            _log.warning("serving at most %d connections (not %d): the rest of the descriptor "
                         "limit is kept for frames (raise LimitNOFILE to serve more)",
                         self.connection_cap, self._max_connections)
        connection_class = type("_BoundLiveConnection", (_LiveConnection,), {"live_server": self})
        self._server = await serve(
            self._handle_ws,
            self._host,
            self._port,
            process_request=self._process_request,
            create_connection=connection_class,
            compression=None,  # JPEGs do not deflate; per-viewer compression costs CPU
            server_header=None,  # our responses carry their own Server header
            open_timeout=self.open_timeout_s,
            ping_interval=self._ping_interval_s,
            ping_timeout=self._ping_timeout_s,
            close_timeout=self._close_timeout_s,
            max_size=self._max_message_bytes,
            max_queue=16,
            write_limit=64 * 1024,
            logger=_NoDebugLogger(logging.getLogger("livestack.service.websockets"), {}),
            backlog=ACCEPT_BACKLOG,  # bounds asyncio's accept burst (see limits.py)
        )
        self._hub.attach(asyncio.get_running_loop())
        self._metrics.set_gauge("livestack_viewers", 0)
        port = int(self._server.sockets[0].getsockname()[1])
        _log.info("live server listening on http://%s:%d/", self._host, port)
        return port

    async def stop(self) -> None:
        """Close every connection and stop listening. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        self._hub.detach()
        server.close(close_connections=True)
        for conn in list(self._pending) + list(self._custom):
            conn.transport.abort()
        for task in list(self._custom_tasks):
            task.cancel()
        if self._custom_tasks:
            await asyncio.wait(list(self._custom_tasks))
        await server.wait_closed()

    # -- WebSocket -------------------------------------------------------------------

    async def _handle_ws(self, ws: ServerConnection) -> None:
        if len(self._viewers) >= self._max_viewers:  # upgrades that raced past _screen
            self._refused("viewers")
            await ws.close(CloseCode.TRY_AGAIN_LATER, "too many viewers")
            return
        viewer = _Viewer(ws, self._hub, self._metrics, max_events=self._max_events)
        self._viewers.add(viewer)
        self._metrics.set_gauge("livestack_viewers", len(self._viewers))
        # No await between subscribe and start: no event can slip in before hello.
        self._hub.subscribe(viewer)
        snapshot, previews = self._hub.snapshot_and_previews()
        hello = dict(snapshot)
        hello["commands"] = list(COMMANDS)
        hello["run_id"] = self.run_id
        viewer.start(envelope("hello", hello), previews)
        try:
            async for message in ws:
                if not await self._handle_ws_message(ws, viewer, message):
                    break
        except ConnectionClosed:
            pass  # oversized messages end here too (websockets closes with 1009)
        finally:
            self._hub.unsubscribe(viewer)
            self._viewers.discard(viewer)
            self._metrics.set_gauge("livestack_viewers", len(self._viewers))
            await viewer.stop()

    async def _handle_ws_message(
        self, ws: ServerConnection, viewer: _Viewer, message: str | bytes
    ) -> bool:
        """Handle one client message; return False after closing the connection."""
        if isinstance(message, bytes):
            await ws.close(CloseCode.UNSUPPORTED_DATA, "binary messages are not accepted")
            return False
        try:
            obj = json.loads(message)
        except (ValueError, RecursionError) as exc:
            # Malformed, 30,000-deep nesting or a 5,000-digit integer: one line, no traceback.
            _log.info("viewer sent unusable JSON (%s); closed with 1003",
                      type(exc).__name__)
            await ws.close(CloseCode.UNSUPPORTED_DATA, "malformed JSON")
            return False
        if not isinstance(obj, dict) or obj.get("v") != 1:
            await ws.close(CloseCode.POLICY_VIOLATION, 'expected a JSON object with "v": 1')
            return False
        kind = obj.get("type")
        if kind != "command":
            await ws.close(CloseCode.POLICY_VIOLATION, f"unknown message type {str(kind)[:40]!r}")
            return False
        if viewer.unread_replies >= MAX_UNREAD_REPLIES:
            await ws.close(CloseCode.POLICY_VIOLATION, "too many unread command replies")
            return False
        request_id = obj.get("id")
        if request_id is not None and not isinstance(request_id, (str, int)):
            request_id = None
        name, args, token = obj.get("name"), obj.get("args", {}), obj.get("token")
        ok, payload, _status = await self._run_command(
            name if isinstance(name, str) else "",
            args,
            token if isinstance(token, str) else None,
        )
        if ok:
            viewer.reply(envelope("command_result", payload, id=request_id, ok=True))
        else:
            viewer.reply(envelope("command_result", None, id=request_id, ok=False, error=payload))
        return True

    # -- commands --------------------------------------------------------------------

    def _check_token(self, token: str | None) -> tuple[HTTPStatus, str] | None:
        """Return ``(status, error)`` when the token does not grant commands, else None."""
        if not self._token:
            return HTTPStatus.FORBIDDEN, _COMMANDS_DISABLED
        if not isinstance(token, str) or token == "":
            return HTTPStatus.UNAUTHORIZED, _TOKEN_REQUIRED
        # compare_digest on bytes; only ASCII tokens can encode (a lone surrogate cannot).
        if not token.isascii() or not hmac.compare_digest(token.encode("ascii"), self._token):
            return HTTPStatus.FORBIDDEN, _TOKEN_INVALID
        return None

    async def _run_command(
        self, name: str, args: Any, token: str | None
    ) -> tuple[bool, Any, HTTPStatus]:
        """Authorise and run one command.

        Returns ``(True, result, 200)`` or ``(False, error message, status)``.
        """
        refusal = self._check_token(token)
        if refusal is not None:
            self._metrics.inc("livestack_commands_total", {"name": "-", "result": "refused"})
            return False, refusal[1], refusal[0]
        if name not in COMMANDS:
            self._metrics.inc("livestack_commands_total", {"name": "-", "result": "unknown"})
            return False, f"unknown command {name[:40]!r}", HTTPStatus.NOT_FOUND
        if not isinstance(args, dict):
            return False, "args must be a JSON object", HTTPStatus.BAD_REQUEST
        try:
            result = await asyncio.to_thread(self._commands.run_command, name, args)
        except UsageError as exc:
            self._metrics.inc("livestack_commands_total", {"name": name, "result": "usage_error"})
            return False, str(exc), HTTPStatus.BAD_REQUEST
        except LivestackError as exc:
            self._metrics.inc("livestack_commands_total", {"name": name, "result": "error"})
            _log.warning("command %s failed: %s", name, exc)
            return False, str(exc), HTTPStatus.INTERNAL_SERVER_ERROR
        self._metrics.inc("livestack_commands_total", {"name": name, "result": "ok"})
        _log.info("operator command %s done", name)
        return True, to_jsonable(result if result is not None else {}), HTTPStatus.OK

    # -- HTTP via websockets' process_request ------------------------------------------

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = request.path.partition("?")[0]
        if path == "/ws" and request.method == "GET":
            return None  # continue the WebSocket handshake (426 if it is not an upgrade)
        if request.method != "GET":
            reply = _error_reply(
                HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed", ("Allow", "GET")
            )
        else:
            reply = await self._route_get(path)
        _log.debug("HTTP %s %s -> %d", request.method, path[:200], reply.status.value)
        return Response(
            reply.status.value, reply.status.phrase, Headers(_base_headers(reply)), reply.body
        )

    async def _route_get(self, path: str) -> _Reply:
        if path in ("/", "/index.html"):
            return self._static_reply("index.html")
        if path.startswith("/static/"):
            name = path[len("/static/") :]
            if "/" in name:
                return _error_reply(HTTPStatus.NOT_FOUND, "not found")
            try:
                return self._static_reply(unquote(name, errors="strict"))
            except UnicodeDecodeError:
                return _error_reply(HTTPStatus.NOT_FOUND, "not found")
        if path == "/healthz":
            stacks = len(self._hub.snapshot()["stacks"])
            return _json_reply(
                HTTPStatus.OK, {"status": "ok", "viewers": len(self._viewers), "stacks": stacks}
            )
        if path == "/metrics":
            self._metrics.set_gauge("livestack_viewers", len(self._viewers))
            body = self._metrics.render().encode()
            return _Reply(
                HTTPStatus.OK, body, "text/plain; version=0.0.4; charset=utf-8",
                (("Cache-Control", "no-store"),),
            )
        if path in ("/api/stacks", "/api/stacks/"):
            return _json_reply(HTTPStatus.OK, self._hub.snapshot())
        parts = _safe_split_stack_path(path)
        if parts is None:
            return _error_reply(HTTPStatus.NOT_FOUND, "not found")
        stack_id, leaf = parts
        if leaf == "preview.jpg":
            return await self._preview_reply(stack_id)
        if leaf:  # stack.fits is streamed by the pre-router; nothing else exists
            return _error_reply(HTTPStatus.NOT_FOUND, "not found")
        summary = self._hub.stack(stack_id)
        if summary is None:
            return _error_reply(HTTPStatus.NOT_FOUND, "unknown stack")
        return _json_reply(HTTPStatus.OK, {"stack": summary, "frames": self._hub.frames(stack_id)})

    def _static_reply(self, name: str) -> _Reply:
        entry = self._static.get(name)
        if entry is None:
            return _error_reply(HTTPStatus.NOT_FOUND, "not found")
        body, content_type = entry
        headers: tuple[tuple[str, str], ...] = (("Cache-Control", "no-cache"),)
        if content_type.startswith("text/html"):
            headers = (*headers, ("Content-Security-Policy", _CSP))
        return _Reply(HTTPStatus.OK, body, content_type, headers)

    async def _preview_reply(self, stack_id: str) -> _Reply:
        preview = self._hub.latest_preview(stack_id)
        if preview is not None:
            return _Reply(
                HTTPStatus.OK, preview.jpeg, "image/jpeg",
                (("Cache-Control", "no-store"), ("X-Preview-Version", str(preview.version))),
            )
        data = await asyncio.to_thread(self._read_stack_file, stack_id, "preview.jpg")
        if data is None:
            return _error_reply(HTTPStatus.NOT_FOUND, "no preview yet")
        return _Reply(HTTPStatus.OK, data, "image/jpeg", (("Cache-Control", "no-store"),))

    def _read_stack_file(self, stack_id: str, name: str) -> bytes | None:
        # Runs in a thread: the daemon's lookup may take a lock, and the read touches disk.
        path = self._commands.stack_file(stack_id, name)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size > MAX_PREVIEW_FILE_BYTES:
                    return None
                return f.read()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            return None

    # -- requests answered by the pre-router ---------------------------------------------

    def _screen(self, head: _Head | None) -> tuple[HTTPStatus, str] | None:
        """Refuse a request before routing: ``(status, message)``, or None to serve it."""
        refusal = (HTTPStatus.BAD_REQUEST, "malformed HTTP request", "malformed") \
            if head is None else self._policy.screen(
                head.method, head.path, head.header("host"), head.header("origin"),
                viewers=len(self._viewers), max_viewers=self._max_viewers)
        if refusal is None:
            return None
        self._refused(refusal[2])
        return refusal[0], refusal[1]

    def _refused(self, reason: str) -> None:
        self._metrics.inc("livestack_connections_refused_total", {"reason": reason})

    def _is_custom_route(self, head: _Head) -> bool:
        if head.method == "POST":
            return True
        if head.method != "GET":
            return False
        parts = _safe_split_stack_path(head.path)
        return parts is not None and parts[1] == "stack.fits"

    def _spawn_custom(self, conn: _LiveConnection, head: _Head, body: bytes) -> None:
        self._custom.add(conn)
        task = asyncio.get_running_loop().create_task(self._serve_custom(conn, head, body))
        self._custom_tasks.add(task)
        task.add_done_callback(self._custom_done)

    def _custom_done(self, task: asyncio.Task[None]) -> None:
        self._custom_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("HTTP request handler failed", exc_info=task.exception())

    async def _serve_custom(self, conn: _LiveConnection, head: _Head, body: bytes) -> None:
        transport = conn.transport
        status = HTTPStatus.INTERNAL_SERVER_ERROR
        try:
            if head.method == "POST":
                reply = await self._command_reply(head, body)
                status = reply.status
                transport.write(_serialize_head(reply.status, _base_headers(reply)) + reply.body)
            else:
                status = await self._stream_stack_fits(conn, head)
        finally:
            self._custom.discard(conn)
            transport.close()
            _log.debug("HTTP %s %s -> %d", head.method, head.path[:200], status.value)

    async def _command_reply(self, head: _Head, body: bytes) -> _Reply:
        prefix = "/api/command/"
        if not head.path.startswith(prefix):
            return _error_reply(HTTPStatus.NOT_FOUND, "not found")
        token = _bearer_token(head.header("authorization"))
        refusal = self._check_token(token)
        if refusal is not None:  # refuse before looking at the body
            status, message = refusal
            extra = (("WWW-Authenticate", 'Bearer realm="livestack"'),)
            self._metrics.inc("livestack_commands_total", {"name": "-", "result": "refused"})
            return _error_reply(status, message, *extra)
        try:
            name = unquote(head.path[len(prefix) :], errors="strict")
            args = json.loads(body) if body.strip() else {}
        except (ValueError, RecursionError):  # also too deep / too many digits
            return _error_reply(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        ok, payload, status = await self._run_command(name, args, token)
        if ok:
            return _json_reply(status, {"ok": True, "data": payload})
        return _error_reply(status, payload)

    async def _stream_stack_fits(self, conn: _LiveConnection, head: _Head) -> HTTPStatus:
        parts = _safe_split_stack_path(head.path)
        assert parts is not None  # _is_custom_route checked it
        opened = await asyncio.to_thread(self._open_stack_file, parts[0], "stack.fits")
        transport = conn.transport
        if opened is None:
            reply = _error_reply(HTTPStatus.NOT_FOUND, "no stack file yet")
            transport.write(_serialize_head(reply.status, _base_headers(reply)) + reply.body)
            return reply.status
        f, size = opened
        with f:
            filename = parts[0].replace("/", "_") + ".fits"
            headers = [
                ("Date", email.utils.formatdate(usegmt=True)),
                ("Server", "livestack"),
                ("Connection", "close"),
                ("Content-Type", "application/fits"),
                ("Content-Length", str(size)),
                ("Content-Disposition", f'attachment; filename="{filename}"'),
                ("Cache-Control", "no-store"),
                ("X-Content-Type-Options", "nosniff"),
            ]
            transport.write(_serialize_head(HTTPStatus.OK, headers))
            if transport.is_closing():
                return HTTPStatus.OK
            try:
                # Zero-copy where the OS allows; waits for the socket, never buffers the file.
                await asyncio.get_running_loop().sendfile(transport, f, 0, size)
            except (ConnectionError, OSError) as exc:
                _log.info("stack.fits download of %s ended early: %s", parts[0], exc)
                transport.abort()
        return HTTPStatus.OK

    def _open_stack_file(self, stack_id: str, name: str) -> tuple[IO[bytes], int] | None:
        # Runs in a thread (daemon lookup + open + stat).
        path = self._commands.stack_file(stack_id, name)
        if path is None:
            return None
        try:
            f = open(path, "rb")  # closed by the caller after streaming
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            return None
        size = os.fstat(f.fileno()).st_size
        return f, size


def _load_static() -> dict[str, tuple[bytes, str]]:
    """Read the viewer's static files once: ``{name: (bytes, content type)}``.

    Only regular files directly in ``livestack/service/static`` with a known
    extension are served; nothing else on disk is reachable.
    """
    files: dict[str, tuple[bytes, str]] = {}
    root = resources.files("livestack.service").joinpath("static")
    for entry in root.iterdir():
        name = entry.name
        content_type = _CONTENT_TYPES.get(os.path.splitext(name)[1].lower())
        if content_type is None or not _STATIC_NAME_RE.match(name) or not entry.is_file():
            continue
        files[name] = (entry.read_bytes(), content_type)
    return files

"""Thread-safe bridge between the worker thread and the live server's event loop.

The daemon's worker thread calls :meth:`Hub.publish`, :meth:`Hub.publish_preview`,
:meth:`Hub.update_stack` and :meth:`Hub.record_frame`; none of them blocks on a
viewer or touches a socket. The hub keeps a small state store (stack summaries,
the last frames of every stack, the latest preview of every stack) and forwards
events to the asyncio loop with ``loop.call_soon_threadsafe``, where the
server's per-viewer sinks pick them up.

Events (``publish(event)``)
---------------------------
The events and their keys are defined once, in :mod:`livestack.service.events`
(``frame``, ``stack`` with a :class:`~livestack.service.events.StackSummary`, ``alert``).
An event's keys become the ``data`` of the wire envelope ``{"v": 1, "type": ...,
"seq": n, "data": {...}}`` (``seq`` increases by one per published event). A plain dict
with a ``"type"`` key is accepted too (tests, tools). Summaries (``update_stack``) are
merged over the previous ones; unknown keys are kept and passed through.

Preview ordering contract
-------------------------
Call ``publish_preview(stack_id, v, jpeg)`` and publish a ``stack`` event with
``preview_version = v`` (either order). A viewer receives the binary preview
after the ``stack`` event that announces it, and only the newest preview: an
older version that a slow viewer never got is skipped.

Values are sanitised once, when they enter the hub: numpy scalars become Python
numbers, non-finite floats become ``None`` (browsers reject ``NaN`` in JSON),
datetimes become ISO strings, paths become strings and dataclasses become dicts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import struct
import threading
from collections import deque
from collections.abc import Callable, Mapping
from datetime import date, datetime
from pathlib import Path, PurePath
from typing import Any, Protocol

from livestack.service.events import (
    EVENT_TYPES,
    Event,
    FrameEvent,
    StackSummary,
    event_to_dict,
)

#: Version of the wire envelope ``{"v": 1, ...}``.
PROTOCOL_VERSION = 1


#: Length prefix of a binary preview message: 4-byte big-endian header length.
_PREVIEW_PREFIX = struct.Struct(">I")


def to_jsonable(value: Any, *, where: str = "value") -> Any:
    """Return a copy of ``value`` made only of JSON types.

    Parameters
    ----------
    value : Any
        Nested dicts, lists, tuples, strings, numbers, ``None``, booleans, numpy
        scalars, datetimes, paths or dataclass instances.
    where : str
        Key path used in the error message.

    Returns
    -------
    Any
        The same structure with numpy scalars as Python numbers, non-finite
        floats as ``None``, datetimes as ISO 8601 strings, paths as strings and
        dataclasses as dicts.

    Raises
    ------
    TypeError
        If a value of another type is found (a programming error in the caller).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, where=f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, deque)):
        return [to_jsonable(v, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return to_jsonable(fields, where=where)
    item = getattr(value, "item", None)  # numpy scalar (np.float32, np.int64, np.bool_)
    if callable(item) and getattr(value, "shape", None) == ():
        return to_jsonable(item(), where=where)
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serialisable")


def envelope(kind: str, data: Any, **extra: Any) -> str:
    """Serialise one wire message ``{"v": 1, "type": kind, ..., "data": data}``.

    Parameters
    ----------
    kind : str
        Message type, e.g. ``"hello"``, ``"frame"``, ``"command_result"``.
    data : Any
        JSON-able payload (already sanitised by :func:`to_jsonable`).
    **extra : Any
        Extra top-level keys (``seq``, ``id``, ``ok``, ``error``).

    Returns
    -------
    str
        Compact JSON text.
    """
    message: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": kind}
    message.update(extra)
    message["data"] = data
    return json.dumps(message, separators=(",", ":"), allow_nan=False)


def encode_preview_message(stack_id: str, version: int, jpeg: bytes) -> bytes:
    """Build the binary WebSocket message that carries one preview.

    Layout: 4-byte big-endian unsigned length ``L``, then ``L`` bytes of UTF-8
    JSON ``{"stack_id": str, "version": int, "mime": "image/jpeg"}``, then the
    JPEG bytes to the end of the message.

    Parameters
    ----------
    stack_id : str
        Stack the preview belongs to.
    version : int
        Preview version (increases per stack).
    jpeg : bytes
        JPEG file content.

    Returns
    -------
    bytes
        The message, built once and shared by every viewer.
    """
    header = json.dumps(
        {"stack_id": stack_id, "version": version, "mime": "image/jpeg"},
        separators=(",", ":"),
    ).encode()
    return _PREVIEW_PREFIX.pack(len(header)) + header + jpeg


def decode_preview_message(message: bytes) -> tuple[dict[str, Any], bytes]:
    """Split a binary preview message into its JSON header and JPEG bytes.

    Parameters
    ----------
    message : bytes
        A message built by :func:`encode_preview_message`.

    Returns
    -------
    header : dict
        ``{"stack_id", "version", "mime"}``.
    jpeg : bytes
        The JPEG file content.

    Raises
    ------
    ValueError
        If the message is shorter than its declared header.
    """
    if len(message) < _PREVIEW_PREFIX.size:
        raise ValueError("preview message shorter than its length prefix")
    (length,) = _PREVIEW_PREFIX.unpack_from(message)
    end = _PREVIEW_PREFIX.size + length
    if len(message) < end:
        raise ValueError("preview message shorter than its declared header")
    header = json.loads(message[_PREVIEW_PREFIX.size : end])
    return header, bytes(message[end:])


@dataclasses.dataclass(frozen=True)
class Preview:
    """The latest preview of one stack.

    Attributes
    ----------
    stack_id : str
        Stack identifier.
    version : int
        Preview version.
    jpeg : bytes
        JPEG file content.
    message : bytes
        Ready-to-send binary WebSocket message (see :func:`encode_preview_message`).
    """

    stack_id: str
    version: int
    jpeg: bytes
    message: bytes


class HubSink(Protocol):
    """A consumer of hub events; its methods run in the event loop thread only."""

    def on_event(self, text: str, announce: tuple[str, int] | None) -> None:
        """Take one serialised event; ``announce`` is ``(stack_id, preview_version)``."""

    def on_preview(self, stack_id: str, version: int) -> None:
        """Learn that a new preview of ``stack_id`` is stored in the hub."""


#: Operator commands forwarded to :meth:`Commands.run_command` (the one list: the server
#: refuses others, the daemon implements these).
COMMANDS: tuple[str, ...] = (
    "pause", "resume", "reset", "new_stack", "set_reference", "exclude_frame", "snapshot",
)


class Commands(Protocol):
    """Operator actions and stack files, implemented by the daemon.

    The live server calls both methods from a worker thread (``asyncio.to_thread``),
    so they may block briefly (take a lock, wait for the current frame).
    """

    def run_command(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run one operator command and return a JSON-able result.

        ``name`` is one of ``pause``, ``resume``, ``reset``, ``new_stack``,
        ``set_reference``, ``exclude_frame``, ``snapshot``. The viewer page sends
        ``args = {"stack_id": <selected stack>}`` and, for ``exclude_frame`` and
        ``set_reference``, ``"file": <frame path as in the frame events>``.

        Raises
        ------
        livestack.errors.UsageError
            For bad or missing arguments; the message is shown to the operator.
        """
        ...

    def stack_file(self, stack_id: str, name: str) -> Path | None:
        """Return the path of ``"stack.fits"`` or ``"preview.jpg"`` of a stack, or None."""
        ...


class Hub:
    """Thread-safe store and fan-out of live events.

    Parameters
    ----------
    max_frames_per_stack : int
        How many recent frame records to keep per stack for the HTTP API.

    Notes
    -----
    ``publish*``, ``update_stack``, ``record_frame``, ``snapshot`` and the
    read accessors may be called from any thread. ``attach``, ``detach``,
    ``subscribe`` and ``unsubscribe`` are called by the server on its loop.
    Events published while no loop is attached update the store but are not
    delivered (there is nobody to deliver them to).
    """

    def __init__(self, *, max_frames_per_stack: int = 500) -> None:
        if max_frames_per_stack < 1:
            raise ValueError(f"max_frames_per_stack must be >= 1, got {max_frames_per_stack}")
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sinks: set[HubSink] = set()
        self._seq = 0
        self._max_frames = max_frames_per_stack
        self._stacks: dict[str, dict[str, Any]] = {}
        self._frames: dict[str, deque[dict[str, Any]]] = {}
        self._previews: dict[str, Preview] = {}
        #: Applied to every event, summary and frame record before it is stored or sent
        #: (the daemon sets a :class:`~livestack.service.guard.PathRedactor`).
        self.redact: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None

    # -- server side (event loop thread) ---------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver future events on ``loop`` (called by the server when it starts)."""
        with self._lock:
            self._loop = loop

    def detach(self) -> None:
        """Stop delivering events (called by the server when it stops)."""
        with self._lock:
            self._loop = None
        self._sinks.clear()

    def subscribe(self, sink: HubSink) -> None:
        """Add a consumer; call from the loop thread."""
        self._sinks.add(sink)

    def unsubscribe(self, sink: HubSink) -> None:
        """Remove a consumer; call from the loop thread. Unknown sinks are ignored."""
        self._sinks.discard(sink)

    # -- producer side (any thread) --------------------------------------------------

    def publish(self, event: Event | Mapping[str, Any]) -> None:
        """Broadcast one event to every viewer, in publish order.

        Parameters
        ----------
        event : FrameEvent, StackEvent, AlertEvent or Mapping
            A :mod:`~livestack.service.events` event, or a dict
            ``{"type": "frame"|"stack"|"alert", ...}`` whose other keys become the
            envelope's ``data``.

        Raises
        ------
        ValueError
            If the type is missing or unknown.
        TypeError
            If a value is not JSON-serialisable.
        """
        event = event_to_dict(event)
        kind = event.get("type")
        if kind not in EVENT_TYPES:
            raise ValueError(f"event type must be one of {sorted(EVENT_TYPES)}, got {kind!r}")
        data = to_jsonable({k: v for k, v in event.items() if k != "type"}, where=str(kind))
        if self.redact is not None:
            data = self.redact(data)
        announce: tuple[str, int] | None = None
        if kind == "stack" and isinstance(data.get("preview_version"), int):
            announce = (str(data.get("stack_id", "")), data["preview_version"])
        with self._lock:
            self._seq += 1
            text = envelope(str(kind), data, seq=self._seq)
            self._schedule(self._dispatch_event, text, announce)

    def publish_preview(self, stack_id: str, version: int, jpeg: bytes) -> None:
        """Store the latest preview of a stack and tell viewers about it.

        Parameters
        ----------
        stack_id : str
            Stack identifier.
        version : int
            Preview version; a version not newer than the stored one is ignored.
        jpeg : bytes
            JPEG file content (kept by reference; do not mutate).
        """
        message = encode_preview_message(stack_id, int(version), jpeg)
        preview = Preview(stack_id, int(version), jpeg, message)
        with self._lock:
            current = self._previews.get(stack_id)
            if current is not None and current.version >= preview.version:
                return
            self._previews[stack_id] = preview
            self._schedule(self._dispatch_preview, stack_id, preview.version)

    def update_stack(self, stack_id: str, summary: StackSummary | Mapping[str, Any]) -> None:
        """Merge ``summary`` into the stored summary of ``stack_id`` (no broadcast).

        Parameters
        ----------
        stack_id : str
            Stack identifier.
        summary : StackSummary or Mapping
            Summary keys; merged over the previous ones.

        Raises
        ------
        TypeError
            If a value is not JSON-serialisable.
        """
        keys = summary.to_dict() if isinstance(summary, StackSummary) else dict(summary)
        clean = to_jsonable(keys, where=f"stack {stack_id}")
        if self.redact is not None:
            clean = self.redact(clean)
        with self._lock:
            stored = self._stacks.setdefault(stack_id, {"stack_id": stack_id})
            stored.update(clean)
            stored["stack_id"] = stack_id

    def record_frame(self, stack_id: str, frame: FrameEvent | Mapping[str, Any]) -> None:
        """Append one frame record (same keys as a ``frame`` event) to a stack's history.

        Only the last ``max_frames_per_stack`` records are kept.

        Raises
        ------
        TypeError
            If a value is not JSON-serialisable.
        """
        clean = to_jsonable(event_to_dict(frame), where=f"frame of {stack_id}")
        if self.redact is not None:
            clean = self.redact(clean)
        with self._lock:
            frames = self._frames.get(stack_id)
            if frames is None:
                frames = self._frames[stack_id] = deque(maxlen=self._max_frames)
            frames.append(clean)

    # -- readers (any thread) --------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Return ``{"seq": n, "stacks": [summary, ...]}`` for ``hello`` and the API.

        ``seq`` is the sequence number of the last published event. Each summary
        has ``stack_id`` and ``preview_version`` (the newest stored preview when it
        is newer than the summary's).
        """
        with self._lock:
            stacks = [self._summary_locked(sid) for sid in self._stack_ids_locked()]
            return {"seq": self._seq, "stacks": stacks}

    def stack(self, stack_id: str) -> dict[str, Any] | None:
        """Return the summary of one stack, or None if the hub never heard of it."""
        with self._lock:
            if stack_id not in self._stack_ids_locked():
                return None
            return self._summary_locked(stack_id)

    def frames(self, stack_id: str) -> list[dict[str, Any]]:
        """Return the recent frame records of one stack, oldest first."""
        with self._lock:
            return [dict(f) for f in self._frames.get(stack_id, ())]

    def latest_preview(self, stack_id: str) -> Preview | None:
        """Return the newest preview of one stack, or None."""
        with self._lock:
            return self._previews.get(stack_id)

    def previews(self) -> dict[str, int]:
        """Return ``{stack_id: version}`` of every stored preview."""
        with self._lock:
            return {sid: p.version for sid, p in self._previews.items()}

    def snapshot_and_previews(self) -> tuple[dict[str, Any], dict[str, int]]:
        """Return :meth:`snapshot` and :meth:`previews` read under one lock.

        A new viewer's ``hello`` and its initial preview slots must agree: read
        separately, a preview published in between would reach the viewer before
        the ``stack`` event that announces it.
        """
        with self._lock:
            stacks = [self._summary_locked(sid) for sid in self._stack_ids_locked()]
            previews = {sid: p.version for sid, p in self._previews.items()}
            return {"seq": self._seq, "stacks": stacks}, previews

    # -- internals -------------------------------------------------------------------

    def _stack_ids_locked(self) -> list[str]:
        # Summaries first (the daemon's order), then stacks known only by frames/previews.
        return list(dict.fromkeys([*self._stacks, *self._frames, *self._previews]))

    def _summary_locked(self, stack_id: str) -> dict[str, Any]:
        summary = dict(self._stacks.get(stack_id, {"stack_id": stack_id}))
        preview = self._previews.get(stack_id)
        if preview is not None:
            known = summary.get("preview_version")
            if not isinstance(known, int) or known < preview.version:
                summary["preview_version"] = preview.version
        return summary

    def _schedule(self, callback: Any, *args: Any) -> None:
        # Called with self._lock held so that events keep their seq order on the loop.
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            # The loop closed under us (shutdown): nobody is left to deliver to.
            self._loop = None

    def _dispatch_event(self, text: str, announce: tuple[str, int] | None) -> None:
        for sink in tuple(self._sinks):
            sink.on_event(text, announce)

    def _dispatch_preview(self, stack_id: str, version: int) -> None:
        for sink in tuple(self._sinks):
            sink.on_preview(stack_id, version)

"""The events viewers receive: one schema for the engine, the hub, the server and the viewer.

The engine builds these dataclasses; :meth:`Hub.publish <livestack.service.hub.Hub.publish>`
turns one into the ``data`` of the wire envelope ``{"v": 1, "type": ..., "seq": n,
"data": {...}}`` with :meth:`to_dict` (``type`` goes to the envelope). The viewer
(``static/app.js``) reads these keys; change them here and there together.

``frame`` (:class:`FrameEvent`)
    A file's verdict: ``stack_id``, ``file``, ``verdict`` (``"accepted"|"rejected"|
    "failed"``), ``reason`` (a :class:`~livestack.reasons.Reason` value or a quality
    gate code, None when accepted), ``message``, ``weight``, ``exposure_s``, ``seq``,
    ``time`` (ISO 8601), ``metrics`` (None or the fields of
    :class:`~livestack.pipeline.types.FrameMetrics`), ``timings_ms`` (per stage) and
    ``rejected_low`` / ``rejected_high`` (pixels the stack clipped). A file that failed
    before the pipeline saw it (unreadable, vanished, ...) has no ``stack_id`` and no
    ``exposure_s``, ``seq``, ``timings_ms``, ``rejected_low``, ``rejected_high``.
``stack`` (:class:`StackEvent`)
    ``stack_id`` plus the :class:`StackSummary` keys.
``alert`` (:class:`AlertEvent`)
    ``level`` (``"info"|"warning"|"error"``), ``code``, ``message`` and ``stack_id``
    (None when the alert concerns no stack).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

#: Keys of a ``frame`` event that only a file the pipeline processed has.
_PIPELINE_KEYS = ("exposure_s", "seq", "timings_ms", "rejected_low", "rejected_high")


@dataclass(frozen=True)
class FrameEvent:
    """A file's verdict (see the module docstring for the keys)."""

    TYPE: ClassVar[str] = "frame"

    stack_id: str | None
    file: str
    verdict: str
    reason: str | None
    message: str
    weight: float
    exposure_s: float | None = None
    seq: int | None = None
    time: str = ""
    metrics: dict[str, Any] | None = None
    timings_ms: dict[str, float] | None = None
    rejected_low: int | None = None
    rejected_high: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The event's data; the pipeline's keys only when the pipeline saw the file."""
        data = {"stack_id": self.stack_id, "file": self.file, "verdict": self.verdict,
                "reason": self.reason, "message": self.message, "weight": self.weight,
                "exposure_s": self.exposure_s, "seq": self.seq, "time": self.time,
                "metrics": self.metrics, "timings_ms": self.timings_ms,
                "rejected_low": self.rejected_low, "rejected_high": self.rejected_high}
        if self.timings_ms is None:  # failed before the pipeline: none of its keys
            for key in _PIPELINE_KEYS:
                del data[key]
        return data


@dataclass(frozen=True)
class StackSummary:
    """What viewers know about a stack (the hub keeps the latest one per stack).

    Attributes
    ----------
    object, filter : str
        From the frames' headers (``OBJECT``, ``FILTER``).
    frames : int
        Accepted frames in the stack.
    frames_seen, rejected, failed : int
        Files routed to the stack, and how many of them were rejected / failed.
    total_exposure_s : float
        Integrated seconds of the accepted frames.
    sub_exposure_s : float or None
        The stack's exposure time per frame.
    preview_version : int
        The newest preview's version (viewers fetch it when it grows).
    state : str
        ``"running"``, ``"paused"`` or ``"rebuilding"`` (an exclude / set-reference
        rebuild runs in the background; the old stack is shown until it swaps).
    reference : str or None
        The reference frame's file.
    started, updated : str
        ISO 8601.
    solve : dict or None
        Plate solving status (:meth:`StackSolving.status
        <livestack.service.solving.StackSolving.status>`).
    """

    object: str
    filter: str
    frames: int
    frames_seen: int
    rejected: int
    failed: int
    total_exposure_s: float
    sub_exposure_s: float | None
    preview_version: int
    state: str
    reference: str | None
    started: str
    updated: str
    solve: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        """The summary's keys and values."""
        return {"object": self.object, "filter": self.filter, "frames": self.frames,
                "frames_seen": self.frames_seen, "rejected": self.rejected,
                "failed": self.failed, "total_exposure_s": self.total_exposure_s,
                "sub_exposure_s": self.sub_exposure_s,
                "preview_version": self.preview_version, "state": self.state,
                "reference": self.reference, "started": self.started,
                "updated": self.updated, "solve": self.solve}


@dataclass(frozen=True)
class StackEvent:
    """A stack's new summary."""

    TYPE: ClassVar[str] = "stack"

    stack_id: str
    summary: StackSummary

    def to_dict(self) -> dict[str, Any]:
        """``stack_id`` and the summary's keys, flat."""
        return {"stack_id": self.stack_id, **self.summary.to_dict()}


@dataclass(frozen=True)
class AlertEvent:
    """Something the operator should know (lag, rejections in a row, a failed write)."""

    TYPE: ClassVar[str] = "alert"

    level: str
    code: str
    message: str
    stack_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The alert's keys (``stack_id`` None when it concerns no stack)."""
        return {"level": self.level, "code": self.code, "message": self.message,
                "stack_id": self.stack_id}


#: Any event the engine publishes.
Event = FrameEvent | StackEvent | AlertEvent
#: Event types the hub accepts.
EVENT_TYPES = frozenset({FrameEvent.TYPE, StackEvent.TYPE, AlertEvent.TYPE})


def event_to_dict(event: Event | Mapping[str, Any]) -> dict[str, Any]:
    """``{"type": ..., **keys}`` of an event (a dict with a ``"type"`` is copied)."""
    if isinstance(event, Mapping):
        return dict(event)
    return {"type": event.TYPE, **event.to_dict()}

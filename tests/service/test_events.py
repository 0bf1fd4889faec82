"""Typed events: the keys on the wire are the ones the viewer has always read."""

from __future__ import annotations

import json

from livestack.reasons import Reason
from livestack.service.events import (
    EVENT_TYPES,
    AlertEvent,
    FrameEvent,
    StackEvent,
    StackSummary,
    event_to_dict,
)
from livestack.service.hub import Hub

STACK_ID = "2026-01-15/M_42-L-60s"


def _summary(state: str = "rebuilding") -> StackSummary:
    return StackSummary(object="M 42", filter="L", frames=3, frames_seen=4, rejected=1,
                        failed=0, total_exposure_s=180.0, sub_exposure_s=60.0,
                        preview_version=2, state=state, reference="/in/a.fits",
                        started="2026-01-15T20:00:00+00:00",
                        updated="2026-01-15T20:05:00+00:00", solve=None)


def test_a_stacked_frame_has_every_key_in_the_viewers_order() -> None:
    event = FrameEvent(STACK_ID, "/in/a.fits", "rejected", Reason.NO_MATCH, "cannot register",
                       0.5, exposure_s=60.0, seq=4, time="2026-01-15T20:00:00",
                       metrics={"fwhm_px": 2.5}, timings_ms={"detect": 1.0},
                       rejected_low=3, rejected_high=7)
    wire = json.loads(json.dumps(event_to_dict(event)))
    assert list(wire) == ["type", "stack_id", "file", "verdict", "reason", "message", "weight",
                          "exposure_s", "seq", "time", "metrics", "timings_ms",
                          "rejected_low", "rejected_high"]
    assert wire["type"] == "frame" and wire["reason"] == "no_match" and wire["seq"] == 4


def test_a_file_that_failed_before_the_pipeline_has_no_pipeline_keys() -> None:
    event = FrameEvent(None, "/in/x.fits", "failed", Reason.TRUNCATED, "/in/x.fits: short",
                       0.0, time="2026-01-15T20:00:00+00:00")
    assert event_to_dict(event) == {
        "type": "frame", "stack_id": None, "file": "/in/x.fits", "verdict": "failed",
        "reason": "truncated", "message": "/in/x.fits: short", "weight": 0.0,
        "time": "2026-01-15T20:00:00+00:00", "metrics": None}


def test_stack_events_are_flat_and_the_hub_stores_typed_summaries_and_frames() -> None:
    summary = _summary()
    wire = event_to_dict(StackEvent(STACK_ID, summary))
    assert wire == {"type": "stack", "stack_id": STACK_ID, **summary.to_dict()}
    assert wire["state"] == "rebuilding"
    hub = Hub()
    hub.update_stack(STACK_ID, summary)
    hub.record_frame(STACK_ID, FrameEvent(STACK_ID, "/in/a.fits", "accepted", None, "ok", 1.0,
                                          exposure_s=60.0, seq=1, time="t", timings_ms={},
                                          rejected_low=0, rejected_high=0))
    stored = hub.stack(STACK_ID)
    assert stored is not None and stored["frames"] == 3 and stored["state"] == "rebuilding"
    (frame,) = hub.frames(STACK_ID)
    assert frame["type"] == "frame" and frame["verdict"] == "accepted" and frame["seq"] == 1


def test_alerts_always_say_which_stack_and_every_type_is_known_to_the_hub() -> None:
    assert event_to_dict(AlertEvent("warning", "lag", "falling behind")) == {
        "type": "alert", "level": "warning", "code": "lag", "message": "falling behind",
        "stack_id": None}
    assert {FrameEvent.TYPE, StackEvent.TYPE, AlertEvent.TYPE} == EVENT_TYPES
    Hub().publish(AlertEvent("error", "rebuild_failed", "x", STACK_ID))  # accepted, no loop

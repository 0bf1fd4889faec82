"""Routing by the solved pointing: a jump the header did not report starts a new stack."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from livestack.pipeline.routing import Router, angular_separation_deg
from livestack.pipeline.types import FrameInfo

T0 = datetime(2026, 1, 15, 21, 0, tzinfo=timezone.utc)
DIAGONAL_DEG = 0.84  # 0.67 x 0.5 deg


def frame(i: int, ra: float | None = None, dec: float | None = None) -> FrameInfo:
    return FrameInfo(path=f"/frames/f{i:03d}.fits", image_type="light", shape=(600, 800),
                     exposure_s=30.0, date_obs=T0 + timedelta(minutes=i), object_name="",
                     ra_deg=ra, dec_deg=dec)


def test_a_solved_jump_beyond_the_fraction_starts_a_stack_and_a_return_goes_back() -> None:
    router = Router(solved_jump_fraction=0.5)
    first = router.route(frame(0))
    assert router.route_solved(first, frame(1), 90.0, 10.0) is None  # not solved yet
    router.set_solved_centre(first, 83.8, -5.4, DIAGONAL_DEG)
    assert router.solved_centre(first) == (83.8, -5.4, DIAGONAL_DEG)
    # 0.4 of the diagonal away: the frame failed for another reason and stays.
    near = router.route_solved(first, frame(1), 83.8 + 0.4 * DIAGONAL_DEG / 0.9955, -5.4)
    assert near is None
    assert router.route(frame(2)) == first
    # A re-point by 2 deg without RA/DEC keys.
    moved = router.route_solved(first, frame(3), 85.8, -5.4)
    assert moved is not None
    second, moved_deg = moved
    assert second != first and second.endswith("-2")
    assert moved_deg == pytest.approx(angular_separation_deg(83.8, -5.4, 85.8, -5.4))
    assert router.solved_centre(second) == (85.8, -5.4, DIAGONAL_DEG)
    # Frames without pointing follow the new stack.
    assert router.route(frame(4)) == second
    # Back at the first field: the first stack again, not a third.
    back = router.route_solved(second, frame(5), 83.82, -5.41)
    assert back is not None and back[0] == first
    assert router.route(frame(6)) == first
    assert router.stack_ids() == [first, second]


def test_the_threshold_scales_with_the_field_and_the_fraction() -> None:
    wide = Router(solved_jump_fraction=0.5)
    narrow = Router(solved_jump_fraction=0.1)
    for router in (wide, narrow):
        sid = router.route(frame(0))
        router.set_solved_centre(sid, 10.0, 0.0, 2.0)
    # 0.5 deg = 0.25 of a 2 deg diagonal: inside 0.5, outside 0.1.
    assert wide.route_solved(wide.stack_ids()[0], frame(1), 10.5, 0.0) is None
    assert narrow.route_solved(narrow.stack_ids()[0], frame(1), 10.5, 0.0) is not None
    with pytest.raises(ValueError):
        Router(solved_jump_fraction=0.0)
    with pytest.raises(ValueError):
        wide.set_solved_centre(wide.stack_ids()[0], 10.0, float("nan"), 2.0)
    with pytest.raises(ValueError):
        wide.set_solved_centre(wide.stack_ids()[0], 10.0, 0.0, 0.0)


def test_a_moved_frame_leaves_the_old_failure_run() -> None:
    router = Router(failure_run=3)
    first = router.route(frame(0))
    router.set_solved_centre(first, 83.8, -5.4, DIAGONAL_DEG)
    assert router.report_alignment_failure(first, frame(1)) == ()
    assert router.report_alignment_failure(first, frame(2)) == ()
    assert router.route_solved(first, frame(2), 80.0, -5.4) is not None
    # frame 2 left the run: one more failure does not complete it.
    assert router.report_alignment_failure(first, frame(3)) == ()
    assert not router.is_retired(first)


def test_solved_centres_and_the_fraction_survive_to_dict() -> None:
    router = Router(solved_jump_fraction=0.3)
    first = router.route(frame(0))
    router.set_solved_centre(first, 359.9, 45.0, 1.5)
    moved = router.route_solved(first, frame(1), 5.0, 45.0)
    assert moved is not None
    state = json.loads(json.dumps(router.to_dict()))
    again = Router.from_dict(state)
    assert again.solved_jump_fraction == 0.3
    assert again.solved_centre(first) == (359.9, 45.0, 1.5)
    assert again.solved_centre(moved[0]) == (5.0, 45.0, 1.5)
    assert again.to_dict() == router.to_dict()
    # Routed identically afterwards: back near the first centre (across RA 0).
    assert again.route_solved(moved[0], frame(2), 0.1, 45.0) == \
        router.route_solved(moved[0], frame(2), 0.1, 45.0)
    # A state written before solved routing still loads.
    for item in state["stacks"]:
        del item["solved"]
    del state["solved_jump_fraction"]
    old = Router.from_dict(state)
    assert old.solved_jump_fraction == 0.5 and old.solved_centre(first) is None

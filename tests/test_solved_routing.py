"""Routing by the solved pointing: a jump the header did not report starts a new stack."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from livestack.config import Config, SolverConfig
from livestack.engine.core import Engine
from livestack.pipeline.routing import Router, angular_separation_deg
from livestack.pipeline.types import FrameInfo
from livestack.pipeline.wcs import field_geometry
from livestack.sim.tycho import Catalogue, read_index_stars, render_field, tan_cards
from tests.storage.test_solver import INDEX_DIR, require_solver

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
    assert [st["stack_id"] for st in router.to_dict()["stacks"]] == [first, second]


def test_the_threshold_scales_with_the_field_and_the_fraction() -> None:
    wide = Router(solved_jump_fraction=0.5)
    narrow = Router(solved_jump_fraction=0.1)
    ids = {}
    for router in (wide, narrow):
        ids[id(router)] = sid = router.route(frame(0))
        router.set_solved_centre(sid, 10.0, 0.0, 2.0)
    # 0.5 deg = 0.25 of a 2 deg diagonal: inside 0.5, outside 0.1.
    assert wide.route_solved(ids[id(wide)], frame(1), 10.5, 0.0) is None
    assert narrow.route_solved(ids[id(narrow)], frame(1), 10.5, 0.0) is not None
    with pytest.raises(ValueError):
        Router(solved_jump_fraction=0.0)
    with pytest.raises(ValueError):
        wide.set_solved_centre(ids[id(wide)], 10.0, float("nan"), 2.0)
    with pytest.raises(ValueError):
        wide.set_solved_centre(ids[id(wide)], 10.0, 0.0, 0.0)


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


# --------------------------------------------------------------------------- with the solver

SHAPE = (600, 800)  # 0.67 x 0.5 deg at 3"/px
FIELD_A = (83.8, -5.4)
FIELD_B = (85.8, -5.4)  # 2 deg east: no overlap, no RA/DEC key says so


def _render(folder: Path, name: str, minute: int, centre: tuple[float, float],
            catalogue: Catalogue) -> Path:
    cards = tan_cards(centre[0], centre[1], 3.0, SHAPE)
    # A small dither, so frames of one field are not identical.
    cards["CRPIX1"] = float(cards["CRPIX1"]) + 2.0 * (minute % 3)
    image = render_field(catalogue, cards, SHAPE, rng=np.random.default_rng(minute))
    header = fits.Header({"IMAGETYP": "Light Frame", "EXPTIME": 30.0,
                          "DATE-OBS": f"2026-01-01T00:{minute:02d}:00", "FOCALLEN": 935.0,
                          "XPIXSZ": 13.6})  # a scale, but no RA/DEC, OBJCTRA or WCS
    path = folder / f"{name}.fits"
    fits.PrimaryHDU(np.clip(image, 0, 60000).astype(np.uint16), header).writeto(path)
    return path


def _settle(engine: Engine) -> None:
    """What the worker does between frames: finish the solves, then an idle tick."""
    engine.solving.drain(60)
    engine.idle()
    engine.solving.drain(60)
    engine.idle()


@pytest.mark.solver
def test_a_jump_without_header_pointing_starts_a_stack_and_a_return_goes_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    require_solver()
    catalogue = read_index_stars(Path(INDEX_DIR) / "index-tycho2-07.littleendian.fits")
    a = [_render(tmp_path, f"a{i}", i, FIELD_A, catalogue) for i in range(3)]
    b = [_render(tmp_path, f"b{i}", 10 + i, FIELD_B, catalogue) for i in range(2)]
    back = _render(tmp_path, "a3", 20, FIELD_A, catalogue)
    config = replace(Config(), solver=replace(SolverConfig(), time_limit_s=30))
    engine = Engine(config, tmp_path / "out", background_checkpoints=False)
    try:
        with caplog.at_level(logging.INFO):
            for path in a:
                assert engine.process_path(path).status == "accepted"  # type: ignore[union-attr]
            _settle(engine)
            (first,) = engine.runtimes
            assert engine.router.solved_centre(first) is not None
            row = engine.process_path(b[0])
            assert row is not None and row.status == "rejected" and row.stack_id == first
            assert row.reason in ("no_match", "no_overlap")
            _settle(engine)  # b0 is solved 2 deg away and moves
            moved = engine.journal.row(row.id)
            assert moved is not None and moved.status == "accepted"
            second = moved.stack_id
            assert second is not None and second != first
            row = engine.process_path(b[1])  # follows the new stack, no solve needed
            assert row is not None and (row.status, row.stack_id) == ("accepted", second)
            row = engine.process_path(back)
            assert row is not None and row.status == "rejected"
            _settle(engine)
            returned = engine.journal.row(row.id)
            assert returned is not None and (returned.status, returned.stack_id) == \
                ("accepted", first)
        assert sorted(engine.runtimes) == sorted([first, second])
        assert engine.runtimes[first].session.n_accepted == 4
        assert engine.runtimes[second].session.n_accepted == 2
        lines = [r.getMessage() for r in caplog.records if "routed: solved centre moved" in
                 r.getMessage()]
        assert len(lines) == 2, lines
        expected = angular_separation_deg(*FIELD_A, *FIELD_B)  # 1.99 deg at Dec -5.4
        for line in lines:
            moved_deg = float(re.search(r"moved ([0-9.]+) deg", line).group(1))  # type: ignore[union-attr]
            assert moved_deg == pytest.approx(expected, abs=0.02)
        # The new stack's WCS is the moved frame's solve (not solved a second time).
        note = engine.journal.get_state(f"solver:{second}")
        assert note["solved"] and note["reference"] == str(b[0]) and note["attempt"] == 1
        geo = field_geometry(note["wcs"], SHAPE)
        assert angular_separation_deg(geo.ra_deg, geo.dec_deg, *FIELD_B) < 0.01
        # The solved centres are in the journaled router state.
        saved = Router.from_dict(engine.journal.get_state("router"))
        assert saved.solved_centre(first) is not None
        assert saved.solved_centre(second) is not None
    finally:
        engine.close()

"""``livestack integrate S1 S2 ...``: several nights of one target integrated together."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy.ndimage import median_filter

from livestack.cli import main
from livestack.errors import UsageError
from livestack.multisession import add_provenance, plan_sessions
from livestack.pipeline.combine import IntegrateConfig
from livestack.pipeline.warp import warp
from livestack.restack import integrate_plan
from livestack.sessionplan import load_session, plan_integration
from livestack.sim.nights import Night, write_night
from livestack.storage.stackfits import read_stack_fits
from tests.multinight import (
    B_START,
    ID_A,
    ID_B,
    N_PER_NIGHT,
    SEED,
    TRAIL_A,
    TRAIL_B,
    base_config,
    mad_noise,
    write_two_nights,
)

SHAPE = (288, 384)
CORNERS = np.array([[0.0, 0.0], [383.0, 0.0], [0.0, 287.0], [383.0, 287.0]])


@pytest.fixture(scope="module")
def nights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Night, Night]:
    return write_two_nights(tmp_path_factory.mktemp("nights"))


@pytest.fixture(scope="module")
def combined(nights: tuple[Night, Night]) -> dict[str, Any]:
    """Night A alone, night B alone and both together (plans and products)."""
    a, b = nights
    plan, summaries, _ = plan_sessions([a.stack_dir, b.stack_dir])
    product = integrate_plan(plan)
    add_provenance(product, summaries)
    return {"plan": plan, "summaries": summaries, "both": product,
            "a": integrate_plan(plan_integration(load_session(a.stack_dir))),
            "b": integrate_plan(plan_integration(load_session(b.stack_dir)))}


def _sim_index(night: Night, k: int) -> int:
    return night.start_index + k


def test_every_frame_is_registered_onto_the_first_sessions_reference(
        nights: tuple[Night, Night], combined: dict[str, Any]) -> None:
    a, b = nights
    plan = combined["plan"]
    assert [f.path for f in plan.frames] == [str(p) for p in a.lights + b.lights]
    assert plan.reference.path == str(a.lights[0])
    # the simulator's truth maps every light onto the sky grid of its index 0 (night A's
    # reference): the composed transforms must agree with it to a small fraction of a pixel
    for frame, night, k in [(f, a, i) for i, f in enumerate(plan.frames[:N_PER_NIGHT])] + [
            (f, b, i) for i, f in enumerate(plan.frames[N_PER_NIGHT:])]:
        truth = night.simulator.transform(_sim_index(night, k))
        err = np.abs(frame.transform.apply(CORNERS) - truth.apply(CORNERS)).max()
        assert err < 0.1, (frame.path, err)
    assert np.abs(combined["summaries"][1].cross.matrix[:, 2]).max() > 10.0  # a real offset


def test_noise_falls_as_for_the_total_frame_count(combined: dict[str, Any]) -> None:
    both, only_a, only_b = combined["both"], combined["a"], combined["b"]
    n_total = 2 * N_PER_NIGHT
    full = both.count == n_total
    assert full.mean() > 0.5  # the nights overlap on most of the reference grid
    rows, cols = np.nonzero(full)
    box = (slice(rows.min() + 8, rows.max() - 8), slice(cols.min() + 8, cols.max() - 8))
    sigma_a = mad_noise(only_a.image[box])
    sigma_b = mad_noise(only_b.image[box])
    sigma_both = mad_noise(both.image[box])
    assert sigma_b > 1.3 * sigma_a  # night B is the noisier one
    # inverse-variance weighting of the two nights' frames
    expected = (sigma_a ** -2 + sigma_b ** -2) ** -0.5
    assert sigma_both == pytest.approx(expected, rel=0.15)
    assert sigma_both < 0.9 * sigma_a
    # the noisier (hazier) night weighs less, by the same rule as within one night
    weights = [r.weight for r in both.records if r.verdict == "accepted"]
    assert np.mean(weights[N_PER_NIGHT:]) < 0.8 * np.mean(weights[:N_PER_NIGHT])


def _trail_pixels(night: Night, k: int, transform: Any) -> NDArray[np.bool_]:
    truth = night.simulator.light(_sim_index(night, k)).truth
    assert truth.trail_mask is not None
    moved = warp(truth.trail_mask.astype(np.float32), transform, SHAPE, "nearest")
    return np.asarray((moved.image > 0.5) & moved.footprint)


def test_trails_are_rejected_as_in_one_night(nights: tuple[Night, Night],
                                             combined: dict[str, Any]) -> None:
    a, b = nights
    plan = combined["plan"]
    both = combined["both"]
    clean = integrate_plan(plan_integration(
        plan_sessions([a.stack_dir, b.stack_dir])[2],
        exclude=[a.lights[TRAIL_A].name, b.lights[TRAIL_B - B_START].name]))
    plain = integrate_plan(plan, IntegrateConfig(reject="none"))
    sigma = mad_noise(clean.image)
    excess: dict[str, float] = {}
    for night, k, frame in ((a, TRAIL_A, plan.frames[TRAIL_A]),
                            (b, TRAIL_B - B_START, plan.frames[N_PER_NIGHT + TRAIL_B - B_START])):
        trail = _trail_pixels(night, k, frame.transform) & (both.count >= 2 * N_PER_NIGHT - 1)
        # where the trail lifts a plain (unrejected) mean by more than 5 sigma
        strong = trail & ((plain.image - clean.image) > 5.0 * sigma)
        assert strong.sum() > 100, night.stack_id
        plain_excess = float(np.mean((plain.image - clean.image)[strong]))
        kept_excess = float(np.mean((both.image - clean.image)[strong]))
        assert abs(kept_excess) < 0.1 * plain_excess, (night.stack_id, kept_excess,
                                                        plain_excess)
        assert np.mean(both.rejected_high[strong] >= 1) > 0.95
        excess[night.stack_id] = kept_excess
    # as within one night: night A alone leaves no smaller trace of its trail
    only_a = combined["a"]
    clean_a = integrate_plan(plan_integration(load_session(a.stack_dir),
                                              exclude=[a.lights[TRAIL_A].name]))
    plain_a = integrate_plan(plan_integration(load_session(a.stack_dir)),
                             IntegrateConfig(reject="none"))
    trail_a = _trail_pixels(a, TRAIL_A, plan.frames[TRAIL_A].transform)
    strong_a = trail_a & ((plain_a.image - clean_a.image) > 5.0 * mad_noise(clean_a.image))
    one_night = float(np.mean((only_a.image - clean_a.image)[strong_a]))
    assert abs(excess[ID_A]) <= abs(one_night) + 0.5 * sigma


def _defect_residuals(product: Any, positions: NDArray[np.int64]) -> NDArray[np.float64]:
    """|image - 3x3 median| at ``positions`` in units of the stack's noise."""
    image = np.nan_to_num(product.image, nan=0.0)
    resid = np.abs(image - median_filter(image, size=3))
    inside = ((positions[:, 0] > 2) & (positions[:, 0] < SHAPE[0] - 3)
              & (positions[:, 1] > 2) & (positions[:, 1] < SHAPE[1] - 3))
    y, x = positions[inside].T
    ok = product.count[y, x] > 0
    return np.asarray(resid[y[ok], x[ok]] / mad_noise(product.image), dtype=np.float64)


def test_sensor_defects_leave_no_more_trace_than_in_one_night(
        nights: tuple[Night, Night], combined: dict[str, Any]) -> None:
    a, _ = nights
    plan = combined["plan"]
    hot = a.simulator.hot_pixels.astype(np.float64)  # same sensor in both nights (same seed)
    assert len(hot) > 10
    positions = []
    for frame in plan.frames:  # where each frame put its hot pixels on the reference grid
        xy = frame.transform.apply(hot[:, ::-1])
        positions.append(np.round(xy[:, ::-1]).astype(np.int64))
    where = np.concatenate(positions)
    two = _defect_residuals(combined["both"], where)
    one = _defect_residuals(combined["a"], np.concatenate(positions[:N_PER_NIGHT]))
    assert np.percentile(two, 99) < 5.0
    assert np.mean(two > 5.0) <= np.mean(one > 5.0) + 0.01


def test_provenance_and_dates_span_both_nights(nights: tuple[Night, Night],
                                                combined: dict[str, Any]) -> None:
    a, b = nights
    header = combined["both"].header
    assert header["NCOMBINE"] == 2 * N_PER_NIGHT
    assert header["NSESSION"] == 2
    assert header["SESS1"].startswith(f"{ID_A}: {N_PER_NIGHT} frames")
    assert header["SESS2"].startswith(f"{ID_B}: {N_PER_NIGHT} frames")
    assert header["STACKID"] == ID_A
    assert header["DATE-OBS"].startswith("2026-01-15T21:00")
    assert header["DATE-END"].startswith("2026-01-17T2")
    assert f"session {ID_B}" in header["HISTORY"]
    files = [r.file for r in combined["both"].records if r.verdict == "accepted"]
    assert files == [str(p) for p in a.lights + b.lights]


def test_select_exclude_and_reference_apply_across_sessions(nights: tuple[Night, Night]
                                                            ) -> None:
    a, b = nights
    dirs = [a.stack_dir, b.stack_dir]
    # fwhm_px grows by 0.05 per frame within each night: the last three of each go
    plan, _, _ = plan_sessions(dirs, select="fwhm_px < 2.74", exclude=[b.lights[1].name])
    kept = {f.path for f in plan.frames}
    assert kept == {str(p) for p in [*a.lights[:5], b.lights[0], *b.lights[2:5]]}
    reasons = dict(plan.excluded)
    assert reasons[str(b.lights[1])] == "--exclude"
    assert reasons[str(a.lights[7])] == reasons[str(b.lights[7])] == "--select"
    # a frame of the second night as the reference: every transform is composed onto it
    plan, _, _ = plan_sessions(dirs, reference=b.lights[2].name)
    assert plan.reference.path == str(b.lights[2]) and plan.reference_changed
    onto = b.simulator.transform(B_START + 2).inverse()
    for k, frame in enumerate(plan.frames[:N_PER_NIGHT]):
        truth = a.simulator.transform(k).then(onto)
        assert np.abs(frame.transform.apply(CORNERS) - truth.apply(CORNERS)).max() < 0.1


@pytest.mark.parametrize("change, what", [
    ({"object_name": "M 31"}, "target"),
    ({"filter_name": "Ha"}, "filter"),
    ({"binning": 2}, "binning"),
    ({"width": 320}, "frame size"),
])
def test_mismatching_sessions_are_a_one_line_error_naming_them(
        nights: tuple[Night, Night], tmp_path: Path, change: dict[str, Any], what: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = nights
    other = write_night(tmp_path / "other", replace(base_config(), **change), SEED, 2,
                        stack_id="2026-02-01/odd", start_index=60)
    with pytest.raises(UsageError) as info:
        plan_sessions([a.stack_dir, other.stack_dir])
    message = str(info.value)
    assert ID_A in message and "2026-02-01/odd" in message and what in message
    assert "\n" not in message
    out = tmp_path / "out.fits"
    code = main(["integrate", str(a.stack_dir), str(other.stack_dir), "-o", str(out),
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not out.exists()
    assert err[-1].startswith("livestack: sessions ") and what in err[-1]


def test_same_session_twice_is_refused(nights: tuple[Night, Night]) -> None:
    a, _ = nights
    with pytest.raises(UsageError, match="given twice"):
        plan_sessions([a.stack_dir, a.stack_dir])


def test_cli_integrates_two_sessions(nights: tuple[Night, Night], combined: dict[str, Any],
                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = nights
    out = tmp_path / "two.fits"
    assert main(["integrate", str(a.stack_dir), str(b.stack_dir), "-o", str(out),
                 "--no-progress"]) == 0
    assert f"{ID_A} + {ID_B}: {2 * N_PER_NIGHT} frames integrated" in capsys.readouterr().out
    written = read_stack_fits(out)
    np.testing.assert_array_equal(written.image, combined["both"].image)
    assert written.header["NSESSION"] == 2

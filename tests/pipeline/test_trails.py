"""Satellite and aircraft trails must not make a frame "elongated" (pipeline/trails.py).

A trail breaks into many elongated detections; when they outnumber the stars they used to
set the frame's median elongation (bench_stack_dense's frame 3: 12.45:1, rejected). The
trail test drops detections that lie on one narrow straight line and are oriented along
it, while a frame whose stars are all trailed (scattered over the field, one orientation)
must still be rejected.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from livestack.pipeline import detect
from livestack.pipeline.detect import DetectConfig, measure
from livestack.pipeline.quality import GateConfig, QualityGate
from livestack.pipeline.trails import find_trails
from livestack.pipeline.types import FrameMetrics, StarList
from livestack.sim import SimConfig, Simulator
from livestack.sim import sky as simsky

SMALL = (1200, 900)  # sep.extract path
LARGE = (3600, 2400)  # 8.6 MP: the peak pass on the 4x4-binned frame


def _frame(size: tuple[int, int], seed: int, *, satellite: bool = False,
           aircraft: bool = False, extra: tuple[simsky.Trail, ...] = (),
           elongation: float = 1.0,
           density: float = 1.0) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """A simulated raw light (float32 ADU, gain 1) and the mask of its trail pixels.

    ``density`` 1 is bench_stack_dense's star density (9000 stars on 26 MP), where a
    trail gives more candidates than the stars do.
    """
    width, height = size
    n_stars = round(density * 9000 * width * height / (6248 * 4176))
    config = SimConfig(width=width, height=height, n_stars=n_stars,
                       satellite_frames=(1,) if satellite else (),
                       aircraft_frames=(1,) if aircraft else (), cosmic_rays_per_frame=0.0,
                       elongation=elongation, elongation_angle_deg=35.0)
    frame = Simulator(config, seed=seed).light(1)
    assert frame.truth is not None
    img = frame.data.astype(np.float32)
    mask = np.zeros(img.shape, dtype=bool)
    if frame.truth.trail_mask is not None:
        mask |= frame.truth.trail_mask
    for trail in extra:
        simsky.render_trail(img, mask, trail)
    return img, mask


def _accepted(metrics: FrameMetrics) -> bool:
    return QualityGate(GateConfig()).evaluate(metrics).accepted


def _on_mask(stars: StarList, mask: NDArray[np.bool_], margin_px: int = 3) -> int:
    """Number of stars whose centroid lies within ``margin_px`` of a trail pixel."""
    near = ndimage.binary_dilation(mask, iterations=margin_px)
    ij = np.rint(stars.xy).astype(np.intp)
    return int(np.count_nonzero(near[ij[:, 1], ij[:, 0]]))


def _without_trail_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """Detection as before the trail test (the comparison the tests make)."""
    monkeypatch.setattr(detect, "_on_trail",
                        lambda x, *_args: np.zeros(len(x), dtype=bool))


# --------------------------------------------------------------------------- frames


def test_large_frame_with_a_satellite_is_accepted_without_its_fragments(
        monkeypatch: pytest.MonkeyPatch) -> None:
    img, mask = _frame(LARGE, seed=1, satellite=True)
    ref, _ = _frame(LARGE, seed=1)
    stars, metrics = measure(img)
    ref_stars, ref_metrics = measure(ref)
    assert _accepted(metrics), metrics
    assert metrics.elongation < 1.2
    assert abs(metrics.fwhm_px - ref_metrics.fwhm_px) < 0.05 * ref_metrics.fwhm_px
    assert _on_mask(stars, mask) == 0
    # The trail costs at most the stars it crosses.
    assert len(stars) >= len(ref_stars) - 3
    # Before the trail test, the fragments won the median: the bug this guards.
    _without_trail_test(monkeypatch)
    old_stars, old_metrics = measure(img)
    assert _on_mask(old_stars, mask) > len(old_stars) // 2
    assert not _accepted(old_metrics)


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["small", "large"])
def test_two_trails_are_both_dropped(size: tuple[int, int]) -> None:
    """A satellite and an aircraft (two dashed wing lights and a strobe) on one frame,
    and two satellites on another."""
    width, height = size
    second = simsky.Trail(0.3 * width, 0.6 * height, 71.0, 1500.0, 1.7)
    for kwargs in ({"satellite": True, "aircraft": True},
                   {"satellite": True, "extra": (second,)}):
        img, mask = _frame(size, seed=7, **kwargs)  # type: ignore[arg-type]
        stars, metrics = measure(img)
        assert _accepted(metrics), (kwargs, metrics)
        assert metrics.elongation < 1.2
        assert _on_mask(stars, mask) == 0, kwargs
        assert len(stars) >= 8


def test_small_frame_with_a_dashed_trail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A blinking trail (short dashes, each a separate detection of 2-4:1) on a small
    frame: sep's path had kept the dashes as stars, and with longer dashes they had set
    the elongation."""
    width, height = SMALL
    short = simsky.Trail(0.4 * width, 0.55 * height, 17.0, 2000.0, 1.8, 12.0, 0.5)
    longer = simsky.Trail(0.4 * width, 0.55 * height, 17.0, 2000.0, 1.8, 30.0, 0.3)
    for trail in (short, longer):
        img, mask = _frame(SMALL, seed=1, extra=(trail,))
        stars, metrics = measure(img)
        assert _accepted(metrics)
        assert metrics.elongation < 1.2
        assert _on_mask(stars, mask) == 0
    _without_trail_test(monkeypatch)
    old_stars, old_metrics = measure(img)
    assert not _accepted(old_metrics)
    assert _on_mask(old_stars, mask) > len(old_stars) // 2


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["small", "large"])
def test_uniformly_trailed_frame_is_still_rejected(size: tuple[int, int],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """All stars 3:1 along one direction, at random positions: no line of fragments, so
    the trail test drops none of them."""
    # Denser than the bench's field: trailed faint stars sink below the threshold.
    img, _mask = _frame(size, seed=11, elongation=3.0, density=6.0)
    stars, metrics = measure(img)
    verdict = QualityGate(GateConfig()).evaluate(metrics)
    assert verdict.reason == "elongated", verdict
    assert metrics.elongation > 2.5
    assert len(stars) >= 8
    _without_trail_test(monkeypatch)
    old_stars, old_metrics = measure(img)
    np.testing.assert_array_equal(stars.xy, old_stars.xy)
    assert metrics == old_metrics


@pytest.mark.parametrize("size", [SMALL, (2900, 2900)], ids=["small", "large"])
def test_dense_field_without_trails_keeps_its_stars(size: tuple[int, int],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of bright stars, blends included: the trail test finds no line and the
    catalogue is exactly the one without it."""
    from tests.pipeline.test_detect import noisy, render_stars, star_field

    rng = np.random.default_rng(5)
    shape = (size[1], size[0])
    n = 2500 if size == SMALL else 5000
    xy, flux = star_field(rng, shape, n, margin=20, flux_min=3000)
    img = noisy(rng, render_stars(shape, xy, flux, fwhm_px=3.0, radius_px=12))
    config = DetectConfig(max_stars=400)
    stars, metrics = measure(img, config)
    assert len(stars) == 400
    _without_trail_test(monkeypatch)
    old_stars, old_metrics = measure(img, config)
    np.testing.assert_array_equal(stars.xy, old_stars.xy)
    assert metrics == old_metrics


# --------------------------------------------------------------------------- find_trails


def _trail_fragments(rng: np.random.Generator, n: int, angle_deg: float,
                     start: tuple[float, float], length_px: float,
                     jitter_px: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    s = np.sort(rng.uniform(0.0, length_px, n))
    a = math.radians(angle_deg)
    xy = np.column_stack([start[0] + s * math.cos(a), start[1] + s * math.sin(a)])
    xy += rng.normal(0.0, jitter_px, xy.shape)
    theta = a + rng.normal(0.0, math.radians(3.0), n)
    return xy, theta


def test_find_trails_finds_two_lines_among_stars() -> None:
    rng = np.random.default_rng(1)
    stars_xy = rng.uniform(0, [6000, 4000], (400, 2))
    stars_theta = rng.uniform(0, math.pi, 400)
    stars_el = 1.0 + rng.exponential(0.15, 400)  # a few blends above 1.5
    a_xy, a_th = _trail_fragments(rng, 60, 20.0, (100.0, 500.0), 5500.0, 1.0)
    b_xy, b_th = _trail_fragments(rng, 8, 120.0, (3000.0, 300.0), 1500.0, 1.0)
    xy = np.vstack([stars_xy, a_xy, b_xy])
    theta = np.concatenate([stars_theta, a_th, b_th])
    el = np.concatenate([stars_el, rng.uniform(3, 30, 60), rng.uniform(2, 5, 8)])
    on, lines = find_trails(xy, theta, el, band_px=8.0)
    assert on[400:].all()
    assert [ln.members for ln in lines] == [60, 8]
    assert abs(lines[0].angle_deg - 20.0) < 0.5 and abs(lines[1].angle_deg - 120.0) < 1.0
    # Stars only go when the trail crosses them.
    a_dir = np.array([math.cos(math.radians(20.0)), math.sin(math.radians(20.0))])
    b_dir = np.array([math.cos(math.radians(120.0)), math.sin(math.radians(120.0))])
    d_a = np.abs((stars_xy - np.array([100.0, 500.0])) @ np.array([-a_dir[1], a_dir[0]]))
    d_b = np.abs((stars_xy - np.array([3000.0, 300.0])) @ np.array([-b_dir[1], b_dir[0]]))
    assert np.all((d_a[on[:400]] < 8.5) | (d_b[on[:400]] < 8.5))


@pytest.mark.parametrize("seed", range(20))
def test_find_trails_ignores_uniform_trailing(seed: int) -> None:
    """400 stars, all 3:1 along one direction, scattered: many chance collinear
    groups of 3-6 along that direction, never a trail."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [6248, 4176], (400, 2))
    theta = math.radians(35.0) + rng.normal(0.0, math.radians(3.0), 400)
    el = rng.normal(3.0, 0.2, 400)
    on, lines = find_trails(xy, theta, el, band_px=8.0)
    assert not on.any() and lines == []


def test_find_trails_needs_orientation_along_the_line() -> None:
    """Elongated detections on a line but oriented across it are not a trail (a row of
    trailed stars, e.g. a cluster's chain)."""
    rng = np.random.default_rng(2)
    xy, theta = _trail_fragments(rng, 30, 20.0, (100.0, 500.0), 3000.0, 1.0)
    el = np.full(30, 4.0)
    on, lines = find_trails(xy, theta + math.radians(60.0), el, band_px=8.0)
    assert not on.any() and lines == []
    on, lines = find_trails(xy, theta, el, band_px=8.0)
    assert on.all() and len(lines) == 1


def test_find_trails_validates_its_input() -> None:
    with pytest.raises(ValueError, match="orientations"):
        find_trails(np.zeros((3, 2)), np.zeros(2), np.zeros(3), 4.0)
    with pytest.raises(ValueError, match="band_px"):
        find_trails(np.zeros((3, 2)), np.zeros(3), np.zeros(3), 0.0)
    on, lines = find_trails(np.zeros((0, 2)), np.zeros(0), np.zeros(0), 4.0)
    assert on.shape == (0,) and lines == []

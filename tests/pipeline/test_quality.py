"""Tests of livestack.pipeline.quality (metrics in, verdicts out; plus images end to end)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from livestack.pipeline.detect import measure
from livestack.pipeline.quality import GateConfig, QualityGate
from livestack.pipeline.types import FrameMetrics
from tests.pipeline.test_detect import noisy, render_stars, star_field


def _good(i: int = 0) -> FrameMetrics:
    """A normal frame with small frame-to-frame scatter."""
    return FrameMetrics(star_count=150 + (i % 5), fwhm_px=2.5 + 0.02 * (i % 3),
                        fwhm_arcsec=None, elongation=1.08, background_adu=1000.0 + i,
                        noise_adu=10.0, snr=80.0)


def _with(**kw: float | int) -> FrameMetrics:
    base = _good().as_dict()
    base.update(kw)
    return FrameMetrics(**{k: (float("nan") if v is None else v)  # type: ignore[arg-type]
                           for k, v in base.items()})


def _gate_with_history(n: int = 5, config: GateConfig | None = None) -> QualityGate:
    gate = QualityGate(config or GateConfig())
    for i in range(n):
        verdict = gate.evaluate(_good(i))
        assert verdict.accepted, verdict.message
        gate.record_accepted(_good(i))
    return gate


@pytest.mark.parametrize(
    ("metrics", "reason", "words"),
    [
        (_with(star_count=41), "star_count_drop", ["41", "0.3x", "152", "clouds"]),
        (_with(fwhm_px=4.2), "fwhm_jump", ["4.20", "1.7x", "2.52"]),
        (_with(background_adu=1400.0), "background_jump", ["1400", "40 sigma", "dawn"]),
        (_with(elongation=2.1, fwhm_px=3.0), "elongated", ["2.10", "2.00", "wind"]),
        (_with(star_count=5), "too_few_stars", ["5", "8"]),
        (_with(background_adu=float("nan")), "no_finite_pixels", ["no finite"]),
    ],
)
def test_bad_frames_after_good_history_get_the_right_reason(metrics: FrameMetrics, reason: str,
                                                             words: list[str]) -> None:
    gate = _gate_with_history()
    verdict = gate.evaluate(metrics)
    assert not verdict.accepted
    assert verdict.reason == reason
    for word in words:
        assert word in verdict.message, verdict.message
    assert verdict.message.count(".") <= 3 and "\n" not in verdict.message


def test_evaluate_is_pure_and_only_accepted_frames_shape_the_history() -> None:
    gate = _gate_with_history(3)
    state = json.dumps(gate.to_dict())
    for _ in range(5):
        gate.evaluate(_with(star_count=10))
    assert json.dumps(gate.to_dict()) == state
    assert gate.history_length == 3


def test_jump_tests_wait_for_min_history_and_follow_slow_drifts() -> None:
    gate = QualityGate(GateConfig(min_history=3))
    gate.record_accepted(_good())
    gate.record_accepted(_good())
    assert gate.evaluate(_with(star_count=40)).accepted  # only 2 frames of history
    gate.record_accepted(_good())
    assert gate.evaluate(_with(star_count=40)).reason == "star_count_drop"
    # Twilight: the sky falls/rises slowly; the running median follows, nothing rejected.
    slow = QualityGate(GateConfig(window=5))
    for i in range(40):
        m = _with(background_adu=1000.0 + 20.0 * i)
        verdict = slow.evaluate(m)
        assert verdict.accepted, (i, verdict.message)
        slow.record_accepted(m)
    # A darker sky is never a "jump".
    assert slow.evaluate(_with(background_adu=10.0)).accepted


def test_absolute_limits_apply_from_the_first_frame() -> None:
    gate = QualityGate(GateConfig(max_fwhm_px=3.0, max_background_adu=5000.0))
    v = gate.evaluate(_with(fwhm_px=3.4))
    assert v.reason == "fwhm_too_large" and "3.40" in v.message
    v = gate.evaluate(_with(background_adu=6000.0))
    assert v.reason == "background_too_high" and "6000" in v.message
    assert gate.evaluate(_good()).accepted
    assert gate.evaluate(_good()).message == "accepted"


def test_state_round_trips_through_json() -> None:
    gate = _gate_with_history(25)  # more than the window: only the last 20 are kept
    gate.record_accepted(_with(fwhm_px=float("nan"), star_count=0))
    d = json.loads(json.dumps(gate.to_dict()))
    again = QualityGate.from_dict(GateConfig(), d)
    assert again.to_dict() == gate.to_dict()
    assert again.history_length == 20
    probe = _with(star_count=60)
    assert again.evaluate(probe) == gate.evaluate(probe)
    smaller = QualityGate.from_dict(GateConfig(window=4), d)
    assert smaller.history_length == 4
    with pytest.raises(ValueError, match="history"):
        QualityGate.from_dict(GateConfig(), {"nope": 1})
    with pytest.raises(ValueError, match="bad quality-gate history row"):
        QualityGate.from_dict(GateConfig(), {"history": [{"star_count": "x"}]})


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="star_drop_ratio"):
        GateConfig(star_drop_ratio=1.5)
    with pytest.raises(ValueError, match="min_history"):
        GateConfig(window=3, min_history=5)
    with pytest.raises(ValueError, match="fwhm_jump_ratio"):
        GateConfig(fwhm_jump_ratio=0.9)


def test_end_to_end_on_rendered_frames() -> None:
    """Clouds, bad seeing, dawn and wind on rendered frames, measured by detect.measure."""
    rng = np.random.default_rng(21)
    shape = (400, 500)
    xy, flux = star_field(rng, shape, 120, margin=20, flux_min=1500)

    def frame(transparency: float = 1.0, fwhm: float = 2.5, sky: float = 1000.0,
              elongation: float = 1.0) -> FrameMetrics:
        img = render_stars(shape, xy, flux * transparency, fwhm_px=fwhm,
                           elongation=elongation, angle_deg=20.0)
        noise = math.sqrt(sky / 10.0)  # sky-limited: noise follows the sky level
        return measure(noisy(rng, img, sky=sky, noise=noise))[1]

    gate = QualityGate(GateConfig())
    for _ in range(4):
        m = frame()
        assert gate.evaluate(m).accepted
        gate.record_accepted(m)
    assert gate.evaluate(frame(transparency=0.3)).reason == "star_count_drop"
    assert gate.evaluate(frame(fwhm=4.5)).reason == "fwhm_jump"
    assert gate.evaluate(frame(sky=3000.0)).reason == "background_jump"
    assert gate.evaluate(frame(elongation=2.2)).reason == "elongated"
    assert gate.evaluate(frame()).accepted

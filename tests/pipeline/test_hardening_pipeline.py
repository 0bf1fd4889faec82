"""Issue 14, point 7 (pipeline part): scattered NaN pixels get their own reason, and a
zero or NaN frame scale gives no raw numpy RuntimeWarning."""

from __future__ import annotations

import numpy as np
import pytest

from livestack.pipeline.normalize import FrameStats, NormalizeConfig, normalization
from livestack.pipeline.quality import GateConfig
from livestack.pipeline.session import PipelineConfig, StackSession
from livestack.sim import SimConfig, Simulator
from livestack.storage.headers import parse_frame_info


def test_scattered_nan_pixels_are_reported_as_nan_pixels_not_no_overlap() -> None:
    sim = Simulator(SimConfig(width=256, height=192), seed=4)
    rng = np.random.default_rng(0)
    session = StackSession("t", PipelineConfig(gate=GateConfig(min_stars=3)))
    outcomes = []
    for i in range(3):
        frame = sim.light(i)
        data = frame.data.astype(np.float32)
        if i == 2:  # a quarter of the pixels NaN, scattered (a broken converter, say)
            data[rng.random(data.shape) < 0.25] = np.nan
        info = parse_frame_info(frame.header, f"f{i}.fits", data.shape)
        outcomes.append(session.process(data, info, None))
    assert [o.verdict for o in outcomes[:2]] == ["accepted", "accepted"]
    assert outcomes[2].verdict == "rejected" and outcomes[2].reason == "nan_pixels"
    assert "NaN" in outcomes[2].message and "%" in outcomes[2].message


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("method", ["additive_scaling", "multiplicative"])
def test_zero_or_nan_scale_gives_no_runtime_warning(method: str) -> None:
    reference = FrameStats(100.0, 10.0, 5.0)
    for frame in (FrameStats(0.0, 0.0, 5.0), FrameStats(np.nan, np.nan, 5.0)):
        norm = normalization(frame, reference, NormalizeConfig(method=method))
        assert np.all(np.isfinite(norm.scale))  # falls back to 1.0, as documented

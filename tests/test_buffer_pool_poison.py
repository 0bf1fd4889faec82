"""Every pooled buffer handed out poisoned (not zeros, not the last frame's pixels): a step
that reads pooled memory before writing it (np.empty read as np.zeros) would change the
stack, so the stacks must equal the never-pooled engine's bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from livestack.engine.buffers import BufferPool
from livestack.engine.core import Engine
from livestack.sim import SimConfig, write_sequence
from tests.daemon_helpers import copy_frames, frames, last_row, make_config

__all__ = ["frames"]


class PoisonPool(BufferPool):
    """Pools everything; each array it hands out is filled with garbage first."""

    def empty(self, shape: Any, dtype: Any = np.float32) -> np.ndarray:
        out = super().empty(shape, dtype)
        dt = np.dtype(dtype)
        if dt.kind == "f":
            out.fill(3.0e30)
        elif dt.kind == "b":
            out.fill(True)
        else:
            out.fill(np.iinfo(dt).max)
        return out


def _stack(tmp_path: Path, paths: list[Path], pool: BufferPool) -> tuple[np.ndarray, list]:
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    engine.ingest.buffers = pool
    for path in paths:
        engine.process_path(path)
    engine.finalize()
    rows = [(last_row(engine, p).status, last_row(engine, p).reason) for p in paths]
    (rt,) = engine.runtimes.values()
    with fits.open(rt.folder / "stack.fits") as hdul:
        image = np.array(hdul[0].data)
    engine.close()
    return image, rows


def _compare(tmp_path: Path, lights: list[Path]) -> None:
    results = {}
    for name, pool in (("fresh", BufferPool(min_bytes=1 << 62)),
                       ("poison", PoisonPool(min_bytes=0))):
        good = copy_frames(lights, tmp_path / name / "in")
        results[name] = _stack(tmp_path / name, good, pool)
    assert results["poison"][1] == results["fresh"][1]
    assert results["poison"][0].tobytes() == results["fresh"][0].tobytes()


def test_mono_frames_through_a_poisoned_pool(tmp_path: Path, frames: list[Path]) -> None:
    _compare(tmp_path, frames[:6])


@pytest.mark.parametrize("bayer", ["RGGB"])
def test_bayer_frames_through_a_poisoned_pool(tmp_path: Path, bayer: str) -> None:
    config = SimConfig(width=256, height=192, bayer_pattern=bayer,
                       drift_px_per_frame=(1.3, 0.7))
    lights = write_sequence(tmp_path / "lights", config, seed=11, n_frames=5)
    _compare(tmp_path, lights)


def test_saturated_frames_through_a_poisoned_pool() -> None:
    from livestack.pipeline.session import PipelineConfig, StackSession
    from livestack.sim.saturated import SaturatedSky

    sky = SaturatedSky(seed=3)
    pool = PoisonPool(min_bytes=0)
    sessions = {name: StackSession(name, PipelineConfig()) for name in ("fresh", "pooled")}
    for index in range(5):
        for name, session in sessions.items():
            outcome = session.process(
                sky.frame(index), sky.info(index), None,
                stored_transform=sky.transform(index) if index else None,
                scratch=pool.empty if name == "pooled" else None)
            assert outcome.verdict == "accepted", outcome.message
    fresh, pooled = (s.product().image for s in sessions.values())
    assert pooled.tobytes() == fresh.tobytes()

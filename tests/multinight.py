"""Two simulated nights of the same sky for the multi-session and distributed tests.

Same seed (same stars, same sensor defects), different drift, noise (read noise and sky)
and dates; independent frames (night B starts at simulator index 40). Each night has a
bright satellite trail (night A's fourth light, night B's second). Frames are small
(384 x 288) to keep CI fast.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from livestack.sim import SimConfig
from livestack.sim.nights import Night, write_night

SEED = 5
N_PER_NIGHT = 8
B_START = 40
TRAIL_A, TRAIL_B = 3, B_START + 1
ID_A, ID_B = "2026-01-15/m42-l-60s", "2026-01-17/m42-l-60s"


def base_config() -> SimConfig:
    return SimConfig(width=384, height=288, n_stars=2000, satellite_frames=(TRAIL_A, TRAIL_B),
                     cosmic_rays_per_frame=3.0, drift_px_per_frame=(0.7, 0.4), dither_px=2.0)


def night_b_config() -> SimConfig:
    """Hazier, noisier night two days later, drifting the other way."""
    return replace(base_config(), drift_px_per_frame=(-0.6, 0.5), read_noise_e=6.0,
                   sky_e_per_s=30.0, start_time_utc="2026-01-17T22:00:00")


def write_two_nights(base: Path) -> tuple[Night, Night]:
    a = write_night(base / "a", base_config(), SEED, N_PER_NIGHT, stack_id=ID_A)
    b = write_night(base / "b", night_b_config(), SEED, N_PER_NIGHT, stack_id=ID_B,
                    start_index=B_START)
    return a, b


def mad_noise(image: NDArray[np.float32]) -> float:
    """Robust per-pixel noise from horizontal neighbour differences (stars barely count)."""
    diff = np.diff(image, axis=1)
    diff = diff[np.isfinite(diff)]
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))


def require_distributed() -> None:
    """Skip without Dask, except under CI where the test extra must provide it."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("dask/distributed missing under CI: install '.[test]'")
        pytest.skip("dask/distributed not installed (pip install 'livestack[distributed]')")

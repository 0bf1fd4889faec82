"""``livestack stack`` rewrites stack.fits only when the run ends (or every N frames if asked).

A batch's frames come back to back, so the live daemon's cadence (a rewrite every
``fits_every_frames``) cost 120-250 ms per 26 MP frame (bench/bench_stack_dense.py);
``output.batch_fits_every_frames`` (default 0) sets the batch's own cadence.
"""

from __future__ import annotations

from pathlib import Path

from astropy.io import fits

from livestack.batch import stack_files
from livestack.config import Config, config_from_dict
from livestack.engine.state import FITS_NAME
from tests.daemon_helpers import frames

__all__ = ["frames"]


def _config(tmp_path: Path, **output: object) -> Config:
    # The daemon's cadence says "every 2 frames": the batch must not follow it.
    return config_from_dict({"output": {"dir": str(tmp_path / "stacks"),
                                        "fits_every_frames": 2, **output}})


def _stack(config: Config, lights: list[Path], out: Path) -> tuple[list[bool], Path]:
    """Stack ``lights``; return whether stack.fits existed after each file, and its path."""
    seen: list[bool] = []

    def progress(done: int, total: int, row: object) -> None:
        seen.append(any(out.rglob(FITS_NAME)))

    stack_files(config, lights, out, progress=progress)
    (fits_path,) = out.rglob(FITS_NAME)
    return seen, fits_path


def test_the_batch_writes_stack_fits_once_at_the_end(tmp_path: Path,
                                                      frames: list[Path]) -> None:
    seen, fits_path = _stack(_config(tmp_path), frames[:6], tmp_path / "out")
    assert seen == [False] * 6
    assert fits.getheader(fits_path)["NCOMBINE"] == 6


def test_batch_fits_every_frames_brings_the_rewrites_back(tmp_path: Path,
                                                         frames: list[Path]) -> None:
    config = _config(tmp_path, batch_fits_every_frames=3)
    seen, fits_path = _stack(config, frames[:6], tmp_path / "out")
    assert seen == [False, False, True, True, True, True]
    assert fits.getheader(fits_path)["NCOMBINE"] == 6

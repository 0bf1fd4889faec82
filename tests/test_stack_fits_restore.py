"""Issue 14, point 2: after a restart stack.fits always equals the restored stack.

Before: 18 frames accepted, stack.fits last written at 10 (fits_every_frames), a kill,
a restart restoring the checkpoint of 18 with nothing to replay: stack.fits kept saying
NCOMBINE 10, even after a clean stop; a truncated stack.fits was never rewritten either.
"""

from __future__ import annotations

from pathlib import Path

from astropy.io import fits

from livestack.engine.core import Engine
from livestack.engine.state import FITS_NAME
from livestack.storage.stackcheck import stack_fits_matches
from tests.daemon_helpers import copy_frames, frames, make_config

__all__ = ["frames"]


def _killed_after(tmp_path: Path, watch: list[Path]) -> Path:
    """Stack ``watch`` (FITS every 4, checkpoint every 6), then stop without finalize."""
    config = make_config(tmp_path, fits_every_frames=4, checkpoint_every_frames=6)
    engine = Engine(config, tmp_path / "stacks", background_checkpoints=False)
    for path in watch:
        engine.process_path(path)
    (rt,) = engine.runtimes.values()
    assert rt.session.n_accepted == 6 and rt.frames_since_checkpoint == 0
    engine.close()  # what a SIGKILL leaves: journal + checkpoint, no final stack.fits
    return rt.folder / FITS_NAME


def _restart(tmp_path: Path, *, finalize: bool) -> None:
    """A new engine on the same output: resume, optionally finalize, close."""
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    engine.resume()
    if finalize:
        engine.finalize()
    engine.close()


def _ncombine(path: Path) -> int:
    with fits.open(path) as hdul:
        return int(hdul[0].header["NCOMBINE"])


def test_stack_fits_behind_the_checkpoint_is_rewritten_at_restore(
        tmp_path: Path, frames: list[Path]) -> None:
    watch = copy_frames(frames[:6], tmp_path / "in")
    fits_path = _killed_after(tmp_path, watch)
    assert _ncombine(fits_path) == 4  # the failure: behind the journal and checkpoint
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    assert engine.resume() == []
    assert _ncombine(fits_path) == 6
    engine.finalize()
    engine.close()
    assert _ncombine(fits_path) == 6


def test_truncated_stack_fits_is_rewritten(tmp_path: Path, frames: list[Path]) -> None:
    watch = copy_frames(frames[:6], tmp_path / "in")
    fits_path = _killed_after(tmp_path, watch)
    _restart(tmp_path, finalize=True)
    with open(fits_path, "r+b") as f:
        f.truncate(1000)
    assert not stack_fits_matches(fits_path, 6, 6)
    _restart(tmp_path, finalize=True)
    assert stack_fits_matches(fits_path, 6, 6) and _ncombine(fits_path) == 6


def test_a_current_stack_fits_is_left_alone(tmp_path: Path, frames: list[Path]) -> None:
    watch = copy_frames(frames[:6], tmp_path / "in")
    fits_path = _killed_after(tmp_path, watch)
    _restart(tmp_path, finalize=False)
    before = fits_path.stat().st_mtime_ns
    _restart(tmp_path, finalize=False)
    assert fits_path.stat().st_mtime_ns == before

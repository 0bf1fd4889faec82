"""Issue 14, point 8: a corrupt journal is recovered and the stack ends up the same."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from livestack.engine.core import Engine
from livestack.engine.state import FITS_NAME
from livestack.errors import JournalError, UsageError
from livestack.recover import journal_problem, recover
from livestack.storage.stackfits import read_stack_fits
from tests.daemon_helpers import assert_same_image, copy_frames, frames, make_config

__all__ = ["frames"]


def _stack(tmp_path: Path, watch: list[Path]) -> Path:
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    engine.resume()
    for path in watch:
        engine.process_path(path)
    engine.finalize()
    (rt,) = engine.runtimes.values()
    engine.close()
    return rt.folder / FITS_NAME


def _corrupt(root: Path, how: str) -> None:
    journal = root / "journal.sqlite"
    for extra in ("journal.sqlite-wal", "journal.sqlite-shm"):
        (root / extra).unlink(missing_ok=True)
    if how == "garbage":
        journal.write_bytes(np.random.default_rng(7).bytes(8192))
    else:
        with open(journal, "r+b") as f:
            f.truncate(3000)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_journal_is_recovered_to_the_same_stack(tmp_path: Path, frames: list[Path],
                                                        how: str) -> None:
    watch = copy_frames(frames[:5], tmp_path / "in")
    fits_path = _stack(tmp_path, watch)
    before = read_stack_fits(fits_path)
    root = tmp_path / "stacks"
    _corrupt(root, how)
    assert journal_problem(root) is not None
    with pytest.raises(JournalError, match="livestack recover"):
        Engine(make_config(tmp_path), root)
    report = recover(root, tmp_path / "in")
    assert report.moved_aside and report.moved_aside[0].name.startswith(
        "journal.sqlite.corrupt-")
    assert list(report.stacks.values()) == [5] and report.unlisted == 0
    assert journal_problem(root) is None
    # The next run resumes from the recovered journal: nothing is processed twice.
    engine = Engine(make_config(tmp_path), root)
    assert engine.resume() == []
    assert all(engine.process_path(p) is None for p in watch)
    (rt,) = engine.runtimes.values()
    assert rt.session.n_accepted == before.header["NCOMBINE"] == 5
    engine.finalize()
    engine.close()
    after = read_stack_fits(fits_path)
    np.testing.assert_array_equal(after.image, before.image)  # the checkpoint was kept
    np.testing.assert_array_equal(after.weight, before.weight)


def test_recover_without_a_usable_checkpoint_replays_and_new_frames_follow(
        tmp_path: Path, frames: list[Path]) -> None:
    watch = copy_frames(frames[:6], tmp_path / "in")
    fits_path = _stack(tmp_path, watch[:4])
    reference = _stack(tmp_path / "ref", copy_frames(frames[:6], tmp_path / "ref" / "in"))
    root = tmp_path / "stacks"
    (fits_path.parent / "checkpoint.npz").write_bytes(b"not a checkpoint")
    _corrupt(root, "garbage")
    report = recover(root, tmp_path / "in")
    assert report.checkpoints_stale == list(report.stacks) and report.unlisted == 2
    engine = Engine(make_config(tmp_path), root)
    engine.resume()
    for path in watch:  # the two frames that arrived later are processed now, once
        engine.process_path(path)
    engine.finalize()
    engine.close()
    after, ref = read_stack_fits(fits_path), read_stack_fits(reference)
    assert after.header["NCOMBINE"] == ref.header["NCOMBINE"] == 6
    assert_same_image(after.image, ref.image)


def test_recover_refuses_an_intact_journal_and_the_cli_reports(tmp_path: Path,
                                                              frames: list[Path]) -> None:
    watch = copy_frames(frames[:2], tmp_path / "in")
    _stack(tmp_path, watch)
    root = tmp_path / "stacks"
    with pytest.raises(UsageError, match="intact"):
        recover(root)
    _corrupt(root, "garbage")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "livestack.cli", "recover", str(root),
                             "--watch", str(tmp_path / "in")], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "moved aside" in result.stdout and "2 frame(s) rebuilt" in result.stdout
    assert "Traceback" not in result.stderr

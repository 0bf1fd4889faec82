"""The one atomic-replace helper: mode, old file kept on failure, no temp left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from livestack.errors import StorageError
from livestack.storage.atomic import atomic_write, stage_write


def test_replaces_with_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "stack.fits"
    target.write_bytes(b"old")
    target.chmod(0o600)
    with atomic_write(target, what="stack FITS") as (fd, tmp):
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp")
        os.write(fd, b"new")
    assert target.read_bytes() == b"new"
    assert (target.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.fits"]


def test_a_full_disk_keeps_the_old_file_and_names_the_path(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.npz"
    target.write_bytes(b"previous checkpoint")
    with pytest.raises(StorageError, match=r"checkpoint\.npz: cannot write checkpoint: No space"):
        with atomic_write(target, what="checkpoint") as (fd, _tmp):
            os.write(fd, b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]


def test_non_os_errors_propagate_and_clean_up(tmp_path: Path) -> None:
    target = tmp_path / "preview.jpg"
    with pytest.raises(ValueError, match="bug"):
        with atomic_write(target) as (_fd, _tmp):
            raise ValueError("bug")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_set_up_names_the_path_and_leaves_no_temp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The temp-file set-up both writers share (mkstemp, then chmod) failing half-way.
    target = tmp_path / "stack.fits"
    target.write_bytes(b"old")

    def refuse(fd: int, mode: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refuse)
    with pytest.raises(StorageError, match=r"stack\.fits: cannot write stack FITS: Operation"):
        with atomic_write(target, what="stack FITS") as (fd, _tmp):
            os.write(fd, b"new")
    with pytest.raises(StorageError, match=r"stack\.fits: cannot write checkpoint: Operation"):
        stage_write(target, lambda fd: None, what="checkpoint")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.fits"]


def test_a_missing_folder_names_the_path(tmp_path: Path) -> None:
    target = tmp_path / "gone" / "checkpoint.npz"
    with pytest.raises(StorageError, match=r"gone/checkpoint\.npz: cannot write checkpoint"):
        with atomic_write(target, what="checkpoint") as (_fd, _tmp):
            pass
    with pytest.raises(StorageError, match=r"gone/checkpoint\.npz: cannot write checkpoint"):
        stage_write(target, lambda fd: None, what="checkpoint")


def test_stage_write_on_a_full_disk_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.npz"
    target.write_bytes(b"previous checkpoint")

    def write(fd: int) -> None:
        os.write(fd, b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError, match=r"checkpoint\.npz: cannot write checkpoint: No space"):
        stage_write(target, write, what="checkpoint")
    assert target.read_bytes() == b"previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]


def test_stage_write_non_os_errors_propagate_and_clean_up(tmp_path: Path) -> None:
    def write(fd: int) -> None:
        raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        stage_write(tmp_path / "checkpoint.npz", write)
    assert list(tmp_path.iterdir()) == []


def test_staged_file_commits_with_mode_or_is_discarded(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.npz"
    target.write_bytes(b"old")

    def write(fd: int) -> None:
        os.write(fd, b"new")

    staged = stage_write(target, write, mode=0o640)
    assert target.read_bytes() == b"old"  # not visible before the commit
    staged.commit()
    assert target.read_bytes() == b"new"
    assert (target.stat().st_mode & 0o777) == 0o640
    stage_write(target, lambda fd: None).discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]


def test_a_failed_rename_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    # A folder in the target's place: the rename fails after the temp file is complete.
    target = tmp_path / "stack.fits"
    target.mkdir()
    (target / "keep").write_bytes(b"x")
    with pytest.raises(StorageError, match=r"stack\.fits: cannot write stack FITS"):
        with atomic_write(target, what="stack FITS") as (fd, _tmp):
            os.write(fd, b"new")
    staged = stage_write(target, lambda fd: None, what="stack FITS")
    with pytest.raises(StorageError, match=r"stack\.fits: cannot write stack FITS"):
        staged.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.fits"]
    assert (target / "keep").read_bytes() == b"x"


def test_a_non_os_error_before_the_rename_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "preview.jpg"

    def stop(tmp: Path) -> None:
        assert tmp.read_bytes() == b"new"  # complete before the rename
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, before_replace=stop) as (fd, _tmp):
            os.write(fd, b"new")
    assert list(tmp_path.iterdir()) == []

"""Atomic accumulator checkpoints (``checkpoint.npz`` in each stack's folder).

A checkpoint is an ``.npz`` of the stack session's state arrays plus one JSON member
(``__meta__``) holding the session's meta and the journal ``seq`` the checkpoint covers.
It is written to a temporary file in the same folder, fsynced, renamed over the previous
checkpoint (``os.replace``, atomic on POSIX) and the folder is fsynced: at every instant
the file name holds either the old or the new complete checkpoint.

Loading verifies the zip CRCs of every member, so a torn or corrupted file is detected
and reported as :class:`~livestack.errors.StorageError`; the daemon then falls back to
replaying the journal.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from livestack.errors import StorageError
from livestack.storage.atomic import StagedFile, stage_write

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT_VERSION = 1
_META_KEY = "__meta__"
_TMP_PREFIX = ".checkpoint-"
_TMP_SUFFIX = ".tmp"


def save_checkpoint(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                    *, compress: bool = False,
                    before_replace: Callable[[Path], None] | None = None) -> int:
    """Write a checkpoint atomically; return its size in bytes.

    Parameters
    ----------
    path : str or Path
        Final file name (normally ``<stack folder>/checkpoint.npz``).
    arrays : dict of str -> ndarray
        The state arrays (any dtype/shape; no object arrays).
    meta : dict
        JSON-able meta data (session meta, journal seq, generation, ...).
    compress : bool
        Deflate the members (smaller, much slower: see ``bench/bench_checkpoint.py``).
    before_replace : callable, optional
        Called with the temp file's path once it is complete and fsynced, just before
        the rename (crash-safety tests stop the process there).

    Raises
    ------
    StorageError
        Any OSError (disk full, permissions, read-only file system); the message names
        the path. The previous checkpoint at ``path`` is left untouched.
    """
    staged, size = stage_checkpoint(path, arrays, meta, compress=compress)
    staged.commit(before_replace)
    return size


def stage_checkpoint(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                     *, compress: bool = False) -> tuple[StagedFile, int]:
    """Write a checkpoint into a temporary file next to ``path``, not yet durable or visible.

    The arrays may be live views of the stack's state: they are only read here, so the
    caller must not change them until this returns (the worker calls it between frames).
    :meth:`StagedFile.commit` (fsync + rename) can then run in another thread.

    Returns
    -------
    staged : StagedFile
    size : int
        Bytes written.

    Raises
    ------
    StorageError
        Any OSError while writing; no temp file is left behind.
    """
    if _META_KEY in arrays:
        raise ValueError(f"array name {_META_KEY!r} is reserved")
    payload = dict(arrays)
    blob = json.dumps({"format": FORMAT_VERSION, **meta}).encode("utf-8")
    payload[_META_KEY] = np.frombuffer(blob, dtype=np.uint8)
    written = [0]

    def write(fd: int) -> None:
        with os.fdopen(fd, "wb", closefd=False) as fh:
            if compress:
                np.savez_compressed(fh, allow_pickle=False, **payload)
            else:
                # numpy streams each member in bounded chunks: no copy of a plane is made.
                np.savez(fh, allow_pickle=False, **payload)
            fh.flush()
            written[0] = fh.tell()

    staged = stage_write(path, write, what="checkpoint", prefix=_TMP_PREFIX)
    return staged, written[0]


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns
    -------
    arrays : dict of str -> ndarray
    meta : dict
        Including ``"format"``.

    Raises
    ------
    FileNotFoundError
        No checkpoint at ``path``.
    StorageError
        The file is unreadable, truncated, corrupted (CRC mismatch) or not a checkpoint.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # reads every member and checks its CRC
            if bad is not None:
                raise StorageError(f"{path}: corrupt checkpoint (bad CRC in {bad})")
        with np.load(path, allow_pickle=False) as npz:
            if _META_KEY not in npz.files:
                raise StorageError(f"{path}: not a livestack checkpoint (no meta)")
            meta = json.loads(npz[_META_KEY].tobytes().decode("utf-8"))
            arrays = {name: npz[name] for name in npz.files if name != _META_KEY}
    except FileNotFoundError:
        raise
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, KeyError) as exc:
        raise StorageError(f"{path}: corrupt or unreadable checkpoint: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise StorageError(f"{path}: unsupported checkpoint format")
    return arrays, meta


def remove_stale_temps(folder: str | Path) -> int:
    """Delete temporary files left by a checkpoint write that was killed; return how many."""
    removed = 0
    for tmp in Path(folder).glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed += 1
    return removed

"""What the engine's parts share: a live stack's bookkeeping, file names and small helpers.

Nothing here does I/O except the two file helpers, which act on the stack folder they are
given.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livestack.storage.atomic import atomic_write

if TYPE_CHECKING:
    from livestack.pipeline.session import FrameOutcome, StackSession
    from livestack.pipeline.types import FrameInfo
    from livestack.storage.journal import Journal

#: IMAGETYP values (normalised by the FITS reader) that are never stacked as lights.
CALIBRATION_TYPES = frozenset({"bias", "dark", "flat", "darkflat"})
#: Rejections caused by alignment (they count towards the router's failure run). The
#: registrar's "too_few_stars" is left out: the gate uses the same code for clouds, and a
#: cloud bank must not start a new stack.
ALIGNMENT_REASONS = frozenset({"no_match", "no_overlap"})
#: Files the daemon serves per stack.
STACK_FILES = ("stack.fits", "preview.jpg")
PREVIEW_NAME = "preview.jpg"
FITS_NAME = "stack.fits"
#: Consecutive rejections that raise an ``alert`` event.
REJECTION_RUN_ALERT = 5
#: Longest wait for the checkpoint thread at finalize/close (0.6 GB + fsync on a slow SD card).
CHECKPOINT_WAIT_S = 300.0

#: Test hook (crash-safety tests only): ``LIVESTACK_TEST_PAUSE_AT=read|accumulate|checkpoint``
#: with ``LIVESTACK_TEST_PAUSE_AFTER=N`` stops the worker at that point once the journal
#: has N finished rows, after printing ``livestack-test: paused at STAGE`` on stderr, so a
#: test can SIGKILL the process exactly there. Unset in production: no effect.
PAUSE_ENV = "LIVESTACK_TEST_PAUSE_AT"
PAUSE_AFTER_ENV = "LIVESTACK_TEST_PAUSE_AFTER"


class CrashPause:
    """The crash-test hook described at :data:`PAUSE_ENV`."""

    def __init__(self) -> None:
        self.stage = os.environ.get(PAUSE_ENV) or None
        self.after = int(os.environ.get(PAUSE_AFTER_ENV, "0") or 0)

    def __call__(self, stage: str, journal: Journal) -> None:
        if self.stage != stage:
            return
        done = sum(n for status, n in journal.counts().items() if status != "pending")
        if done < self.after:
            return
        os.write(2, f"livestack-test: paused at {stage}\n".encode())
        time.sleep(60.0)


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def stack_key_of(info: FrameInfo) -> dict[str, Any]:
    """The header facts that define a stack (stored in the journal's ``stacks`` table)."""
    return {"object": info.object_name, "filter": info.filter_name,
            "exposure_s": info.exposure_s, "binning": list(info.binning),
            "shape": list(info.shape), "bayer_pattern": info.bayer_pattern, "gain": info.gain}


def write_atomic(path: Path, blob: bytes) -> None:
    """Write ``blob`` to ``path`` atomically (readers never see half a file).

    Raises
    ------
    StorageError
        The file cannot be written.
    """
    with atomic_write(path) as (fd, _tmp), os.fdopen(fd, "wb", closefd=False) as fh:
        fh.write(blob)


def remove_files(folder: Path, names: Iterable[str]) -> None:
    """Remove our own files ``names`` from ``folder`` where they exist."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()


def metrics_json(outcome: FrameOutcome) -> dict[str, Any] | None:
    """A frame's quality metrics, timings and rejection counts as the journal stores them."""
    if outcome.metrics is None:
        return None
    data: dict[str, Any] = dict(outcome.metrics.as_dict())
    data["timings_ms"] = {k: round(v, 3) for k, v in outcome.timings_ms.items()}
    data["rejected_low"] = outcome.rejected_low
    data["rejected_high"] = outcome.rejected_high
    return data


@dataclass
class Runtime:
    """A live stack: its session plus output cadence bookkeeping."""

    stack_id: str
    folder: Path
    session: StackSession
    key: dict[str, Any]
    generation: int
    last_seq: int = 0
    frames_since_checkpoint: int = 0
    last_checkpoint_t: float = field(default_factory=time.monotonic)
    accepted_since_fits: int = 0
    accepted_since_preview: int = 0
    last_preview_t: float = 0.0
    preview_version: int = 0
    rejection_run: int = 0
    seen: int = 0
    rejected: int = 0
    failed: int = 0
    started: str = field(default_factory=now_iso)

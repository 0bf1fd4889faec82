"""FrameError's Reason and path: one list of codes, and the rebuild names frames by path."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from livestack.engine.rebuild import read_error, write_error
from livestack.errors import FrameReadError, StorageError
from livestack.reasons import Reason


def test_a_reason_is_its_code_in_text_json_and_comparisons() -> None:
    exc = FrameReadError("truncated", "/in/a.fits: short", "/in/a.fits")
    assert exc.reason is Reason.TRUNCATED
    assert exc.reason == "truncated" and f"replay_{exc.reason}" == "replay_truncated"
    assert json.dumps({"reason": exc.reason}) == '{"reason": "truncated"}'


def test_an_unknown_code_is_refused() -> None:
    with pytest.raises(ValueError, match="not_a_reason"):
        FrameReadError("not_a_reason", "x")


def test_a_frame_error_keeps_reason_message_and_path_through_pickling() -> None:
    exc = pickle.loads(pickle.dumps(FrameReadError(Reason.MISSING, "/in/a.fits: gone",
                                                   Path("/in/a.fits"))))
    assert type(exc) is FrameReadError
    assert (exc.reason, exc.message, exc.path) == (Reason.MISSING, "/in/a.fits: gone",
                                                   "/in/a.fits")


def test_the_rebuild_error_file_names_the_frame_by_path(tmp_path: Path) -> None:
    path = tmp_path / "rebuild-error.json"
    # A message that does not start with the path: the supervisor must not need it to.
    write_error(path, FrameReadError(Reason.CHANGED_ON_DISK, "content changed", "/in/b.fits"))
    assert read_error(path) == {"reason": "changed_on_disk", "message": "content changed",
                                "path": "/in/b.fits"}
    write_error(path, StorageError("disk full"))
    assert read_error(path) == {"reason": "StorageError", "message": "disk full", "path": None}

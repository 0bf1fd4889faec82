"""Engine read path: the next file is hashed ahead (engine.prefetch), a changed file is
hashed afresh; a processed frame's array is decoded into again only when nothing holds it."""

from __future__ import annotations

import hashlib
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from livestack.config import config_from_dict
from livestack.engine.core import Engine
from livestack.engine.prefetch import Prefetcher, hash_file
from livestack.engine.reader import FrameReader
from livestack.engine.worker import WorkQueue
from livestack.sim import SimConfig, write_sequence
from livestack.storage import formats
from livestack.storage.calibration import CalibrationRecord
from livestack.storage.fitsio import read_frame

SIZE = {"width": 256, "height": 192}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_take_returns_the_submitted_hash_once_and_nothing_for_another_path(
        tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"first" * 1000)
    b.write_bytes(b"second" * 1000)
    pre = Prefetcher()
    try:
        pre.submit(a)
        got = pre.take(a)
        assert got is not None and got.sha256 == _sha(a)
        assert got.matches(os.stat(a))
        assert pre.take(a) is None  # handed out once
        pre.submit(a)
        assert pre.take(b) is None  # a result for another path is dropped ...
        assert pre.take(a) is None  # ... not kept for later
    finally:
        pre.close()
    pre.submit(b)  # closed: no thread, no result
    assert pre.take(b) is None


def test_a_file_written_after_hashing_no_longer_matches(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 4096)
    got = hash_file(str(path))
    assert got is not None
    path.write_bytes(b"y" * 4097)
    assert not got.matches(os.stat(path))
    assert hash_file(str(tmp_path / "missing.bin")) is None


def test_the_queue_peeks_at_the_next_path_without_taking_it(tmp_path: Path) -> None:
    q = WorkQueue()
    assert q.peek_path() is None
    q.put_path(tmp_path / "1.fits")
    q.put_path(tmp_path / "2.fits")
    assert q.peek_path() == tmp_path / "1.fits"
    assert q.get(0.0) == ("path", tmp_path / "1.fits")
    assert q.peek_path() == tmp_path / "2.fits"


def test_the_journal_keeps_the_hash_of_the_content_stacked_even_if_changed_after_prefetch(
        tmp_path: Path) -> None:
    lights = tmp_path / "in"
    paths = write_sequence(lights, SimConfig(**SIZE), 1, 3)  # type: ignore[arg-type]
    config = config_from_dict({"output": {"dir": str(tmp_path / "out")}})
    engine = Engine(config, tmp_path / "out")
    try:
        engine.process_path(paths[0], ahead=paths[1])
        # Rewritten after it was hashed ahead (same size, new mtime): hashed afresh.
        data = bytearray(paths[1].read_bytes())
        data[-1] ^= 0x01
        paths[1].write_bytes(bytes(data))
        os.utime(paths[1], ns=(1, 1))
        row1 = engine.process_path(paths[1], ahead=paths[2])
        row2 = engine.process_path(paths[2])
    finally:
        engine.close()
    assert row1 is not None and row1.sha256 == _sha(paths[1])
    assert row2 is not None and row2.sha256 == _sha(paths[2])
    assert row2.status == "accepted"


def test_a_recycled_frame_is_decoded_into_only_when_nothing_else_holds_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_sequence(tmp_path / "in", SimConfig(**SIZE), 1, 3)  # type: ignore[arg-type]
    config = config_from_dict({"output": {"dir": str(tmp_path / "out")}})
    reader = FrameReader(config, None, CalibrationRecord(tmp_path / "out", None, 1.0))
    first, _ = reader.read(str(paths[0]))
    first_id = id(first)
    reader.recycle(first)
    del first  # the reader's is the only reference left: reused
    second, _ = reader.read(str(paths[1]), reuse=True)
    assert id(second) == first_id
    np.testing.assert_array_equal(second, read_frame(paths[1])[0])
    held = second[10:20]  # a view (e.g. kept by a session) pins the array
    reader.recycle(second)
    del second
    third, _ = reader.read(str(paths[2]), reuse=True)
    assert held.base is not None and held.base is not third
    np.testing.assert_array_equal(held, read_frame(paths[1])[0][10:20])
    gone = weakref.ref(third)
    reader.recycle(third)
    del third
    assert gone() is not None
    reader.release()  # idle: dropped (freed), the next read allocates afresh
    assert gone() is None
    tiff = tmp_path / "frame.tiff"  # another format: the spare is dropped before decoding
    tifffile.imwrite(tiff, read_frame(paths[0])[0].astype(np.uint16))
    fourth, _ = reader.read(str(paths[0]))
    gone = weakref.ref(fourth)
    reader.recycle(fourth)
    del fourth
    real_raster = formats.read_raster
    alive_while_decoding: list[bool] = []

    def raster(*args: Any) -> Any:
        alive_while_decoding.append(gone() is not None)
        return real_raster(*args)

    monkeypatch.setattr(formats, "read_raster", raster)
    fifth, _ = reader.read(str(tiff), reuse=True)
    assert alive_while_decoding == [False] and fifth.shape == (192, 256)

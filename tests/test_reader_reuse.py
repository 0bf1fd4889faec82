"""Engine read path: a processed frame's array is decoded into again (FrameReader.recycle)
only when nothing else holds it, and only by the plain FITS reader."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from livestack.config import config_from_dict
from livestack.engine.reader import FrameReader
from livestack.sim import SimConfig, write_sequence
from livestack.storage import formats
from livestack.storage.calibration import CalibrationRecord
from livestack.storage.fitsio import read_frame

SIZE = {"width": 256, "height": 192}


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

"""Scratch storage for the integration engine's registered frames, and the
``--keep-registered`` files.

:class:`FrameStore` keeps every registered frame (``(n, channels, ny, nx)`` float32, NaN
outside its footprint) in RAM when it fits the memory limit, else in a scratch file in a
``.livestack-integrate-*`` folder, written and read with positioned I/O
(``os.pwrite``/``os.preadv``) rather than ``np.memmap`` so that the file's pages never count
towards the process's resident memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from livestack.errors import StorageError
from livestack.pipeline.types import Transform

SCRATCH_NAME = "registered.f32"


class FrameStore:
    """Registered frames, ``(n, n_channels, ny, nx)`` float32, NaN outside footprints."""

    def __init__(self, n: int, channels: int, shape: tuple[int, int], scratch_dir: Path | None
                 ) -> None:
        self.n, self.channels, self.shape = n, channels, shape
        self.plane_bytes = shape[0] * shape[1] * 4
        self.folder: Path | None = None
        self._fd: int | None = None
        self._ram: NDArray[np.float32] | None = None
        if scratch_dir is None:
            self._ram = np.empty((n, channels, *shape), dtype=np.float32)
            return
        need = n * channels * self.plane_bytes
        scratch_dir.mkdir(parents=True, exist_ok=True)
        try:
            free = shutil.disk_usage(scratch_dir).free
        except OSError as exc:
            raise StorageError(f"{scratch_dir}: cannot use for scratch: "
                               f"{exc.strerror or exc}") from exc
        if free < need + 64 * 2**20:
            raise StorageError(f"{scratch_dir}: {free / 2**30:.1f} GiB free, the registered "
                               f"frames need {need / 2**30:.1f} GiB of scratch space "
                               "(raise --memory-limit or free disk space)")
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=".livestack-integrate-",
                                                dir=scratch_dir))
            self._fd = os.open(self.folder / SCRATCH_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            self.close()
            raise StorageError(f"{scratch_dir}: cannot create scratch file: "
                               f"{exc.strerror or exc}") from exc

    @property
    def in_ram(self) -> bool:
        return self._ram is not None

    def put(self, index: int, planes: NDArray[np.float32]) -> None:
        """Store frame ``index`` (``(channels, ny, nx)`` float32)."""
        if self._ram is not None:
            self._ram[index] = planes
            return
        assert self._fd is not None
        data = np.ascontiguousarray(planes, dtype=np.float32).data.cast("B")
        offset = index * self.channels * self.plane_bytes
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self._fd, data[done:], offset + done)
        except OSError as exc:
            raise StorageError(f"{self.folder}: scratch write failed: "
                               f"{exc.strerror or exc}") from exc

    def band(self, channel: int, y0: int, y1: int, out: NDArray[np.float32]
             ) -> NDArray[np.float32]:
        """Rows ``y0:y1`` of one channel of every frame, as a C-contiguous
        ``(n, y1 - y0, nx)`` view of the start of the flat buffer ``out``."""
        rows = y1 - y0
        view = out[: self.n * rows * self.shape[1]].reshape(self.n, rows, self.shape[1])
        if self._ram is not None:
            np.copyto(view, self._ram[:, channel, y0:y1])
            return view
        assert self._fd is not None
        nx = self.shape[1]
        for i in range(self.n):
            target = view[i].data.cast("B")
            offset = ((i * self.channels + channel) * self.shape[0] + y0) * nx * 4
            done = 0
            try:
                while done < len(target):
                    got = os.preadv(self._fd, [target[done:]], offset + done)
                    if got <= 0:
                        raise StorageError(f"{self.folder}: scratch file is short")
                    done += got
            except OSError as exc:
                raise StorageError(f"{self.folder}: scratch read failed: "
                                   f"{exc.strerror or exc}") from exc
        return view

    def close(self) -> None:
        """Release the RAM copy or remove the scratch folder (idempotent)."""
        self._ram = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def write_registered(folder: Path, frame_path: str, planes: NDArray[np.float32],
                     transform: Transform, reference: str) -> None:
    """Write one calibrated, registered frame as ``r_<name>.fits`` (raw header kept).

    Parameters
    ----------
    folder : Path
        The ``--keep-registered`` folder (exists).
    frame_path : str
        The raw frame (its header is copied; its name gives the output name).
    planes : ndarray, shape (channels, ny, nx), float32
        The registered frame (ADU), NaN outside its footprint.
    transform : Transform
        Frame -> reference (written as ``LSTRANS1..6``).
    reference : str
        Path of the reference frame (named in ``HISTORY``).

    Raises
    ------
    FrameReadError
        The raw frame's header cannot be read.
    StorageError
        The file cannot be written.
    """
    from astropy.io import fits

    from livestack.storage.fitsio import write_fits_float32
    from livestack.storage.formats import FRAME_SUFFIXES, read_header

    header, _ = read_header(Path(frame_path))
    header = header.copy()
    header["HISTORY"] = "livestack integrate: calibrated and registered"
    header["HISTORY"] = f"reference: {os.path.basename(reference)}"
    for k, value in enumerate(transform.to_list(), start=1):
        header[f"LSTRANS{k}"] = (value, f"frame->reference affine [{(k - 1) // 3},{(k - 1) % 3}]")
    data = planes[0] if planes.shape[0] == 1 else planes
    stem = Path(frame_path).name
    for suffix in (".fits.fz", ".fit.fz", *FRAME_SUFFIXES):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    write_fits_float32(folder / f"r_{stem}.fits", data, fits.Header(header))


__all__ = ["SCRATCH_NAME", "FrameStore", "write_registered"]

"""Masters of RGB frames: the shape they must match, flat normalisation per CFA colour or
RGB channel, and reading ``(3, ny, nx)`` master files.

RGB frames (TIFF/PNG/JPEG/XISF colour images, read as ``(3, ny, nx)``) need masters of the
same shape: :mod:`livestack.storage.masters` combines such frames as one 2-D image of their
planes end to end (the work is per pixel) and writes the result as a FITS cube, which the
frame reader refuses on purpose (a colour stack dropped among lights is not a light), so
this module reads those cubes back.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError

from livestack.errors import FrameReadError, MasterError
from livestack.pipeline.calibrate import find_cold_pixels, find_defects
from livestack.pipeline.debayer import cfa_channel_masks
from livestack.pipeline.types import FrameInfo
from livestack.storage import fitsio
from livestack.storage.headers import parse_frame_info


def fmt_shape(shape: tuple[int, ...]) -> str:
    """``"256x192"`` for a 2-D shape, ``"256x192 RGB"`` for ``(3, ny, nx)``."""
    text = f"{shape[-1]}x{shape[-2]}"
    return f"{text} RGB" if len(shape) == 3 else text


def geometry_of(info: FrameInfo) -> tuple[int, ...]:
    """``(ny, nx)`` of a mono/CFA frame, ``(3, ny, nx)`` of an RGB one: what must match."""
    return (info.channels, *info.shape) if info.channels > 1 else tuple(info.shape)


def rows_shape(info: FrameInfo) -> tuple[int, int]:
    """The 2-D shape masters are combined in: an RGB frame's planes end to end in rows."""
    return (info.channels * info.shape[0], info.shape[1])


def defect_map(dark: np.ndarray, exposure_s: float, flat: np.ndarray | None
               ) -> np.ndarray:
    """Hot pixels of a master dark and cold ones of a flat, per channel for RGB masters.

    Parameters
    ----------
    dark : ndarray, shape (ny, nx) or (3, ny, nx), float32
        Thermal signal (or the dark itself), ADU.
    exposure_s : float
        The dark's exposure, seconds.
    flat : ndarray or None
        The normalised master flat, same shape.

    Returns
    -------
    ndarray, shape of ``dark``, bool
    """
    if dark.ndim == 3:
        return np.stack([find_defects(dark[c], exposure_s,
                                      master_flat=None if flat is None else flat[c])
                         for c in range(dark.shape[0])])
    return find_defects(dark, exposure_s, master_flat=flat)


def cold_map(flat: np.ndarray) -> np.ndarray:
    """Cold pixels of a flat alone (:func:`find_cold_pixels`), per channel for RGB."""
    if flat.ndim == 3:
        return np.stack([find_cold_pixels(plane) for plane in flat])
    return find_cold_pixels(flat)


def read_rgb_master(path: Path) -> tuple[np.ndarray, fits.Header, FrameInfo]:
    """Pixels (float32), header and info of an RGB ``(3, ny, nx)`` master FITS file.

    Raises
    ------
    MasterError
        Not a readable FITS file, or not a ``(3, ny, nx)`` image.
    """
    try:
        with fits.open(path, memmap=False) as hdul:
            header = hdul[0].header.copy()
            data = hdul[0].data
    except (OSError, ValueError, TypeError, VerifyError) as exc:
        raise MasterError(f"{path}: cannot read master: {exc}") from exc
    if data is None or data.ndim != 3 or data.shape[0] != 3:
        shape = None if data is None else data.shape
        raise MasterError(f"{path}: cannot read master: expected a 2-D or (3, ny, nx) image, "
                          f"got {shape}")
    arr = np.ascontiguousarray(data, dtype=np.float32)
    info = replace(parse_frame_info(header, str(path), (arr.shape[1], arr.shape[2])),
                   channels=3)
    return arr, header, info


def read_master_header(path: Path) -> tuple[fits.Header, FrameInfo, np.ndarray | None]:
    """Header and info of a master FITS file; an RGB cube's pixels come along (one read).

    Returns
    -------
    header : astropy.io.fits.Header
    info : FrameInfo
        ``channels`` is 3 for a ``(3, ny, nx)`` master.
    data : ndarray or None
        The pixels of an RGB master (read whole by astropy); None for a 2-D master
        (read on first use by the fast frame reader).

    Raises
    ------
    MasterError
        Unreadable file, or neither a 2-D nor a ``(3, ny, nx)`` image.
    """
    try:
        header, info = fitsio.read_header(path)
    except FrameReadError as exc:
        if exc.reason != "not_2d":
            raise MasterError(f"{path}: cannot read master: {exc.message}") from exc
        data, header, info = read_rgb_master(path)
        return header, info, data
    return header, info, None


def normalize_flat(flat: np.ndarray, bayer_pattern: str | None) -> np.ndarray:
    """Divide a flat by its median, per CFA colour (R, G, B) when ``bayer_pattern`` is set,
    per channel for an RGB ``(3, ny, nx)`` flat.

    Raises
    ------
    MasterError
        If a median is not positive.
    """
    out = np.array(flat, dtype=np.float32, copy=True)
    if out.ndim == 3:  # RGB: per channel, as per CFA colour for a mosaic
        for plane in out:
            plane[...] = normalize_flat(plane, None)
        return out
    if bayer_pattern is None:
        groups = [np.ones(out.shape, dtype=bool)]
    else:
        codes = cfa_channel_masks(bayer_pattern, out.shape)
        groups = [codes == k for k in range(3)]
    for mask in groups:
        vals = out[mask]
        vals = vals[np.isfinite(vals)]
        med = float(np.median(vals)) if vals.size else float("nan")
        if not med > 0:
            raise MasterError(f"master flat has a non-positive median ({med}); "
                              "check the flat frames and their bias/dark subtraction")
        out[mask] /= np.float32(med)
    return out

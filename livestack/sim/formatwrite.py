"""Write simulated frames as camera RAW (DNG), TIFF, PNG, JPEG and XISF files.

For the format tests and benchmarks: the same uint16 pixels as the FITS frame, with
the metadata each format can carry. The writers import their optional packages
(``pidng``, ``tifffile``, ``xisf``; Pillow is core) when called.

* DNG: the CFA (or mono) data with BlackLevel, WhiteLevel, CFAPattern, ExposureTime,
  ISO, Make/Model and DateTimeOriginal in the camera's local time, with
  OffsetTimeOriginal unless ``offset_tag`` is False.
* TIFF: 16-bit mono with EXIF-style ExposureTime, ISO, Model, DateTimeOriginal (UTC,
  offset ``+00:00``).
* PNG and JPEG: pixels only (no metadata); the file's mtime is set to the end of the
  exposure so the reader's mtime fall-back gives the right start. JPEG is 8-bit.
* XISF: 16-bit with the FITS cards as FITSKeywords.

A frame whose data are ``(3, ny, nx)`` (see :func:`rgb_frame`, which debayers a CFA frame
as a camera's software would) is written as an RGB image: chunky (or ``planar=True``)
16-bit TIFF, 16-bit RGB PNG (through ``imagecodecs``: Pillow writes no 48-bit PNG),
8-bit RGB JPEG, and a three-channel XISF.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from livestack.pipeline.debayer import DEFAULT_METHOD, debayer
from livestack.sim.camera import SimFrame

#: Formats :func:`write_frame` knows, with their file suffix.
SUFFIXES = {"dng": ".dng", "tiff": ".tiff", "png": ".png", "jpeg": ".jpg", "xisf": ".xisf"}
_STRUCTURAL = ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "BZERO", "BSCALE")


def _start_utc(frame: SimFrame) -> datetime:
    text = str(frame.header["DATE-OBS"])
    return datetime.fromisoformat(text).replace(tzinfo=None)


def _exposure_s(frame: SimFrame) -> float:
    return float(str(frame.header["EXPTIME"]))


def rgb_frame(frame: SimFrame, method: str = DEFAULT_METHOD,
              rcd_green_diagonals: bool = False) -> SimFrame:
    """The colour frame a camera's software would save from a CFA frame: debayered RGB.

    Parameters
    ----------
    frame : SimFrame
        A CFA frame (its header has BAYERPAT).
    method : str
        Demosaic method (:func:`livestack.pipeline.debayer.debayer`); the default is the
        pipeline's, so an RGB night matches its FITS CFA original stacked with the same
        demosaic but for rounding.
    rcd_green_diagonals : bool
        The camera's software runs RCD as published (False) unless told otherwise: the
        pipeline's default diagonal statistic (True) is livestack's own, and the files a
        camera writes do not change with it.

    Returns
    -------
    SimFrame
        ``data`` uint16 ``(3, ny, nx)`` (rounded, clipped to 0..65535), the header without
        the CFA keywords, the same truth.

    Raises
    ------
    ValueError
        ``frame`` has no Bayer pattern.
    """
    pattern = frame.header.get("BAYERPAT")
    if not pattern:
        raise ValueError("rgb_frame needs a CFA frame (BAYERPAT)")
    rgb = debayer(np.asarray(frame.data, dtype=np.float32), str(pattern), method,
                  rcd_green_diagonals)
    data = np.clip(np.rint(rgb), 0, 65535).astype(np.uint16)
    header = {k: v for k, v in frame.header.items()
              if k not in ("BAYERPAT", "XBAYROFF", "YBAYROFF", "ROWORDER")}
    return SimFrame(data=data, header=header, truth=frame.truth)


def _is_rgb(frame: SimFrame) -> bool:
    return frame.data.ndim == 3


def _chunky(frame: SimFrame) -> np.ndarray:
    """``(ny, nx, 3)`` uint16 of an RGB frame, ``(ny, nx)`` of a mono one."""
    data = np.asarray(frame.data, dtype=np.uint16)
    return np.ascontiguousarray(np.moveaxis(data, 0, -1)) if data.ndim == 3 else data


def _offset_text(offset: timedelta) -> str:
    minutes = int(offset.total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def write_dng(path: Path, frame: SimFrame, *, black_adu: int = 0, white_adu: int = 65535,
              offset: timedelta = timedelta(hours=0), offset_tag: bool = True,
              iso: int = 800, model: str = "Simulated DSLR") -> None:
    """Write ``frame`` as an uncompressed DNG (pidng); LibRaw reads it back exactly.

    Parameters
    ----------
    path : Path
        Destination ending in ``.dng``.
    frame : SimFrame
        Its BAYERPAT (if any) becomes the DNG CFAPattern; mono frames are written as a
        CFA too (LibRaw reads only CFA DNGs raw), so use colour frames.
    black_adu, white_adu : int
        BlackLevel and WhiteLevel tags.
    offset : timedelta
        Camera clock minus UTC: DateTimeOriginal is written in that local time.
    offset_tag : bool
        Record ``offset`` in OffsetTimeOriginal (False: the file has no offset tag).
    iso : int
    model : str
    """
    # Lazy: pidng, tifffile and xisf are optional (the ``test`` and ``formats`` extras).
    from pidng.core import RAW2DNG, DNGTags, Tag
    from pidng.defs import CFAPattern, DNGVersion, PhotometricInterpretation
    from pidng.dng import Type

    data = np.ascontiguousarray(frame.data, dtype=np.uint16)
    ny, nx = data.shape
    pattern = str(frame.header.get("BAYERPAT", "RGGB"))
    tags = DNGTags()
    tags.set(Tag.ImageWidth, nx)
    tags.set(Tag.ImageLength, ny)
    tags.set(Tag.TileWidth, nx)
    tags.set(Tag.TileLength, ny)
    tags.set(Tag.Orientation, 1)
    tags.set(Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array)
    tags.set(Tag.SamplesPerPixel, 1)
    tags.set(Tag.BitsPerSample, 16)
    tags.set(Tag.CFARepeatPatternDim, [2, 2])
    tags.set(Tag.CFAPattern, getattr(CFAPattern, pattern))
    tags.set(Tag.BlackLevel, int(black_adu))
    tags.set(Tag.WhiteLevel, int(white_adu))
    tags.set(Tag.ExposureTime, [[round(_exposure_s(frame) * 1000), 1000]])
    tags.set(Tag.PhotographicSensitivity, int(iso))
    local = _start_utc(frame) + offset
    tags.set(Tag.DateTimeOriginal, local.strftime("%Y:%m:%d %H:%M:%S"))
    tags.set(Tag.SubsecTimeOriginal, f"{local.microsecond // 1000:03d}")
    if offset_tag:
        tags.set((36881, Type.Ascii), _offset_text(offset))  # OffsetTimeOriginal
    tags.set(Tag.Make, "livestack")
    tags.set(Tag.Model, model)
    tags.set(Tag.DNGVersion, DNGVersion.V1_4)
    tags.set(Tag.DNGBackwardVersion, DNGVersion.V1_2)
    tags.set(Tag.ColorMatrix1, [[1, 1], [0, 1], [0, 1], [0, 1], [1, 1], [0, 1], [0, 1],
                                [0, 1], [1, 1]])
    tags.set(Tag.CalibrationIlluminant1, 21)
    tags.set(Tag.AsShotNeutral, [[1, 1], [1, 1], [1, 1]])
    path = Path(path)
    writer = RAW2DNG()
    writer.options(tags, path=str(path.parent), compress=False)
    writer.convert(data, filename=path.stem)  # pidng appends ".dng"


def write_tiff(path: Path, frame: SimFrame, planar: bool = False) -> None:
    """Write ``frame`` as 16-bit TIFF with EXIF-style exposure, ISO, model and time.

    Mono frames are ``minisblack``; RGB frames ``rgb``, chunky or, with ``planar``,
    one plane per channel (PlanarConfiguration 2).
    """
    import tifffile

    start = _start_utc(frame)
    exposure_ms = round(_exposure_s(frame) * 1000)
    extratags = [
        (272, "s", 0, "Simulated camera", True),                       # Model
        (33434, "2I", 1, (exposure_ms, 1000), True),                   # ExposureTime
        (34855, "H", 1, int(str(frame.header.get("GAIN", 100))), True),     # ISOSpeedRatings
        (36867, "s", 0, start.strftime("%Y:%m:%d %H:%M:%S"), True),    # DateTimeOriginal
        (37521, "s", 0, f"{start.microsecond // 1000:03d}", True),     # SubsecTimeOriginal
        (36881, "s", 0, "+00:00", True),                               # OffsetTimeOriginal
    ]
    if not _is_rgb(frame):
        tifffile.imwrite(path, np.asarray(frame.data, dtype=np.uint16),
                         photometric="minisblack", extratags=extratags)
    elif planar:
        tifffile.imwrite(path, np.asarray(frame.data, dtype=np.uint16), photometric="rgb",
                         planarconfig="separate", extratags=extratags)
    else:
        tifffile.imwrite(path, _chunky(frame), photometric="rgb", planarconfig="contig",
                         extratags=extratags)


def _set_mtime_to_end(path: Path, frame: SimFrame) -> None:
    end = _start_utc(frame) + timedelta(seconds=_exposure_s(frame))
    stamp = end.replace(tzinfo=timezone.utc).timestamp()
    os.utime(path, (stamp, stamp))


def write_png(path: Path, frame: SimFrame) -> None:
    """Write ``frame`` as 16-bit grey or RGB PNG without metadata; mtime = end of exposure."""

    if _is_rgb(frame):
        # Lazy: imagecodecs is optional (formats/test extras); Pillow writes no 16-bit RGB.
        import imagecodecs

        Path(path).write_bytes(imagecodecs.png_encode(_chunky(frame)))
    else:
        Image.fromarray(np.asarray(frame.data, dtype=np.uint16)).save(path, format="PNG")
    _set_mtime_to_end(path, frame)


def write_jpeg(path: Path, frame: SimFrame, quality: int = 95) -> None:
    """Write ``frame`` as 8-bit grey or RGB JPEG (top 8 bits); mtime = end of the exposure."""

    data8 = (_chunky(frame) >> 8).astype(np.uint8)
    Image.fromarray(data8).save(path, format="JPEG", quality=quality)
    _set_mtime_to_end(path, frame)


def write_xisf(path: Path, frame: SimFrame) -> None:
    """Write ``frame`` as 16-bit XISF with its FITS cards as FITSKeywords."""
    from xisf import XISF

    keywords: dict[str, list[dict[str, str]]] = {}
    for key, value in frame.header.items():
        if key in _STRUCTURAL:
            continue
        if isinstance(value, bool):
            text = "T" if value else "F"
        elif isinstance(value, str):
            text = f"'{value}'"
        else:
            text = str(value)
        keywords[key] = [{"value": text, "comment": ""}]
    data = _chunky(frame)
    data = data if data.ndim == 3 else data[:, :, None]
    XISF.write(str(path), data, creator_app="livestack.sim",
               image_metadata={"FITSKeywords": keywords})


def write_frame(path: Path, frame: SimFrame, fmt: str) -> Path:
    """Write ``frame`` in format ``fmt`` (a key of :data:`SUFFIXES`); returns the path."""
    writers: dict[str, Callable[[Path, SimFrame], None]] = {
        "dng": write_dng, "tiff": write_tiff, "png": write_png, "jpeg": write_jpeg,
        "xisf": write_xisf}
    writers[fmt](Path(path), frame)
    return Path(path)

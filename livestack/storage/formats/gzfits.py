"""Gzip-compressed FITS (``.fits.gz``, ``.fit.gz``, ``.fts.gz``).

The whole file is decompressed in memory (the standard library's ``gzip``) and the
image HDU is read with astropy, exactly as an uncompressed file would be.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError

from livestack.reasons import Reason
from livestack.storage.formats.common import err, to_image_float32

GZ_SUFFIXES: dict[str, str] = {".fits.gz": "fits.gz", ".fit.gz": "fits.gz",
                               ".fts.gz": "fits.gz"}


def read_gzfits(path: Path) -> tuple[np.ndarray, fits.Header]:
    """Read the first image HDU of a gzipped FITS file.

    Returns
    -------
    image : ndarray, shape (ny, nx), float32
        BZERO/BSCALE applied, native byte order.
    header : astropy.io.fits.Header

    Raises
    ------
    FrameReadError
        ``"truncated"`` (the gzip stream ends early), ``"corrupt"`` (not gzip),
        ``"not_fits"``, ``"not_2d"``, ``"all_nan"``.
    """
    try:
        with gzip.open(path, "rb") as fh:
            blob = fh.read()
    except EOFError as exc:
        raise err(Reason.TRUNCATED, path, f"gzip stream ends early: {exc}") from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise err(Reason.CORRUPT, path, f"not a readable gzip file: {exc}") from exc
    try:
        with fits.open(io.BytesIO(blob), memmap=False) as hdul:
            hdu = next((h for h in hdul if h.is_image and h.data is not None), None)
            if hdu is None:
                raise err(Reason.NOT_2D, path, "no image data in the FITS file")
            data = np.asarray(hdu.data)
            header = hdu.header.copy()
    except (OSError, ValueError, TypeError, IndexError, VerifyError) as exc:
        raise err(Reason.NOT_FITS, path, f"the decompressed data are not a readable FITS file: "
                  f"{exc}") from exc
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise err(Reason.NOT_2D, path, f"expected a 2-D image, got shape {data.shape}")
    return to_image_float32(data.astype(np.float32), path, "fits.gz"), header

"""FITS I/O adapter: readiness check, fast frame reader, atomic float32 writer.

The fast path reads the header blocks, parses them with
``astropy.io.fits.Header.fromstring`` and decodes the big-endian payload once
into a native float32 array (BZERO/BSCALE applied) with a numba kernel, which
avoids astropy's intermediate arrays. Tile-compressed (``.fz``) files,
``BITPIX=-64`` and images in extensions other than the first with data go
through astropy.

Every per-file problem raises :class:`~livestack.errors.FrameReadError` (or
:class:`~livestack.errors.FrameNotReadyError` from :func:`check_complete`)
with a reason code and a one-line message naming the file.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeAlias

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from numpy.typing import NDArray

from livestack.errors import FrameNotReadyError, FrameReadError
from livestack.pipeline.types import Allocator, FrameInfo
from livestack.reasons import Reason
from livestack.storage import kernels_fits as kf
from livestack.storage.atomic import atomic_write
from livestack.storage.headers import parse_frame_info

BLOCK = 2880
CARD = 80
# A header longer than this many blocks is not a camera frame; stop scanning.
MAX_HEADER_BLOCKS = 2000
# Stop looking for the image HDU after this many HDUs.
MAX_HDUS = 16
_FAST_BITPIX = (8, 16, 32, -32)
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
_BE_DTYPES: dict[int, np.dtype[Any]] = {8: np.dtype(np.uint8), 16: np.dtype(">i2"),
                                        32: np.dtype(">i4"), -32: np.dtype(">f4")}


@dataclass(frozen=True)
class FrameLayout:
    """Where the image lives in a FITS file (from the header blocks only).

    Attributes
    ----------
    hdu_index : int
        Index of the HDU holding the image (0 = primary).
    header_start, data_start : int
        Byte offsets of that HDU's header and data unit.
    data_nbytes : int
        Declared size of the data unit without padding.
    bitpix : int
        BITPIX of the HDU (8 for a compressed BINTABLE).
    axes : tuple of int
        ``(NAXIS1, NAXIS2, ...)`` in FITS order (of the image, ZNAXISn for
        compressed HDUs).
    compressed : bool
        True for a tile-compressed image (BINTABLE with ``ZIMAGE = T``).
    header_bytes : bytes
        The raw header blocks of the image HDU.
    """

    hdu_index: int
    header_start: int
    data_start: int
    data_nbytes: int
    bitpix: int
    axes: tuple[int, ...]
    compressed: bool
    header_bytes: bytes

    @property
    def required_size(self) -> int:
        """Bytes the file must have: up to the end of the image's data (padding optional)."""
        return self.data_start + self.data_nbytes

    @property
    def shape(self) -> tuple[int, ...]:
        """Numpy shape of the image (FITS axes reversed)."""
        return tuple(reversed(self.axes))


#: A file's whole content in memory (the ingest's one read: ``read_file_sha256``).
FileBytes: TypeAlias = "NDArray[np.uint8] | bytes"


class _MemoryFile:
    """``seek``/``read`` over a file's content in memory, for the header scan (no copy)."""

    def __init__(self, data: NDArray[np.uint8]) -> None:
        self._data = data
        self._pos = 0

    def seek(self, pos: int) -> int:
        self._pos = pos
        return pos

    def read(self, n: int) -> bytes:
        chunk = self._data[self._pos:self._pos + n].tobytes()
        self._pos += len(chunk)
        return chunk


def _err(reason: Reason, path: Path, text: str) -> FrameReadError:
    return FrameReadError(reason, f"{path}: {text}", path)


@contextmanager
def _open(path: Path) -> Iterator[io.BufferedReader]:
    """Open for reading, mapping OS errors to FrameReadError reasons."""
    try:
        fh = open(path, "rb")  # closed in the finally below
    except FileNotFoundError as exc:
        raise _err(Reason.VANISHED, path, "file vanished before it could be read") from exc
    except PermissionError as exc:
        raise _err(Reason.UNREADABLE, path, "permission denied") from exc
    except IsADirectoryError as exc:
        raise _err(Reason.UNREADABLE, path, "is a directory, not a file") from exc
    except OSError as exc:
        raise _err(Reason.UNREADABLE, path, f"cannot open: {exc.strerror or exc}") from exc
    try:
        yield fh
    except FileNotFoundError as exc:
        raise _err(Reason.VANISHED, path, "file vanished while being read") from exc
    except PermissionError as exc:
        raise _err(Reason.UNREADABLE, path, "permission denied") from exc
    except OSError as exc:
        raise _err(Reason.UNREADABLE, path, f"read error: {exc.strerror or exc}") from exc
    finally:
        fh.close()


def _card_value(card: str) -> Any:
    """Value of a structural card (int, float, bool or string); None if absent."""
    if card[8:10] != "= ":
        return None
    text = card[10:].strip()
    if text.startswith("'"):
        end = text.find("'", 1)
        return text[1:end].rstrip() if end > 0 else text[1:].rstrip()
    text = text.split("/", 1)[0].strip()
    if text in ("T", "F"):
        return text == "T"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text.replace("D", "E"))
    except ValueError:
        return None


def _scan_header(fh: IO[bytes] | _MemoryFile, start: int, path: Path, primary: bool,
                 file_size: int) -> tuple[dict[str, Any], bytes, int]:
    """Read header blocks from ``start`` until END.

    Returns
    -------
    cards : dict
        Values of the cards (first occurrence wins).
    raw : bytes
        The header blocks.
    data_start : int

    Raises
    ------
    FrameReadError
        ``"truncated"`` if the file ends before END, ``"not_fits"`` if the
        bytes are not a FITS header.
    """
    fh.seek(start)
    cards: dict[str, Any] = {}
    chunks: list[bytes] = []
    for block_no in range(MAX_HEADER_BLOCKS):
        block = fh.read(BLOCK)
        if block_no == 0:
            expected = b"SIMPLE  =" if primary else b"XTENSION="
            head = block[: len(expected)]
            if head != expected[: len(head)]:
                if primary:
                    raise _err(Reason.NOT_FITS, path, "not a FITS file (no SIMPLE card)")
                raise _err(Reason.NOT_FITS, path, f"bytes after HDU at offset {start} are not a "
                           "FITS extension header")
        try:
            text = block.decode("ascii")
        except UnicodeDecodeError as exc:
            raise _err(Reason.NOT_FITS, path, "header contains non-ASCII bytes") from exc
        if any(c < " " or c > "~" for c in text):
            raise _err(Reason.NOT_FITS, path, "header contains control characters")
        chunks.append(block)
        for i in range(0, len(text) - CARD + 1, CARD):
            card = text[i:i + CARD]
            key = card[:8].rstrip()
            if key == "END":
                if primary and cards.get("SIMPLE") is not True:
                    raise _err(Reason.NOT_FITS, path, "SIMPLE is not T")
                return cards, b"".join(chunks), start + (block_no + 1) * BLOCK
            if key and key not in cards:
                cards[key] = _card_value(card)
        if len(block) < BLOCK:
            raise _err(Reason.TRUNCATED, path, f"header incomplete: file has {file_size} bytes and "
                       "no END card yet")
    raise _err(Reason.NOT_FITS, path, f"no END card within {MAX_HEADER_BLOCKS} header blocks")


def _data_nbytes(cards: dict[str, Any], path: Path) -> tuple[int, int, tuple[int, ...]]:
    """(bitpix, data bytes, axes) from structural cards."""
    try:
        bitpix = int(cards["BITPIX"])
        naxis = int(cards["NAXIS"])
        axes = tuple(int(cards[f"NAXIS{i}"]) for i in range(1, naxis + 1))
    except (KeyError, TypeError, ValueError) as exc:
        raise _err(Reason.NOT_FITS, path, f"missing or bad structural keyword ({exc})") from exc
    if bitpix not in (8, 16, 32, 64, -32, -64) or naxis < 0 or any(a < 0 for a in axes):
        raise _err(Reason.NOT_FITS, path, f"invalid BITPIX={bitpix} or NAXIS={naxis}")
    count = 0 if naxis == 0 else int(np.prod(axes, dtype=np.int64))
    pcount = int(cards.get("PCOUNT") or 0)
    gcount = int(cards.get("GCOUNT") or 1)
    return bitpix, abs(bitpix) // 8 * gcount * (pcount + count), axes


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _layout(fh: IO[bytes] | _MemoryFile, path: Path, file_size: int) -> FrameLayout:
    """Find the first HDU that holds image data (primary, IMAGE or compressed BINTABLE)."""
    start = 0
    for index in range(MAX_HDUS):
        cards, raw, data_start = _scan_header(fh, start, path, index == 0, file_size)
        bitpix, nbytes, axes = _data_nbytes(cards, path)
        compressed = cards.get("XTENSION") == "BINTABLE" and cards.get("ZIMAGE") is True
        if compressed:
            znaxis = int(cards.get("ZNAXIS") or 0)
            image_axes = tuple(int(cards.get(f"ZNAXIS{i}") or 0) for i in range(1, znaxis + 1))
            return FrameLayout(index, start, data_start, nbytes, int(cards.get("ZBITPIX") or 0),
                               image_axes, True, raw)
        is_image = index == 0 or cards.get("XTENSION") in ("IMAGE", "IUEIMAGE")
        if is_image and nbytes > 0:
            return FrameLayout(index, start, data_start, nbytes, bitpix, axes, False, raw)
        next_start = data_start + _padded(nbytes)
        if next_start >= file_size:
            if index == 0 and cards.get("EXTEND") is True and nbytes == 0:
                raise _err(Reason.TRUNCATED, path, "primary header has no data and the extension "
                           "is not written yet")
            # No image anywhere: report the primary as an empty image.
            return FrameLayout(index, start, data_start, nbytes, bitpix, axes, False, raw)
        start = next_start
    raise _err(Reason.NOT_2D, path, f"no image data in the first {MAX_HDUS} HDUs")


def _stat_size(path: Path) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise _err(Reason.VANISHED, path, "file vanished") from exc
    except PermissionError as exc:
        raise _err(Reason.UNREADABLE, path, "permission denied") from exc
    except OSError as exc:
        raise _err(Reason.UNREADABLE, path, f"cannot stat: {exc.strerror or exc}") from exc
    if not os.path.isfile(path):
        raise _err(Reason.UNREADABLE, path, "not a regular file")
    if st.st_size == 0:
        raise _err(Reason.EMPTY_FILE, path, "file is empty (0 bytes)")
    return int(st.st_size)


def frame_layout(path: Path) -> FrameLayout:
    """Locate the image of a FITS file from its header blocks, checking it is complete.

    Parameters
    ----------
    path : Path

    Returns
    -------
    FrameLayout

    Raises
    ------
    FrameReadError
        ``"empty_file"``, ``"not_fits"``, ``"unreadable"``, ``"vanished"``, or
        ``"truncated"`` when the data unit is shorter than the header declares.
    """
    path = Path(path)
    size = _stat_size(path)
    with _open(path) as fh:
        layout = _layout(fh, path, size)
    if size < layout.required_size:
        raise _err(Reason.TRUNCATED, path, f"data unit incomplete: file has {size} bytes, header "
                   f"declares {layout.required_size}")
    return layout


def check_complete(path: Path) -> int:
    """Check that a FITS file is completely written, reading only its header blocks.

    Parameters
    ----------
    path : Path
        Plain FITS or tile-compressed ``.fz`` file.

    Returns
    -------
    int
        The size in bytes the file must have: header(s) plus the image's data
        unit. A missing final 2880-byte padding is tolerated.

    Raises
    ------
    FrameNotReadyError
        Reason ``"incomplete"``: the header or data unit is shorter than
        declared (the camera is probably still writing it).
    FrameReadError
        ``"empty_file"`` (0 bytes), ``"not_fits"``, ``"unreadable"``,
        ``"vanished"``.
    """
    path = Path(path)
    try:
        return frame_layout(path).required_size
    except FrameReadError as exc:
        if exc.reason is Reason.TRUNCATED:
            raise FrameNotReadyError(Reason.INCOMPLETE, exc.message, exc.path) from exc
        raise


def _parse_header(raw: bytes, path: Path) -> fits.Header:
    try:
        return fits.Header.fromstring(raw)
    except (ValueError, VerifyError) as exc:
        raise _err(Reason.NOT_FITS, path, f"header cannot be parsed: {exc}") from exc


def _image_shape_2d(axes: tuple[int, ...], path: Path) -> tuple[int, int]:
    """(ny, nx) of a 2-D image; a 3-D cube with one plane counts as 2-D."""
    shape = tuple(reversed(axes))
    squeezed = shape[1:] if len(shape) == 3 and shape[0] == 1 else shape
    if len(squeezed) != 2:
        kind = "cube" if len(shape) >= 3 else f"{len(shape)}-D array"
        raise _err(Reason.NOT_2D, path, f"expected a 2-D image, got a {kind} of shape {shape}")
    return int(squeezed[0]), int(squeezed[1])


def read_header(path: Path) -> tuple[fits.Header, FrameInfo]:
    """Read only the header of a frame (cheap) and parse its :class:`FrameInfo`.

    Raises
    ------
    FrameReadError
        As :func:`frame_layout`, plus ``"not_2d"``.
    """
    path = Path(path)
    layout = frame_layout(path)
    header = _parse_header(layout.header_bytes, path)
    shape = _image_shape_2d(layout.axes, path)
    return header, parse_frame_info(header, str(path), shape)


def _decode(buf: np.ndarray, bitpix: int, shape: tuple[int, int], bscale: float,
            bzero: float, empty: Allocator | None = None) -> tuple[np.ndarray, int | None]:
    """Decode a big-endian payload to native float32. Returns (image, finite count or None).

    The image comes from ``empty`` (default ``np.empty``): every pixel is written.
    """

    out = (empty or np.empty)(shape, np.float32)
    finite: int | None = None
    if bitpix == 16 and _LITTLE_ENDIAN_HOST:
        kf.decode_be_int16(buf.view(np.uint16).reshape(shape), bscale, bzero, out)
    elif bitpix == 32 and _LITTLE_ENDIAN_HOST:
        kf.decode_be_int32(buf.view(np.uint32).reshape(shape), bscale, bzero, out)
    elif bitpix == -32 and _LITTLE_ENDIAN_HOST:
        finite = int(kf.decode_be_float32(buf.view(np.uint32).reshape(shape),
                                          out.view(np.uint32)))
        if bscale != 1.0 or bzero != 0.0:
            out *= np.float32(bscale)
            out += np.float32(bzero)
    else:
        dtype = _BE_DTYPES[bitpix]
        if bitpix > 0:
            # float64 intermediate keeps 32-bit integers exact before one rounding.
            scaled = np.frombuffer(buf, dtype=dtype).reshape(shape) * bscale + bzero
            out[...] = scaled
        else:
            out[...] = np.frombuffer(buf, dtype=dtype).reshape(shape)
            if bscale != 1.0 or bzero != 0.0:
                out *= np.float32(bscale)
                out += np.float32(bzero)
            finite = int(np.count_nonzero(np.isfinite(out)))
    return out, finite


def _apply_blank(out: np.ndarray, buf: np.ndarray, bitpix: int, blank: int) -> None:
    dtype = _BE_DTYPES[bitpix]
    stored = np.frombuffer(buf, dtype=dtype).reshape(out.shape)
    out[stored == blank] = np.nan


def _read_fast(fh: io.BufferedReader, path: Path, layout: FrameLayout, header: fits.Header,
               shape: tuple[int, int], empty: Allocator | None = None) -> np.ndarray:
    nbytes = layout.data_nbytes
    fh.seek(layout.data_start)
    buf = (empty or np.empty)((nbytes,), np.uint8)
    got = fh.readinto(buf.data)
    if got is None or got < nbytes:
        raise _err(Reason.TRUNCATED, path, f"data unit has {got or 0} of {nbytes} bytes")
    return _decode_payload(buf, path, layout, header, shape, empty)


def _decode_payload(buf: np.ndarray, path: Path, layout: FrameLayout, header: fits.Header,
                    shape: tuple[int, int], empty: Allocator | None = None) -> np.ndarray:
    """The image from its big-endian data unit ``buf`` (uint8, ``layout.data_nbytes``)."""
    bscale = float(header.get("BSCALE", 1.0))
    bzero = float(header.get("BZERO", 0.0))
    out, finite = _decode(buf, layout.bitpix, shape, bscale, bzero, empty)
    blank = header.get("BLANK")
    if layout.bitpix > 0 and isinstance(blank, int) and not isinstance(blank, bool):
        _apply_blank(out, buf, layout.bitpix, blank)
        finite = int(np.count_nonzero(np.isfinite(out)))
    if finite == 0:
        raise _err(Reason.ALL_NAN, path, "no finite pixel in the image")
    return out


def _read_astropy(path: Path, layout: FrameLayout, content: np.ndarray | None = None
                  ) -> tuple[np.ndarray, fits.Header]:
    """Fallback reader (compressed, BITPIX -64/64): astropy decodes, we convert once.

    With ``content`` (the file's bytes, uint8) astropy decodes those bytes, not the file
    again, so the journal's hash is of exactly what was decoded.
    """
    source: Path | io.BytesIO = path if content is None else io.BytesIO(content.data)
    try:
        with fits.open(source, memmap=False) as hdul:
            hdu = hdul[layout.hdu_index]
            data = hdu.data
            header = hdu.header.copy()
    except FileNotFoundError as exc:
        raise _err(Reason.VANISHED, path, "file vanished while being read") from exc
    except PermissionError as exc:
        raise _err(Reason.UNREADABLE, path, "permission denied") from exc
    except (OSError, ValueError, TypeError, IndexError, VerifyError) as exc:
        raise _err(Reason.UNREADABLE, path, f"astropy cannot decode the image: {exc}") from exc
    if data is None:
        raise _err(Reason.NOT_2D, path, "no image data")
    arr = np.asarray(data)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        kind = "cube" if arr.ndim >= 3 else f"{arr.ndim}-D array"
        raise _err(Reason.NOT_2D, path, f"expected a 2-D image, got a {kind} of shape {arr.shape}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if out.dtype.byteorder not in ("=", "|"):
        out = out.astype(out.dtype.newbyteorder("="))
    if not np.isfinite(out).any():
        raise _err(Reason.ALL_NAN, path, "no finite pixel in the image")
    return out, header


def read_frame(path: Path, data: FileBytes | None = None, *, empty: Allocator | None = None
               ) -> tuple[np.ndarray, FrameInfo, fits.Header]:
    """Read a 2-D FITS frame as native float32 with BZERO/BSCALE applied.

    Parameters
    ----------
    path : Path
        Plain FITS (fast path for BITPIX 8/16/32/-32) or anything astropy
        reads (``.fz`` tile-compressed, BITPIX -64).
    data : ndarray (n_bytes,) uint8 or bytes, optional
        The file's whole content, already read (the ingest hashes these bytes for the
        journal): decoded from memory without opening the file again. The astropy
        fall-back (compressed, BITPIX 64/-64) still reads ``path``.
    empty : Allocator, optional
        Where the fast path's image comes from (default ``np.empty``): the ingest's
        buffer pool gives the same memory frame after frame. The astropy fall-back
        allocates its own.

    Returns
    -------
    image : ndarray, shape (ny, nx), float32
        C-contiguous, native byte order. Integer BLANK pixels become NaN.
    info : FrameInfo
    header : astropy.io.fits.Header
        Header of the HDU holding the image.

    Raises
    ------
    FrameReadError
        Reasons ``"empty_file"``, ``"not_fits"``, ``"truncated"`` (data shorter
        than declared), ``"not_2d"`` (cube or 1-D; the message gives the shape),
        ``"unreadable"``, ``"vanished"``, ``"all_nan"`` (no finite pixel).
    """
    path = Path(path)
    if data is not None:
        return _read_frame_bytes(path, data, empty)
    size = _stat_size(path)
    with _open(path) as fh:
        layout = _layout(fh, path, size)
        if size < layout.required_size:
            raise _err(Reason.TRUNCATED, path, f"data unit incomplete: file has {size} bytes, "
                       f"header declares {layout.required_size}")
        shape = _image_shape_2d(layout.axes, path)
        fast = not layout.compressed and layout.bitpix in _FAST_BITPIX
        if fast:
            header = _parse_header(layout.header_bytes, path)
            image = _read_fast(fh, path, layout, header, shape, empty)
    if not fast:
        image, header = _read_astropy(path, layout)
    return image, parse_frame_info(header, str(path), shape), header


def _read_frame_bytes(path: Path, data: FileBytes, empty: Allocator | None = None
                      ) -> tuple[np.ndarray, FrameInfo, fits.Header]:
    """:func:`read_frame` on the file's content in memory (same checks, same reasons)."""
    content = np.frombuffer(data, dtype=np.uint8)  # a view: no copy of the bytes
    size = content.size
    if size == 0:
        raise _err(Reason.EMPTY_FILE, path, "file is empty (0 bytes)")
    layout = _layout(_MemoryFile(content), path, size)
    if size < layout.required_size:
        raise _err(Reason.TRUNCATED, path, f"data unit incomplete: file has {size} bytes, "
                   f"header declares {layout.required_size}")
    shape = _image_shape_2d(layout.axes, path)
    if layout.compressed or layout.bitpix not in _FAST_BITPIX:
        image, header = _read_astropy(path, layout, content)
    else:
        header = _parse_header(layout.header_bytes, path)
        payload = content[layout.data_start:layout.data_start + layout.data_nbytes]
        image = _decode_payload(payload, path, layout, header, shape, empty)
    return image, parse_frame_info(header, str(path), shape), header


def write_fits_float32(path: Path, data: np.ndarray, header: fits.Header | None,
                       extensions: Sequence[fits.hdu.base.ExtensionHDU] = ()) -> None:
    """Write ``data`` as a float32 FITS file atomically (temp file, fsync, rename).

    Parameters
    ----------
    path : Path
        Destination; an existing file is replaced only once the new one is
        complete on disk, so readers never see a partial file.
    data : ndarray
        Any shape (2-D frame, ``(3, ny, nx)`` colour); written as BITPIX -32.
    header : astropy.io.fits.Header or None
        Copied; BZERO/BSCALE/BLANK/CHECKSUM/DATASUM are dropped (they would
        rescale or mis-describe the float data).
    extensions : sequence of HDUs
        Appended after the primary HDU (e.g. weight maps, a provenance table).

    Raises
    ------
    StorageError
        When the file cannot be written (disk full, permission, ...).
    """
    path = Path(path)
    hdr = header.copy() if header is not None else fits.Header()
    for key in ("BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM"):
        hdr.remove(key, ignore_missing=True, remove_all=True)
    primary = fits.PrimaryHDU(data=np.ascontiguousarray(data, dtype=np.float32), header=hdr)
    hdul = fits.HDUList([primary, *extensions])
    with atomic_write(path, what="FITS") as (fd, _tmp), \
            os.fdopen(fd, "wb", closefd=False) as fh:
        write_hdul(hdul, fh)


def write_hdul(hdul: fits.HDUList, fh: IO[bytes]) -> None:
    """``hdul.writeto(fh)`` for a file object made from a descriptor, with its errors intact.

    astropy's free-space check looks up the name of the file it writes to; a descriptor's
    file object (``os.fdopen``) is named by its number, so on a write error (a full disk)
    the check raised ``AttributeError`` in place of the ``OSError`` it caught, and the
    error escaped :func:`~livestack.storage.atomic.atomic_write`'s handling as a traceback.

    Parameters
    ----------
    hdul : astropy.io.fits.HDUList
    fh : binary file object, open for writing

    Raises
    ------
    OSError
        The write's own error (``atomic_write`` turns it into ``StorageError``).
    """
    try:
        hdul.writeto(fh)
    except AttributeError as exc:
        if isinstance(exc.__context__, OSError):
            raise exc.__context__ from None
        raise



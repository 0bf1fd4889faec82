"""Write and read the stack FITS file (``stack.fits``): image, maps and provenance.

Layout
------
* Primary HDU: the stacked image, float32 (colour: NAXIS3 = 3, planes R, G, B), with
  NCOMBINE, EXPTIME (total of the accepted frames, s), DATE-OBS/MJD-OBS (first accepted
  start), DATE-AVG/MJD-AVG (mean mid-exposure), DATE-END/MJD-END (last accepted end;
  :func:`livestack.pipeline.fitskeys.time_keywords`), NEFF, EGAINEFF,
  BUNIT = 'ADU', IMAGETYP = 'Master Light', CREATOR, then every item of
  ``product.header`` (which wins over the computed values; structural keywords such as
  NAXIS or BZERO are ignored, and so are CFA keys such as CFAPAT on an RGB image).
* ``WEIGHT`` float32, ``COUNT``/``REJLOW``/``REJHIGH`` uint16 (stored as int16 with
  BZERO = 32768, the FITS convention; astropy reads them back as uint16), optional ``STD``
  float32.
* ``FRAMES`` binary table, one row per frame seen (accepted, rejected, failed): file,
  verdict, reason, weight, fwhm_px, stars, background, noise, dx, dy, rotation_deg,
  exposure_s, date_obs (ISO UTC), plus mjd_obs, elongation, snr, fwhm_arcsec and the
  full 2x3 transform ``matrix`` so that a round trip is exact, and the file ``format``
  (``fits``, ``fits.gz``, ``dng``, ``tiff``, ...). Missing numbers are NaN
  (``stars``: -1); missing strings are empty. FITS strings are ASCII: other characters
  in file names are stored as backslash escapes.

Effective gain
--------------
For a weighted mean of N frames of gain ``g`` (e-/ADU, header ``EGAIN`` of the frames),
the signal in ADU is unchanged while the Poisson noise drops by ``sqrt(N_eff)``, so the
image behaves like one frame of gain ``g * N_eff`` with
``N_eff = (sum w)^2 / sum w^2`` over the accepted frames (``N`` for equal weights).
``NEFF`` holds ``N_eff`` and ``EGAINEFF`` (when ``EGAIN`` is known) ``g * N_eff``, the value
photometry software needs on this image (per-pixel rejections and normalisation scale
factors are ignored). ``EGAIN`` itself stays the single-frame value.

Atomicity
---------
The file is written to a temporary name in the same directory, fsync'ed, then renamed
over ``path`` with :func:`os.replace` (and the directory fsync'ed): readers see either the
old or the new stack, never a torn one. Any ``OSError`` (ENOSPC, EACCES, ...) removes the
temporary file, leaves the previous file untouched and raises :class:`StorageError`.
"""

from __future__ import annotations

import io
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from numpy.typing import NDArray

from livestack.errors import StorageError
from livestack.pipeline.fitskeys import TIME_COMMENTS, is_cfa_key, time_keywords
from livestack.pipeline.product import StackProduct
from livestack.pipeline.types import FrameMetrics, FrameRecord, Transform
from livestack.storage.atomic import atomic_write
from livestack.storage.formats import frame_format

CREATOR = "livestack"
#: FITS block size: headers and data are padded to a multiple of it.
FITS_BLOCK = 2880

#: Keywords astropy manages; values passed in ``product.header`` for them are ignored.
_STRUCTURAL = frozenset({
    "SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "BZERO", "BSCALE",
    "PCOUNT", "GCOUNT", "XTENSION", "TFIELDS", "END", "EXTNAME",
})
_COMMENTARY = frozenset({"HISTORY", "COMMENT"})
_DATE_FMT = "%Y-%m-%dT%H:%M:%S.%f"


class _FdWriter:
    """Minimal binary file object over a raw descriptor; every byte goes through os.write."""

    mode = "wb"

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name  # astropy's error path needs it
        self.closed = False
        self._pos = 0

    def write(self, data: Any) -> int:
        if isinstance(data, np.ndarray):
            view = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
        else:
            view = memoryview(data).cast("B")
        total = view.nbytes
        while view.nbytes:
            written = os.write(self.fd, view)
            view = view[written:]
        self._pos += total
        return total

    def flush(self) -> None:
        """Nothing is buffered."""

    def tell(self) -> int:
        return self._pos


def _iso(moment: datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment.strftime(_DATE_FMT)[:-3]


def _parse_iso(text: str) -> datetime | None:
    text = text.strip()
    if not text:
        return None
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def _ascii(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _header_value(value: object) -> bool | int | float | str | None:
    """Convert to a FITS-storable scalar, or None to skip (NaN/inf/None)."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, bool | int | str):
        return _ascii(value) if isinstance(value, str) else value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return _ascii(str(value))


def _set(header: fits.Header, key: str, value: object, comment: str = "") -> None:
    converted = _header_value(value)
    if converted is None:
        return
    name = key.upper()
    if name in _COMMENTARY:
        # One card per line; astropy wraps lines longer than a card.
        for line in str(converted).splitlines() or [""]:
            if name == "HISTORY":
                header.add_history(line)
            else:
                header.add_comment(line)
        return
    if len(name) > 8:
        name = f"HIERARCH {key}"
    header[name] = (converted, comment)


def _accepted(records: list[FrameRecord]) -> list[FrameRecord]:
    return [r for r in records if r.verdict == "accepted"]


def _computed_header(product: StackProduct) -> list[tuple[str, object, str]]:
    accepted = _accepted(product.records)
    cards: list[tuple[str, object, str]] = [
        ("BUNIT", "ADU", "pixel unit"),
        ("IMAGETYP", "Master Light", "stacked light frames"),
        ("CREATOR", CREATOR, "software that wrote this file"),
        ("NCOMBINE", len(accepted), "number of frames combined"),
        ("EXPTIME", float(sum(r.exposure_s for r in accepted)), "[s] total exposure"),
    ]
    for key, value in time_keywords((r.date_obs, r.exposure_s) for r in accepted).items():
        cards.append((key, value, TIME_COMMENTS[key]))
    weights = np.array([r.weight for r in accepted if r.weight > 0], dtype=np.float64)
    if weights.size:
        n_eff = float(weights.sum() ** 2 / np.sum(weights ** 2))
        cards.append(("NEFF", n_eff, "(sum w)^2/sum w^2 over frames"))
        gain = _header_value(product.header.get("EGAIN"))
        if isinstance(gain, int | float) and not isinstance(gain, bool) and gain > 0:
            cards.append(("EGAINEFF", float(gain) * n_eff,
                          "[e-/ADU] gain of the mean: EGAIN*NEFF"))
    return cards


def _primary(product: StackProduct) -> fits.PrimaryHDU:
    image = np.ascontiguousarray(product.image, dtype=np.float32)
    if image.ndim not in (2, 3):
        raise ValueError(f"stack image must be 2-D or (3, ny, nx), got {image.shape}")
    hdu = fits.PrimaryHDU(image)
    header = hdu.header
    for key, value, comment in _computed_header(product):
        _set(header, key, value, comment)
    for key, value in product.header.items():
        if key.upper() in _STRUCTURAL or (image.ndim == 3 and is_cfa_key(key)):
            continue  # an RGB stack is not a mosaic: no CFA keys (pipeline.fitskeys)
        _set(header, key, value)
    return hdu


def _frames_table(records: list[FrameRecord]) -> fits.BinTableHDU:
    def metric(r: FrameRecord, name: str) -> float:
        if r.metrics is None:
            return math.nan
        value = getattr(r.metrics, name)
        return math.nan if value is None else float(value)

    def matrix(r: FrameRecord) -> NDArray[np.float64]:
        if r.transform is None:
            return np.full(6, np.nan)
        return np.asarray(r.transform.matrix, dtype=np.float64).ravel()

    def text(name: str, values: list[str]) -> fits.Column:
        width = max([1, *(len(v) for v in values)])
        return fits.Column(name, f"{width}A", array=np.array(values, dtype=f"U{width}"))

    n = len(records)
    mats = np.array([matrix(r) for r in records]).reshape(n, 6)
    rotation = np.array([r.transform.rotation_deg if r.transform is not None else math.nan
                         for r in records], dtype=np.float64)
    columns = [
        text("file", [_ascii(r.file) for r in records]),
        text("verdict", [r.verdict for r in records]),
        text("reason", [_ascii(r.reason or "") for r in records]),
        fits.Column("weight", "D", array=np.array([r.weight for r in records], np.float64)),
        fits.Column("fwhm_px", "D", unit="pix",
                    array=np.array([metric(r, "fwhm_px") for r in records])),
        fits.Column("stars", "J", array=np.array(
            [r.metrics.star_count if r.metrics is not None else -1 for r in records],
            dtype=np.int32)),
        fits.Column("background", "D", unit="adu",
                    array=np.array([metric(r, "background_adu") for r in records])),
        fits.Column("noise", "D", unit="adu",
                    array=np.array([metric(r, "noise_adu") for r in records])),
        fits.Column("dx", "D", unit="pix", array=mats[:, 2].copy()),
        fits.Column("dy", "D", unit="pix", array=mats[:, 5].copy()),
        fits.Column("rotation_deg", "D", unit="deg", array=rotation),
        fits.Column("exposure_s", "D", unit="s",
                    array=np.array([r.exposure_s for r in records], np.float64)),
        text("date_obs", [_iso(r.date_obs) if r.date_obs is not None else ""
                          for r in records]),
        fits.Column("mjd_obs", "D", array=np.array(
            [r.mjd_obs if r.mjd_obs is not None else math.nan for r in records])),
        fits.Column("elongation", "D", array=np.array([metric(r, "elongation")
                                                       for r in records])),
        fits.Column("snr", "D", array=np.array([metric(r, "snr") for r in records])),
        fits.Column("fwhm_arcsec", "D", unit="arcsec",
                    array=np.array([metric(r, "fwhm_arcsec") for r in records])),
        fits.Column("matrix", "6D", array=mats),
        text("model", [r.transform.model if r.transform is not None else "" for r in records]),
        text("format", [frame_format(r.file) or "" for r in records]),  # file format
    ]
    return fits.BinTableHDU.from_columns(columns, name="FRAMES")


def _build(product: StackProduct) -> fits.HDUList:
    hdus: list[Any] = [_primary(product)]
    hdus.append(fits.ImageHDU(np.ascontiguousarray(product.weight, np.float32), name="WEIGHT"))
    for name, data in (("COUNT", product.count), ("REJLOW", product.rejected_low),
                       ("REJHIGH", product.rejected_high)):
        hdus.append(fits.ImageHDU(np.ascontiguousarray(data, np.uint16), name=name))
    if product.std is not None:
        hdus.append(fits.ImageHDU(np.ascontiguousarray(product.std, np.float32), name="STD"))
    hdus.append(_frames_table(product.records))
    return fits.HDUList(hdus)


def write_stack_fits(path: Path, product: StackProduct) -> None:
    """Write ``product`` to ``path`` atomically (see the module docstring).

    Parameters
    ----------
    path : Path
        Destination, e.g. ``<stack dir>/stack.fits``; its directory must exist.
    product : StackProduct

    Raises
    ------
    StorageError
        If the file cannot be written (disk full, permissions, missing directory); the
        temporary file is removed and an existing ``path`` is left untouched.
    ValueError
        If the product's image is not 2-D or (3, ny, nx).
    """
    path = Path(path)
    hdul = _build(product)
    with atomic_write(path, what="stack FITS") as (fd, tmp):
        out = _FdWriter(fd, str(tmp))
        for hdu in hdul:
            if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU)):
                _write_image(out, hdu)
            else:
                _write_table(out, hdu)


#: Bytes converted to big-endian per write: astropy converts a whole HDU at once, which
#: at 26 MP added a 104 MB copy per map to the peak memory of every stack.fits write.
_WRITE_CHUNK_BYTES = 8 * 2**20


def _write_image(out: _FdWriter, hdu: fits.PrimaryHDU | fits.ImageHDU) -> None:
    """One image HDU: astropy's header, then the data converted to FITS in chunks.

    float32 becomes big-endian IEEE; uint16 becomes big-endian int16 with BZERO = 32768
    (``v ^ 0x8000`` is ``v - 32768`` in two's complement), as astropy writes them.
    """
    data = hdu.data
    out.write(hdu.header.tostring().encode("ascii"))
    if data is None:
        return
    flat = np.ascontiguousarray(data).reshape(-1)
    if flat.dtype == np.uint16:
        def convert(chunk: NDArray[Any]) -> NDArray[Any]:
            return (chunk ^ np.uint16(0x8000)).astype(">u2")
    elif flat.dtype == np.float32:
        def convert(chunk: NDArray[Any]) -> NDArray[Any]:
            return chunk.astype(">f4")
    else:
        raise ValueError(f"stack HDU {hdu.name}: unexpected dtype {flat.dtype}")
    step = max(1, _WRITE_CHUNK_BYTES // flat.dtype.itemsize)
    for start in range(0, flat.size, step):
        out.write(convert(flat[start:start + step]))
    out.write(b"\0" * (-flat.nbytes % FITS_BLOCK))


def _write_table(out: _FdWriter, hdu: Any) -> None:
    """A (small) table HDU through astropy: its bytes after an empty primary block."""
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buffer)
    out.write(buffer.getbuffer()[FITS_BLOCK:])


def _records(table: Any) -> list[FrameRecord]:
    records: list[FrameRecord] = []
    names = set(table.columns.names)
    for row in table.data:
        def num(name: str, row: Any = row) -> float:
            return float(row[name]) if name in names else math.nan

        def opt(value: float) -> float | None:
            return None if math.isnan(value) else value

        stars = int(row["stars"])
        metrics = None
        if stars >= 0:
            metrics = FrameMetrics(star_count=stars, fwhm_px=num("fwhm_px"),
                                   fwhm_arcsec=opt(num("fwhm_arcsec")),
                                   elongation=num("elongation"),
                                   background_adu=num("background"), noise_adu=num("noise"),
                                   snr=num("snr"))
        transform = None
        if "matrix" in names and np.all(np.isfinite(row["matrix"])):
            model = str(row["model"]).strip() if "model" in names else ""
            transform = Transform(np.asarray(row["matrix"], dtype=np.float64).reshape(2, 3),
                                  model or "similarity", 0, math.nan, "stored")
        elif math.isfinite(num("dx")) and math.isfinite(num("dy")):
            transform = Transform.from_params(num("dx"), num("dy"), num("rotation_deg"),
                                              method="stored")
        reason = str(row["reason"]).strip()
        records.append(FrameRecord(
            file=str(row["file"]).rstrip(), verdict=str(row["verdict"]).strip(),
            reason=reason or None, weight=float(row["weight"]), metrics=metrics,
            transform=transform, exposure_s=float(row["exposure_s"]),
            date_obs=_parse_iso(str(row["date_obs"])), mjd_obs=opt(num("mjd_obs")),
        ))
    return records


def read_stack_fits(path: Path) -> StackProduct:
    """Read a file written by :func:`write_stack_fits`.

    Returns
    -------
    StackProduct
        Arrays in native byte order (float32 / uint16); ``header`` holds the primary
        header's non-structural cards (HIERARCH keys without the prefix; HISTORY and
        COMMENT as newline-joined strings).

    Raises
    ------
    StorageError
        If the file cannot be opened or lacks an expected extension.
    """
    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            primary = hdul[0]
            image = np.asarray(primary.data, dtype=np.float32)
            header: dict[str, object] = {
                key: primary.header[key] for key in primary.header
                if key and key not in _STRUCTURAL and key not in _COMMENTARY}
            for key in sorted(_COMMENTARY):
                if key in primary.header:
                    header[key] = "\n".join(str(v) for v in primary.header[key])

            def plane(name: str, dtype: type) -> Any:
                return np.ascontiguousarray(hdul[name].data, dtype=dtype)

            std = plane("STD", np.float32) if "STD" in hdul else None
            return StackProduct(
                image=np.ascontiguousarray(image), weight=plane("WEIGHT", np.float32),
                count=plane("COUNT", np.uint16), rejected_low=plane("REJLOW", np.uint16),
                rejected_high=plane("REJHIGH", np.uint16), records=_records(hdul["FRAMES"]),
                header=header, std=std,
            )
    except (OSError, KeyError) as exc:
        raise StorageError(f"{path}: cannot read stack FITS: {exc}") from exc

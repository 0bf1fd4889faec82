"""Master calibration frames: building them from raw frames, and choosing them per light.

Building (:func:`build_master`) is a per-pixel sigma-clipped mean computed in
row chunks: each chunk's rows are read from every input file (a compressed or
non-FITS input is decoded once into a temporary ``.npy``), so memory stays at about
``CHUNK_BYTES + one output frame`` whatever the number of frames
(26 MP x 50 frames would be 5 GB in RAM at once).

Choosing (:class:`MasterLibrary`) matches masters to a light's
:class:`~livestack.pipeline.types.FrameInfo` and explains every miss in the
returned :class:`~livestack.pipeline.calibrate.MasterSet`'s description.

Master darks normally *include* the bias (that is what a raw dark holds);
when one was built with ``bias=`` the header says ``LSBIASSB = T`` and the
library adds the bias back.
"""

from __future__ import annotations

import math
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError

from livestack.errors import FrameReadError, MasterError
from livestack.pipeline.calibrate import MasterSet
from livestack.pipeline.types import FrameInfo
from livestack.storage.fitsio import (
    FrameLayout,
    frame_layout,
    write_fits_float32,
)
from livestack.storage.formats import FRAME_SUFFIXES, ReadOptions, is_fits
from livestack.storage.formats import read_frame as read_any_frame
from livestack.storage.formats import read_header as read_any_header
from livestack.storage.headers import parse_frame_info
from livestack.storage.masters_rgb import (
    cold_map,
    defect_map,
    fmt_shape,
    geometry_of,
    normalize_flat,
    read_master_header,
    read_rgb_master,
    rows_shape,
)

MASTER_KINDS: tuple[str, ...] = ("bias", "dark", "flat", "darkflat")
_IMAGETYP = {"bias": "Master Bias", "dark": "Master Dark", "flat": "Master Flat",
             "darkflat": "Master Dark Flat"}
#: Working memory for one chunk of rows of all input frames.
CHUNK_BYTES = 64 * 2**20
#: Exposures within this relative tolerance (or 1 ms) count as equal.
EXPOSURE_RTOL = 0.01
#: Maximum kappa-sigma passes per pixel.
CLIP_MAX_ITER = 5
FITS_SUFFIXES = FRAME_SUFFIXES  # every frame format (FITS, .fits.gz, RAW, TIFF, PNG, XISF)
# Raw calibration frames keep the RAW black level: the bias/dark masters carry it.
_CALIBRATION_READ = ReadOptions(raw_black="keep")
_FAST_DTYPES: dict[int, np.dtype[Any]] = {
    8: np.dtype(np.uint8), 16: np.dtype(">i2"), 32: np.dtype(">i4"), -32: np.dtype(">f4"),
    -64: np.dtype(">f8")}


def list_fits(directory: Path) -> list[Path]:
    """Frame files of any supported format directly in ``directory``, sorted."""
    return sorted(p for p in Path(directory).iterdir()
                  if p.is_file() and p.name.lower().endswith(FITS_SUFFIXES)
                  and not p.name.startswith("."))


def same_exposure(a_s: float, b_s: float) -> bool:
    """True when two exposures are equal within 1% (or 1 ms)."""
    return abs(a_s - b_s) <= max(1e-3, EXPOSURE_RTOL * max(abs(a_s), abs(b_s)))


def _fmt_temp(temp_c: float | None) -> str:
    return f"{temp_c:.1f} C" if temp_c is not None else "unknown temperature"


# --------------------------------------------------------------------------- reading inputs


@dataclass
class _Input:
    """One raw calibration frame: where its pixels are and what its header says."""

    path: Path
    layout: FrameLayout
    header: fits.Header
    info: FrameInfo


def _inspect(path: Path) -> _Input:
    if not is_fits(path):
        return _inspect_other(path)
    try:
        layout = frame_layout(path)
        header = fits.Header.fromstring(layout.header_bytes)
    except FrameReadError as exc:
        raise MasterError(f"{path}: cannot use as calibration frame: {exc.message}") from exc
    except (ValueError, VerifyError) as exc:
        raise MasterError(f"{path}: header cannot be parsed: {exc}") from exc
    shape = layout.shape[1:] if len(layout.shape) == 3 and layout.shape[0] == 1 else layout.shape
    if len(shape) != 2:
        raise MasterError(f"{path}: expected a 2-D image, got shape {layout.shape}")
    info = parse_frame_info(header, str(path), (int(shape[0]), int(shape[1])))
    return _Input(Path(path), layout, header, info)


def _inspect_other(path: Path) -> _Input:
    """A non-FITS calibration frame: decoded once here; its rows come from a spill file."""
    try:
        header, info = read_any_header(path, _CALIBRATION_READ)
    except FrameReadError as exc:
        raise MasterError(f"{path}: cannot use as calibration frame: {exc.message}") from exc
    ny, nx = rows_shape(info)
    # compressed=True sends _RowSource to the decode-and-spill path.
    layout = FrameLayout(0, 0, 0, 0, -32, (nx, ny), True, b"")
    return _Input(Path(path), layout, header, info)


class _RowSource:
    """Rows of one input frame as float32 without holding the frame in memory.

    Rows are read with plain reads at their offset, not through a memory map: mapped pages
    that were read stay in the process's resident set until the map is closed, so mapping
    N inputs of a 26 MP master build added N x 52 MB to the peak RSS.
    """

    def __init__(self, item: _Input, spill_dir: Path | None) -> None:
        self.item = item
        nx = item.info.shape[1]
        self._nx = nx
        layout = item.layout
        self._bscale = float(item.header.get("BSCALE", 1.0))
        self._bzero = float(item.header.get("BZERO", 0.0))
        self._path: Path = item.path
        self._offset: int
        self._dtype: np.dtype[Any]
        if not layout.compressed and layout.bitpix in _FAST_DTYPES:
            self._offset, self._dtype = layout.data_start, _FAST_DTYPES[layout.bitpix]
            self._scaled = True
        else:
            if spill_dir is None:
                raise MasterError(f"{item.path}: compressed input needs a spill directory")
            try:
                data, _, _ = read_any_frame(item.path, _CALIBRATION_READ)
            except FrameReadError as exc:
                raise MasterError(f"{item.path}: {exc.message}") from exc
            spill = spill_dir / f"{id(self)}.npy"
            # RGB: the planes end to end in rows (see masters_rgb.rows_shape).
            np.save(spill, np.ascontiguousarray(data.reshape(-1, data.shape[-1]),
                                                dtype=np.float32))
            del data
            mapped = np.load(spill, mmap_mode="r")  # only to learn where the data starts
            self._path, self._offset, self._dtype = spill, int(mapped.offset), mapped.dtype
            del mapped
            self._scaled = False

    def _read(self, y0: int, y1: int) -> np.ndarray:
        count = (y1 - y0) * self._nx
        try:
            with open(self._path, "rb") as fh:
                fh.seek(self._offset + y0 * self._nx * self._dtype.itemsize)
                block = np.fromfile(fh, dtype=self._dtype, count=count)
        except OSError as exc:
            raise MasterError(f"{self.item.path}: cannot read the data: {exc}") from exc
        if block.size != count:
            raise MasterError(f"{self.item.path}: truncated data (rows {y0}-{y1 - 1} missing)")
        return block.reshape(y1 - y0, self._nx)

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows ``y0:y1`` as float32 with BZERO/BSCALE applied.

        Raises
        ------
        MasterError
            The file cannot be read or ends before these rows.
        """
        block = self._read(y0, y1)
        if not self._scaled:
            return block.astype(np.float32, copy=False)
        if self.item.layout.bitpix in (8, 16, -32):
            out = block.astype(np.float32)
            if self._bscale != 1.0:
                out *= np.float32(self._bscale)
            if self._bzero != 0.0:
                out += np.float32(self._bzero)
            return out
        return (block.astype(np.float64) * self._bscale + self._bzero).astype(np.float32)


# --------------------------------------------------------------------------- validation


def _odd_one(items: Sequence[_Input], key: Callable[[_Input], object]) -> _Input | None:
    """The first item whose key differs from the most common key, or None."""
    counts = Counter(key(i) for i in items)
    if len(counts) <= 1:
        return None
    common = counts.most_common(1)[0][0]
    return next(i for i in items if key(i) != common)


def _validate(kind: str, items: Sequence[_Input]) -> None:
    plural = {"bias": "bias frames", "dark": "darks", "flat": "flats",
              "darkflat": "dark flats"}[kind]
    allowed = {kind, "unknown"} | ({"dark"} if kind == "darkflat" else set())
    for item in items:
        if item.info.image_type not in allowed:
            raise MasterError(f"{item.path}: IMAGETYP says {item.info.image_type!r}, "
                              f"expected {plural}")
    ref = items[0].info

    def refuse(odd: _Input, what: str, value: str, common: str) -> MasterError:
        return MasterError(f"{odd.path}: {what} {value} differs from the other {plural}' "
                           f"{common}; refusing to mix them")

    odd = _odd_one(items, lambda i: geometry_of(i.info))
    if odd is not None:
        common = Counter(geometry_of(i.info) for i in items).most_common(1)[0][0]
        raise refuse(odd, "shape", fmt_shape(geometry_of(odd.info)), fmt_shape(common))
    odd = _odd_one(items, lambda i: i.info.binning)
    if odd is not None:
        common_bin = Counter(i.info.binning for i in items).most_common(1)[0][0]
        raise refuse(odd, "binning", "{}x{}".format(*odd.info.binning),
                     "{}x{}".format(*common_bin))
    if kind != "flat":
        exposures = sorted(i.info.exposure_s for i in items)
        median_exp = exposures[len(exposures) // 2]
        for item in items:
            if not same_exposure(item.info.exposure_s, median_exp):
                raise refuse(item, "exposure", f"{item.info.exposure_s:g} s", f"{median_exp:g} s")
    for attr in ("gain", "offset"):
        odd = _odd_one(items, lambda i, a=attr: getattr(i.info, a))  # type: ignore[misc]
        if odd is not None:
            common_val = Counter(getattr(i.info, attr) for i in items).most_common(1)[0][0]
            raise refuse(odd, attr.upper(), f"{getattr(odd.info, attr)}", f"{common_val}")
    odd = _odd_one(items, lambda i: i.info.bayer_pattern)
    if odd is not None:
        raise refuse(odd, "Bayer pattern", str(odd.info.bayer_pattern), str(ref.bayer_pattern))
    if kind == "flat":
        odd = _odd_one(items, lambda i: i.info.filter_name.casefold())
        if odd is not None:
            common_f = Counter(i.info.filter_name for i in items).most_common(1)[0][0]
            raise refuse(odd, "filter", repr(odd.info.filter_name), repr(common_f))


# --------------------------------------------------------------------------- combining


def _combine(sources: Sequence[_RowSource], shape: tuple[int, int], kappa: float,
             pre: np.ndarray | None, scales: Sequence[float] | None) -> tuple[np.ndarray, int]:
    """Chunked sigma-clipped mean of ``(rows - pre) / scale``; returns (image, rejected count)."""
    from livestack.pipeline import kernels_masters as km

    ny, nx = shape
    n = len(sources)
    rows_per_chunk = max(1, CHUNK_BYTES // max(1, n * nx * 4))
    out = np.empty(shape, dtype=np.float32)
    rejected_total = 0
    for y0 in range(0, ny, rows_per_chunk):
        y1 = min(ny, y0 + rows_per_chunk)
        stack = np.empty((n, y1 - y0, nx), dtype=np.float32)
        for i, src in enumerate(sources):
            block = src.rows(y0, y1)
            if pre is not None:
                block -= pre[y0:y1]
            if scales is not None:
                block /= np.float32(scales[i])
            stack[i] = block
        # Per-chunk rejection counts: only their total is reported (a full-frame int32
        # map would add 4 B/px to the build's peak).
        rejected = np.zeros((y1 - y0, nx), dtype=np.int32)
        km.clipped_mean_stack(stack, kappa, CLIP_MAX_ITER, out[y0:y1], rejected)
        rejected_total += int(rejected.sum())
    return out, rejected_total


def _frame_median(src: _RowSource, shape: tuple[int, int], pre: np.ndarray | None) -> float:
    """Median of a frame after ``- pre``, from every 2nd row and column."""
    ny, _ = shape
    samples = []
    step_rows = max(1, CHUNK_BYTES // 8 // max(1, shape[1] * 4))
    for y0 in range(0, ny, step_rows):
        y1 = min(ny, y0 + step_rows)
        block = src.rows(y0, y1)
        if pre is not None:
            block -= pre[y0:y1]
        samples.append(block[(-y0) % 2::2, ::2].ravel())
    values = np.concatenate(samples)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else float("nan")


def build_master(kind: str, paths: Sequence[Path], *, bias: np.ndarray | None = None,
                 dark_flat: np.ndarray | None = None,
                 kappa: float = 3.0) -> tuple[np.ndarray, fits.Header]:
    """Combine raw calibration frames into a master by a sigma-clipped mean.

    Parameters
    ----------
    kind : str
        ``"bias"``, ``"dark"``, ``"flat"`` or ``"darkflat"``.
    paths : sequence of Path
        The raw frames (plain or ``.fz`` FITS).
    bias : ndarray or None
        Master bias (float32, same shape). Flats: subtracted when no
        ``dark_flat`` is given. Darks: subtracted, and the header says
        ``LSBIASSB = T``.
    dark_flat : ndarray or None
        Master dark flat (bias included), subtracted from flats.
    kappa : float
        Rejection threshold in sigma (iterated per pixel, at most 5 passes).

    Returns
    -------
    master : ndarray, shape (ny, nx), float32
        Flats are normalised to median 1 (per CFA colour for Bayer data),
        after each frame was divided by its own median.
    header : astropy.io.fits.Header
        IMAGETYP ``'Master <Kind>'``, NCOMBINE, EXPTIME, CCD-TEMP (mean),
        GAIN, OFFSET, XBINNING/YBINNING, FILTER (flats), BAYERPAT with
        ``ROWORDER='TOP-DOWN'`` (the effective pattern of the array as
        stored), one ``LSINnnnn`` card per input file name, LSMETHOD,
        LSKAPPA, LSREJECT (fraction of values rejected), HISTORY.

    Raises
    ------
    MasterError
        Unknown kind, no frames, an unreadable frame, mixed shapes, binning,
        exposures (not for flats), gain, offset, Bayer pattern or filter
        (flats): the message names the odd file. Also a flat with no signal.
    """
    if kind not in MASTER_KINDS:
        raise MasterError(f"unknown master kind {kind!r}; expected one of {MASTER_KINDS}")
    if not paths:
        raise MasterError(f"no {kind} frames given")
    if not kappa > 0:
        raise MasterError(f"kappa must be > 0, got {kappa}")
    items = [_inspect(Path(p)) for p in paths]
    _validate(kind, items)
    geometry = geometry_of(items[0].info)
    # RGB frames are combined as one 2-D image of their planes end to end (per pixel work).
    shape = rows_shape(items[0].info)
    for label, arr in (("bias", bias), ("dark flat", dark_flat)):
        if arr is not None and arr.shape != geometry:
            raise MasterError(f"master {label} shape {fmt_shape(arr.shape)} does not match the "
                              f"{kind} frames' {fmt_shape(geometry)}")
    pre: np.ndarray | None = None
    pre_label = "none"
    if kind == "flat":
        if dark_flat is not None:
            pre, pre_label = np.asarray(dark_flat, dtype=np.float32).reshape(shape), "dark flat"
        elif bias is not None:
            pre, pre_label = np.asarray(bias, dtype=np.float32).reshape(shape), "bias"
    elif kind == "dark" and bias is not None:
        pre, pre_label = np.asarray(bias, dtype=np.float32).reshape(shape), "bias"

    with tempfile.TemporaryDirectory(prefix="livestack-master-") as spill:
        sources = [_RowSource(item, Path(spill)) for item in items]
        scales: list[float] | None = None
        if kind == "flat":
            scales = []
            for src in sources:
                med = _frame_median(src, shape, pre)
                if not med > 0:
                    raise MasterError(f"{src.item.path}: flat median {med:.1f} ADU after "
                                      f"{pre_label} subtraction is not positive")
                scales.append(med)
        master, n_rejected = _combine(sources, shape, kappa, pre, scales)
        del sources
    master = master.reshape(geometry)
    pattern = items[0].info.bayer_pattern
    if kind == "flat":
        master = normalize_flat(master, pattern)
    header = _master_header(kind, items, kappa, n_rejected, pre_label, pattern)
    return master, header


def _master_header(kind: str, items: Sequence[_Input], kappa: float, n_rejected: int,
                   pre_label: str, pattern: str | None) -> fits.Header:
    infos = [i.info for i in items]
    n = len(items)
    ny, nx = infos[0].shape
    hdr = fits.Header()
    hdr["IMAGETYP"] = (_IMAGETYP[kind], "livestack master calibration frame")
    hdr["LSMASTER"] = (True, "built by livestack")
    hdr["LSKIND"] = (kind, "bias, dark, flat or darkflat")
    hdr["NCOMBINE"] = (n, "number of frames combined")
    exposure = float(np.mean([i.exposure_s for i in infos]))
    hdr["EXPTIME"] = (exposure, "[s] mean exposure of the inputs")
    temps = [i.ccd_temp_c for i in infos if i.ccd_temp_c is not None]
    if temps:
        hdr["CCD-TEMP"] = (float(np.mean(temps)), "[C] mean sensor temperature of the inputs")
        hdr["LSTMPMIN"] = (float(min(temps)), "[C] lowest input temperature")
        hdr["LSTMPMAX"] = (float(max(temps)), "[C] highest input temperature")
    if infos[0].gain is not None:
        hdr["GAIN"] = (infos[0].gain, "camera gain setting")
    if infos[0].offset is not None:
        hdr["OFFSET"] = (infos[0].offset, "camera offset setting")
    if infos[0].egain_e_per_adu is not None:
        hdr["EGAIN"] = (infos[0].egain_e_per_adu, "[e-/ADU]")
    hdr["XBINNING"] = infos[0].binning[0]
    hdr["YBINNING"] = infos[0].binning[1]
    if infos[0].filter_name:
        hdr["FILTER"] = infos[0].filter_name
    if pattern is not None:
        hdr["BAYERPAT"] = (pattern, "effective CFA pattern of the array as stored")
        hdr["ROWORDER"] = "TOP-DOWN"
        hdr["XBAYROFF"] = 0
        hdr["YBAYROFF"] = 0
    dates = [i.date_obs for i in infos if i.date_obs is not None]
    if dates:
        hdr["DATE-OBS"] = (min(dates).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3],
                           "UTC start of the first input")
    hdr["LSMETHOD"] = ("sigma-clipped mean", "combine method")
    hdr["LSKAPPA"] = (kappa, "rejection threshold in sigma")
    hdr["LSREJECT"] = (n_rejected / float(n * ny * nx * infos[0].channels),
                       "fraction of input values rejected")
    hdr["LSBIASSB"] = (kind == "dark" and pre_label == "bias", "bias already subtracted")
    if kind == "flat":
        hdr["LSFLATPR"] = (pre_label, "subtracted from each flat before normalising")
    for index, item in enumerate(items, start=1):
        hdr[f"LSIN{index:04d}"] = (item.path.name, "input frame")
    hdr.add_history(f"livestack master {kind}: sigma-clipped mean of {n} frames, kappa {kappa:g}, "
                    f"max {CLIP_MAX_ITER} passes")
    if kind == "flat":
        hdr.add_history(f"each flat minus {pre_label}, divided by its median; result normalised "
                        "to median 1" + (" per CFA colour" if pattern else "")
                        + (" per channel" if infos[0].channels > 1 else ""))
    return hdr


# --------------------------------------------------------------------------- folders -> masters


def _group_key(kind: str, info: FrameInfo) -> tuple[object, ...]:
    key: tuple[object, ...] = (geometry_of(info), info.binning, info.gain, info.offset,
                               info.bayer_pattern)
    if kind in ("dark", "darkflat"):
        key += (round(info.exposure_s, 3),)
    if kind == "flat":
        key += (info.filter_name.casefold(),)
    return key


def _split_by_temperature(items: list[_Input], gap_c: float = 2.0) -> list[list[_Input]]:
    """Split darks into runs whose sorted temperatures have no gap above ``gap_c``."""
    known = sorted((i for i in items if i.info.ccd_temp_c is not None),
                   key=lambda i: float(i.info.ccd_temp_c or 0.0))
    unknown = [i for i in items if i.info.ccd_temp_c is None]
    groups: list[list[_Input]] = []
    for item in known:
        if groups and float(item.info.ccd_temp_c or 0.0) - float(
                groups[-1][-1].info.ccd_temp_c or 0.0) <= gap_c:
            groups[-1].append(item)
        else:
            groups.append([item])
    if unknown:
        groups.append(unknown)
    return groups


def _groups(kind: str, paths: Sequence[Path]) -> list[list[_Input]]:
    items = [_inspect(p) for p in paths]
    by_key: dict[tuple[object, ...], list[_Input]] = {}
    for item in items:
        by_key.setdefault(_group_key(kind, item.info), []).append(item)
    out: list[list[_Input]] = []
    for group in by_key.values():
        out.extend(_split_by_temperature(group) if kind == "dark" else [group])
    return out


def _raw_dir_files(directory: Path, kind: str) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise MasterError(f"{directory}: not a directory of {kind} frames")
    files = list_fits(directory)
    if not files:
        raise MasterError(f"{directory}: no frame files (FITS, RAW, TIFF, PNG, XISF) for the "
                          f"{kind} master")
    return files


def _matching(candidates: Iterable[MasterEntry], info: FrameInfo) -> list[MasterEntry]:
    return [c for c in candidates if geometry_of(c.info) == geometry_of(info)
            and c.info.binning == info.binning
            and _same_setting(c.info.gain, info.gain) and _same_setting(c.info.offset, info.offset)]


def _build_all(raw: dict[str, list[Path]], kappa: float,
               existing: Sequence[MasterEntry] = ()) -> list[MasterEntry]:
    """Build every master the raw files allow: biases, darks, dark flats, then flats.

    Darks keep their bias. Each flat group is corrected with the dark flat of
    its (median) exposure, else a bias, taken from ``existing`` or the fresh
    masters.
    """
    built: list[MasterEntry] = []
    for kind in ("bias", "dark", "darkflat"):
        for group in _groups(kind, raw.get(kind, [])):
            data, hdr = build_master(kind, [i.path for i in group], kappa=kappa)
            built.append(MasterEntry.from_array(kind, data, hdr))
    known = [*existing, *built]
    for group in _groups("flat", raw.get("flat", [])):
        probe = group[0].info
        exposures = sorted(i.info.exposure_s for i in group)
        flat_exp = exposures[len(exposures) // 2]
        dark_flat = next((d for d in _matching((e for e in known if e.kind == "darkflat"), probe)
                          if same_exposure(d.info.exposure_s, flat_exp)), None)
        bias_entry = next(iter(_matching((e for e in known if e.kind == "bias"), probe)), None)
        data, hdr = build_master(
            "flat", [i.path for i in group], kappa=kappa,
            dark_flat=dark_flat.data() if dark_flat is not None else None,
            bias=bias_entry.data() if bias_entry is not None and dark_flat is None else None)
        built.append(MasterEntry.from_array("flat", data, hdr))
    return built


def _master_file_name(entry: MasterEntry) -> str:
    info = entry.info
    parts = [f"master_{entry.kind}"]
    if entry.kind in ("dark", "darkflat"):
        parts.append(f"{info.exposure_s:g}s")
    if entry.kind == "dark" and info.ccd_temp_c is not None:
        parts.append(f"{info.ccd_temp_c:+.0f}C".replace("+", "p").replace("-", "m"))
    if entry.kind == "flat" and info.filter_name:
        parts.append("".join(c if c.isalnum() else "-" for c in info.filter_name))
    parts.append("bin{}x{}".format(*info.binning))
    if info.gain is not None:
        parts.append(f"g{info.gain:g}")
    return "_".join(parts)


def build_masters_from_dirs(out_dir: Path, bias_dir: Path | None = None,
                            dark_dir: Path | None = None, flat_dir: Path | None = None,
                            darkflat_dir: Path | None = None, *,
                            kappa: float = 3.0) -> list[Path]:
    """Build and write every master the given folders of raw frames allow.

    Frames are grouped by shape, binning, gain, offset, Bayer pattern, and
    exposure (darks, dark flats), sensor temperature (darks: runs with no gap
    above 2 C) and filter (flats). Flats are corrected with the dark flat of
    their exposure, else the bias.

    Parameters
    ----------
    out_dir : Path
        Created if needed; files are named like
        ``master_dark_60s_m10C_bin2x2_g80.fits``.
    bias_dir, dark_dir, flat_dir, darkflat_dir : Path or None
    kappa : float

    Returns
    -------
    list of Path
        The written master files.

    Raises
    ------
    MasterError
        A folder without FITS files, or any :func:`build_master` error.
    StorageError
        When a master cannot be written.
    """
    files = {kind: (_raw_dir_files(d, kind) if d is not None else [])
             for kind, d in (("bias", bias_dir), ("dark", dark_dir), ("flat", flat_dir),
                             ("darkflat", darkflat_dir))}
    if not any(files.values()):
        raise MasterError("no calibration folders given")
    entries = _build_all(files, kappa)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MasterError(f"{out}: cannot create the output folder: {exc.strerror}") from exc
    written: list[Path] = []
    for entry in entries:
        stem = _master_file_name(entry)
        target = out / f"{stem}.fits"
        n = 2
        while target in written:
            target = out / f"{stem}_{n}.fits"
            n += 1
        write_fits_float32(target, entry.data(), entry.header)
        written.append(target)
    return written


# --------------------------------------------------------------------------- the library


def _same_setting(a: float | None, b: float | None) -> bool:
    return a is None or b is None or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


@dataclass
class MasterEntry:
    """One master frame known to the library (data loaded lazily from ``path``).

    Attributes
    ----------
    kind : str
        ``bias``, ``dark``, ``flat`` or ``darkflat``.
    info : FrameInfo
    header : astropy.io.fits.Header
    path : Path or None
        None for masters built in memory.
    ncombine : int
    bias_subtracted : bool
        True for darks built with a bias subtracted (``LSBIASSB = T``).
    """

    kind: str
    info: FrameInfo
    header: fits.Header
    path: Path | None = None
    ncombine: int = 1
    bias_subtracted: bool = False
    _data: np.ndarray | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """File name, or ``'in-memory <kind>'``."""
        return self.path.name if self.path is not None else f"in-memory {self.kind}"

    @classmethod
    def from_array(cls, kind: str, data: np.ndarray, header: fits.Header,
                   path: Path | None = None) -> MasterEntry:
        """Entry for a master already in memory (e.g. fresh from :func:`build_master`)."""
        arr = np.ascontiguousarray(data, dtype=np.float32)
        info = parse_frame_info(header, str(path) if path else f"<{kind}>",
                                (arr.shape[-2], arr.shape[-1]))
        if arr.ndim == 3:
            info = replace(info, channels=int(arr.shape[0]))
        return cls(kind, info, header, path, int(header.get("NCOMBINE", 1) or 1),
                   bool(header.get("LSBIASSB", False)), arr)

    @classmethod
    def from_file(cls, path: Path) -> MasterEntry:
        """Entry for a master FITS file (reads the header only).

        Raises
        ------
        MasterError
            Unreadable file, or IMAGETYP not a bias/dark/flat/dark flat.
        """
        header, info, data = read_master_header(path)
        kind = str(header.get("LSKIND", "")).strip() or info.image_type
        if kind not in MASTER_KINDS:
            raise MasterError(f"{path}: IMAGETYP {header.get('IMAGETYP')!r} is not a bias, dark, "
                              "flat or dark flat master")
        return cls(kind, info, header, Path(path), int(header.get("NCOMBINE", 1) or 1),
                   bool(header.get("LSBIASSB", False)), data)

    def data(self) -> np.ndarray:
        """The master's pixels (float32), read on first use.

        Raises
        ------
        MasterError
            If the file cannot be read any more.
        """
        if self._data is None:
            assert self.path is not None  # entries without data always have a path
            if self.info.channels > 1:
                self._data, _, _ = read_rgb_master(self.path)
                return self._data
            try:
                self._data, _, _ = read_any_frame(self.path)
            except FrameReadError as exc:
                raise MasterError(f"{self.path}: cannot read master: {exc.message}") from exc
        return self._data


@dataclass(frozen=True)
class _Choice:
    bias: MasterEntry | None
    dark: MasterEntry | None
    dark_scale: float
    flat: MasterEntry | None
    notes: tuple[str, ...]


class MasterLibrary:
    """Master frames, and the choice of which ones calibrate a given light.

    Parameters
    ----------
    entries : iterable of MasterEntry
    """

    def __init__(self, entries: Iterable[MasterEntry] = ()) -> None:
        self.entries: list[MasterEntry] = list(entries)
        self._cache: dict[tuple[object, ...], MasterSet] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def from_paths(cls, paths: Iterable[Path]) -> MasterLibrary:
        """Load master FITS files, or every FITS file of the given folders (headers only).

        Raises
        ------
        MasterError
            A path that does not exist, a folder without FITS files, or a file
            that is not a master (see :meth:`MasterEntry.from_file`).
        """
        entries: list[MasterEntry] = []
        for raw_path in paths:
            path = Path(raw_path)
            if path.is_dir():
                files = list_fits(path)
                if not files:
                    raise MasterError(f"{path}: no master FITS files in this folder")
                entries.extend(MasterEntry.from_file(f) for f in files)
            elif path.is_file():
                entries.append(MasterEntry.from_file(path))
            else:
                raise MasterError(f"{path}: no such master file or folder")
        return cls(entries)

    def _of_kind(self, kind: str) -> list[MasterEntry]:
        return [e for e in self.entries if e.kind == kind]

    @staticmethod
    def _narrow(cands: list[MasterEntry], keep: Callable[[MasterEntry], bool], notes: list[str],
                why: Callable[[list[MasterEntry]], str]) -> list[MasterEntry]:
        kept = [c for c in cands if keep(c)]
        if cands and not kept:
            notes.append(why(cands))
        return kept

    def _geometry(self, kind: str, info: FrameInfo, notes: list[str],
                  check_gain: bool = True) -> list[MasterEntry]:
        cands = self._of_kind(kind)
        name = {"darkflat": "dark flat"}.get(kind, kind)
        cands = self._narrow(
            cands, lambda c: geometry_of(c.info) == geometry_of(info), notes, lambda cs: (
                f"no {name} of shape {fmt_shape(geometry_of(info))} (have "
                f"{', '.join(sorted({fmt_shape(geometry_of(c.info)) for c in cs}))})"))
        cands = self._narrow(cands, lambda c: c.info.binning == info.binning, notes, lambda cs: (
            f"no {name} with binning {info.binning[0]}x{info.binning[1]} (have "
            f"{', '.join(sorted({'{}x{}'.format(*c.info.binning) for c in cs}))})"))
        if check_gain:
            for attr in ("gain", "offset"):
                want: float | None = getattr(info, attr)

                def keep(c: MasterEntry, a: str = attr, w: float | None = want) -> bool:
                    return _same_setting(getattr(c.info, a), w)

                def why(cs: list[MasterEntry], a: str = attr, w: float | None = want) -> str:
                    have = ", ".join(sorted({f"{getattr(c.info, a):g}" for c in cs}))
                    return f"no {name} with {a.upper()} {w:g} (have {have})"

                cands = self._narrow(cands, keep, notes, why)
        return cands

    @staticmethod
    def _temp_ok(entry: MasterEntry, info: FrameInfo, tol: float) -> bool:
        a, b = entry.info.ccd_temp_c, info.ccd_temp_c
        return a is None or b is None or abs(a - b) <= tol

    @staticmethod
    def _temp_distance(entry: MasterEntry, info: FrameInfo) -> float:
        a, b = entry.info.ccd_temp_c, info.ccd_temp_c
        return abs(a - b) if a is not None and b is not None else 0.0

    def choose(self, info: FrameInfo, temp_tolerance_c: float = 2.0) -> _Choice:
        """Pick bias, dark (with its exposure scale) and flat for ``info`` (metadata only)."""
        notes: list[str] = []
        biases = self._geometry("bias", info, notes)
        bias = min(biases, key=lambda b: (self._temp_distance(b, info), -b.ncombine)) \
            if biases else None

        dark: MasterEntry | None = None
        scale = 1.0
        all_darks = self._of_kind("dark")
        darks = self._geometry("dark", info, notes)
        darks = self._narrow(
            darks, lambda d: self._temp_ok(d, info, temp_tolerance_c), notes, lambda ds: (
                f"no dark within {temp_tolerance_c:.1f} C of {_fmt_temp(info.ccd_temp_c)} (have "
                f"{', '.join(sorted({_fmt_temp(d.info.ccd_temp_c) for d in ds}))})"))
        exact = [d for d in darks if same_exposure(d.info.exposure_s, info.exposure_s)]
        if exact:
            dark = min(exact, key=lambda d: (self._temp_distance(d, info), -d.ncombine))
        elif darks:
            have = ", ".join(f"{e:g} s" for e in sorted({d.info.exposure_s for d in darks}))
            scalable = [d for d in darks if d.info.exposure_s > 0]
            if bias is None and not all(d.bias_subtracted for d in scalable):
                notes.append(f"no dark of {info.exposure_s:g} s (have {have}) and no bias to "
                             "scale one")
            elif scalable and info.exposure_s > 0:
                dark = min(scalable, key=lambda d: (
                    abs(math.log(d.info.exposure_s / info.exposure_s)),
                    self._temp_distance(d, info)))
                scale = info.exposure_s / dark.info.exposure_s
            else:
                notes.append(f"no dark of {info.exposure_s:g} s (have {have})")
        elif not all_darks:
            notes.append("no master dark loaded")

        flats = self._geometry("flat", info, notes, check_gain=False)
        want_filter = info.filter_name.strip().casefold()
        flats = self._narrow(
            flats, lambda f: f.info.filter_name.strip().casefold() == want_filter, notes,
            lambda fs: (f"no flat for filter {info.filter_name!r} (have "
                        f"{', '.join(sorted({repr(f.info.filter_name) for f in fs}))})"))
        flats = self._narrow(
            flats, lambda f: f.info.bayer_pattern == info.bayer_pattern, notes,
            lambda fs: (f"no flat with Bayer pattern {info.bayer_pattern} (have "
                        f"{', '.join(sorted({str(f.info.bayer_pattern) for f in fs}))})"))
        flat = max(flats, key=lambda f: f.ncombine) if flats else None
        if not self._of_kind("flat"):
            notes.append("no master flat loaded")
        if dark is not None and dark.bias_subtracted and bias is None:
            notes.append(f"{dark.label} has its bias removed but no bias master fits: "
                         "the bias level stays in the frame")
        return _Choice(bias, dark, scale, flat, tuple(notes))

    def select(self, info: FrameInfo, temp_tolerance_c: float = 2.0) -> MasterSet:
        """The :class:`MasterSet` that calibrates a light described by ``info``.

        Matching: shape and binning always; GAIN/OFFSET when both sides know
        them (not for flats); darks by exposure (within 1%) and temperature
        (within ``temp_tolerance_c``, unknown temperatures accepted); flats by
        filter and Bayer pattern. Without a dark of the light's exposure, a
        dark of another exposure is scaled if a bias exists:
        ``bias + (dark - bias) * t_light / t_dark``. The defect map (hot
        pixels from the dark, cold from the flat) is computed once per
        distinct choice and cached, as is the whole set.

        Parameters
        ----------
        info : FrameInfo
        temp_tolerance_c : float

        Returns
        -------
        MasterSet
            ``description`` lists what was applied and why anything is missing,
            e.g. ``"no dark within 2.0 C of -20.0 C (have -10.0 C)"``.

        Raises
        ------
        MasterError
            A chosen master file can no longer be read.
        """
        choice = self.choose(info, temp_tolerance_c)
        key = (id(choice.bias) if choice.bias else None, id(choice.dark) if choice.dark else None,
               round(choice.dark_scale, 9), id(choice.flat) if choice.flat else None,
               choice.notes)
        with self._lock:
            cached = self._cache.get(key)
            if cached is None:
                cached = self._build_set(choice)
                self._cache[key] = cached
        return cached

    @staticmethod
    def _build_set(choice: _Choice) -> MasterSet:
        applied: list[str] = []
        subtract: np.ndarray | None = None
        defects: np.ndarray | None = None
        bias = choice.bias.data() if choice.bias is not None else None
        if choice.bias is not None:
            applied.append(f"bias x{choice.bias.ncombine} ({choice.bias.label})")
        if choice.dark is not None:
            d = choice.dark
            dark = d.data()
            if d.bias_subtracted:
                thermal = dark
            elif bias is not None:
                thermal = dark - bias
            else:
                thermal = None
            if choice.dark_scale == 1.0:
                subtract = dark + bias if (d.bias_subtracted and bias is not None) else dark
            else:
                assert thermal is not None and bias is not None  # choose() guarantees a bias
                subtract = bias + thermal * np.float32(choice.dark_scale)
            text = (f"dark {d.info.exposure_s:g}s {_fmt_temp(d.info.ccd_temp_c).replace(' C', 'C')}"
                    f" x{d.ncombine} ({d.label})")
            if choice.dark_scale != 1.0:
                text += (f" scaled x{choice.dark_scale:.3g} to "
                         f"{d.info.exposure_s * choice.dark_scale:g}s")
            applied.append(text)
            defects = defect_map(thermal if thermal is not None else dark, d.info.exposure_s,
                                 choice.flat.data() if choice.flat else None)
        elif bias is not None:
            subtract = bias
        flat = choice.flat.data() if choice.flat is not None else None
        if choice.flat is not None:
            f = choice.flat
            applied.append(f"flat {f.info.filter_name!r} x{f.ncombine} ({f.label})")
            if defects is None:
                defects = cold_map(f.data())
        if defects is not None:
            applied.append(f"defect map: {int(defects.sum())} pixels")
        return MasterSet(
            subtract=np.ascontiguousarray(subtract, dtype=np.float32)
            if subtract is not None else None,
            flat=flat,
            defects=defects,
            description=tuple(applied) + choice.notes,
        )


# --------------------------------------------------------------------------- CLI helper


def _is_master_file(path: Path) -> bool:
    try:
        header, _, _ = read_master_header(path)
    except MasterError:
        return False
    imagetyp = str(header.get("IMAGETYP", "")).strip().lower()
    return bool(header.get("LSMASTER", False)) or imagetyp.startswith("master") or int(
        header.get("NCOMBINE", 1) or 1) > 1


def masters_for_cli(bias: Path | None = None, darks: Path | None = None,
                    flats: Path | None = None, darkflats: Path | None = None, *,
                    kappa: float = 3.0) -> MasterLibrary:
    """Library for ``livestack stack --bias P --darks P --flats P``.

    Each argument is a master file, a folder of master files, or a folder of
    raw frames (masters are then built in memory: biases first, flats
    corrected with the matching dark flat or bias).

    Raises
    ------
    MasterError
        Missing paths, empty folders, or any build error.
    """
    entries: list[MasterEntry] = []
    raw: dict[str, list[Path]] = {"bias": [], "dark": [], "flat": [], "darkflat": []}
    for kind, arg in (("bias", bias), ("dark", darks), ("flat", flats), ("darkflat", darkflats)):
        if arg is None:
            continue
        path = Path(arg)
        if path.is_file():
            entries.append(MasterEntry.from_file(path))
        elif path.is_dir():
            files = list_fits(path)
            if not files:
                raise MasterError(f"{path}: no frame files (FITS, RAW, TIFF, PNG, XISF)")
            if all(_is_master_file(f) for f in files):
                # A folder of masters may hold every kind: take the ones asked for.
                found = [e for e in (MasterEntry.from_file(f) for f in files) if e.kind == kind]
                if not found:
                    raise MasterError(f"{path}: no master {kind} in this folder")
                entries.extend(found)
            else:
                raw[kind] = files
        else:
            raise MasterError(f"{path}: no such {kind} file or folder")
    if any(raw.values()):
        # Raw flats may use a bias or dark-flat master that was given as a file.
        entries.extend(_build_all(raw, kappa, existing=entries))
    return MasterLibrary(entries)

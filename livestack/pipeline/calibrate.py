"""Frame calibration against master frames, and the defect map. Pure: arrays in, arrays out.

``calibrated = (raw - subtract) / flat``, then every defect pixel (hot or
cold) becomes the median of its same-colour neighbours. The work is one fused
numba kernel (:func:`livestack.pipeline.kernels_calibrate.calibrate_fused`)
that touches each pixel once (``tests/oracles.py`` holds the numpy formulation that
tests and benchmarks compare it with).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from livestack.errors import CalibrationError
from livestack.pipeline import kernels_calibrate as kc
from livestack.pipeline.cosmetic import correct_defects, neighbour_step
from livestack.reasons import Reason

#: Flat values at or below this are not divided by (they are defects; see the kernel).
FLAT_MIN = kc.FLAT_MIN


@dataclass(frozen=True)
class MasterSet:
    """The calibration to apply to one kind of frame.

    Attributes
    ----------
    subtract : ndarray or None
        float32 ``(ny, nx)``: bias + dark (scaled to the light's exposure), ADU.
    flat : ndarray or None
        float32 ``(ny, nx)``: normalised flat (median 1; per CFA colour for Bayer).
    defects : ndarray or None
        bool ``(ny, nx)``: hot/cold pixel map.

    Masters of RGB frames have the frames' ``(3, ny, nx)`` shape (flat: median 1 per
    channel); :meth:`channel` gives the 2-D set of one channel.
    description : tuple of str
        What was applied, human-readable (``"dark 60s -10.0C x20"``), or why
        nothing fitted.

    Notes
    -----
    The defect positions are indexed once at construction (so the kernel
    never scans the map); treat the arrays as read-only afterwards.
    """

    subtract: NDArray[np.float32] | None = None
    flat: NDArray[np.float32] | None = None
    defects: NDArray[np.bool_] | None = None
    description: tuple[str, ...] = ()
    # Row-compressed defect positions, computed once so the kernel never scans
    # the map: columns of row y are _defect_cols[_defect_ptr[y]:_defect_ptr[y + 1]].
    _defect_ptr: NDArray[np.int64] | None = field(default=None, init=False, repr=False,
                                                  compare=False)
    _defect_cols: NDArray[np.int64] | None = field(default=None, init=False, repr=False,
                                                   compare=False)

    # RGB masters: the 2-D set of each channel, built once (defects indexed per channel).
    _channels: tuple[MasterSet, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.defects is not None and self.defects.ndim == 2:
            ys, xs = np.nonzero(self.defects)
            ptr = np.searchsorted(ys, np.arange(self.defects.shape[0] + 1)).astype(np.int64)
            object.__setattr__(self, "_defect_ptr", ptr)
            object.__setattr__(self, "_defect_cols", xs.astype(np.int64))
        arrays = [a for a in (self.subtract, self.flat, self.defects) if a is not None]
        if arrays and all(a.ndim == 3 for a in arrays) and len({a.shape[0] for a in arrays}) == 1:
            object.__setattr__(self, "_channels", tuple(
                MasterSet(None if self.subtract is None else self.subtract[c],
                          None if self.flat is None else self.flat[c],
                          None if self.defects is None else self.defects[c],
                          self.description)
                for c in range(arrays[0].shape[0])))

    def channel(self, index: int) -> MasterSet:
        """The 2-D masters of channel ``index`` of an RGB set.

        Raises
        ------
        IndexError
            The set is not one of ``(channels, ny, nx)`` masters, or has no such channel.
        """
        return self._channels[index]

    def is_empty(self) -> bool:
        """True when the set would leave a frame unchanged."""
        return self.subtract is None and self.flat is None and self.defects is None


def _check_shapes(raw_shape: tuple[int, ...], masters: MasterSet, frame_name: str | None) -> None:
    for label, arr in (("subtract (bias+dark)", masters.subtract), ("flat", masters.flat),
                       ("defect map", masters.defects)):
        if arr is not None and arr.shape != raw_shape:
            where = f"{frame_name}: " if frame_name else ""
            raise CalibrationError(
                Reason.MASTER_SHAPE_MISMATCH,
                f"{where}master {label} has shape {arr.shape} but the frame has shape {raw_shape}",
                frame_name,
            )


def _as_frame(raw: np.ndarray, frame_name: str | None) -> NDArray[np.float32]:
    if raw.ndim != 2 and not (raw.ndim == 3 and raw.shape[0] == 3):
        where = f"{frame_name}: " if frame_name else ""
        raise CalibrationError("not_2d", f"{where}expected a 2-D or (3, ny, nx) RGB frame, "
                                         f"got shape {raw.shape}")
    return np.ascontiguousarray(raw, dtype=np.float32)


def _calibrate_rgb(data: NDArray[np.float32], masters: MasterSet | None,
                   frame_name: str | None, out: NDArray[np.float32] | None
                   ) -> NDArray[np.float32]:
    """Calibrate a ``(3, ny, nx)`` RGB frame channel by channel (no CFA: 1-px rings)."""
    if out is None:
        out = np.empty_like(data)
    if masters is not None and not masters.is_empty():
        _check_shapes(data.shape, masters, frame_name)
    for c in range(data.shape[0]):
        plane = masters.channel(c) if masters is not None and not masters.is_empty() else None
        # data may be raw's own memory (float32 input): calibrate() only reads it.
        calibrate(data[c], plane, None, frame_name=frame_name, out=out[c])
    return out


def calibrate(raw: np.ndarray, masters: MasterSet | None, bayer_pattern: str | None = None,
              *, frame_name: str | None = None,
              out: NDArray[np.float32] | None = None,
              overwrite_raw: bool = False) -> NDArray[np.float32]:
    """Calibrate one frame: ``(raw - subtract) / flat``, then defect correction.

    Parameters
    ----------
    raw : ndarray, shape (ny, nx) or (3, ny, nx)
        The frame in ADU (any real dtype); never modified unless ``overwrite_raw``. An RGB
        frame is calibrated per channel with masters of its own ``(3, ny, nx)`` shape.
    masters : MasterSet or None
        None or an empty set returns a float32 copy.
    bayer_pattern : str or None
        CFA pattern of ``raw``: defects take same-colour neighbours 2 px away.
    frame_name : str or None
        Named in error messages.
    out : ndarray or None
        Optional C-contiguous float32 ``(ny, nx)`` buffer to write into (not
        ``raw``); reusing one saves the page faults of a fresh 100 MB array
        per 26 MP frame.
    overwrite_raw : bool
        Calibrate in ``raw`` itself when it is C-contiguous float32 (and ``out`` is None):
        the live worker's frame as read is not needed afterwards, and a second 26 MP
        float32 frame is 104 MB of peak memory. Same result bit for bit.

    Returns
    -------
    ndarray, shape of ``raw``, float32
        New array (or ``out``). Pixels whose flat is <= 1e-3 (or NaN) are not divided; the
        defect map is expected to cover them (:func:`find_defects` does).

    Raises
    ------
    CalibrationError
        ``"master_shape_mismatch"`` naming both shapes; ``"not_2d"``.
    ValueError
        An unusable ``out`` buffer.
    """
    data = _as_frame(raw, frame_name)
    if out is not None:
        if out.shape != data.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 of shape {data.shape}")
        if np.shares_memory(out, raw):
            raise ValueError("out must not share memory with raw")
    if data.ndim == 3:
        return _calibrate_rgb(data, masters, frame_name, out)
    in_place = overwrite_raw and out is None and data is raw
    if masters is None or masters.is_empty():
        if in_place:
            return data
        if out is not None:
            out[...] = data
            return out
        return data.copy() if (data is raw or np.shares_memory(data, raw)) else data
    _check_shapes(data.shape, masters, frame_name)
    sub, flat, defects, defects_u8, ptr, cols = _kernel_masters(data.shape, masters)
    if in_place:
        out = data
        unresolved = kc.calibrate_inplace(data, sub, flat, defects_u8, ptr, cols,
                                          masters.subtract is not None,
                                          masters.flat is not None, masters.defects is not None,
                                          neighbour_step(bayer_pattern))
    else:
        if out is None:
            out = np.empty_like(data)
        unresolved = kc.calibrate_fused(data, sub, flat, defects_u8, ptr, cols,
                                        masters.subtract is not None, masters.flat is not None,
                                        masters.defects is not None,
                                        neighbour_step(bayer_pattern), out)
    if unresolved:
        # Some defects had no usable neighbour in the ring: redo the defects
        # with the fallbacks of correct_defects (same result for the others).
        out[...] = correct_defects(out, defects, bayer_pattern)
    return out




def _kernel_masters(shape: tuple[int, ...], masters: MasterSet) -> tuple[
        NDArray[np.float32], NDArray[np.float32], NDArray[np.bool_], NDArray[np.uint8],
        NDArray[np.int64], NDArray[np.int64]]:
    """The kernels' master arguments: subtract, flat, defect map (bool and its uint8
    view), row pointers and columns of the defects; dummies for what is absent."""
    dummy_f = np.zeros((1, 1), dtype=np.float32)
    sub = np.ascontiguousarray(masters.subtract, dtype=np.float32) \
        if masters.subtract is not None else dummy_f
    flat = np.ascontiguousarray(masters.flat, dtype=np.float32) \
        if masters.flat is not None else dummy_f
    defects = np.ascontiguousarray(masters.defects, dtype=np.bool_) \
        if masters.defects is not None else np.zeros((1, 1), dtype=np.bool_)
    defects_u8 = defects.view(np.uint8)  # see kernels_calibrate: uint8 masks are faster
    empty_index = np.zeros(1, dtype=np.int64)
    ptr = masters._defect_ptr if masters._defect_ptr is not None else np.zeros(
        shape[0] + 1, dtype=np.int64)
    cols = masters._defect_cols if masters._defect_cols is not None else empty_index
    return sub, flat, defects, defects_u8, ptr, cols


@dataclass(frozen=True)
class RawScan:
    """What :func:`calibrate_scanned` read from each raw row before calibrating it.

    Attributes
    ----------
    row_key : ndarray, shape (ny,), int32
        Each row's finite maximum as an order key (``kernels_calibrate.NO_KEY``: none).
    row_count : ndarray, shape (ny,), int64
        Pixels equal to the row's maximum, in the rows that can hold the frame's maximum
        (0 in the others).
    above : ndarray, shape (ny, 3), int64
        Pixels at or above each of the given levels.
    dense : ndarray, shape (ny,), uint8
        The rows whose per-pixel codes were written
        (``kernels_calibrate.calibrate_inplace_scan``).
    sample : ndarray, float64
        ``raw[::sample_step, ::sample_step]``.
    """

    row_key: NDArray[np.int32]
    row_count: NDArray[np.int64]
    above: NDArray[np.int64]
    dense: NDArray[np.uint8]
    sample: NDArray[np.float64]


def can_scan(raw: np.ndarray, masters: MasterSet | None) -> bool:
    """Whether :func:`calibrate_scanned` applies: a 2-D C-contiguous float32 frame and
    masters to apply (otherwise the raw frame survives calibration and is read as it is)."""
    return (raw.ndim == 2 and raw.dtype == np.float32 and raw.flags.c_contiguous
            and raw.flags.writeable and masters is not None and not masters.is_empty())


def calibrate_scanned(raw: NDArray[np.float32], masters: MasterSet,
                      bayer_pattern: str | None, levels: NDArray[np.float32],
                      codes: NDArray[np.uint8], sample_step: int, *,
                      frame_name: str | None = None) -> tuple[NDArray[np.float32], RawScan]:
    """Calibrate ``raw`` in place, reading what the saturation step needs from each raw row
    first (the raw frame is read once instead of three times).

    Parameters
    ----------
    raw : ndarray, shape (ny, nx), float32, C-contiguous
        The frame (ADU); overwritten by the calibrated frame (see :func:`can_scan`).
    masters : MasterSet
        Not empty.
    bayer_pattern : str or None
        As for :func:`calibrate`.
    levels : ndarray, shape (n_levels,), float32
        Levels whose pixel counts (and per-pixel codes) are wanted; at most 3.
    codes : ndarray, shape (ny, nx), uint8
        Scratch for the per-pixel codes of the rare rows that need them.
    sample_step : int
        Stride of :attr:`RawScan.sample`.
    frame_name : str or None
        Named in error messages.

    Returns
    -------
    calibrated : ndarray, shape (ny, nx), float32
        ``raw`` itself, calibrated exactly as :func:`calibrate` with ``overwrite_raw``.
    scan : RawScan

    Raises
    ------
    CalibrationError
        ``"master_shape_mismatch"``.
    ValueError
        More than 3 levels, or a frame :func:`can_scan` refuses.
    """
    if not can_scan(raw, masters) or codes.shape != raw.shape or levels.size > 3:
        raise ValueError("calibrate_scanned needs a writeable C-contiguous float32 2-D "
                         "frame, masters, codes of its shape and at most 3 levels")
    _check_shapes(raw.shape, masters, frame_name)
    sub, flat, defects, defects_u8, ptr, cols = _kernel_masters(raw.shape, masters)
    ny, nx = raw.shape
    scan = RawScan(np.empty(ny, np.int32), np.empty(ny, np.int64), np.empty((ny, 3), np.int64),
                   np.empty(ny, np.uint8),
                   np.empty((-(-ny // sample_step), -(-nx // sample_step)), np.float64))
    slots = np.full(3, np.nan, dtype=np.float32)
    slots[:levels.size] = levels
    unresolved = kc.calibrate_inplace_scan(
        raw, sub, flat, defects_u8, ptr, cols, masters.subtract is not None,
        masters.flat is not None, masters.defects is not None, neighbour_step(bayer_pattern),
        slots, codes, scan.row_key, scan.row_count, scan.above, scan.dense, scan.sample,
        sample_step)
    if unresolved:  # as in calibrate()
        raw[...] = correct_defects(raw, defects, bayer_pattern)
    return raw, scan


def local_level(image: np.ndarray, step: int = 2) -> NDArray[np.float32]:
    """Median of each pixel's 8 neighbours ``step`` px away (numba kernel).

    Follows steep structure such as amp glow or vignetting. With ``step=2`` a
    defect cluster up to 2 px wide never enters its own pixels' rings, a 3 px
    one fills at most 3 of the 8 places (the median stays a normal pixel), and
    the ring holds only same-colour pixels of a CFA mosaic.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
    step : int

    Returns
    -------
    ndarray, shape (ny, nx), float32
    """

    data = np.ascontiguousarray(image, dtype=np.float32)
    out = np.empty_like(data)
    kc.ring_median(data, step, out)
    return out


def find_defects(master_dark: np.ndarray, exposure_s: float, hot_sigma: float = 5.0,
                 master_flat: np.ndarray | None = None, cold_fraction: float = 0.5,
                 *, min_rate_adu_s: float = 0.0) -> NDArray[np.bool_]:
    """Hot pixels from a master dark, cold/dead pixels from a master flat.

    Hot: the dark exceeds its local level (median of the 8 pixels 2 px away,
    see :func:`local_level`, so amp glow is not flagged) by more than
    ``hot_sigma`` robust sigma of the residual *and* by more than
    ``min_rate_adu_s * exposure_s`` ADU.
    Cold: the flat is below ``cold_fraction`` of its local level
    (vignetting and dust shadows stay), or at/below 1e-3, or not finite.
    Non-finite dark pixels are defects too.

    Parameters
    ----------
    master_dark : ndarray, shape (ny, nx)
        Master dark (bias included or not: only the excess over the
        background matters), ADU.
    exposure_s : float
        Exposure the dark signal corresponds to, seconds (>= 0).
    hot_sigma : float
        Hot threshold in robust sigma of the dark's residual.
    master_flat : ndarray or None
        Normalised master flat of the same shape.
    cold_fraction : float
        Cold threshold relative to the flat's local level.
    min_rate_adu_s : float
        Optional absolute floor on the dark current excess, ADU per second
        (0 disables it).

    Returns
    -------
    ndarray, shape (ny, nx), bool

    Raises
    ------
    ValueError
        Negative ``exposure_s``, non-positive ``hot_sigma``, ``cold_fraction``
        outside (0, 1), non-2-D input, or flat/dark shapes that differ.
    """
    if exposure_s < 0:
        raise ValueError(f"exposure_s must be >= 0, got {exposure_s}")
    if hot_sigma <= 0:
        raise ValueError(f"hot_sigma must be > 0, got {hot_sigma}")
    if not 0 < cold_fraction < 1:
        raise ValueError(f"cold_fraction must be in (0, 1), got {cold_fraction}")
    dark = np.asarray(master_dark, dtype=np.float32)
    if dark.ndim != 2:
        raise ValueError(f"master_dark must be 2-D, got shape {dark.shape}")
    resid = dark - local_level(dark)
    finite = np.isfinite(resid)
    sample = resid[finite]
    step = max(1, sample.size // 2_000_000)
    sample = sample[::step]
    med = float(np.median(sample)) if sample.size else 0.0
    sigma = float(1.4826 * np.median(np.abs(sample - med))) if sample.size else 0.0
    threshold = med + max(hot_sigma * sigma, min_rate_adu_s * exposure_s)
    defects = ~finite
    if sigma > 0 or min_rate_adu_s > 0:
        defects |= resid > threshold
    if master_flat is not None:
        flat = np.asarray(master_flat, dtype=np.float32)
        if flat.shape != dark.shape:
            raise ValueError(f"master_flat shape {flat.shape} differs from dark {dark.shape}")
        level = local_level(flat)
        with np.errstate(invalid="ignore", divide="ignore"):
            cold = ~np.isfinite(flat) | (flat <= FLAT_MIN) | (flat < cold_fraction * level)
        defects |= cold
    return defects


def find_cold_pixels(master_flat: np.ndarray, cold_fraction: float = 0.5) -> NDArray[np.bool_]:
    """Cold/dead pixels of a normalised flat alone (see :func:`find_defects`).

    Raises
    ------
    ValueError
        ``cold_fraction`` outside (0, 1) or non-2-D input.
    """
    if not 0 < cold_fraction < 1:
        raise ValueError(f"cold_fraction must be in (0, 1), got {cold_fraction}")
    flat = np.asarray(master_flat, dtype=np.float32)
    if flat.ndim != 2:
        raise ValueError(f"master_flat must be 2-D, got shape {flat.shape}")
    level = local_level(flat)
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(flat) | (flat <= FLAT_MIN) | (flat < cold_fraction * level)

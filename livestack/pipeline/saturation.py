"""Saturated pixels: find them, carry them through the pipeline, stack them as saturated.

A star whose core is flat-topped at the camera's white level has no true peak in the
frame. Three things then go wrong on the way to the stack unless the pipeline knows
which pixels were saturated (issue 9, part 1):

1. **Lanczos3 rings** next to the plateau's steep edges, undershooting into the sky by
   up to ~10 % of the step (a dark ring);
2. **normalisation** maps the white level to a different value in every frame and past
   what the camera can record;
3. **rejection** sees the scattered plateau values as outliers and rejects the high
   ones, which deepens the ring.

What this module does, per frame:

* :func:`resolve_level` finds the level: the config override, else the header's
  ``SATURATE``/``DATAMAX`` (:attr:`FrameInfo.saturation_adu`), else the container's
  BITPIX range narrowed from the data (a maximum <= 4095 or <= 16383 is a 12- or 14-bit
  camera in a 16-bit file), else the frame's own flat-topped maximum (at least
  ``min_flat_pixels`` pixels share the maximum, which noise practically never does).
* :func:`raw_mask` marks ``raw >= level`` on the raw (CFA) grid; :func:`debayered_mask`
  widens it to the 3x3 CFA neighbourhood so it holds for any demosaic algorithm (each
  algorithm reads at most the 3x3 neighbourhood's same-colour samples at full weight;
  wider ones such as RCD reach further with small weights that the clamp below bounds).
* :func:`clamp_ringing` (after the warp) bounds output pixels near a steep step or a
  saturated pixel to their bilinear cell: never below the cell's minimum, and never above
  its maximum when the cell is saturated. This is PixInsight's idea of clamping Lanczos
  (a threshold on the jump between neighbouring pixels, 0.3 of the range by default),
  applied as a post-pass: elsewhere the output is Lanczos3's, bit for bit, so its
  sharpness and noise are unchanged. It also warps the mask (nearest input pixel).
* :class:`StackSaturation` fixes the stack's level (the first frame's white level after
  calibration and normalisation) and, in each normalised frame, sets the saturated
  samples to it and clips every sample to it. A saturated core is then the same value in
  every frame: the mean is the level, the dispersion is zero, nothing there is an outlier,
  and no stacked value exceeds what the camera can record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from livestack.pipeline import kernels_calibrate as kc
from livestack.pipeline import kernels_saturation as ks
from livestack.pipeline.calibrate import MasterSet, calibrate, calibrate_scanned, can_scan
from livestack.pipeline.types import (
    Allocator,
    BoolImage,
    FrameInfo,
    OutputMap,
    Transform,
    Warped,
)

#: Data maxima that identify a 12- and a 14-bit camera inside a 16-bit container.
_NARROW_LEVELS = (4095.0, 16383.0)
#: Radius (px) of the dilation of steep/saturated seeds: Lanczos3 reads 3 px each side.
_LANCZOS3_RADIUS = 3
#: A frame whose normalised level exceeds the stack's by this factor raises it.
_LEVEL_RAISE = 1.05
#: Row/column stride of the sample the calibration offset is measured on.
_OFFSET_STEP = 16


@dataclass(frozen=True)
class SaturationConfig:
    """How saturated pixels are found and handled.

    Attributes
    ----------
    enabled : bool
        Find saturated pixels, clamp the warp near them and stack them as saturated.
        False restores the plain linear pipeline.
    level_adu : float or None
        Raw level (ADU) at and above which a pixel is saturated; overrides the header
        and the data. None: automatic (see :func:`resolve_level`). Range: > 0.
    clamp_threshold : float
        A jump between neighbouring pixels larger than this fraction of the frame's
        range (calibrated saturation level minus the sky) marks a steep step whose
        Lanczos ringing is clamped. 0 clamps everywhere; 1 only near saturated pixels.
        Frames whose level is unknown are not clamped. Range: [0, 1].
    min_flat_pixels : int
        Pixels that must share the frame's maximum for it to count as a flat-topped
        (saturated) level when no keyword gives one. Range: >= 2.
    """

    enabled: bool = True
    level_adu: float | None = field(default=None,
                                    metadata={"min": 0.0, "max": None, "lo_open": True})
    clamp_threshold: float = field(default=0.3, metadata={"min": 0.0, "max": 1.0})
    min_flat_pixels: int = field(default=4, metadata={"min": 2, "max": None})

    def __post_init__(self) -> None:
        if self.level_adu is not None and not (np.isfinite(self.level_adu)
                                               and self.level_adu > 0):
            raise ValueError(f"level_adu must be > 0 or null, got {self.level_adu}")
        if not 0.0 <= self.clamp_threshold <= 1.0:
            raise ValueError(f"clamp_threshold must be in [0, 1], got {self.clamp_threshold}")
        if self.min_flat_pixels < 2:
            raise ValueError(f"min_flat_pixels must be >= 2, got {self.min_flat_pixels}")


@dataclass(frozen=True)
class FrameSaturation:
    """A frame's saturation facts after calibration.

    Attributes
    ----------
    mask : ndarray, shape (ny, nx), bool, or None
        Saturated pixels of the calibrated (debayered) frame; None when none is.
    level_adu : float
        The white level in calibrated ADU (raw level minus the calibration offset).
    range_adu : float
        Level minus the sky: what :attr:`SaturationConfig.clamp_threshold` is a fraction of.
    """

    mask: BoolImage | None
    level_adu: float
    range_adu: float


def resolve_level(raw: NDArray[Any], info: FrameInfo, config: SaturationConfig
                  ) -> float | None:
    """The raw level (ADU) at and above which this frame's pixels are saturated.

    Parameters
    ----------
    raw : ndarray, shape (ny, nx) or (3, ny, nx)
        Raw pixels as read (ADU; NaN allowed); an RGB frame's channels share one level.
    info : FrameInfo
        ``saturation_adu``/``saturation_source`` from the header.
    config : SaturationConfig

    Returns
    -------
    float or None
        In order: ``config.level_adu``; a SATURATE or DATAMAX level; a BITPIX level,
        narrowed to 4095 or 16383 when the data's maximum is at most that; the data's
        maximum when at least ``min_flat_pixels`` (and at most 1 %) of the pixels share it
        and it is below the level found so far. None when nothing says it.
    """
    if config.level_adu is not None:
        return float(config.level_adu)
    level = info.saturation_adu
    if level is not None and info.saturation_source in ("SATURATE", "DATAMAX"):
        return float(level)

    frame = np.ascontiguousarray(raw, dtype=np.float32)
    if frame.ndim == 3:  # RGB: the channels' planes end to end (max and count only)
        frame = frame.reshape(-1, frame.shape[-1])
    data_max, n_at_max = ks.max_and_count(frame)
    return _level_from_max(level, data_max, n_at_max, frame.size, config)


def _level_from_max(level: float | None, data_max: float, n_at_max: int, size: int,
                    config: SaturationConfig) -> float | None:
    """:func:`resolve_level` once the header gave ``level`` (a BITPIX level or None) and
    the data their finite maximum and how many of the ``size`` pixels hold it."""
    if not np.isfinite(data_max):
        return level
    if level is not None:
        for narrow in _NARROW_LEVELS:
            if level > narrow and data_max <= narrow:
                level = narrow
                break
    flat_top = (n_at_max >= config.min_flat_pixels and n_at_max <= 0.01 * size
                and data_max > 0)
    if flat_top and (level is None or data_max < level):
        level = float(data_max)
    return None if level is None else float(level)


def raw_mask(raw: NDArray[Any], level_adu: float | None, empty: Allocator | None = None
             ) -> BoolImage | None:
    """``raw >= level_adu`` without isolated pixels (NaN is not saturated).

    An isolated saturated pixel (no saturated 8-neighbour) is a hot pixel or a cosmic
    ray, not a star: cosmetic correction and rejection handle those, and marking it
    would put it back into the stack at the white level.

    Parameters
    ----------
    raw : ndarray, shape (ny, nx)
    level_adu : float or None
    empty : Allocator, optional
        Where the mask comes from (default ``np.empty``; a caller's buffer pool).

    Returns
    -------
    ndarray, shape (ny, nx), bool, or None
        None when no pixel is saturated.
    """
    if level_adu is None:
        return None

    frame = np.ascontiguousarray(raw, dtype=np.float32)
    mask = (empty or np.empty)(frame.shape, np.bool_)
    return mask if ks.saturated_mask(frame, float(np.float32(level_adu)), mask) else None


def debayered_mask(cfa_mask: BoolImage | None) -> BoolImage | None:
    """Mark a pixel saturated when any CFA pixel in its 3x3 neighbourhood is.

    Independent of the demosaic algorithm: a debayered pixel's three values come from
    its CFA neighbourhood, so a saturated neighbour can clip any of them.

    Parameters
    ----------
    cfa_mask : ndarray, shape (ny, nx), bool, or None

    Returns
    -------
    ndarray, shape (ny, nx), bool, or None
    """
    if cfa_mask is None:
        return None
    ny, nx = cfa_mask.shape
    ys, xs = np.nonzero(cfa_mask)  # sparse: stars' cores, not the frame
    out = np.zeros_like(cfa_mask)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out[np.clip(ys + dy, 0, ny - 1), np.clip(xs + dx, 0, nx - 1)] = True
    return out


@dataclass(frozen=True)
class RawSaturation:
    """What :func:`frame_saturation` needs from the raw pixels, taken before calibrating.

    Attributes
    ----------
    level_adu : float
        The raw white level.
    mask : ndarray, bool, or None
        Saturated pixels (on the debayered grid for colour).
    raw_sample : ndarray, float64
        The raw frame every ``_OFFSET_STEP`` rows and columns (the pedestal estimate).
    """

    level_adu: float
    mask: BoolImage | None
    raw_sample: NDArray[np.float64]


def raw_saturation(raw: NDArray[Any], info: FrameInfo, config: SaturationConfig,
                   empty: Allocator | None = None) -> RawSaturation | None:
    """The raw half of :func:`frame_saturation`, so the raw frame can be calibrated in place.

    ``empty`` (default ``np.empty``) gives a mono frame's mask (a caller's buffer pool).

    Returns
    -------
    RawSaturation or None
        None when disabled or when no level is known.
    """
    if not config.enabled:
        return None
    level = resolve_level(raw, info, config)
    if level is None:
        return None
    if raw.ndim == 3:  # an RGB frame: a pixel saturated in any channel is saturated
        masks = [m for m in (raw_mask(plane, level) for plane in raw) if m is not None]
        mask = np.logical_or.reduce(masks) if masks else None
    else:
        mask = raw_mask(raw, level, empty)
    if info.bayer_pattern:
        mask = debayered_mask(mask)
    sample = np.array(raw[..., ::_OFFSET_STEP, ::_OFFSET_STEP], dtype=np.float64)
    return RawSaturation(level, mask, sample)


def calibrate_saturated(raw: NDArray[Any], info: FrameInfo, masters: MasterSet | None,
                        config: SaturationConfig, *, overwrite_raw: bool = False,
                        empty: Allocator | None = None
                        ) -> tuple[NDArray[np.float32], RawSaturation | None]:
    """:func:`raw_saturation`, then :func:`~livestack.pipeline.calibrate.calibrate`, with
    the raw frame read once where it can be.

    When the frame is calibrated in place (``overwrite_raw``, a 2-D float32 frame, masters
    to apply), the calibration kernel takes the saturation facts from each raw row just
    before calibrating it (:func:`~livestack.pipeline.calibrate.calibrate_scanned`): the
    frame's maximum, the pixel counts at the candidate levels, the codes of the few rows
    that hold a candidate, and the offset sample. The level, the mask and the sample are
    those of :func:`raw_saturation` exactly (``tests/pipeline/test_saturation.py``
    compares them); 26 MP, that saves two reads of the raw frame (``resolve_level``'s
    maximum, ``raw_mask``'s count). Otherwise the two steps run as before.

    Parameters
    ----------
    raw : ndarray, shape (ny, nx) or (3, ny, nx)
        The frame as read (ADU); overwritten when ``overwrite_raw`` (see ``calibrate``).
    info : FrameInfo
    masters : MasterSet or None
    config : SaturationConfig
    overwrite_raw : bool
    empty : Allocator, optional
        Where a mono frame's mask comes from (default ``np.empty``).

    Returns
    -------
    calibrated : ndarray, shape of ``raw``, float32
    raw_saturation : RawSaturation or None
        As :func:`raw_saturation` returns it.

    Raises
    ------
    CalibrationError
        As :func:`~livestack.pipeline.calibrate.calibrate`.
    """
    if not (config.enabled and overwrite_raw and can_scan(raw, masters)):
        raw_sat = raw_saturation(raw, info, config, empty)
        return calibrate(raw, masters, info.bayer_pattern,
                         overwrite_raw=overwrite_raw), raw_sat
    assert masters is not None  # can_scan
    fixed: float | None = None
    base: float | None = None
    if config.level_adu is not None:
        fixed = float(config.level_adu)
    elif (info.saturation_adu is not None
          and info.saturation_source in ("SATURATE", "DATAMAX")):
        fixed = float(info.saturation_adu)
    else:
        base = info.saturation_adu
    if fixed is not None:
        candidates = [fixed]
    elif base is not None:
        candidates = [float(base), *(n for n in _NARROW_LEVELS if base > n)]
    else:
        candidates = []
    levels = np.array(candidates, dtype=np.float32)
    mask = (empty or np.empty)(raw.shape, np.bool_)
    codes = mask.view(np.uint8)
    calibrated, scan = calibrate_scanned(raw, masters, info.bayer_pattern, levels, codes,
                                         _OFFSET_STEP)
    # The frame's maximum and its count as ks.max_and_count gives them.
    keys = scan.row_key
    row_max = (keys ^ ((keys >> 31) & np.int32(0x7FFFFFFF))).view(np.float32)
    row_max = np.where(keys == kc.NO_KEY, np.float32(-np.inf), row_max)
    data_max = float(row_max.max())
    at_max = row_max == np.float32(data_max)
    n_at_max = int(scan.row_count[at_max].sum()) if np.isfinite(data_max) else 0
    level = fixed if fixed is not None else _level_from_max(base, data_max, n_at_max,
                                                            raw.size, config)
    if level is None:
        return calibrated, None
    level32 = np.float32(level)
    hits = np.flatnonzero(levels == level32)
    no_rows = np.zeros(raw.shape[0], np.uint8)
    if hits.size:  # a fixed candidate: its code bit (rows without one have no pixel)
        bit = int(hits[0])
        n = (ks.mask_from_codes(codes, scan.dense, 1 << bit, no_rows, 0)
             if scan.above[:, bit].any() else 0)
    elif np.isfinite(data_max) and level32 == np.float32(data_max):
        # The frame's maximum: its pixels (the rows that hold it are dense) and the +inf
        # pixels of every row.
        n = ks.mask_from_codes(codes, scan.dense, kc.CODE_POS_INF, at_max.astype(np.uint8),
                               kc.CODE_ROW_MAX)
    else:  # cannot happen: _level_from_max returns a candidate or the maximum
        raise AssertionError(f"saturation level {level} is neither a candidate nor the "
                             f"frame's maximum {data_max}")
    out_mask: BoolImage | None = mask if n else None
    if info.bayer_pattern:
        out_mask = debayered_mask(out_mask)
    return calibrated, RawSaturation(level, out_mask, scan.sample)


def calibrated_saturation(raw: RawSaturation | None, calibrated: NDArray[Any]
                          ) -> FrameSaturation | None:
    """The calibrated half of :func:`frame_saturation`: the white level after calibration."""
    if raw is None:
        return None
    sub_raw = raw.raw_sample
    sub_cal = np.asarray(calibrated[..., ::_OFFSET_STEP, ::_OFFSET_STEP], dtype=np.float64)
    finite = np.isfinite(sub_raw) & np.isfinite(sub_cal)
    if not finite.any():
        return None
    raw_sky = float(np.median(sub_raw[finite]))
    cal_sky = float(np.median(sub_cal[finite]))
    level_cal = raw.level_adu - (raw_sky - cal_sky)
    return FrameSaturation(raw.mask, level_cal, max(level_cal - cal_sky, 1e-6))


def frame_saturation(raw: NDArray[Any], calibrated: NDArray[Any], info: FrameInfo,
                     config: SaturationConfig) -> FrameSaturation | None:
    """Find a frame's saturated pixels and its white level after calibration.

    Parameters
    ----------
    raw : ndarray, shape (ny, nx) or (3, ny, nx)
        Raw pixels (ADU): CFA for a colour camera, or an RGB frame (a pixel is then
        saturated when any of its channels is: the mask is 2-D, as for a debayered frame).
    calibrated : ndarray, shape of ``raw``, float32
        The same frame after bias/dark/flat (still CFA for colour).
    info : FrameInfo
    config : SaturationConfig

    Returns
    -------
    FrameSaturation or None
        None when disabled or when no level is known. The calibrated level is the raw
        level minus the calibration offset (median of raw minus median of calibrated on a
        sparse grid: the dark/bias pedestal); flat-field gain is ignored, the mask is
        exact (it comes from the raw pixels).
    """
    return calibrated_saturation(raw_saturation(raw, info, config), calibrated)


#: A transform whose warp is a plain copy (see :func:`clamp_ringing`).
_IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def clamp_ringing(warped: Warped, image: NDArray[np.float32], transform: Transform,
                  saturation: FrameSaturation | None, config: SaturationConfig,
                  empty: Allocator | None = None, post: OutputMap | None = None
                  ) -> tuple[Warped, BoolImage | None]:
    """Clamp the warp's ringing near steep steps and saturated pixels (module docstring).

    Parameters
    ----------
    warped : Warped
        :func:`~livestack.pipeline.warp.warp`'s result for ``image``; its image is
        modified in place.
    image : ndarray, shape (ny, nx) or (3, ny, nx), float32
        The frame that was warped (ADU).
    transform : Transform
        Frame -> reference, as given to the warp.
    saturation : FrameSaturation or None
        From :func:`frame_saturation`; None leaves ``warped`` untouched.
    config : SaturationConfig
    empty : Allocator, optional
        Where the frame-sized flag maps and the returned mask come from (default
        ``np.empty``; a caller's buffer pool saves their fresh pages per frame).
    post : OutputMap, optional
        The order-preserving map (``post.monotone``) the warp applied to ``warped``
        (``warp(..., post=post)``): the clamp's bounds are mapped the same way, clamped
        samples are capped at its ceiling again and, with ``post.saturate``, saturated
        samples become the ceiling, so that the result is bit for bit that of the clamp on
        the plain warp followed by ``apply_normalization`` and
        :meth:`StackSaturation.apply`.

    Returns
    -------
    warped : Warped
        The same object, clamped.
    saturated : ndarray, shape like the footprint, bool, or None
        Output pixels whose nearest input pixel is saturated; None when none is.
    """
    if saturation is None:
        return warped, None
    if np.array_equal(transform.matrix, _IDENTITY):
        # The identity "warp" is a copy (the reference frame; Mitchell smooths it with
        # positive weights only, 1/18, 8/9, 1/18): nothing rings, and each output pixel's
        # nearest input pixel is itself. Skipping the kernels also keeps
        # their compile off a fresh install's first frame.
        mask = saturation.mask
        found = (mask if mask is not None and mask.shape == warped.footprint.shape
                 and mask.any() else None)
        if found is not None and post is not None and post.saturate:
            # What StackSaturation.apply does to them after the normalisation.
            planes = warped.image[np.newaxis] if warped.image.ndim == 2 else warped.image
            hit = found & warped.footprint
            ceilings = post.arrays(planes.shape[0])[2]
            for c in range(planes.shape[0]):
                planes[c][hit] = ceilings[c]
        return warped, found

    src = np.ascontiguousarray(image, dtype=np.float32)
    src = src[np.newaxis] if src.ndim == 2 else src
    out = warped.image[np.newaxis] if warped.image.ndim == 2 else warped.image
    no_mask = np.zeros((0, 0), dtype=np.bool_)
    sat = saturation.mask if saturation.mask is not None else no_mask
    threshold = config.clamp_threshold * saturation.range_adu
    alloc = empty or np.empty
    flags = alloc(src.shape[1:], np.uint8)
    tiles = ks.steep_flags(src, sat, float(threshold), _LANCZOS3_RADIUS, flags, empty)
    inv = np.ascontiguousarray(transform.inverse().matrix, dtype=np.float64)
    sat_out = alloc(warped.footprint.shape if saturation.mask is not None else (0, 0),
                    np.bool_)
    if post is None:
        no_map = np.zeros(0, dtype=np.float32)
        maps = (no_map, no_map, no_map)
    else:
        maps = post.arrays(out.shape[0])
    ks.clamp_warped(out, warped.footprint, src, flags, tiles, sat, inv, sat_out, *maps,
                    post is not None and post.saturate)
    return warped, (sat_out if sat_out.size and sat_out.any() else None)


@dataclass
class StackSaturation:
    """The stack's saturation level and how saturated samples enter the stack.

    Attributes
    ----------
    level_adu : ndarray, shape (channels,), float64, or None
        The stack's level in normalised ADU: the first frame's calibrated white level
        mapped by its normalisation (the reference's own level when it has one), raised
        when a later frame's level is more than 5 % higher (a 12/14-bit guess made on
        an earlier frame's low data). None until a frame with a known level arrives.
    """

    level_adu: NDArray[np.float64] | None = None

    def apply(self, planes: NDArray[np.float32], footprint: BoolImage,
              saturated: BoolImage | None, frame: FrameSaturation | None,
              location: Any, scale: Any, reference_location: Any) -> None:
        """Set saturated samples to the stack's level and clip all samples to it.

        Parameters
        ----------
        planes : ndarray, shape (ny, nx) or (channels, ny, nx), float32
            The frame after normalisation, modified in place.
        footprint : ndarray, shape (ny, nx), bool
        saturated : ndarray, shape (ny, nx), bool, or None
            From :func:`clamp_ringing`.
        frame : FrameSaturation or None
            This frame's facts; None (level unknown) leaves ``planes`` untouched.
        location, scale, reference_location : float or ndarray (channels,)
            The frame's :class:`~livestack.pipeline.types.Normalization` terms.
        """
        if frame is None:
            return
        view = planes[np.newaxis] if planes.ndim == 2 else planes
        level = self.level_after(frame, view.shape[0], location, scale, reference_location)
        assert level is not None
        self.level_adu = level
        empty = np.zeros((0, 0), dtype=np.bool_)
        ks.apply_level(view, footprint, saturated if saturated is not None else empty,
                       level.astype(np.float32))

    def level_after(self, frame: FrameSaturation | None, channels: int, location: Any,
                    scale: Any, reference_location: Any) -> NDArray[np.float64] | None:
        """The stack's level once a frame is stacked, without changing it (the live
        stack maps the frame by it in the warp, and commits it if the frame is stacked).

        Parameters
        ----------
        frame : FrameSaturation or None
            The frame's facts; None (level unknown) gives None: the frame is not clipped.
        channels : int
            Planes of the frame.
        location, scale, reference_location : float or ndarray (channels,)
            The frame's :class:`~livestack.pipeline.types.Normalization` terms.

        Returns
        -------
        ndarray, shape (channels,), float64, or None
            The level in normalised ADU that :meth:`apply` would clip the frame at (and
            leave as :attr:`level_adu`).
        """
        if frame is None:
            return None
        level = np.broadcast_to(
            (frame.level_adu - np.asarray(location, dtype=np.float64)) *
            np.asarray(scale, dtype=np.float64) +
            np.asarray(reference_location, dtype=np.float64), (channels,)).astype(np.float64)
        if self.level_adu is None:
            return level.copy()
        if np.any(level > _LEVEL_RAISE * self.level_adu):
            # A frame that records far more than the stack's level (the 12/14-bit guess
            # was wrong for an earlier frame whose data stayed low): the higher level
            # wins, so no real signal is ever clipped at a guessed level.
            return np.maximum(self.level_adu, level)
        return self.level_adu

    def to_json(self) -> list[float] | None:
        """The level as a JSON list (checkpoints), None when unknown."""
        return None if self.level_adu is None else [float(v) for v in self.level_adu]

    @classmethod
    def from_json(cls, value: Any) -> StackSaturation:
        """Inverse of :meth:`to_json`; anything else (old checkpoints) is unknown."""
        if isinstance(value, list) and value and all(isinstance(v, (int, float))
                                                     for v in value):
            return cls(np.asarray(value, dtype=np.float64))
        return cls()

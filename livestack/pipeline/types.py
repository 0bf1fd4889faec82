"""Small value types shared by the pure pipeline steps.

Conventions used everywhere in livestack
----------------------------------------
* Images are 2-D ``float32`` arrays indexed ``[y, x]`` (row, column), C-contiguous,
  native byte order. Colour images are ``(3, ny, nx)`` float32 (R, G, B planes).
* Pixel coordinates are 0-based with the centre of pixel ``[0, 0]`` at
  ``(x, y) = (0.0, 0.0)`` (sep's convention; FITS/DS9 coordinates are these + 1).
* A :class:`Transform` maps a frame's pixel coordinates to the reference frame's
  pixel coordinates: ``ref_xy = A @ frame_xy + t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import numpy as np
from numpy.typing import DTypeLike, NDArray

FloatImage = NDArray[np.float32]
BoolImage = NDArray[np.bool_]


class Allocator(Protocol):
    """Where a step's large output comes from: ``np.empty`` or a caller's buffer pool.

    Called as ``empty(shape, dtype)``; returns an uninitialised, writeable, C-contiguous
    array of that shape and dtype. The steps stay pure: the caller owns the memory and
    decides when it may be handed out again (``livestack.engine.buffers``).
    """

    def __call__(self, shape: tuple[int, ...], dtype: DTypeLike, /) -> NDArray[Any]:
        """An uninitialised array of ``shape`` and ``dtype``."""
        ...


@dataclass(frozen=True)
class FrameInfo:
    """Facts about a frame taken from its FITS header.

    Attributes
    ----------
    path : str
        File path as seen by the watcher (may contain spaces).
    image_type : str
        One of ``"light"``, ``"dark"``, ``"bias"``, ``"flat"``, ``"darkflat"``,
        ``"unknown"`` (normalised from IMAGETYP / FRAME).
    shape : tuple of int
        ``(ny, nx)`` of the primary image.
    exposure_s : float
        Exposure time in seconds (EXPTIME or EXPOSURE), 0.0 if absent.
    date_obs : datetime or None
        Exposure start, timezone-aware UTC.
    mjd_obs : float or None
        Exposure start as MJD (UTC).
    object_name, filter_name : str
        OBJECT and FILTER, stripped; empty when absent.
    ccd_temp_c : float or None
        Sensor temperature in degrees Celsius.
    binning : tuple of int
        ``(xbin, ybin)``.
    gain, offset : float or None
        Camera GAIN and OFFSET settings (driver units).
    egain_e_per_adu : float or None
        Electrons per ADU (EGAIN), when known.
    bayer_pattern : str or None
        Effective 2x2 CFA pattern of pixel ``[0:2, 0:2]`` of the array as read
        (after XBAYROFF/YBAYROFF and ROWORDER are applied), e.g. ``"RGGB"``;
        None for mono.
    ra_deg, dec_deg : float or None
        Pointing in degrees.
    pixel_scale_arcsec : float or None
        Arcseconds per (binned) pixel, from SCALE, PIXSCALE, IM_SCALE, SECPIX or
        XPIXSZ (already binned)/FOCALLEN.
    saturation_adu : float or None
        Raw level (ADU) at and above which a pixel is saturated, from SATURATE, DATAMAX
        or the BITPIX range; None when no keyword says it.
    saturation_source : str
        The keyword ``saturation_adu`` came from (``"SATURATE"``, ``"DATAMAX"``,
        ``"BITPIX"``), ``""`` when None. A BITPIX level is the container's and may be
        narrowed from the data (``pipeline.saturation.resolve_level``).
    channels : int
        1 for a mono or CFA frame (``(ny, nx)``), 3 for an RGB frame read channels first
        as ``(3, ny, nx)`` (TIFF/PNG/JPEG/XISF colour images; stacked in colour, never
        debayered). ``shape`` is ``(ny, nx)`` either way.
    """

    path: str
    image_type: str
    shape: tuple[int, int]
    exposure_s: float = 0.0
    date_obs: datetime | None = None
    mjd_obs: float | None = None
    object_name: str = ""
    filter_name: str = ""
    ccd_temp_c: float | None = None
    binning: tuple[int, int] = (1, 1)
    gain: float | None = None
    offset: float | None = None
    egain_e_per_adu: float | None = None
    bayer_pattern: str | None = None
    ra_deg: float | None = None
    dec_deg: float | None = None
    pixel_scale_arcsec: float | None = None
    saturation_adu: float | None = None
    saturation_source: str = ""
    channels: int = 1


@dataclass(frozen=True)
class StarList:
    """Detected stars of one frame, in full-resolution pixel coordinates.

    Attributes
    ----------
    xy : ndarray, shape (n, 2), float64
        Centroids ``(x, y)`` in pixels, brightest first.
    flux : ndarray, shape (n,), float64
        Background-subtracted flux in ADU.
    fwhm_px : ndarray, shape (n,), float64
        Per-star FWHM in pixels.
    elongation : ndarray, shape (n,), float64
        Major/minor axis ratio (>= 1).
    """

    xy: NDArray[np.float64]
    flux: NDArray[np.float64]
    fwhm_px: NDArray[np.float64]
    elongation: NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.xy.shape[0])


@dataclass(frozen=True)
class FrameMetrics:
    """Quality measurements of one calibrated frame.

    Attributes
    ----------
    star_count : int
    fwhm_px : float
        Median star FWHM in pixels (NaN when no stars).
    fwhm_arcsec : float or None
        Same in arcseconds when the pixel scale is known.
    elongation : float
        Median major/minor ratio (NaN when no stars).
    background_adu : float
        Median sky level in ADU.
    noise_adu : float
        Robust sky noise (sigma) in ADU.
    snr : float
        Signal-to-noise estimate: median flux of the brightest stars over the
        noise within their aperture.
    """

    star_count: int
    fwhm_px: float
    fwhm_arcsec: float | None
    elongation: float
    background_adu: float
    noise_adu: float
    snr: float

    def as_dict(self) -> dict[str, float | int | None]:
        """Return the metrics as a JSON-safe dict (NaN becomes None)."""
        out: dict[str, float | int | None] = {}
        for key, value in self.__dict__.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
            else:
                out[key] = value
        return out


@dataclass(frozen=True)
class Verdict:
    """Outcome of the quality gate for one frame.

    Attributes
    ----------
    accepted : bool
    reason : str or None
        Machine-readable code when rejected (e.g. ``"fwhm_jump"``), else None.
    message : str
        One human sentence, e.g. ``"FWHM 4.1 px is 1.6x the running median 2.5 px"``.
    """

    accepted: bool
    reason: str | None = None
    message: str = ""


@dataclass(frozen=True)
class Transform:
    """An affine map from frame pixel coordinates to reference pixel coordinates.

    Attributes
    ----------
    matrix : ndarray, shape (2, 3), float64
        ``[[a, b, tx], [c, d, ty]]`` so that ``x_ref = a*x + b*y + tx`` and
        ``y_ref = c*x + d*y + ty``.
    model : str
        ``"translation"``, ``"similarity"`` or ``"affine"``.
    n_matches : int
        Number of star pairs used in the fit (0 for fallbacks/identity).
    rms_px : float
        RMS residual of the fit in reference pixels (NaN if not fitted).
    method : str
        How it was found: ``"triangles"``, ``"phase_correlation"``, ``"identity"``,
        ``"stored"`` (replayed from the journal), ``"truth"`` (simulator).
    """

    matrix: NDArray[np.float64]
    model: str = "similarity"
    n_matches: int = 0
    rms_px: float = float("nan")
    method: str = "triangles"

    @staticmethod
    def identity() -> Transform:
        """Return the identity transform."""
        return Transform(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "translation", 0,
                         0.0, "identity")

    @staticmethod
    def from_params(dx: float, dy: float, rotation_deg: float = 0.0, scale: float = 1.0,
                    model: str = "similarity", method: str = "truth") -> Transform:
        """Build a similarity transform (rotation about the origin, then shift).

        Parameters
        ----------
        dx, dy : float
            Translation in reference pixels.
        rotation_deg : float
            Counter-clockwise rotation in degrees (x right, y up in array terms: y down).
        scale : float
            Isotropic scale factor.
        """
        theta = math.radians(rotation_deg)
        c, s = scale * math.cos(theta), scale * math.sin(theta)
        return Transform(np.array([[c, -s, dx], [s, c, dy]]), model, 0, 0.0, method)

    @property
    def dx(self) -> float:
        """Translation along x in pixels."""
        return float(self.matrix[0, 2])

    @property
    def dy(self) -> float:
        """Translation along y in pixels."""
        return float(self.matrix[1, 2])

    @property
    def rotation_deg(self) -> float:
        """Rotation angle in degrees, in (-180, 180]."""
        return math.degrees(math.atan2(self.matrix[1, 0], self.matrix[0, 0]))

    @property
    def scale(self) -> float:
        """Isotropic scale (square root of the determinant's magnitude)."""
        return math.sqrt(abs(float(np.linalg.det(self.matrix[:, :2]))))

    def apply(self, xy: NDArray[np.float64]) -> NDArray[np.float64]:
        """Map ``(n, 2)`` frame coordinates to reference coordinates."""
        xy = np.asarray(xy, dtype=np.float64)
        return xy @ self.matrix[:, :2].T + self.matrix[:, 2]

    def inverse(self) -> Transform:
        """Return the transform from reference to frame coordinates."""
        full = np.vstack([self.matrix, [0.0, 0.0, 1.0]])
        inv = np.linalg.inv(full)[:2]
        return Transform(inv, self.model, self.n_matches, self.rms_px, self.method)

    def then(self, other: Transform) -> Transform:
        """Return ``other ∘ self``: apply this transform, then ``other``."""
        a = np.vstack([self.matrix, [0.0, 0.0, 1.0]])
        b = np.vstack([other.matrix, [0.0, 0.0, 1.0]])
        return Transform((b @ a)[:2], self.model, self.n_matches, self.rms_px, self.method)

    def to_list(self) -> list[float]:
        """Six floats, row-major, for the journal."""
        return [float(v) for v in self.matrix.ravel()]

    @staticmethod
    def from_list(values: list[float], model: str = "similarity") -> Transform:
        """Inverse of :meth:`to_list`; ``method`` becomes ``"stored"``."""
        return Transform(np.asarray(values, dtype=np.float64).reshape(2, 3), model, 0,
                         float("nan"), "stored")


@dataclass(frozen=True)
class Warped:
    """A frame resampled onto the reference grid.

    Attributes
    ----------
    image : ndarray, shape (ny, nx) or (3, ny, nx), float32
        Resampled pixels; pixels outside the footprint are 0.0 (never NaN).
    footprint : ndarray, shape (ny, nx), bool
        True where the frame covers the reference grid with a full kernel
        and all input samples were finite.
    """

    image: FloatImage
    footprint: BoolImage


@dataclass(frozen=True)
class Normalization:
    """Additive-with-scaling normalisation of one frame onto the reference.

    ``normalised = (pixel - location) * scale + reference_location``.

    Attributes
    ----------
    location : float or ndarray (3,)
        The frame's background location (ADU), per channel for colour.
    scale : float or ndarray (3,)
        Multiplier matching the frame's dispersion to the reference's.
    reference_location : float or ndarray (3,)
    weight : float
        Frame weight for the weighted mean (> 0).
    """

    location: float | NDArray[np.float64]
    scale: float | NDArray[np.float64]
    reference_location: float | NDArray[np.float64]
    weight: float = 1.0


@dataclass(frozen=True)
class OutputMap:
    """What the warp applies to each output sample as it writes it (the live stack's
    normalisation and saturation level, fused into the warp's output pass).

    In the footprint, plane ``c``'s sample ``w`` becomes ``v = w * gain[c]``, then
    ``v + offset[c]`` (two float32 roundings, no fused multiply-add: the numbers of
    :func:`livestack.pipeline.normalize.apply_normalization`), 0.0 if that is not finite,
    then ``ceiling[c]`` if above it; saturated samples become ``ceiling[c]``
    (:meth:`livestack.pipeline.saturation.StackSaturation.apply`). Outside the footprint
    samples stay 0.0.

    Attributes
    ----------
    gain : ndarray, shape (nc,), float32
        Per-plane multiplier (the normalisation's scale), > 0 and finite for the fused
        path (:attr:`monotone`).
    offset : ndarray, shape (nc,), float32
        Per-plane offset in normalised ADU (``reference_location - location * scale``).
    ceiling : ndarray, shape (nc,), float32
        The stack's saturation level in normalised ADU; +inf when unknown (no clip).
    saturate : bool
        Whether saturated samples are set to the ceiling (the frame's level is known).
    """

    gain: NDArray[np.float32]
    offset: NDArray[np.float32]
    ceiling: NDArray[np.float32]
    saturate: bool = False

    def arrays(self, nc: int
               ) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
        """Gain, offset and ceiling as contiguous float32 arrays of shape ``(nc,)`` (the
        kernels' arguments).

        Raises
        ------
        ValueError
            An attribute that does not broadcast to ``(nc,)``.
        """
        gain, offset, ceiling = (
            np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype=np.float32), (nc,)))
            for a in (self.gain, self.offset, self.ceiling))
        return gain, offset, ceiling

    @property
    def monotone(self) -> bool:
        """Whether the map preserves order (every gain finite and > 0), so that a clamp
        to mapped bounds equals the mapped clamp, bit for bit."""
        return bool(np.all(np.isfinite(self.gain) & (self.gain > 0)))


@dataclass
class FrameRecord:
    """One frame's row in a stack's provenance table (mutable while stacking).

    Attributes
    ----------
    file : str
    verdict : str
        ``"accepted"``, ``"rejected"`` or ``"failed"``.
    reason : str or None
    weight : float
    metrics : FrameMetrics or None
    transform : Transform or None
    exposure_s : float
    date_obs : datetime or None
    mjd_obs : float or None
    """

    file: str
    verdict: str
    reason: str | None = None
    weight: float = 0.0
    metrics: FrameMetrics | None = None
    transform: Transform | None = None
    exposure_s: float = 0.0
    date_obs: datetime | None = None
    mjd_obs: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

"""The per-frame step, one way for the live stack, ``integrate`` and the rebuild.

A raw light goes calibrate -> cosmetic -> debayer -> background -> detect -> register ->
normalise -> warp. Each stage is a small function usable on its own (astroalign's
``find_transform`` / ``apply_transform`` / ``register`` is the model):

* :func:`calibrate_frame`: master calibration, hot pixels, debayer, sky gradient; the
  result carries the frame's luminance and saturated pixels.
* :func:`detect_frame`: stars and quality metrics on the luminance.
* :func:`find_transform`: frame -> reference by star matching (the live path; the
  batch paths reuse the stored transform instead).
* :func:`normalise_frame`: location, scale, weight and normalised noise, measured on the
  **unwarped** frame in every path. Interpolation smooths the noise, so a dispersion or
  noise measured after warping is biased (about 4 % on lanczos3): the live stack always
  measured before warping, and ``integrate`` now does too.
* :func:`apply_transform`: the warp onto the reference grid, with the ringing clamp near
  saturated pixels.
* :func:`register`: all of it after calibration, for callers that want one call.

:class:`FrameNorm` is what the journal stores per frame (``norm`` column), so that a
re-stack onto the same reference reuses it instead of detecting stars again.

Pure: arrays and dataclasses in and out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from livestack.errors import FrameError
from livestack.pipeline.background import subtract_gradient
from livestack.pipeline.calibrate import MasterSet
from livestack.pipeline.cosmetic import correct_defects, find_isolated_hot_pixels
from livestack.pipeline.debayer import debayer, luminance
from livestack.pipeline.detect import DetectConfig, measure
from livestack.pipeline.normalize import (
    FrameStats,
    NormalizeConfig,
    aperture_flux,
    frame_stats,
    normalization,
    normalized_noise,
    star_flux_scale,
)
from livestack.pipeline.ranges import rng
from livestack.pipeline.register import Registrar
from livestack.pipeline.saturation import (
    FrameSaturation,
    SaturationConfig,
    calibrate_saturated,
    calibrated_saturation,
    clamp_ringing,
)
from livestack.pipeline.types import (
    Allocator,
    FrameInfo,
    FrameMetrics,
    Normalization,
    OutputMap,
    StarList,
    Transform,
    Warped,
)
from livestack.pipeline.warp import resolve_kernel, warp

if TYPE_CHECKING:
    from livestack.pipeline.session import PipelineConfig


@dataclass(frozen=True)
class CosmeticConfig:
    """Hot-pixel handling for frames without a defect map from darks.

    Attributes
    ----------
    auto_hot_pixels : bool
        Find isolated hot pixels in each frame when no master dark supplies a map.
    hot_sigma : float
        Detection threshold in sigma above all same-colour neighbours.
    """

    auto_hot_pixels: bool = True
    hot_sigma: float = field(default=8.0, metadata=rng(0.0, 1000.0, lo_open=True))


@dataclass(frozen=True)
class GradientConfig:
    """Optional per-frame sky-gradient removal before normalisation.

    Attributes
    ----------
    enabled : bool
        Subtract a smooth per-frame sky model (light pollution, moon) before normalising.
    mesh_px : int
        Mesh size of the smooth sky model in pixels.
    """

    enabled: bool = False
    mesh_px: int = field(default=256, metadata=rng(8, 65_536))


@dataclass(frozen=True)
class CalibratedFrame:
    """A light after calibration, cosmetic correction, debayering and background removal.

    Attributes
    ----------
    image : ndarray, shape (ny, nx) or (3, ny, nx), float32
        ADU; RGB for a Bayer camera.
    luminance : ndarray, shape (ny, nx), float32
        ``image`` itself for mono.
    saturation : FrameSaturation or None
        Saturated pixels (on the debayered grid) and the calibrated white level.
    """

    image: NDArray[np.float32]
    luminance: NDArray[np.float32]
    saturation: FrameSaturation | None


@dataclass(frozen=True)
class FrameReference:
    """What normalisation needs of the reference frame.

    Attributes
    ----------
    stats : FrameStats
        The reference's unwarped statistics (:func:`frame_stats` without a footprint).
    stars : StarList or None
        Its stars (for the photometric scale); None: dispersion ratio only.
    metrics : FrameMetrics or None
        Its metrics (for ``stars``, ``fwhm`` and ``noise`` weights).
    """

    stats: FrameStats
    stars: StarList | None = None
    metrics: FrameMetrics | None = None


@dataclass(frozen=True)
class FrameNorm:
    """A frame's normalisation onto the reference, as the journal stores it.

    Attributes
    ----------
    normalization : Normalization
        ``(x - location) * scale + reference_location`` and the weight.
    noise_adu : float or ndarray (3,)
        Background sigma after normalisation, measured before warping (ADU).
    star_scaled : bool
        The scale is the matched-star flux ratio (else the dispersion ratio or 1).
    method, weights : str
        The :class:`NormalizeConfig` it was computed with.
    """

    normalization: Normalization
    noise_adu: float | NDArray[np.float64]
    star_scaled: bool = False
    method: str = "additive_scaling"
    weights: str = "noise"

    @property
    def weight(self) -> float:
        """The frame's weight."""
        return float(self.normalization.weight)

    def to_json(self) -> dict[str, Any]:
        """JSON-able values: ``scale``, ``offset`` (the frame's location), ``reference``
        (the reference's location), ``weight``, ``noise``, ``star_scaled``, ``method``,
        ``weights``; per-channel values are lists."""
        n = self.normalization

        def conv(v: Any) -> Any:
            arr = np.asarray(v, dtype=np.float64)
            return float(arr) if arr.ndim == 0 else arr.tolist()

        return {"scale": conv(n.scale), "offset": conv(n.location),
                "reference": conv(n.reference_location), "weight": float(n.weight),
                "noise": conv(self.noise_adu), "star_scaled": bool(self.star_scaled),
                "method": self.method, "weights": self.weights}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FrameNorm:
        """The inverse of :meth:`to_json`.

        Raises
        ------
        KeyError, TypeError, ValueError
            A malformed record.
        """
        def conv(v: Any) -> float | NDArray[np.float64]:
            return np.asarray(v, dtype=np.float64) if isinstance(v, list) else float(v)

        norm = Normalization(location=conv(d["offset"]), scale=conv(d["scale"]),
                             reference_location=conv(d["reference"]), weight=float(d["weight"]))
        return cls(norm, conv(d["noise"]), bool(d.get("star_scaled", False)),
                   str(d.get("method", "additive_scaling")), str(d.get("weights", "noise")))

    def matches(self, config: NormalizeConfig) -> bool:
        """True when it was computed with this normalisation method and weighting."""
        return self.method == config.method and self.weights == config.weights


# ------------------------------------------------------------------------------ stages
def calibrate_frame(raw: NDArray[Any], info: FrameInfo, masters: MasterSet | None,
                    config: PipelineConfig, *, overwrite_raw: bool = False,
                    empty: Allocator | None = None) -> CalibratedFrame:
    """Calibrate, correct hot pixels, debayer and remove the sky gradient of one light.

    Parameters
    ----------
    raw : ndarray, shape (ny, nx) or (3, ny, nx), float32
        Pixels as read (a CFA mosaic for colour cameras, or an RGB frame), ADU.
    info : FrameInfo
        ``bayer_pattern`` selects colour processing.
    masters : MasterSet or None
        ``(3, ny, nx)`` masters for an RGB frame.
    config : PipelineConfig
        ``cosmetic``, ``debayer``, ``gradient`` and ``saturation`` are used.
    overwrite_raw : bool
        Calibrate in ``raw`` itself (see :func:`~livestack.pipeline.calibrate.calibrate`).
    empty : Allocator, optional
        Where the saturation mask comes from (default ``np.empty``; a caller's pool).

    Returns
    -------
    CalibratedFrame

    Raises
    ------
    FrameError
        ``not_2d``, ``all_nan`` or a calibration problem (``master_*``).
    """
    if raw.ndim != 2 and not (raw.ndim == 3 and raw.shape[0] == 3 and not info.bayer_pattern):
        raise FrameError("not_2d", f"{info.path}: expected a 2-D (mono or CFA) or "
                                   f"(3, ny, nx) RGB image, got shape {raw.shape}")
    # An RGB frame (TIFF/PNG/JPEG/XISF colour file) is calibrated and corrected per channel
    # and never debayered: it is already what debayer() makes of a CFA frame.
    # The raw half of the saturation facts first: the calibration may overwrite raw.
    calibrated, raw_sat = calibrate_saturated(raw, info, masters, config.saturation,
                                              overwrite_raw=overwrite_raw, empty=empty)
    saturation = calibrated_saturation(raw_sat, calibrated)
    cosmetic = config.cosmetic
    if cosmetic.auto_hot_pixels and (masters is None or masters.defects is None):
        hot = find_isolated_hot_pixels(calibrated, cosmetic.hot_sigma, info.bayer_pattern)
        if hot.any():
            calibrated = correct_defects(calibrated, hot, info.bayer_pattern, copy=False)
    image: NDArray[np.float32] = calibrated
    if info.bayer_pattern:
        image = debayer(calibrated, info.bayer_pattern, config.debayer.method,
                        config.debayer.rcd_green_diagonals)
    if config.gradient.enabled:
        mesh = config.gradient.mesh_px
        if image.ndim == 3:
            image = np.stack([subtract_gradient(c, mesh) for c in image])
        else:
            image = subtract_gradient(image, mesh)
    image = np.ascontiguousarray(image, dtype=np.float32)
    lum = luminance(image) if image.ndim == 3 else image
    # A coarse look first: a full scan only when the sample finds nothing finite.
    if not np.isfinite(lum[:: max(1, lum.shape[0] // 64), :: max(1, lum.shape[1] // 64)]).any():
        if not np.isfinite(lum).any():
            raise FrameError("all_nan", f"{info.path}: no finite pixel in the frame")
    return CalibratedFrame(image, lum, saturation)


def detect_frame(lum: NDArray[np.float32], info: FrameInfo, config: DetectConfig
                 ) -> tuple[StarList, FrameMetrics]:
    """Stars and quality metrics of a calibrated frame's luminance.

    The frame's own pixel scale (from its header) fills ``config.pixel_scale_arcsec``
    when the configuration leaves it unset (FWHM in arcsec).

    Raises
    ------
    ValueError
        ``lum`` is not 2-D.
    """
    if config.pixel_scale_arcsec is None and info.pixel_scale_arcsec is not None:
        config = replace(config, pixel_scale_arcsec=info.pixel_scale_arcsec)
    return measure(lum, config)


def find_transform(registrar: Registrar, stars: StarList, lum: NDArray[np.float32]
                   ) -> Transform:
    """Frame -> reference transform by star matching.

    Raises
    ------
    FrameError
        An alignment failure (``too_few_stars``, ``no_match``, ...).
    """
    return registrar.register(stars, lum)


#: Photometry aperture for the scale: this many times the reference's FWHM, at least
#: :data:`PHOTOMETRY_MIN_RADIUS_PX` and at most :data:`PHOTOMETRY_MAX_RADIUS_PX`; the sky
#: annulus lies 3 to 8 px beyond it.
PHOTOMETRY_RADIUS_FWHM = 4.0
PHOTOMETRY_MIN_RADIUS_PX = 4.0
#: ... and at most this (a defocused or trailed reference would otherwise make every
#: stamp hundreds of px wide; 32 px still holds > 99.9 % of an 8 px FWHM star).
PHOTOMETRY_MAX_RADIUS_PX = 32.0
#: Stars fainter than this SNR in the photometry aperture are left out of the scale: in
#: the aperture's sky noise they would scatter it by several per cent (a sparse simulated
#: field with 12 such stars gave 0.905 for a true 1.000).
PHOTOMETRY_MIN_SNR = 30.0
_PHOTOMETRY_ANNULUS_PX = (3.0, 8.0)


def photometry_radius_px(reference_fwhm_px: float | None) -> float | None:
    """Aperture radius (px) of the photometric scale for a reference of this FWHM (px).

    Returns None when the FWHM is unknown (not finite or not positive): the detector's
    fluxes are then used, as before.
    """
    if reference_fwhm_px is None or not (math.isfinite(reference_fwhm_px)
                                         and reference_fwhm_px > 0):
        return None
    return min(max(PHOTOMETRY_RADIUS_FWHM * float(reference_fwhm_px), PHOTOMETRY_MIN_RADIUS_PX),
               PHOTOMETRY_MAX_RADIUS_PX)


def photometry_stars(lum: NDArray[np.float32], stars: StarList, radius_px: float) -> StarList:
    """``stars`` with their flux re-measured in one fixed aperture (:func:`aperture_flux`).

    The frame and the reference measured in the same aperture give a photometric scale
    that does not follow the seeing (the detector's aperture does).

    Parameters
    ----------
    lum : ndarray, shape (ny, nx), float32
        The luminance the stars were detected on (unwarped, ADU).
    stars : StarList
    radius_px : float
        Aperture radius (px), from :func:`photometry_radius_px`.

    Returns
    -------
    StarList
        Same positions, FWHM and elongation; ``flux`` in the fixed aperture (NaN near the
        edges and below :data:`PHOTOMETRY_MIN_SNR`, which
        :func:`~livestack.pipeline.normalize.star_flux_scale` skips).
    """
    annulus = (radius_px + _PHOTOMETRY_ANNULUS_PX[0], radius_px + _PHOTOMETRY_ANNULUS_PX[1])
    flux = aperture_flux(lum, stars.xy, radius_px, annulus, PHOTOMETRY_MIN_SNR)
    return StarList(stars.xy, flux, stars.fwhm_px, stars.elongation)


def photometric_scale(lum: NDArray[np.float32], stars: StarList | None,
                      reference_stars: StarList | None, transform: Transform | None, *,
                      radius_px: float | None = None,
                      reference_photometry: StarList | None = None,
                      is_reference: bool = False) -> float | None:
    """The frame's photometric scale, from one fixed aperture when the reference has one.

    With ``radius_px`` and ``reference_photometry`` (the reference's stars measured by
    :func:`photometry_stars` at that radius), the frame's stars are measured the same way
    on ``lum`` and paired (:func:`star_scale`); with too few bright pairs for that, or
    without them, the detector's fluxes are (the scale before the fixed aperture).

    Parameters
    ----------
    lum : ndarray, shape (ny, nx), float32
        The frame's unwarped luminance (ADU).
    stars, reference_stars : StarList or None
        The frame's and the reference's detected stars (own pixel coordinates).
    transform : Transform or None
        Frame -> reference.
    radius_px : float, optional
        From :func:`photometry_radius_px` of the reference's FWHM.
    reference_photometry : StarList, optional
    is_reference : bool

    Returns
    -------
    float or None
        The scale, or None (the caller uses the dispersion ratio).
    """
    if (radius_px is not None and reference_photometry is not None and stars is not None
            and not is_reference):
        phot = photometry_stars(lum, stars, radius_px)
        scale = star_scale(phot, reference_photometry, transform)
        if scale is not None:
            return scale
    return star_scale(stars, reference_stars, transform, is_reference=is_reference)


def star_scale(stars: StarList | None, reference_stars: StarList | None,
               transform: Transform | None, *, is_reference: bool = False) -> float | None:
    """The photometric scale of a frame: reference/frame flux ratio of matched stars.

    Parameters
    ----------
    stars, reference_stars : StarList or None
        The frame's and the reference's stars, each in its own pixel coordinates.
    transform : Transform or None
        Frame -> reference, to pair them.
    is_reference : bool
        The reference itself: 1.0.

    Returns
    -------
    float or None
        None without stars or with fewer than 5 pairs (the dispersion ratio is then used).
    """
    if stars is None or reference_stars is None:
        return None
    if is_reference:
        return 1.0
    if transform is None:
        return None
    return star_flux_scale(transform.apply(stars.xy), stars.flux, reference_stars.xy,
                           reference_stars.flux)


def normalise_frame(image: NDArray[np.float32], reference: FrameReference,
                    config: NormalizeConfig, *, transform: Transform | None = None,
                    stars: StarList | None = None, metrics: FrameMetrics | None = None,
                    stats: FrameStats | None = None, is_reference: bool = False,
                    signal_scale: float | None = None) -> FrameNorm:
    """Normalisation and weight of a frame onto the reference, measured before warping.

    Parameters
    ----------
    image : ndarray, shape (ny, nx) or (3, ny, nx), float32
        The calibrated, **unwarped** frame (ADU).
    reference : FrameReference
    config : NormalizeConfig
    transform : Transform, optional
        Frame -> reference, to pair the frame's stars with the reference's.
    stars : StarList, optional
        The frame's stars (frame pixels). With ``additive_scaling``, the reference/frame
        flux ratio of matched stars (:func:`star_scale`) is the scale; without them (or
        with fewer than 5 pairs) the dispersion ratio is.
    metrics : FrameMetrics, optional
        For the ``stars``, ``fwhm`` and ``noise`` weights.
    stats : FrameStats, optional
        The frame's statistics when already measured (the reference's own).
    is_reference : bool
        The reference itself: scale 1 by the flux ratio.
    signal_scale : float, optional
        A photometric scale found by the caller, used when ``stars`` is None.

    Returns
    -------
    FrameNorm
    """
    if stats is None:
        stats = frame_stats(image, None)
    if stars is not None and config.method == "additive_scaling":
        signal_scale = star_scale(stars, reference.stars, transform, is_reference=is_reference)
    if config.method != "additive_scaling":
        signal_scale = None
    ref_metrics = reference.metrics
    norm = normalization(
        stats, reference.stats, config, signal_scale=signal_scale,
        star_count=metrics.star_count if metrics is not None else None,
        fwhm_px=metrics.fwhm_px if metrics is not None else None,
        noise_adu=metrics.noise_adu if metrics is not None else None,
        reference_star_count=ref_metrics.star_count if ref_metrics is not None else None,
        reference_fwhm_px=ref_metrics.fwhm_px if ref_metrics is not None else None,
        reference_noise_adu=ref_metrics.noise_adu if ref_metrics is not None else None)
    return FrameNorm(norm, normalized_noise(stats, norm), signal_scale is not None,
                     config.method, config.weights)


def apply_transform(image: NDArray[np.float32], transform: Transform, shape: tuple[int, int],
                    kernel: str, saturation: FrameSaturation | None = None,
                    saturation_config: SaturationConfig | None = None, *,
                    out: Warped | None = None, empty: Allocator | None = None,
                    post: OutputMap | None = None
                    ) -> tuple[Warped, NDArray[np.bool_] | None]:
    """Warp a calibrated frame onto the reference grid, clamping the kernel's ringing.

    Parameters
    ----------
    image : ndarray, shape (ny, nx) or (3, ny, nx), float32
    transform : Transform
        Frame -> reference.
    shape : tuple of int
        ``(ny, nx)`` of the reference grid.
    kernel : str
        ``nearest``, ``bilinear``, ``bicubic``, ``lanczos3``, ``mitchell`` or ``auto``
        (:func:`livestack.pipeline.warp.resolve_kernel`).
    saturation : FrameSaturation, optional
    saturation_config : SaturationConfig, optional
        Without it, no clamping.
    out : Warped, optional
        A previous result to warp into (see :func:`livestack.pipeline.warp.warp`).
    empty : Allocator, optional
        Where the clamp's frame-sized maps come from (default ``np.empty``).
    post : OutputMap, optional
        The normalisation and saturation level to apply on the way (the live stack):
        the result is then what ``apply_normalization`` and ``StackSaturation.apply``
        would make of the plain result, bit for bit, in fewer passes over the frame.

    Returns
    -------
    warped : Warped
    saturated : ndarray (ny, nx) bool or None
        Saturated pixels on the reference grid.
    """
    if post is not None and not post.monotone:
        # The clamp cannot run after an order-reversing map: the plain steps, in order.
        from livestack.pipeline.kernels_normalize import affine_masked
        from livestack.pipeline.kernels_saturation import apply_level

        warped, saturated = apply_transform(image, transform, shape, kernel, saturation,
                                            saturation_config, out=out, empty=empty)
        planes = warped.image[np.newaxis] if warped.image.ndim == 2 else warped.image
        gains, offsets, ceilings = post.arrays(planes.shape[0])
        affine_masked(planes, warped.footprint.view(np.uint8), gains, offsets, planes)
        no_mask = np.zeros((0, 0), dtype=np.bool_)
        apply_level(planes, warped.footprint,
                    saturated if saturated is not None and post.saturate else no_mask,
                    ceilings)
        return warped, saturated
    warped = warp(image, transform, shape, kernel, out=out, post=post)
    if saturation_config is None:
        return warped, None
    return clamp_ringing(warped, image, transform, saturation, saturation_config, empty,
                         post)


def check_norm(norm: FrameNorm, info: FrameInfo) -> None:
    """A frame's noise and weight must be usable by the stack.

    Raises
    ------
    FrameError
        ``zero_noise`` (a noise-free or heavily quantised sky) or ``bad_weight``.
    """
    check_noise(np.asarray(norm.noise_adu, dtype=np.float64), info)
    weight = norm.normalization.weight
    if not (math.isfinite(weight) and weight > 0):
        raise FrameError("bad_weight", f"{info.path}: frame weight {weight} is not finite and > 0")


def check_noise(noise_adu: NDArray[np.float64], info: FrameInfo) -> None:
    """Raise ``FrameError("zero_noise")`` unless every channel's noise is finite and > 0.

    A noise-free or heavily quantised sky measures a background sigma of 0, which the
    kappa-sigma accumulator cannot weight.
    """
    if not bool(np.all(np.isfinite(noise_adu) & (noise_adu > 0))):
        values = ", ".join(f"{v:.3g}" for v in np.atleast_1d(noise_adu))
        raise FrameError("zero_noise",
                         f"{info.path}: background noise {values} ADU is not finite and > 0 "
                         "(noise-free or heavily quantised sky)")


@dataclass(frozen=True)
class RegisteredFrame:
    """The result of :func:`register`: a frame on the reference grid, not yet normalised.

    Attributes
    ----------
    warped : Warped
    saturated : ndarray (ny, nx) bool or None
    transform : Transform
    norm : FrameNorm
    """

    warped: Warped
    saturated: NDArray[np.bool_] | None
    transform: Transform
    norm: FrameNorm


def register(frame: CalibratedFrame, info: FrameInfo, transform: Transform,
             reference: FrameReference, shape: tuple[int, int], config: PipelineConfig, *,
             stars: StarList | None = None, metrics: FrameMetrics | None = None,
             stats: FrameStats | None = None, is_reference: bool = False,
             norm: FrameNorm | None = None, normalize: NormalizeConfig | None = None,
             out: Warped | None = None, empty: Allocator | None = None,
             post: OutputMap | None = None) -> RegisteredFrame:
    """Normalise (measured unwarped) and warp one calibrated frame onto the reference.

    Parameters
    ----------
    frame : CalibratedFrame
    info : FrameInfo
    transform : Transform
        Frame -> reference (found by :func:`find_transform` or stored).
    reference : FrameReference
    shape : tuple of int
        The reference grid ``(ny, nx)``.
    config : PipelineConfig
    stars, metrics, stats, is_reference
        See :func:`normalise_frame`.
    norm : FrameNorm, optional
        A stored normalisation to reuse instead of measuring.
    normalize : NormalizeConfig, optional
        Overrides ``config.normalize``.
    out : Warped, optional
        A previous frame's warp to overwrite (the live stack's reusable buffer); the
        result then holds its arrays.
    empty : Allocator, optional
        Where the clamp's frame-sized maps come from (default ``np.empty``; the
        engine's buffer pool).
    post : OutputMap, optional
        The frame's normalisation and the stack's level, applied by the warp
        (:func:`apply_transform`): the result is then normalised and level-clipped.

    Returns
    -------
    RegisteredFrame

    Raises
    ------
    FrameError
        ``nan_pixels`` / ``no_overlap`` when the warped frame covers nothing,
        ``zero_noise`` or ``bad_weight``.
    """
    if norm is None:
        norm = normalise_frame(frame.image, reference, normalize or config.normalize,
                               transform=transform, stars=stars, metrics=metrics, stats=stats,
                               is_reference=is_reference)
    warped, saturated = apply_transform(frame.image, transform, shape, config.warp.kernel,
                                        frame.saturation, config.saturation, out=out,
                                        empty=empty, post=post)
    if not warped.footprint.any():
        raise_no_footprint(frame.luminance, info,
                           resolve_kernel(config.warp.kernel, frame.image.ndim == 3))
    check_norm(norm, info)
    return RegisteredFrame(warped, saturated, transform, norm)


def raise_no_footprint(lum: NDArray[np.float32], info: FrameInfo, kernel: str) -> None:
    """The warped frame covers no pixel: say whether NaN pixels or the geometry did it.

    Raises
    ------
    FrameError
        ``nan_pixels`` when the frame has non-finite pixels (scattered NaN leave no output
        pixel whose interpolation neighbours are all finite), else ``no_overlap``.
    """
    bad = int(np.count_nonzero(~np.isfinite(lum)))
    if bad:
        raise FrameError("nan_pixels", f"{info.path}: {100.0 * bad / lum.size:.1f} % of the "
                                       f"pixels are NaN/inf; no aligned pixel has only finite "
                                       f"neighbours for the {kernel} kernel")
    raise FrameError("no_overlap",
                     f"{info.path}: the aligned frame does not overlap the reference")


__all__ = [
    "CalibratedFrame",
    "CosmeticConfig",
    "FrameNorm",
    "FrameReference",
    "GradientConfig",
    "RegisteredFrame",
    "apply_transform",
    "calibrate_frame",
    "check_noise",
    "check_norm",
    "detect_frame",
    "find_transform",
    "normalise_frame",
    "raise_no_footprint",
    "register",
    "star_scale",
]

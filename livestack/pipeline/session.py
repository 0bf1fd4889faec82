"""One running stack: a frame's journey from calibrated pixels to the stack.

:class:`StackSession` chains the pure steps for one stack (one target, filter,
exposure, ...): calibrate -> (debayer) -> measure -> gate -> register -> warp ->
normalise -> accumulate. It holds no files, sockets or threads; the daemon and
``livestack stack`` feed it arrays and persist what it returns.

Per-frame problems never raise: they come back as a :class:`FrameOutcome` with
verdict ``"rejected"`` (the frame is readable but unusable: gate, alignment)
or ``"failed"`` (calibration impossible), a reason code and a sentence.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from livestack.errors import FrameError
from livestack.pipeline.accumulate import RunningStack, StackConfig
from livestack.pipeline.calibrate import MasterSet
from livestack.pipeline.debayer import DebayerConfig
from livestack.pipeline.detect import DetectConfig
from livestack.pipeline.frame import (
    CalibratedFrame,
    CosmeticConfig,
    FrameNorm,
    FrameReference,
    GradientConfig,
    calibrate_frame,
    check_noise,
    detect_frame,
    find_transform,
    normalise_frame,
    photometric_scale,
    photometry_radius_px,
    photometry_stars,
    register,
)
from livestack.pipeline.normalize import (
    FrameStats,
    NormalizeConfig,
    frame_stats,
    output_map,
)
from livestack.pipeline.product import StackProduct, provenance_header
from livestack.pipeline.quality import GateConfig, QualityGate
from livestack.pipeline.ranges import rng
from livestack.pipeline.register import PhaseImage, RegisterConfig, Registrar, phase_image
from livestack.pipeline.saturation import (
    SaturationConfig,
    StackSaturation,
)
from livestack.pipeline.stretch import auto_stretch, encode_jpeg
from livestack.pipeline.types import (
    Allocator,
    FrameInfo,
    FrameMetrics,
    FrameRecord,
    StarList,
    Transform,
    Verdict,
    Warped,
)
from livestack.pipeline.warp import AUTO, KERNELS, resolve_kernel
from livestack.reasons import CALIBRATION_FAILURES


@dataclass(frozen=True)
class WarpConfig:
    """Resampling onto the reference grid.

    Attributes
    ----------
    kernel : str
        Resampling kernel: ``auto`` (``lanczos3`` for mono frames, ``mitchell`` for
        colour ones), ``nearest``, ``bilinear``, ``bicubic``, ``lanczos3`` (the sharpest
        stars) or ``mitchell`` (Mitchell-Netravali, B = C = 1/3: it smooths the noise
        almost as much as bilinear with two thirds of its blur). On the 32 Seestar colour
        frames against Siril 1.0.6 (median FWHM 2.954 px), RCD + mitchell gives 2.924 px at
        1.010 x Siril's star SNR, RCD + lanczos3 2.722 px at 0.983 x, RCD + bilinear
        2.978 px at 1.018 x (``bench/bench_demosaic_siril.py``): only mitchell is as sharp
        as Siril's stack with at least its SNR, hence ``auto``'s choice for colour. (With
        Malvar, the demosaic above 8 MP, neither meets both: 3.008 px at 0.990 x with
        mitchell, 2.831 px at 0.958 x with lanczos3.)
    reuse_buffer : bool
        Warp each frame into the previous frame's arrays: saves the CPU of a fresh
        output per frame (31-48 % of a rotated Lanczos3 warp's CPU at 26 MP,
        bench/bench_warp.py) but keeps those arrays (5 bytes per pixel) between frames,
        which raised the peak RSS of a 26 MP mono run by ~110 MB (bench/bench_pipeline.py).
    """

    kernel: str = field(default=AUTO, metadata={"choices": (AUTO, *KERNELS)})
    reuse_buffer: bool = True

    def __post_init__(self) -> None:
        if self.kernel != AUTO and self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join((AUTO, *KERNELS))}, "
                             f"got {self.kernel!r}")


@dataclass(frozen=True)
class PreviewConfig:
    """Preview rendering.

    Attributes
    ----------
    max_size_px : int
        Longer side of the JPEG in pixels.
    quality : int
        JPEG quality, 1-95.
    """

    max_size_px: int = field(default=1600, metadata=rng(16, 65_536))
    quality: int = field(default=85, metadata=rng(1, 95))


@dataclass(frozen=True)
class PipelineConfig:
    """Every numeric setting of a stack, grouped by step. All defaults are valid."""

    detect: DetectConfig = field(default_factory=DetectConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    warp: WarpConfig = field(default_factory=WarpConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    gradient: GradientConfig = field(default_factory=GradientConfig)
    cosmetic: CosmeticConfig = field(default_factory=CosmeticConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    saturation: SaturationConfig = field(default_factory=SaturationConfig)
    debayer: DebayerConfig = field(default_factory=DebayerConfig)


@dataclass(frozen=True)
class FrameOutcome:
    """What happened to one frame. See ``/tmp``-free docs in the module docstring.

    Attributes
    ----------
    file : str
    verdict : str
        ``"accepted"``, ``"rejected"`` or ``"failed"``.
    reason : str or None
        Machine-readable code when not accepted.
    message : str
        One human sentence.
    metrics : FrameMetrics or None
    transform : Transform or None
        Frame -> reference; stored in the journal and reused on replay.
    weight : float
    timings_ms : dict of str to float
        Milliseconds per stage.
    rejected_low, rejected_high : int
        Pixels of this frame rejected as low/high outliers.
    norm : FrameNorm or None
        The accepted frame's normalisation (the journal keeps it for re-stacks).
    stars : StarList or None
        The frame's detected stars when it was rejected after detection (e.g. it did not
        align): the daemon plate-solves them to route the frame by its solved pointing.
    """

    file: str
    verdict: str
    reason: str | None
    message: str
    metrics: FrameMetrics | None = None
    transform: Transform | None = None
    weight: float = 0.0
    timings_ms: dict[str, float] = field(default_factory=dict)
    rejected_low: int = 0
    rejected_high: int = 0
    norm: FrameNorm | None = None
    stars: StarList | None = None


class _Timer:
    """Collects per-stage wall-clock milliseconds."""

    def __init__(self) -> None:
        self.timings_ms: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings_ms[stage] = self.timings_ms.get(stage, 0.0) + (now - self._t) * 1e3
        self._t = now


@dataclass
class _Reference:
    """The stack's reference frame: its grid, stars and background statistics."""

    file: str
    shape: tuple[int, ...]
    stars: StarList
    stats: FrameStats
    #: The luminance binned for the registrar: all a stack needs of the reference's pixels
    #: (the full-resolution luminance was 104 MB held for the night at 26 MP).
    phase: PhaseImage
    metrics: FrameMetrics
    #: Aperture radius (px) of the photometric scale and the reference's stars measured
    #: in it (:func:`frame.photometry_stars`); None: the detector's fluxes are used.
    photometry_radius_px: float | None = None
    photometry_stars: StarList | None = None


class StackSession:
    """One running stack. Pure: arrays in, outcomes and arrays out.

    Parameters
    ----------
    stack_id : str
        Identifier used in records and logs.
    config : PipelineConfig
    """

    def __init__(self, stack_id: str, config: PipelineConfig) -> None:
        self.stack_id = stack_id
        self.config = config
        self.gate = QualityGate(config.gate)
        self.records: list[FrameRecord] = []
        self.n_accepted = 0
        self.total_exposure_s = 0.0
        self.egain_e_per_adu: float | None = None
        self.first_info: FrameInfo | None = None
        self._reference: _Reference | None = None
        self._registrar: Registrar | None = None
        self._stack: RunningStack | None = None
        self._weights: list[float] = []
        #: False once the stack's reference differs from the one stored transforms refer to.
        self._stored_transforms_valid = True
        #: Header values of the batch integration this session continues (see from_product).
        self.base_header: dict[str, object] = {}
        #: The stack's saturation level (pipeline.saturation).
        self.saturation = StackSaturation()
        #: The last frame's warp, whose arrays the next frame's warp overwrites (``out=``).
        self._warp_buffer: Warped | None = None
        #: Stars of the frame in progress (handed to a rejected frame's outcome).
        self._frame_stars: StarList | None = None

    # ------------------------------------------------------------------ frames
    def process(self, raw: np.ndarray, info: FrameInfo, masters: MasterSet | None,
                stored_transform: Transform | None = None, *,
                overwrite_raw: bool = False, scratch: Allocator | None = None) -> FrameOutcome:
        """Put one raw frame through the pipeline and, if it passes, into the stack.

        Parameters
        ----------
        raw : ndarray, shape (ny, nx) or (3, ny, nx), float32
            Pixels as read (a CFA mosaic for colour cameras, or an RGB frame of a
            TIFF/PNG/JPEG/XISF file: calibrated per channel, not debayered), ADU.
        info : FrameInfo
            Header facts; ``bayer_pattern`` selects colour processing.
        masters : MasterSet or None
            Masters chosen for this frame by the library.
        stored_transform : Transform or None
            A transform from the journal: reused instead of matching stars so a
            replay is deterministic (astroalign's RANSAC is unseeded). If the first
            frame of the stack arrives with a non-identity stored transform, the frame
            those transforms refer to is missing; they are then ignored from here on and
            frames are registered afresh against the new reference.
        overwrite_raw : bool
            Calibrate in ``raw`` itself (the caller does not need it afterwards): one
            full-resolution float32 frame less in memory (104 MB at 26 MP).
        scratch : Allocator, optional
            Where the warp output and the saturation maps come from (the engine's
            buffer pool): the session then keeps no warp buffer of its own between
            frames, and that memory is the pool's to hand out again once this frame is
            stacked (the stack copies the warped frame; nothing here keeps any of it).
            Ignored when ``warp.reuse_buffer`` is off (nothing kept between frames).

        Returns
        -------
        FrameOutcome
            Never raises for per-frame problems.
        """
        timer = _Timer()
        self._frame_stars = None
        if not self.config.warp.reuse_buffer:
            scratch = None
        try:
            return self._process(raw, info, masters, stored_transform, timer, overwrite_raw,
                                 scratch)
        except FrameError as exc:
            # A master that does not fit is the setup's fault, not the frame's.
            verdict = "failed" if exc.reason in CALIBRATION_FAILURES else "rejected"
            outcome = FrameOutcome(info.path, verdict, exc.reason, exc.message,
                                   timings_ms=timer.timings_ms, stars=self._frame_stars)
            self._record(outcome, info)
            return outcome

    def _prepare(self, raw: np.ndarray, info: FrameInfo, masters: MasterSet | None,
                 timer: _Timer, overwrite_raw: bool = False, scratch: Allocator | None = None
                 ) -> tuple[CalibratedFrame, StarList, FrameMetrics]:
        """Calibrate, correct, debayer and measure one raw frame (:mod:`.frame`).

        Returns
        -------
        frame : CalibratedFrame
            The calibrated (debayered) frame, its luminance and saturated pixels.
        stars : StarList
        metrics : FrameMetrics

        Raises
        ------
        FrameError
            ``not_2d``, ``shape_mismatch``, ``all_nan`` or a calibration problem.
        """
        rgb = raw.ndim == 3 and raw.shape[0] == 3 and not info.bayer_pattern
        # Colour (debayered CFA or RGB) and mono frames never share a stack.
        colour = rgb or bool(info.bayer_pattern)
        if (raw.ndim == 2 or rgb) and self._reference is not None and (
                raw.shape[-2:] != self._reference.phase.shape
                or colour != (len(self._reference.shape) == 3)):
            raise FrameError(
                "shape_mismatch",
                f"{info.path}: shape {raw.shape} ({'colour' if colour else 'mono'}) differs "
                f"from the stack's {self._reference.shape}",
            )
        frame = calibrate_frame(raw, info, masters, self.config, overwrite_raw=overwrite_raw,
                                empty=scratch)
        # calibrate_frame runs calibrate, cosmetic, debayer and gradient: one lap for all
        timer.lap("calibrate")
        stars, metrics = detect_frame(frame.luminance, info, self.config.detect)
        timer.lap("detect")
        return frame, stars, metrics

    def _process(self, raw: np.ndarray, info: FrameInfo, masters: MasterSet | None,
                 stored_transform: Transform | None, timer: _Timer,
                 overwrite_raw: bool, scratch: Allocator | None = None) -> FrameOutcome:
        cfg = self.config
        frame, stars, metrics = self._prepare(raw, info, masters, timer, overwrite_raw, scratch)
        image, lum, saturation = frame.image, frame.luminance, frame.saturation
        self._frame_stars = stars  # for the outcome of a frame rejected from here on
        verdict = self.gate.evaluate(metrics)
        if not verdict.accepted:
            outcome = FrameOutcome(info.path, "rejected", verdict.reason, verdict.message,
                                   metrics=metrics, timings_ms=timer.timings_ms)
            self._record(outcome, info)
            return outcome

        if self._reference is None:
            if stored_transform is not None and not _is_identity(stored_transform):
                # The frame the stored transforms refer to is gone (deleted, changed or
                # excluded): this frame becomes the reference instead, so the later stored
                # transforms no longer apply and frames are registered afresh.
                self._stored_transforms_valid = False
            # Checked before the frame becomes the reference: a zero-noise reference
            # would poison every later normalisation.
            ref_stats = frame_stats(image, None)
            check_noise(np.asarray(ref_stats.noise_adu, dtype=np.float64), info)
            transform = Transform.identity()
            self._set_reference(info, image, lum, stars, metrics, ref_stats)
        elif stored_transform is not None and self._stored_transforms_valid:
            transform = stored_transform
        else:
            assert self._registrar is not None
            transform = find_transform(self._registrar, stars, lum)
        timer.lap("register")

        ref = self._reference
        assert ref is not None
        # Location and scale belong to the frame, not to the grid: measured before warping
        # (frame.normalise_frame), since interpolation smooths the noise and would bias the
        # dispersion-based scale.
        is_reference = transform.method == "identity" and ref.file == info.path
        # The photometric scale compares the frame's and the reference's stars in one
        # fixed aperture: the detector's aperture follows each frame's seeing and made
        # blurred frames look brighter (scaled down, weighted up).
        # Too few bright pairs for it (a sparse or faint field): the detector's fluxes.
        signal_scale = None
        if cfg.normalize.method == "additive_scaling":
            signal_scale = photometric_scale(
                lum, stars, ref.stars, transform, radius_px=ref.photometry_radius_px,
                reference_photometry=ref.photometry_stars, is_reference=is_reference)
        reference = FrameReference(ref.stats, ref.stars, ref.metrics)
        frame_norm = normalise_frame(image, reference, cfg.normalize, transform=transform,
                                     signal_scale=signal_scale, metrics=metrics,
                                     stats=ref.stats if is_reference else None,
                                     is_reference=is_reference)
        timer.lap("normalize")
        grid = image.shape[:-2] + ref.phase.shape
        buffer = self._warp_buffer
        if buffer is not None and buffer.image.shape != grid:
            buffer = None
        pooled = scratch is not None
        if scratch is not None:
            buffer = Warped(scratch(grid, np.float32), scratch(ref.phase.shape, np.bool_))
        # Reusing the buffer is safe: the stack copies it (accumulates or holds it);
        # nothing keeps it past this frame.
        norm = frame_norm.normalization
        channels = 1 if image.ndim == 2 else image.shape[0]
        level = self.saturation.level_after(saturation, channels, norm.location, norm.scale,
                                            norm.reference_location)
        # The warp writes the frame normalised and clipped at the stack's level (what
        # apply_normalization and StackSaturation.apply did in two more passes).
        done = register(frame, info, transform, reference, ref.phase.shape, cfg,
                        norm=frame_norm, out=buffer, empty=scratch,
                        post=output_map(norm, channels, level))
        self._warp_buffer = done.warped if cfg.warp.reuse_buffer and not pooled else None
        if level is not None:  # the frame is stacked from here on
            self.saturation.level_adu = level
        timer.lap("warp")
        noise_norm = done.norm.noise_adu
        warped = done.warped
        normalised = warped.image
        timer.lap("normalize")

        if self._stack is None:
            self._stack = RunningStack(normalised.shape, cfg.stack)
        rejected_low, rejected_high = self._stack.add(normalised, warped.footprint, norm.weight,
                                                      noise_norm)
        timer.lap("accumulate")

        self.gate.record_accepted(metrics)
        self.n_accepted += 1
        self.total_exposure_s += info.exposure_s
        self._weights.append(norm.weight)
        if info.egain_e_per_adu is not None:
            self.egain_e_per_adu = info.egain_e_per_adu
        outcome = FrameOutcome(info.path, "accepted", None,
                               _accept_message(info, metrics, transform, norm.weight),
                               metrics=metrics, transform=transform, weight=norm.weight,
                               timings_ms=timer.timings_ms, rejected_low=rejected_low,
                               rejected_high=rejected_high, norm=done.norm)
        self._record(outcome, info)
        return outcome

    def _set_reference(self, info: FrameInfo, image: np.ndarray, lum: np.ndarray,
                       stars: StarList, metrics: FrameMetrics, stats: FrameStats) -> None:
        phase = phase_image(lum, self.config.register)
        radius = photometry_radius_px(metrics.fwhm_px)
        phot = None if radius is None else photometry_stars(lum, stars, radius)
        self._reference = _Reference(info.path, image.shape, stars, stats, phase, metrics,
                                     radius, phot)
        self._registrar = Registrar(stars, phase, self.config.register)
        self.first_info = info

    def _record(self, outcome: FrameOutcome, info: FrameInfo) -> None:
        self.records.append(FrameRecord(
            file=info.path, verdict=outcome.verdict, reason=outcome.reason, weight=outcome.weight,
            metrics=outcome.metrics, transform=outcome.transform, exposure_s=info.exposure_s,
            date_obs=info.date_obs, mjd_obs=info.mjd_obs,
        ))

    # ----------------------------------------------------------------- results
    @property
    def reference_file(self) -> str | None:
        """Path of the reference frame, or None before the first accepted frame."""
        return None if self._reference is None else self._reference.file

    @property
    def reference_stars(self) -> StarList | None:
        """Stars detected in the reference frame (its grid), or None before it is set."""
        return None if self._reference is None else self._reference.stars

    def has_image(self) -> bool:
        """True once at least one frame is in the stack."""
        return self._stack is not None and self._stack.n_frames > 0

    def stacked_image(self) -> np.ndarray:
        """Return the current stacked image, float32, NaN where nothing covers.

        Raises
        ------
        ValueError
            If no frame has been accepted yet.
        """
        if self._stack is None:
            raise ValueError(f"stack {self.stack_id} has no accepted frame yet")
        return self._stack.mean()

    def release_scratch(self) -> None:
        """Give back the reusable warp output (5 B/px, 130 MB at 26 MP mono).

        It saves a fresh allocation per frame while frames come back to back (a batch, a
        backlog); a stack waiting for its next frame does not need it, and the writes and
        solves that run when the worker is idle then peak without it.
        """
        self._warp_buffer = None

    def product(self, *, copy: bool = True) -> StackProduct:
        """Return the stack image, its maps, the frame records and FITS header values.

        Parameters
        ----------
        copy : bool
            False: the maps may be views of the live stack state (see
            :meth:`RunningStack.product_maps`), valid until the next frame; for writing
            ``stack.fits`` between frames.

        Raises
        ------
        ValueError
            If no frame has been accepted yet.
        """
        if self._stack is None:
            raise ValueError(f"stack {self.stack_id} has no accepted frame yet")
        image, weight, count, rejected_low, rejected_high = self._stack.product_maps(copy=copy)
        return StackProduct(
            image=image, weight=weight, count=count,
            rejected_low=rejected_low, rejected_high=rejected_high,
            records=list(self.records), header=_stack_header(self),
        )

    def _colour_stack(self) -> bool:
        """Whether the stack holds colour (3-plane) frames."""
        return self._stack is not None and len(self._stack.shape) == 3

    def preview_jpeg(self, max_size_px: int | None = None, quality: int | None = None) -> bytes:
        """Render the stack as an auto-stretched JPEG.

        Parameters
        ----------
        max_size_px : int, optional
            Longer side in pixels (default from the config).
        quality : int, optional
            JPEG quality (default from the config).

        Raises
        ------
        ValueError
            If no frame has been accepted yet.
        """
        size = max_size_px or self.config.preview.max_size_px
        if self._stack is None:
            raise ValueError(f"stack {self.stack_id} has no accepted frame yet")
        pixels = auto_stretch(self._stack.preview_mean(size), max_size_px=size)
        return encode_jpeg(pixels, quality or self.config.preview.quality)

    # ------------------------------------------------------------ persistence
    def state(self, *, copy: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Return everything needed to resume this stack exactly.

        Parameters
        ----------
        copy : bool
            False returns the accumulator's own planes (see :meth:`RunningStack.state`),
            valid until the next frame: for writing a checkpoint without a 18 B/px copy.

        Returns
        -------
        arrays : dict of str to ndarray
            The accumulator state (prefixed ``stack.``) and the reference frame's
            luminance and stars (prefixed ``ref.``).
        meta : dict
            JSON-able: counters, gate history, reference statistics, records.
        """
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {
            "stack_id": self.stack_id,
            "n_accepted": self.n_accepted,
            "total_exposure_s": self.total_exposure_s,
            "egain_e_per_adu": self.egain_e_per_adu,
            "gate": self.gate.to_dict(),
            "weights": list(self._weights),
            "stored_transforms_valid": self._stored_transforms_valid,
            "base_header": dict(self.base_header),
            "saturation_adu": self.saturation.to_json(),
            "records": [record_to_json(r) for r in self.records],
            "first_info": None if self.first_info is None else _info_to_json(self.first_info),
        }
        if self._stack is not None:
            for key, value in self._stack.state(copy=copy).items():
                arrays[f"stack.{key}"] = value
        ref = self._reference
        if ref is not None:
            arrays["ref.phase"] = ref.phase.binned
            arrays["ref.xy"] = ref.stars.xy
            arrays["ref.flux"] = ref.stars.flux
            arrays["ref.fwhm_px"] = ref.stars.fwhm_px
            arrays["ref.elongation"] = ref.stars.elongation
            if ref.photometry_stars is not None:
                arrays["ref.photometry_flux"] = ref.photometry_stars.flux
            meta["reference"] = {
                "file": ref.file,
                "shape": list(ref.shape),
                "phase_factor": ref.phase.factor,
                "phase_shape": list(ref.phase.shape),
                "stats": _stats_to_json(ref.stats),
                "metrics": asdict(ref.metrics),
                "photometry_radius_px": ref.photometry_radius_px,
            }
        return arrays, meta

    @classmethod
    def restore(cls, stack_id: str, config: PipelineConfig, arrays: dict[str, np.ndarray],
                meta: dict[str, Any]) -> StackSession:
        """Rebuild a session from :meth:`state` output.

        Raises
        ------
        KeyError, ValueError
            If the state is incomplete or inconsistent (a corrupt checkpoint).
        """
        session = cls(stack_id, config)
        session.n_accepted = int(meta["n_accepted"])
        session.total_exposure_s = float(meta["total_exposure_s"])
        session.egain_e_per_adu = meta.get("egain_e_per_adu")
        session.gate = QualityGate.from_dict(config.gate, meta["gate"])
        session._weights = [float(w) for w in meta.get("weights", [])]
        session._stored_transforms_valid = bool(meta.get("stored_transforms_valid", True))
        session.base_header = dict(meta.get("base_header", {}))
        session.saturation = StackSaturation.from_json(meta.get("saturation_adu"))
        session.records = [record_from_json(r) for r in meta["records"]]
        if meta.get("first_info") is not None:
            session.first_info = _info_from_json(meta["first_info"])
        stack_state = {k[len("stack."):]: v for k, v in arrays.items() if k.startswith("stack.")}
        if stack_state:
            session._stack = RunningStack.from_state(stack_state, config.stack)
        if "reference" in meta:
            ref = _reference_from_state(arrays, meta["reference"], config)
            session._reference = ref
            session._registrar = Registrar(ref.stars, ref.phase, config.register)
        return session


    @classmethod
    def from_product(cls, stack_id: str, config: PipelineConfig, product: StackProduct,
                     frame_noise_adu: np.ndarray, reference_raw: np.ndarray,
                     reference_info: FrameInfo, reference_masters: MasterSet | None
                     ) -> StackSession:
        """A live session that continues from a batch integration of the same frames.

        The daemon's background rebuild (exclude a frame, change the reference) runs the
        integration engine and then keeps stacking live frames onto its result.

        Parameters
        ----------
        stack_id : str
        config : PipelineConfig
        product : StackProduct
            The integration: a weighted mean with its weight, count, rejection and
            (preferably) ``std`` maps; ``records`` lists the integrated frames as
            ``accepted`` with their transforms onto the reference.
        frame_noise_adu : ndarray, shape (n_accepted, channels), float64
            Background sigma (ADU) of each integrated frame after normalisation.
        reference_raw : ndarray, shape (ny, nx), float32
            The reference frame's raw pixels (its stars and statistics become the
            session's reference for the live frames that follow).
        reference_info : FrameInfo
        reference_masters : MasterSet or None

        Returns
        -------
        StackSession

        Raises
        ------
        FrameError
            The reference frame cannot be calibrated or measured.
        ValueError
            The product does not match the reference frame's grid or has no frame.
        """
        session = cls(stack_id, config)
        frame, stars, metrics = session._prepare(reference_raw, reference_info,
                                                 reference_masters, _Timer())
        image, lum = frame.image, frame.luminance
        if tuple(product.image.shape) != tuple(image.shape):
            raise ValueError(f"{reference_info.path}: integration shape {product.image.shape} "
                             f"differs from the reference frame's {image.shape}")
        ref_stats = frame_stats(image, None)
        check_noise(np.asarray(ref_stats.noise_adu, dtype=np.float64), reference_info)
        session._set_reference(reference_info, image, lum, stars, metrics, ref_stats)
        accepted = [r for r in product.records if r.verdict == "accepted"]
        session._stack = RunningStack.from_maps(
            config.stack, mean=product.image, weight=product.weight, count=product.count,
            std=product.std, rejected_low=product.rejected_low,
            rejected_high=product.rejected_high, n_frames=len(accepted),
            frame_noise_adu=frame_noise_adu)
        session.records = list(product.records)
        for record in accepted:
            if record.metrics is not None:
                session.gate.record_accepted(record.metrics)
        session.n_accepted = len(accepted)
        session.total_exposure_s = float(sum(r.exposure_s for r in accepted))
        session._weights = [float(r.weight) for r in accepted]
        egain = product.header.get("EGAIN")
        if isinstance(egain, (int, float)):
            session.egain_e_per_adu = float(egain)
        session.base_header = {k: product.header[k] for k in _BATCH_KEYS
                               if k in product.header}
        level = product.header.get("SATURATE")  # the batch's level: live frames continue it
        if isinstance(level, (int, float)) and not isinstance(level, bool):
            channels = product.image.shape[0] if product.image.ndim == 3 else 1
            session.saturation = StackSaturation(np.full(channels, float(level)))
        session.base_header["NBATCH"] = len(accepted)
        return session


# ---------------------------------------------------------------- helpers
#: Header values a batch-seeded session keeps from its integration (see ``from_product``).
_BATCH_KEYS = ("REJECT", "REJLOW", "REJHIGH", "NSTARSCL", "HISTORY")


def _is_identity(transform: Transform, tolerance: float = 1e-9) -> bool:
    """True if ``transform`` maps every pixel to itself (within ``tolerance``)."""
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    return bool(np.allclose(transform.matrix, identity, rtol=0.0, atol=tolerance))


def _accept_message(info: FrameInfo, metrics: FrameMetrics, transform: Transform,
                    weight: float) -> str:
    return (f"accepted: {metrics.star_count} stars, FWHM {metrics.fwhm_px:.2f} px, "
            f"shift ({transform.dx:+.1f}, {transform.dy:+.1f}) px, "
            f"rotation {transform.rotation_deg:+.2f} deg, weight {weight:.2f}")


def _stats_to_json(stats: FrameStats) -> dict[str, Any]:
    return {k: np.asarray(v, dtype=np.float64).tolist() for k, v in asdict(stats).items()}


def _stack_header(session: StackSession) -> dict[str, object]:
    """The provenance header of the stack of ``session`` as it stands (see
    :meth:`StackSession.product`)."""
    accepted = [r for r in session.records if r.verdict == "accepted"]
    cfg = session.config
    header = provenance_header(
        session.stack_id, ((r.date_obs, r.exposure_s) for r in accepted), session.first_info,
        session.egain_e_per_adu, COMBINE=cfg.stack.method, KAPPALO=cfg.stack.kappa_low,
        KAPPAHI=cfg.stack.kappa_high, NORMALIZ=cfg.normalize.method,
        WEIGHTS=cfg.normalize.weights,
        WARPKERN=resolve_kernel(cfg.warp.kernel, session._colour_stack()))
    # The live total counts every accepted frame's exposure as it came in.
    header["EXPTIME"] = float(session.total_exposure_s)
    if session._reference is not None:
        header["REFFRAME"] = session._reference.file
    if session.base_header:
        header.update(session.base_header)
        header["INTEGRAT"] = "batch+live"  # a rebuild's batch result, then live frames
    if session.saturation.level_adu is not None:
        header["SATURATE"] = float(session.saturation.level_adu.min())
    return header


def _reference_from_state(arrays: dict[str, np.ndarray], ref_meta: dict[str, Any],
                          config: PipelineConfig) -> _Reference:
    """The reference frame of a :meth:`StackSession.state` (its ``ref.*`` arrays and meta).

    Raises
    ------
    KeyError, ValueError
        If the state is incomplete or inconsistent (a corrupt checkpoint).
    """
    stars = StarList(np.asarray(arrays["ref.xy"], dtype=np.float64),
                     np.asarray(arrays["ref.flux"], dtype=np.float64),
                     np.asarray(arrays["ref.fwhm_px"], dtype=np.float64),
                     np.asarray(arrays["ref.elongation"], dtype=np.float64))
    if "ref.phase" in arrays:
        ny, nx = (int(v) for v in ref_meta["phase_shape"])
        phase = PhaseImage(np.ascontiguousarray(arrays["ref.phase"], dtype=np.float32),
                           int(ref_meta["phase_factor"]), (ny, nx))
    else:  # a checkpoint from before the binned reference: bin it now
        phase = phase_image(np.asarray(arrays["ref.luminance"], dtype=np.float32),
                            config.register)
    return _Reference(
        ref_meta["file"], tuple(int(s) for s in ref_meta["shape"]), stars,
        _stats_from_json(ref_meta["stats"]), phase, FrameMetrics(**ref_meta["metrics"]),
        *_photometry_from_state(arrays, ref_meta, stars),
    )


def _photometry_from_state(arrays: dict[str, np.ndarray], ref_meta: dict[str, Any],
                           stars: StarList) -> tuple[float | None, StarList | None]:
    """The reference's fixed-aperture radius and stars from a checkpoint, or (None, None)
    for one written before them: that session keeps the detector's fluxes, as its earlier
    frames were scaled with them."""
    radius = ref_meta.get("photometry_radius_px")
    if radius is None or "ref.photometry_flux" not in arrays:
        return None, None
    flux = np.asarray(arrays["ref.photometry_flux"], dtype=np.float64)
    return float(radius), StarList(stars.xy, flux, stars.fwhm_px, stars.elongation)


def _stats_from_json(d: dict[str, Any]) -> FrameStats:
    def conv(v: Any) -> float | np.ndarray:
        return np.asarray(v, dtype=np.float64) if isinstance(v, list) else float(v)
    return FrameStats(conv(d["location"]), conv(d["scale"]), conv(d["noise_adu"]))


def _info_to_json(info: FrameInfo) -> dict[str, Any]:
    d = asdict(info)
    d["date_obs"] = None if info.date_obs is None else info.date_obs.isoformat()
    return d


def _info_from_json(d: dict[str, Any]) -> FrameInfo:
    d = dict(d)
    d["date_obs"] = None if d["date_obs"] is None else datetime.fromisoformat(d["date_obs"])
    d["shape"] = tuple(d["shape"])
    d["binning"] = tuple(d["binning"])
    return FrameInfo(**d)


def record_to_json(record: FrameRecord) -> dict[str, Any]:
    """A :class:`FrameRecord` as JSON-able values (checkpoints, rebuild results)."""
    return {
        "file": record.file, "verdict": record.verdict, "reason": record.reason,
        "weight": record.weight,
        "metrics": None if record.metrics is None else asdict(record.metrics),
        "transform": None if record.transform is None else record.transform.to_list(),
        "model": None if record.transform is None else record.transform.model,
        "exposure_s": record.exposure_s,
        "date_obs": None if record.date_obs is None else record.date_obs.isoformat(),
        "mjd_obs": record.mjd_obs,
    }


def record_from_json(d: dict[str, Any]) -> FrameRecord:
    """The inverse of :func:`record_to_json`.

    Raises
    ------
    KeyError, ValueError, TypeError
        On an incomplete or malformed record.
    """
    metrics = None if d["metrics"] is None else FrameMetrics(**d["metrics"])
    transform = (None if d["transform"] is None
                 else Transform.from_list(d["transform"], d.get("model") or "similarity"))
    return FrameRecord(
        file=d["file"], verdict=d["verdict"], reason=d["reason"], weight=float(d["weight"]),
        metrics=metrics, transform=transform, exposure_s=float(d["exposure_s"]),
        date_obs=None if d["date_obs"] is None else datetime.fromisoformat(d["date_obs"]),
        mjd_obs=d["mjd_obs"],
    )


__all__ = [
    "CosmeticConfig",
    "FrameOutcome",
    "GradientConfig",
    "PipelineConfig",
    "PreviewConfig",
    "StackSession",
    "Verdict",
    "WarpConfig",
    "record_from_json",
    "record_to_json",
]

"""The integration engine: re-stack a session exactly from its journal and raw frames.

``livestack integrate`` (and the daemon's background rebuilds) go through four steps:

1. **Session** (:func:`~livestack.sessionplan.load_session`): the stack's accepted,
   active journal rows in processing order, each with its raw file, stored transform,
   metrics and weight.
2. **Plan** (:func:`~livestack.sessionplan.plan_integration`): drop ``--exclude`` files
   and frames failing the ``--select`` expression, and pick the reference. When the
   reference changes, every stored transform is composed onto the new reference:
   ``T_new = inv(T_ref) o T_frame``.
3. **Register** (:func:`integrate_plan`, first pass): every frame is read, recalibrated
   with its masters, cosmetically corrected, debayered, warped with its transform
   (never re-matched: astroalign's RANSAC is unseeded) and normalised onto the
   reference as the live pipeline does it. With additive-with-scaling the scale is the
   live stack's photometric one: stars are detected on every calibrated frame
   (luminance for colour) and on the reference, the frame's stars are mapped with the
   stored (possibly composed) transform, and the reference/frame flux ratio of the
   matched stars (:func:`~livestack.pipeline.normalize.star_flux_scale`) scales the
   frame; the whole-frame dispersion ratio is only the fallback when too few stars
   match. The registered float32 frames
   (NaN outside each frame's footprint) are kept in RAM when they fit in the memory
   limit, else streamed to a scratch file next to the output, written and read with
   positioned I/O (``os.pwrite``/``os.preadv``) rather than ``np.memmap`` so that the
   file's pages never count towards the process's resident memory.
4. **Combine** (second pass): the reference grid is cut into bands of rows sized from
   the memory limit, and each band goes through the pure
   :func:`livestack.pipeline.combine.combine_masked_tile`. The kernel is per pixel,
   so the result does not depend on the band height, i.e. on ``--memory-limit``.

The scratch folder is removed in a ``finally`` block, so also on Ctrl-C
(``KeyboardInterrupt``) and on errors. Nothing is written to the output before every
input has been checked: missing raw files, a bad ``--select`` and a reference that is
not in the session are one-line :class:`~livestack.errors.UsageError` /
:class:`~livestack.errors.FrameError` messages.

Memory model (``memory_limit_bytes``): the limit covers the engine's large buffers
(the registered frames when kept in RAM, two frames' working set while registering,
the masters, the output maps and the band buffer: 4 bytes per sample of a band, plus
the combine step's fixed 8 MB of sort keys). A fixed allowance of
``min(384 MiB, limit / 4)`` is kept back for the Python runtime and libraries (about
300 MB measured).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from livestack.errors import FrameError, LivestackError, StorageError, UsageError
from livestack.pipeline.combine import (
    KEY_CHUNK_BYTES,
    IntegrateConfig,
    combine_masked_tile,
    normalized_planes,
)
from livestack.pipeline.debayer import luminance
from livestack.pipeline.detect import detect_stars
from livestack.pipeline.frame import (
    FrameNorm,
    FrameReference,
    apply_transform,
    calibrate_frame,
    normalise_frame,
    photometric_scale,
    photometry_radius_px,
    photometry_stars,
    star_scale,
)
from livestack.pipeline.normalize import (
    FrameStats,
    NormalizeConfig,
    frame_stats,
)
from livestack.pipeline.saturation import (
    FrameSaturation,
    StackSaturation,
)
from livestack.pipeline.types import FrameInfo, FrameMetrics, FrameRecord, StarList, Transform
from livestack.pipeline.warp import resolve_kernel
from livestack.reasons import Reason
from livestack.sessionplan import (
    IntegrationPlan,
    MasterSource,
    SessionFrame,
    _metrics_of,
    _stored_norm,
    check_frame_file,
    load_session,
    plan_integration,
)
from livestack.storage.calibration import OpenedMasters, master_cards
from livestack.storage.framestore import FrameStore, write_registered
from livestack.storage.lights import read_light

DEFAULT_MEMORY_LIMIT_BYTES = 2 * 1024**3
#: Held back from the memory limit for the interpreter, numpy, numba and astropy.
RUNTIME_ALLOWANCE_BYTES = 384 * 1024**2
#: Bytes per sample of a band (float32 samples; the sort keys live in a small chunk buffer).
BAND_BYTES_PER_SAMPLE = 4
#: Bytes per pixel of the output maps: image, weight (float32), count, low, high (uint16).
OUTPUT_BYTES_PER_PIXEL = 14

#: ``progress(stage, done, total)`` with stage ``"register"`` or ``"combine"``.
ProgressCallback = Callable[[str, int, int], None]
#: A calibrated frame: image, header facts, the description of the masters applied and
#: its stars (None when the normalisation does not need them), its saturated pixels.
_Loaded = tuple[NDArray[np.float32], FrameInfo, tuple[str, ...], StarList | None,
                FrameSaturation | None]

_NORMALIZE_NAMES = {
    "additive-scaling": "additive_scaling",
    "additive_scaling": "additive_scaling",
    "multiplicative-scaling": "multiplicative",
    "multiplicative": "multiplicative",
    "additive": "additive",
    "none": "none",
}
NORMALIZE_CHOICES: tuple[str, ...] = ("additive-scaling", "multiplicative-scaling", "additive",
                                      "none")


class IntegrationCancelled(LivestackError):
    """The caller's cancel event was set; the integration stopped and cleaned up."""


@dataclass
class _Registered:
    """Per-frame facts gathered while registering (for the header and provenance)."""

    info: FrameInfo
    weight: float
    transform: Transform
    metrics: FrameMetrics | None
    masters: tuple[str, ...] = field(default_factory=tuple)
    #: Background sigma after normalisation (ADU), one value per channel.
    noise_adu: tuple[float, ...] = ()
    #: The frame's normalisation (``FrameNorm.to_json()``).
    norm: dict[str, Any] | None = None


# ------------------------------------------------------------------------------ memory
@dataclass(frozen=True)
class MemoryPlan:
    """How an integration uses its memory limit.

    Attributes
    ----------
    in_ram : bool
        Registered frames kept in RAM (else a scratch file).
    band_rows : int
        Rows per combine band.
    budget_bytes : int
        The limit minus the runtime allowance.
    """

    in_ram: bool
    band_rows: int
    budget_bytes: int


def plan_memory(n_frames: int, channels: int, shape: tuple[int, int], memory_limit_bytes: int,
                *, std_map: bool = False, has_masters: bool = True,
                force_scratch: bool = False) -> MemoryPlan:
    """Decide RAM vs scratch and the band height for a memory limit.

    Raises
    ------
    UsageError
        When the limit cannot hold one frame's working set or a one-row band.
    """
    ny, nx = shape
    npix = ny * nx
    allowance = min(RUNTIME_ALLOWANCE_BYTES, memory_limit_bytes // 4)
    budget = memory_limit_bytes - allowance
    outputs = npix * channels * (OUTPUT_BYTES_PER_PIXEL + (4 if std_map else 0))
    # masters held by the library: subtract, flat (float32) and the defect map (bool)
    masters = npix * 9 if has_masters else 0
    # two frames in flight (raw + calibrated each) + warped + normalised planes + footprint
    # + star detection (luminance for colour, or sep's sky-subtracted copy when unbinned)
    working = npix * (8 + 4 + 20 * channels + 1 + 4) + masters
    # a band row: the samples of every frame plus the band's TileResult maps
    row_bytes = nx * (n_frames * BAND_BYTES_PER_SAMPLE + OUTPUT_BYTES_PER_PIXEL + 4)
    store = n_frames * channels * npix * 4
    keys = min(KEY_CHUNK_BYTES, 8 * n_frames * npix)  # combine_masked_tile's key chunk
    need = max(working, outputs + row_bytes + masters + keys)
    if budget < need:
        raise UsageError(f"--memory-limit {_fmt_bytes(memory_limit_bytes)} is too small for "
                         f"{n_frames} frames of {nx}x{ny}: needs at least "
                         f"{_fmt_bytes(need + allowance)}")
    in_ram = (not force_scratch and store + max(working, outputs + masters
                                                + row_bytes * min(ny, 64)) <= budget)
    free = budget - outputs - masters - keys - (store if in_ram else 0)
    band_rows = int(max(1, min(ny, free // row_bytes)))
    return MemoryPlan(in_ram, band_rows, budget)


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


# ------------------------------------------------------------------------- registration
def _check_files(plan: IntegrationPlan) -> None:
    """Every raw file must pass :func:`~livestack.sessionplan.check_frame_file`, before
    anything is computed or written."""
    for frame in plan.frames:
        check_frame_file(frame)


def _calibrated(frame: SessionFrame, masters: MasterSource | None, pipeline: Any,
                find_stars: bool = False, formats: Any = None) -> _Loaded:
    """Read and calibrate one raw frame the way :class:`StackSession` does
    (:func:`~livestack.storage.lights.read_light`,
    :func:`~livestack.pipeline.frame.calibrate_frame`).

    Parameters
    ----------
    frame : SessionFrame
    masters : MasterSource or None
    pipeline : PipelineConfig
        Cosmetic, gradient and detection settings.
    find_stars : bool
        Also detect the frame's stars (:func:`~livestack.pipeline.detect.detect_stars`
        on the calibrated, gradient-subtracted frame, its luminance for colour, with
        ``pipeline.detect``), as the live pipeline does before it normalises.
    formats : FormatsConfig, optional
        The ``formats`` options the live stack read the frame with.

    Returns
    -------
    image : ndarray, shape (ny, nx) or (3, ny, nx), float32
        Calibrated (and debayered) frame in ADU.
    info : FrameInfo
    masters : tuple of str
        Description of the masters applied.
    stars : StarList or None
        Stars in frame pixel coordinates, or None when ``find_stars`` is False.
    saturation : FrameSaturation or None
        Saturated pixels and white level (``pipeline.saturation``), as the live stack.

    Raises
    ------
    FrameError
        The frame cannot be read or calibrated (named).
    """
    # RAW black level: kept when bias/dark masters carry it (formats.raw_black "auto").
    raw, info = read_light(frame.path, formats, masters)
    chosen = masters.select(info) if masters is not None else None
    calibrated = calibrate_frame(raw, info, chosen, pipeline)
    image = calibrated.image
    stars = None
    if find_stars:
        stars, _, _ = detect_stars(calibrated.luminance, pipeline.detect)
    return (image, info, chosen.description if chosen is not None else (), stars,
            calibrated.saturation)


#: A ``MasterLibrary`` with the temperature tolerance bound in (storage.calibration).
TolerantMasters = OpenedMasters


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while integrating, so the ``finally`` blocks
    remove the scratch file. Does nothing outside the main thread (no signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------ engine
def resolve_settings(config: IntegrateConfig | None, pipeline: Any, normalize: str | None
                     ) -> tuple[IntegrateConfig, Any, NormalizeConfig]:
    """The defaults of :func:`integrate_plan` (shared with the Dask engine).

    Raises
    ------
    UsageError
        ``normalize`` is not one of :data:`NORMALIZE_CHOICES`.
    """
    if config is None:
        config = IntegrateConfig()
    if pipeline is None:
        from livestack.pipeline.session import PipelineConfig

        pipeline = PipelineConfig()
    method = pipeline.normalize.method if normalize is None else _NORMALIZE_NAMES.get(normalize)
    if method is None:
        raise UsageError(f"--normalize must be one of {', '.join(NORMALIZE_CHOICES)}; "
                         f"got {normalize!r}")
    return config, pipeline, NormalizeConfig(method=method, weights=config.weights)


def integrate_plan(plan: IntegrationPlan, config: IntegrateConfig | None = None, *,
                   pipeline: Any = None, normalize: str | None = None,
                   masters: MasterSource | None = None,
                   memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
                   keep_registered_dir: str | Path | None = None,
                   scratch_dir: str | Path | None = None, force_scratch: bool = False,
                   progress: ProgressCallback | None = None,
                   cancel: threading.Event | None = None, frame_noise: bool = False,
                   formats: Any = None, reuse_norm: bool = True) -> Any:
    """Recalibrate, register and combine the frames of a plan.

    Every frame goes through the per-frame step of the live stack
    (:mod:`livestack.pipeline.frame`): read with the same ``formats`` options, calibrated,
    normalised with location and scale measured on the unwarped frame, then warped. A
    frame whose journal row holds the live stack's normalisation onto the same reference
    (same method and weights) reuses it instead of detecting stars again.

    Parameters
    ----------
    plan : IntegrationPlan
    config : IntegrateConfig, optional
        Combination, rejection, weights and ``std_map`` (default ``IntegrateConfig()``).
    pipeline : PipelineConfig, optional
        The stack's pipeline settings (warp kernel, cosmetic, gradient, normalisation);
        default ``PipelineConfig()``.
    normalize : str, optional
        ``"additive-scaling"``, ``"multiplicative-scaling"``, ``"additive"`` or
        ``"none"``; default the pipeline's normalisation. Additive-with-scaling
        scales each frame like the live stack: by the reference/frame flux ratio of
        matched stars (stars detected with ``pipeline.detect`` on every calibrated
        frame and the reference, frame stars mapped with the plan's transform),
        falling back to the dispersion ratio when fewer than 5 stars match. The
        header's ``NSTARSCL`` counts the frames scaled by stars.
    masters : MasterSource, optional
        Picks each frame's masters (a ``MasterLibrary``); None: no calibration frames.
    memory_limit_bytes : int
        See the module docstring.
    keep_registered_dir : path, optional
        Also write every calibrated, registered frame there as float32 FITS
        (``r_<name>.fits``, NaN outside the frame's footprint, not normalised).
    scratch_dir : path, optional
        Where the scratch folder goes when the frames do not fit in RAM (default the
        system temporary folder).
    force_scratch : bool
        Use the scratch file even when the frames fit in RAM (tests, benchmarks).
    progress : callable, optional
        ``progress(stage, done, total)``.
    cancel : threading.Event, optional
        Checked between frames and bands (background rebuilds).
    frame_noise : bool
        Also measure each frame's normalised background noise before warping (as the
        live pipeline does) into ``frame_noise_adu``, for a live stack that continues from
        the result (the daemon's rebuilds; 24 ms per 26 MP frame).
    formats : FormatsConfig, optional
        The ``formats`` options (RAW black level, UTC offset, fall-back exposure).
    reuse_norm : bool
        Reuse the normalisations stored in the journal where they apply (default).

    Returns
    -------
    StackProduct
        Image and maps (``(ny, nx)``, or ``(3, ny, nx)`` for colour), the provenance
        records (integrated frames ``accepted``, left-out frames ``excluded``) and the
        header values.

    Raises
    ------
    FrameError
        A raw frame is missing, changed, unreadable or cannot be calibrated (named).
    UsageError
        The memory limit is too small.
    StorageError
        The scratch file or a registered frame cannot be written.
    IntegrationCancelled
        ``cancel`` was set.
    """
    config, pipeline, norm_config = resolve_settings(config, pipeline, normalize)
    method = norm_config.method
    _check_files(plan)
    keep_dir = Path(keep_registered_dir) if keep_registered_dir is not None else None
    if keep_dir is not None:
        try:
            keep_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{keep_dir}: cannot create folder: "
                               f"{exc.strerror or exc}") from exc

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise IntegrationCancelled(f"stack {plan.stack_id}: integration cancelled")

    n = len(plan.frames)
    ref_index = plan.frames.index(plan.reference)
    stored = [_stored_norm(f, plan, norm_config, masters) if reuse_norm else None
              for f in plan.frames]
    # The photometric scale needs the stars of every frame without a stored normalisation
    # (and the reference's).
    find_stars = method == "additive_scaling" and any(x is None for x in stored)
    ref_image, ref_info, ref_masters, ref_stars, ref_sat = _calibrated(
        plan.reference, masters, pipeline, find_stars, formats)
    channels = 3 if ref_image.ndim == 3 else 1
    shape = (int(ref_image.shape[-2]), int(ref_image.shape[-1]))
    mem = plan_memory(n, channels, shape, memory_limit_bytes, std_map=config.std_map,
                      has_masters=masters is not None, force_scratch=force_scratch)
    # As the live stack: the reference's statistics over all its finite pixels, unwarped.
    ref_stats = frame_stats(ref_image, None)
    ref_metrics = _metrics_of(plan.reference)
    ref_photometry = _reference_photometry(ref_image, ref_stars, ref_metrics)

    store = FrameStore(n, channels, shape, None if mem.in_ram else
                        Path(scratch_dir) if scratch_dir is not None
                        else Path(tempfile.gettempdir()))
    ndim = ref_image.ndim
    order = [ref_index, *[i for i in range(n) if i != ref_index]]
    facts: list[_Registered | None] = [None] * n
    loaded: _Loaded | None = (ref_image, ref_info, ref_masters, ref_stars, ref_sat)
    stack_saturation = StackSaturation()  # fixed by the reference, registered first
    del ref_image
    n_star_scaled = 0

    def load(index: int) -> _Loaded:
        return _calibrated(plan.frames[index], masters, pipeline,
                           find_stars and stored[index] is None, formats)

    planes_buffer = np.empty((channels, *shape), dtype=np.float32)
    used: list[FrameNorm] = []
    try:
        # Read + calibrate the next frame in a helper thread while this one is warped,
        # normalised and stored (numpy and I/O release the GIL; numba runs on TBB).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="integrate-read") as pool:
            ahead: Future[_Loaded] | None = None
            for done, index in enumerate(order, start=1):
                check_cancel()
                frame = plan.frames[index]
                if loaded is None:
                    assert ahead is not None
                    loaded = ahead.result()
                ahead = pool.submit(load, order[done]) if done < n else None
                image, info, applied, stars, saturation = loaded
                loaded = None
                if image.shape[-2:] != shape or image.ndim != ndim:
                    raise FrameError(Reason.SHAPE_MISMATCH,
                                     f"{frame.path}: shape {image.shape} differs from the "
                                     f"reference's {shape}", frame.path)
                signal_scale = _signal_scale(index == ref_index, frame.transform, stars,
                                             ref_stars, image, ref_photometry)
                reused = stored[index]
                n_star_scaled += (reused.star_scaled if reused is not None
                                  else signal_scale is not None)
                planes, weight, noise = _register(frame, image, shape, pipeline.warp.kernel,
                                                  ref_stats, ref_metrics, norm_config, keep_dir,
                                                  plan.reference.path, planes_buffer,
                                                  signal_scale, frame_noise,
                                                  (saturation, pipeline.saturation,
                                                   stack_saturation), reused, used)
                del image
                store.put(index, planes)
                facts[index] = _Registered(info, weight, frame.transform, _metrics_of(frame),
                                           applied, noise, used.pop().to_json())
                if progress is not None:
                    progress("register", done, n)
        del planes, planes_buffer  # the last frame's planes are the buffer
        registered_facts = [f for f in facts if f is not None]
        weights = np.array([f.weight for f in registered_facts], dtype=np.float64)
        maps = _combine(store, weights, config, mem.band_rows, progress, check_cancel)
    finally:
        store.close()
    product = _product(plan, config, norm_config, pipeline, registered_facts, maps,
                       n_star_scaled if method == "additive_scaling" else None)
    if stack_saturation.level_adu is not None:
        product.header["SATURATE"] = float(stack_saturation.level_adu.min())
    provenance = getattr(masters, "provenance", None)
    if callable(provenance):
        product.header.update(master_cards(provenance()))
    n_reused = sum(x is not None for x in stored)
    if n_reused:
        product.header["NORMSTOR"] = n_reused  # frames normalised as the journal recorded
    return product


def _signal_scale(is_reference: bool, transform: Transform, stars: StarList | None,
                  ref_stars: StarList | None, image: NDArray[np.float32] | None = None,
                  photometry: tuple[float, StarList] | None = None) -> float | None:
    """The live stack's photometric scale of a frame (:func:`~livestack.pipeline.frame.
    photometric_scale`: one fixed aperture, measured on ``image``'s luminance, when
    ``photometry`` gives the reference's radius and stars measured in it; else the
    detector's fluxes), or None (dispersion fallback)."""
    if image is None or photometry is None or stars is None:
        return star_scale(stars, ref_stars, transform, is_reference=is_reference)
    lum = luminance(image) if image.ndim == 3 else np.asarray(image, dtype=np.float32)
    return photometric_scale(lum, stars, ref_stars, transform, radius_px=photometry[0],
                             reference_photometry=photometry[1], is_reference=is_reference)


def _reference_photometry(image: NDArray[np.float32], stars: StarList | None,
                          metrics: FrameMetrics | None) -> tuple[float, StarList] | None:
    """The reference's fixed-aperture photometry as the live stack sets it
    (:func:`~livestack.pipeline.frame.photometry_radius_px` of its FWHM), or None."""
    if stars is None or metrics is None:
        return None
    radius = photometry_radius_px(metrics.fwhm_px)
    if radius is None:
        return None
    lum = luminance(image) if image.ndim == 3 else np.asarray(image, dtype=np.float32)
    return radius, photometry_stars(lum, stars, radius)


def _register(frame: SessionFrame, image: NDArray[np.float32], shape: tuple[int, int],
              kernel: str, ref_stats: FrameStats, ref_metrics: FrameMetrics | None,
              norm_config: NormalizeConfig, keep_dir: Path | None, reference: str,
              out: NDArray[np.float32], signal_scale: float | None = None,
              measure_noise: bool = False,
              saturation: tuple[FrameSaturation | None, Any, StackSaturation] | None = None,
              stored: FrameNorm | None = None, norm_out: list[FrameNorm] | None = None
              ) -> tuple[NDArray[np.float32], float, tuple[float, ...]]:
    """Warp one calibrated frame onto the reference and normalise it, as the live stack does.

    Parameters
    ----------
    frame : SessionFrame
        Its ``transform`` maps the frame onto the reference.
    image : ndarray, shape (ny, nx) or (3, ny, nx), float32
        The calibrated frame (ADU).
    shape : tuple of int
        ``(ny, nx)`` of the reference grid.
    kernel : str
        Warp kernel (``PipelineConfig.warp.kernel``).
    ref_stats : FrameStats
        The reference's statistics (location, dispersion, noise).
    ref_metrics : FrameMetrics or None
        The reference's journal metrics (for the weights).
    norm_config : NormalizeConfig
    keep_dir : Path or None
        Where to write the registered, unnormalised frame (``--keep-registered``).
    reference : str
        Path of the reference (for that file's header).
    out : ndarray, shape (channels, ny, nx), float32
        Buffer the normalised planes are written into.
    signal_scale : float, optional
        Photometric scale for additive-with-scaling (:func:`_signal_scale`); None
        falls back to the ratio of the dispersions (reference / warped frame).
    measure_noise : bool
        Measure the noise a live continuation needs (see ``integrate_plan(frame_noise=)``).
    saturation : tuple, optional
        ``(frame's FrameSaturation or None, SaturationConfig, the stack's
        StackSaturation)``: clamp the warp's ringing and stack saturated samples at the
        stack's white level (:mod:`livestack.pipeline.saturation`). None: neither.
    stored : FrameNorm, optional
        The live stack's normalisation of the frame (journal), reused instead of measuring.
    norm_out : list, optional
        The normalisation used is appended to it.

    Returns
    -------
    planes : ndarray, shape (channels, ny, nx), float32
        ``out``, NaN outside the footprint.
    weight : float
    noise_adu : tuple of float
        With ``measure_noise``, the normalised frame's background sigma per channel (ADU),
        measured before warping; else empty.

    Raises
    ------
    FrameError
        ``no_overlap`` when the warped frame misses the reference grid.
    """
    channels = 3 if image.ndim == 3 else 1
    metrics = _metrics_of(frame)
    # Location, scale and noise are the frame's, measured before warping as the live stack
    # does (frame.normalise_frame): interpolation smooths the noise and biases the scale.
    fnorm = stored if stored is not None else normalise_frame(
        image, FrameReference(ref_stats, None, ref_metrics), norm_config,
        transform=frame.transform, metrics=metrics, signal_scale=signal_scale)
    norm = fnorm.normalization
    if norm_out is not None:
        norm_out.append(fnorm)
    warped, saturated = apply_transform(image, frame.transform, shape, kernel,
                                        saturation[0] if saturation is not None else None,
                                        saturation[1] if saturation is not None else None)
    if not warped.footprint.any():
        raise FrameError(Reason.NO_OVERLAP, f"{frame.path}: the aligned frame does not overlap "
                                            "the reference", frame.path)
    planes = normalized_planes(warped.image, warped.footprint, norm, out)
    if saturation is not None:
        saturation[2].apply(planes, warped.footprint, saturated, saturation[0], norm.location,
                            norm.scale, norm.reference_location)
    if keep_dir is not None:
        registered = warped.image.reshape(channels, *shape).copy()
        np.copyto(registered, np.float32(np.nan), where=~warped.footprint)
        write_registered(keep_dir, frame.path, registered, frame.transform, reference)
    if not measure_noise:
        return planes, float(norm.weight), ()
    noise = np.atleast_1d(np.asarray(fnorm.noise_adu, dtype=np.float64))
    return planes, float(norm.weight), tuple(float(v) for v in noise)


def _luminance(image: NDArray[np.float32]) -> NDArray[np.float32]:
    from livestack.pipeline.debayer import luminance

    return luminance(image)


def _combine(store: FrameStore, weights: NDArray[np.float64], config: IntegrateConfig,
             band_rows: int, progress: ProgressCallback | None,
             check_cancel: Callable[[], None]) -> dict[str, NDArray[Any]]:
    """Second pass: combine band after band into full-size maps."""
    c, (ny, nx) = store.channels, store.shape
    maps: dict[str, NDArray[Any]] = {
        "image": np.empty((c, ny, nx), dtype=np.float32),
        "weight": np.empty((c, ny, nx), dtype=np.float32),
        "count": np.empty((c, ny, nx), dtype=np.uint16),
        "rejected_low": np.empty((c, ny, nx), dtype=np.uint16),
        "rejected_high": np.empty((c, ny, nx), dtype=np.uint16),
    }
    if config.std_map:
        maps["std"] = np.empty((c, ny, nx), dtype=np.float32)
    # one flat buffer; each band is a C-contiguous (n, rows, nx) view of its start
    buffer = np.empty(store.n * band_rows * nx, dtype=np.float32)
    bands = [(ch, y0, min(y0 + band_rows, ny)) for ch in range(c)
             for y0 in range(0, ny, band_rows)]
    for done, (ch, y0, y1) in enumerate(bands, start=1):
        check_cancel()
        samples = store.band(ch, y0, y1, buffer)
        result = combine_masked_tile(samples, weights, config)
        for name, arr in maps.items():
            arr[ch, y0:y1] = getattr(result, name)
        if progress is not None:
            progress("combine", done, len(bands))
    return maps


def _product(plan: IntegrationPlan, config: IntegrateConfig, norm_config: NormalizeConfig,
             pipeline: Any, facts: list[_Registered], maps: dict[str, NDArray[Any]],
             n_star_scaled: int | None = None) -> Any:
    from livestack.pipeline.product import StackProduct, provenance_header

    mono = maps["image"].shape[0] == 1

    def out(arr: NDArray[Any]) -> NDArray[Any]:
        return arr[0] if mono else arr

    records: list[FrameRecord] = []
    for frame, fact in zip(plan.frames, facts, strict=True):
        records.append(FrameRecord(
            file=frame.path, verdict="accepted", reason=None, weight=fact.weight,
            metrics=fact.metrics, transform=fact.transform, exposure_s=fact.info.exposure_s,
            date_obs=fact.info.date_obs, mjd_obs=fact.info.mjd_obs))
    for path, why in plan.excluded:
        records.append(FrameRecord(file=path, verdict="excluded",
                                   reason="exclude" if why == "--exclude" else "select"))

    infos = [f.info for f in facts]
    first = infos[plan.frames.index(plan.reference)]
    gains = [i.egain_e_per_adu for i in infos if i.egain_e_per_adu is not None]
    header = provenance_header(
        plan.stack_id, ((i.date_obs, i.exposure_s) for i in infos), first,
        gains[-1] if gains else None, INTEGRAT="batch", COMBINE=config.combine,
        REJECT=config.reject, REJLOW=float(config.low), REJHIGH=float(config.high),
        WEIGHTS=config.weights, NORMALIZ=norm_config.method,
        WARPKERN=resolve_kernel(pipeline.warp.kernel, not mono),
        REFFRAME=os.path.basename(plan.reference.path), NEXCLUDE=len(plan.excluded))
    if n_star_scaled is not None:
        header["NSTARSCL"] = n_star_scaled  # frames scaled by matched-star flux ratio
    if plan.selection is not None:
        header["SELECT"] = plan.selection
    for k, (path, why) in enumerate(plan.excluded, start=1):
        if k > 9999:
            break
        header[f"EXCL{k}"] = f"{os.path.basename(path)} ({why})"
    ref_masters = facts[plan.frames.index(plan.reference)].masters
    header["HISTORY"] = (
        f"livestack integrate: {len(facts)} frames, {len(plan.excluded)} excluded; "
        f"combine={config.combine} reject={config.reject} low={config.low:g} "
        f"high={config.high:g} weights={config.weights} normalize={norm_config.method}; "
        f"reference {os.path.basename(plan.reference.path)}"
        + (" (changed: transforms composed)" if plan.reference_changed else "")
        + (f"; scale: matched-star flux ratio for {n_star_scaled} of {len(facts)} frames, "
           "dispersion ratio for the rest" if n_star_scaled is not None else "")
        + "; masters: " + ("; ".join(ref_masters) if ref_masters else "none"))
    std = maps.get("std")
    # one weight map for all channels (they differ only where rejection differs)
    weight = maps["weight"][0] if mono else maps["weight"].mean(axis=0, dtype=np.float32)
    return StackProduct(
        image=out(maps["image"]), weight=weight, count=out(maps["count"]),
        rejected_low=out(maps["rejected_low"]), rejected_high=out(maps["rejected_high"]),
        records=records, header=header, **({"std": out(std)} if std is not None else {}),
        frame_noise_adu=(np.array([f.noise_adu for f in facts], dtype=np.float64)
                         if all(f.noise_adu for f in facts) else None),
        frame_norms=([f.norm for f in facts if f.norm is not None]
                     if all(f.norm for f in facts) else None))


def integrate_session(stack_dir: str | Path | None = None,
                      config: IntegrateConfig | None = None, *, journal: Any = None,
                      stack_id: str | None = None, exclude: Sequence[str] = (),
                      select: str | None = None, reference: str | None = None,
                      **options: Any) -> Any:
    """Integrate a stack from its journal: :func:`~livestack.sessionplan.load_session`,
    :func:`~livestack.sessionplan.plan_integration`, :func:`integrate_plan`.

    Parameters
    ----------
    stack_dir : str or Path, optional
        The stack folder (or ``journal`` + ``stack_id``).
    config : IntegrateConfig, optional
    journal, stack_id
        See :func:`~livestack.sessionplan.load_session`.
    exclude, select, reference
        See :func:`~livestack.sessionplan.plan_integration`.
    **options
        Passed to :func:`integrate_plan` (``pipeline``, ``normalize``, ``masters``,
        ``memory_limit_bytes``, ``keep_registered_dir``, ``scratch_dir``,
        ``progress``, ``cancel``, ...).

    Returns
    -------
    StackProduct

    Raises
    ------
    UsageError, FrameError, StorageError, JournalError, IntegrationCancelled
        As the three steps.
    """
    session = load_session(stack_dir, journal=journal, stack_id=stack_id)
    plan = plan_integration(session, exclude=exclude, select=select, reference=reference)
    return integrate_plan(plan, config, **options)


__all__ = [
    "DEFAULT_MEMORY_LIMIT_BYTES",
    "NORMALIZE_CHOICES",
    "IntegrationCancelled",
    "MemoryPlan",
    "TolerantMasters",
    "integrate_plan",
    "integrate_session",
    "plan_memory",
    "sigterm_interrupts",
]

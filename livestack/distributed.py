"""Run an integration's work on a Dask distributed cluster (``integrate --scheduler``).

The default engine stays :func:`livestack.restack.integrate_plan` on the local machine;
this module is used only when ``--scheduler tcp://HOST:PORT`` is given. ``dask`` and
``distributed`` come with the optional extra ``livestack[distributed]`` and are imported
lazily (inside :func:`connect`), so that the core imports and runs without them.

Tasks are pure functions of their arguments, so Dask may run any of them on any worker,
and run it again when a worker is lost (the result is the same):

* **reference** (one task): the reference frame's path, masters and pipeline settings ->
  its grid, statistics and stars;
* **register** (one per frame): frame path, transform, master paths, the reference's
  statistics and stars -> the calibrated, warped, normalised planes
  (``(channels, ny, nx)`` float32, NaN outside the footprint) and the frame's weight and
  header facts. These are the same calls as the local engine makes, so the results
  agree with it. The planes stay on the worker that made them (Dask spills them to the
  worker's local disk above its memory limit): the scratch data never comes back to the
  client;
* **band** (frame x tile): rows ``y0:y1`` of one channel of one frame's planes, cut as
  soon as the frame is registered, where it was registered; the whole frame is then
  dropped, and each piece is kept (or spilled) on its own;
* **combine** (one per tile): one band of every frame and the weights -> the tile's maps
  (:func:`~livestack.pipeline.combine.combine_masked_tile`). Tiles are sized so that
  one combine task uses at most :data:`TILE_SHARE` of ``--memory-limit``
  (:func:`tile_rows`).

Workers read frames and masters from the paths the client names: every worker must see
the same paths (a shared file system such as NFS, mounted at the same place). Start the
workers with the same ``--memory-limit``: a register task needs one frame's working set
(checked as for the local engine), a combine task at most :data:`TILE_SHARE` of it, and
Dask spills the stored pieces to the worker's local disk to keep the worker within it.

The client follows the futures (the progress bar counts finished frames, then tiles);
Ctrl-C (KeyboardInterrupt) or any error cancels every future of the run before it
propagates. Nothing is written by this module: the caller writes the output after the
product is complete.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from livestack.errors import FrameError, UsageError
from livestack.pipeline.combine import IntegrateConfig, combine_masked_tile
from livestack.pipeline.normalize import FrameStats, NormalizeConfig, frame_stats
from livestack.pipeline.saturation import StackSaturation
from livestack.pipeline.types import FrameMetrics, StarList
from livestack.reasons import Reason
from livestack.restack import (
    DEFAULT_MEMORY_LIMIT_BYTES,
    ProgressCallback,
    _calibrated,
    _product,
    _reference_photometry,
    _register,
    _Registered,
    _signal_scale,
    plan_memory,
    resolve_settings,
)
from livestack.sessionplan import (
    IntegrationPlan,
    MasterSource,
    SessionFrame,
    _metrics_of,
    check_frame_file,
)
from livestack.storage.calibration import RecordedMasters, open_masters

EXTRA_HINT = "pip install 'livestack[distributed]'"
#: Share of ``--memory-limit`` one combine task may use; the rest is for the pieces Dask
#: keeps in worker memory (it spills them to the worker's disk above 60 % of its limit).
TILE_SHARE = 0.3
#: Seconds to wait for the scheduler's handshake before the address counts as unreachable.
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class MasterPaths:
    """Where the masters are, as paths every worker can open (a task argument).

    Attributes
    ----------
    bias, darks, flats : str or None
        As ``--bias``, ``--darks``, ``--flats`` (files or folders).
    library : tuple of str
        ``masters.paths`` of the configuration (used when none of the above is given).
    temp_tolerance_c : float
        ``masters.temp_tolerance_c`` for the library.
    """

    bias: str | None = None
    darks: str | None = None
    flats: str | None = None
    library: tuple[str, ...] = ()
    temp_tolerance_c: float = 2.0

    @property
    def empty(self) -> bool:
        """True when no master is named (frames are integrated uncalibrated)."""
        return not (self.bias or self.darks or self.flats or self.library)

    def open(self) -> MasterSource | None:
        """The masters as a :class:`~livestack.sessionplan.MasterSource` (cached per process).

        Raises
        ------
        MasterError
            A master file is missing or unusable (named).
        """
        return _open_masters(self)


# Cached per worker process: every task of a run names the same masters, and loading
# them (a few hundred MB at 26 MP) once per task would dominate the run.
@functools.lru_cache(maxsize=2)
def _open_masters(paths: MasterPaths) -> MasterSource | None:
    return open_masters(bias=paths.bias, darks=paths.darks, flats=paths.flats,
                        paths=paths.library, temp_tolerance_c=paths.temp_tolerance_c)


def connect(address: str, timeout_s: float | None = None) -> Any:
    """Connect to a running Dask scheduler.

    Parameters
    ----------
    address : str
        ``tcp://HOST:PORT`` (any address ``distributed.Client`` accepts).
    timeout_s : float, optional
        Bounded wait for the connection (default :data:`CONNECT_TIMEOUT_S`).

    Returns
    -------
    distributed.Client
        Not set as the default client; close it when done.

    Raises
    ------
    UsageError
        ``dask``/``distributed`` are not installed (naming the extra), or the address is
        malformed or no Dask scheduler answers there.
    """
    try:
        # Imported here, not at module level: Dask is an optional extra and the core
        # (and ``livestack integrate`` without --scheduler) must work without it.
        from distributed import Client
    except ImportError:
        raise UsageError(f"--scheduler needs Dask: {EXTRA_HINT}") from None
    timeout = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    # Ask the address who it is before building a Client: a Client that fails half-way
    # prints tracebacks from its finaliser at exit, and a non-Dask peer's bytes can be
    # misread as a huge message length (MemoryError).
    try:
        kind = asyncio.run(_identify(address, timeout))
    except (OSError, TimeoutError, ValueError, TypeError, MemoryError) as exc:
        reason = (str(exc).strip().splitlines() or [""])[0] or (
            f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError)
            else type(exc).__name__)
        raise UsageError(f"--scheduler {address}: no Dask scheduler reachable there "
                         f"({reason})") from None
    if kind != "Scheduler":
        raise UsageError(f"--scheduler {address}: that is a Dask {kind or 'peer'}, not a "
                         "scheduler")
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise UsageError(f"--scheduler {address}: cannot connect ({exc})") from None


async def _identify(address: str, timeout_s: float) -> str:
    """The ``type`` a Dask server at ``address`` reports (``"Scheduler"``, ``"Worker"``...).

    Raises
    ------
    OSError, TimeoutError, ValueError, MemoryError
        Unreachable, malformed address, or not speaking the Dask protocol.
    """
    from distributed.core import rpc

    remote = rpc(address, timeout=timeout_s)
    try:
        identity = await asyncio.wait_for(remote.identity(), timeout_s)
    finally:
        await remote.close_rpc()
    return str(identity.get("type", "")) if isinstance(identity, dict) else ""


# --------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class _Reference:
    """What every register task needs to know about the reference."""

    shape: tuple[int, int]
    ndim: int
    stats: FrameStats
    stars: StarList | None
    #: The stack's saturation level as the reference sets it (None: unknown).
    level_adu: NDArray[np.float64] | None = None
    #: The fixed-aperture photometry radius and the reference's stars measured in it, as
    #: the live stack sets them (None: the detector's fluxes scale the frames).
    photometry: tuple[float, StarList] | None = None


def _reference_task(frame: SessionFrame, masters: MasterPaths | None, pipeline: Any,
                    find_stars: bool) -> _Reference:
    """Calibrate the reference frame; return its grid, statistics, stars and white level.

    The local engine fixes the stack's saturation level from the reference, registered
    first; here the reference is registered once more to find that level, which every
    register task then starts from. (The local engine also raises the level when a later
    frame records more than 5 % above it, for the frames after that one; a register task
    raises it for its own frame only.)
    """
    check_frame_file(frame)
    image, _, _, stars, saturation = _calibrated(
        frame, masters.open() if masters else None, pipeline, find_stars)
    stats = frame_stats(image, None)  # as the live stack and the local engine
    shape = (int(image.shape[-2]), int(image.shape[-1]))
    level = None
    if saturation is not None:
        stack_saturation = StackSaturation()
        out = np.empty((3 if image.ndim == 3 else 1, *shape), dtype=np.float32)
        norm_config = NormalizeConfig()
        _register(frame, image, shape, pipeline.warp.kernel, stats, None, norm_config, None,
                  frame.path, out, 1.0 if stars is not None else None, False,
                  (saturation, pipeline.saturation, stack_saturation))
        level = stack_saturation.level_adu
    return _Reference(shape, image.ndim, stats, stars, level,
                      _reference_photometry(image, stars, _metrics_of(frame)))


def _register_task(frame: SessionFrame, is_reference: bool, masters: MasterPaths | None,
                   pipeline: Any, ref: _Reference, ref_metrics: FrameMetrics | None,
                   reference_path: str, norm_config: NormalizeConfig
                   ) -> tuple[NDArray[np.float32], _Registered, bool]:
    """Calibrate, warp and normalise one frame as the local engine does.

    Returns
    -------
    planes : ndarray, shape (channels, ny, nx), float32
        Normalised, NaN outside the footprint.
    facts : _Registered
        Weight, header facts, masters applied.
    star_scaled : bool
        True when the photometric scale came from matched stars.

    Raises
    ------
    FrameError
        The frame is missing, changed, unreadable, of another shape, or misses the
        reference grid (named).
    """
    check_frame_file(frame)
    image, info, applied, stars, saturation = _calibrated(
        frame, masters.open() if masters else None, pipeline, ref.stars is not None)
    if image.shape[-2:] != ref.shape or image.ndim != ref.ndim:
        raise FrameError(Reason.SHAPE_MISMATCH, f"{frame.path}: shape {image.shape} differs from "
                                           f"the reference's {ref.shape}", frame.path)
    scale = _signal_scale(is_reference, frame.transform, stars, ref.stars, image,
                          ref.photometry)
    channels = 3 if image.ndim == 3 else 1
    out = np.empty((channels, *ref.shape), dtype=np.float32)
    planes, weight, noise = _register(frame, image, ref.shape, pipeline.warp.kernel, ref.stats,
                                      ref_metrics, norm_config, None, reference_path, out,
                                      scale, False,
                                      (saturation, pipeline.saturation,
                                       StackSaturation(None if ref.level_adu is None
                                                       else ref.level_adu.copy())))
    facts = _Registered(info, weight, frame.transform, _metrics_of(frame), applied, noise)
    return planes, facts, scale is not None


def _facts_of(registered: tuple[NDArray[np.float32], _Registered, bool]
              ) -> tuple[_Registered, bool]:
    """The small part of a register task's result (the client gathers these)."""
    return registered[1], registered[2]


def _band_task(registered: tuple[NDArray[np.float32], _Registered, bool], channel: int,
               y0: int, y1: int) -> NDArray[np.float32]:
    """Rows ``y0:y1`` of one channel of a registered frame, ``(rows, nx)`` float32."""
    return np.ascontiguousarray(registered[0][channel, y0:y1])


def _combine_task(weights: NDArray[np.float64], config: IntegrateConfig,
                  *bands: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
    """Combine one tile: the same band of every frame -> the tile's maps."""
    samples = np.stack(bands)
    result = combine_masked_tile(samples, weights, config)
    del samples
    names = ["image", "weight", "count", "rejected_low", "rejected_high"]
    if config.std_map:
        names.append("std")
    return {name: getattr(result, name) for name in names}


# -------------------------------------------------------------------------------- engine
def integrate_plan_dask(plan: IntegrationPlan, config: IntegrateConfig | None = None, *,
                        client: Any, pipeline: Any = None, normalize: str | None = None,
                        masters: MasterPaths | None = None,
                        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
                        progress: ProgressCallback | None = None) -> Any:
    """:func:`~livestack.restack.integrate_plan` with the work on a Dask cluster.

    Parameters
    ----------
    plan : IntegrationPlan
    config : IntegrateConfig, optional
    client : distributed.Client
        A connected client (:func:`connect` or a ``LocalCluster``'s).
    pipeline : PipelineConfig, optional
    normalize : str, optional
        As ``integrate_plan``.
    masters : MasterPaths, optional
        Paths every worker can open; None: no calibration frames.
    memory_limit_bytes : int
        Per task (and per worker): sets the tile height as the local scratch mode does.
    progress : callable, optional
        ``progress(stage, done, total)`` as futures finish (``"register"``, ``"combine"``).

    Returns
    -------
    StackProduct
        As the local engine's, within float rounding of it (the same calls per frame and
        per pixel).

    Raises
    ------
    FrameError
        From a task (named frame).
    UsageError
        Bad ``normalize``, or the memory limit cannot hold one frame or one tile row.
    KeyboardInterrupt
        After cancelling every future of the run.
    """
    config, pipeline, norm_config = resolve_settings(config, pipeline, normalize)
    find_stars = norm_config.method == "additive_scaling"
    futures: list[Any] = []  # the reference's, then each frame's facts
    bands: dict[int, list[Any]] = defaultdict(list)  # tile index -> each frame's piece
    try:
        ref_future = client.submit(_reference_task, plan.reference, masters, pipeline,
                                   find_stars, pure=False)
        futures.append(ref_future)
        ref: _Reference = ref_future.result()
        n = len(plan.frames)
        channels = 3 if ref.ndim == 3 else 1
        # raises UsageError when one frame's working set does not fit the limit
        plan_memory(n, channels, ref.shape, memory_limit_bytes, std_map=config.std_map,
                    has_masters=masters is not None and not masters.empty, force_scratch=True)
        ny, nx = ref.shape
        rows = tile_rows(n, nx, memory_limit_bytes)
        tiles = [(ch, y0, min(y0 + rows, ny)) for ch in range(channels)
                 for y0 in range(0, ny, rows)]
        ref_metrics = _metrics_of(plan.reference)
        for frame in plan.frames:
            registered = client.submit(_register_task, frame, frame is plan.reference, masters,
                                       pipeline, ref, ref_metrics, plan.reference.path,
                                       norm_config, pure=False)
            futures.append(client.submit(_facts_of, registered, pure=False))
            # Cut the frame into its tiles right away and keep no reference to the whole
            # frame: the worker then frees it, and each tile's piece is stored (or spilled
            # to disk) on its own, so a combine task loads only its tile.
            for t, (ch, y0, y1) in enumerate(tiles):
                bands[t].append(client.submit(_band_task, registered, ch, y0, y1, pure=False))
            del registered
        _follow(client, futures[1:], "register", progress)
        gathered: list[tuple[_Registered, bool]] = client.gather(futures[1:])
        facts = [f for f, _ in gathered]
        n_star_scaled = sum(1 for _, scaled in gathered if scaled)
        weights = np.array([f.weight for f in facts], dtype=np.float64)
        maps = _combine_on_cluster(client, tiles, bands, weights, config, channels, ref.shape,
                                   progress)
    except BaseException:
        # Ctrl-C or a failed task: nothing of this run keeps running on the cluster.
        client.cancel([*futures, *(b for tile in bands.values() for b in tile)])
        raise
    client.cancel(futures)
    product = _product(plan, config, norm_config, pipeline, facts, maps,
                       n_star_scaled if find_stars else None)
    if ref.level_adu is not None:  # as the local engine writes it
        product.header["SATURATE"] = float(ref.level_adu.min())
    return product


def _follow(client: Any, futures: Sequence[Any], stage: str,
            progress: ProgressCallback | None) -> None:
    """Wait for ``futures`` as they finish, reporting progress; raise the first error."""
    from distributed import as_completed

    total = len(futures)
    # the client's loop: it is not the process's default client (set_as_default=False)
    for done, future in enumerate(as_completed(futures, loop=client.loop), start=1):
        if future.status == "error":
            future.result()  # re-raises the task's exception here
        if progress is not None:
            progress(stage, done, total)


def tile_rows(n_frames: int, nx: int, memory_limit_bytes: int) -> int:
    """Rows per tile so that one combine task uses at most :data:`TILE_SHARE` of the limit.

    A combine task holds its inputs (one band per frame), their stacked copy, the sort
    keys (8 bytes per sample at most) and the tile's maps (18 bytes per pixel).
    """
    row_bytes = nx * (16 * n_frames + 18)
    return max(1, int(TILE_SHARE * memory_limit_bytes) // row_bytes)


def _combine_on_cluster(client: Any, tiles: Sequence[tuple[int, int, int]],
                        bands: dict[int, list[Any]], weights: NDArray[np.float64],
                        config: IntegrateConfig, channels: int, shape: tuple[int, int],
                        progress: ProgressCallback | None) -> dict[str, NDArray[Any]]:
    """Submit one combine task per tile; assemble the full maps as they finish."""
    from distributed import as_completed

    ny, nx = shape
    maps: dict[str, NDArray[Any]] = {}  # full-size maps, typed as the first tile's
    pending = {client.submit(_combine_task, weights, config, *bands[t], pure=False): t
               for t in range(len(tiles))}
    total = len(pending)
    try:
        finished = as_completed(list(pending), loop=client.loop)
        for done, future in enumerate(finished, start=1):
            # Dropping the tile's band futures lets the workers free those pieces now.
            t = pending.pop(future)
            ch, y0, y1 = tiles[t]
            del bands[t]
            result = future.result()
            for name, tile in result.items():
                if name not in maps:
                    maps[name] = np.empty((channels, ny, nx), dtype=tile.dtype)
                maps[name][ch, y0:y1] = tile
            del result
            if progress is not None:
                progress("combine", done, total)
    except BaseException:
        client.cancel(list(pending))
        raise
    return maps


def check_cluster_options(args: Any) -> None:
    """Refuse ``--scheduler`` without Dask installed or with an unsupported option.

    Raises
    ------
    UsageError
        Dask missing (naming the extra), or ``--keep-registered`` (the registered
        frames stay on the workers).
    """
    try:
        import distributed  # noqa: F401  (lazy: an optional extra, see connect())
    except ImportError:
        raise UsageError(f"--scheduler needs Dask: {EXTRA_HINT}") from None
    if getattr(args, "keep_registered", None):
        raise UsageError("--keep-registered cannot be used with --scheduler: the registered "
                         "frames stay on the workers")


def master_paths(args: Any, settings: Any, err: Any,
                 recorded: RecordedMasters | None = None) -> MasterPaths:
    """The masters of ``livestack integrate`` options / configuration as paths.

    Without master flags, the sessions' recorded masters (already hash-checked by the
    client) are the workers' library; ``--no-calibration`` names none. Writes the same
    notice as the local engine to ``err`` when no master is given.
    """
    def absolute(value: str | None) -> str | None:
        return os.path.abspath(value) if value else None

    if getattr(args, "no_calibration", False):
        return MasterPaths()
    flags = bool(args.bias or args.darks or args.flats)
    if recorded is not None and not flags:
        # Workers choose among the recorded files by exposure and temperature, as the
        # session chose among its masters (the hashes were checked here, on the client).
        files = tuple(sorted({str(recorded.path_of(m)) for m in recorded.recorded}))
        return MasterPaths(library=files, temp_tolerance_c=float(
            settings.masters.temp_tolerance_c))
    paths = MasterPaths(bias=absolute(args.bias), darks=absolute(args.darks),
                        flats=absolute(args.flats),
                        library=tuple(os.path.abspath(p) for p in settings.masters.paths),
                        temp_tolerance_c=float(settings.masters.temp_tolerance_c))
    if paths.empty:
        err.write("livestack integrate: no masters given (--bias/--darks/--flats or "
                  "masters.paths in -c CONFIG): frames are integrated without calibration "
                  "frames\n")
    return paths


def run_on_cluster(args: Any, plan: IntegrationPlan, config: IntegrateConfig, pipeline: Any,
                   settings: Any, memory_limit_bytes: int,
                   progress: ProgressCallback | None) -> Any:
    """``livestack integrate --scheduler``: connect, integrate, disconnect.

    Returns
    -------
    StackProduct

    Raises
    ------
    UsageError
        Scheduler unreachable or malformed address (one line), or as
        :func:`integrate_plan_dask`.
    FrameError, MasterError
        From a task.
    """
    masters = master_paths(args, settings, _Silent())
    client = connect(args.scheduler)
    try:
        return integrate_plan_dask(plan, config, client=client, pipeline=pipeline,
                                   normalize=args.normalize,
                                   masters=None if masters.empty else masters,
                                   memory_limit_bytes=memory_limit_bytes, progress=progress)
    finally:
        client.close()


class _Silent:
    """A text stream that drops what it is given (the notice was written once already)."""

    def write(self, text: str) -> int:
        return len(text)


def worker_pids(client: Any) -> dict[str, int]:
    """``{worker address: process id}`` of the cluster's workers (tests, diagnostics)."""
    return dict(client.run(os.getpid))


__all__ = ["CONNECT_TIMEOUT_S", "EXTRA_HINT", "TILE_SHARE", "MasterPaths",
           "check_cluster_options", "connect", "integrate_plan_dask", "master_paths",
           "run_on_cluster", "tile_rows", "worker_pids"]

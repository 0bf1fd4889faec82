"""The warm-up of a ``kappa_sigma`` :class:`~livestack.pipeline.accumulate.RunningStack`.

:class:`WarmupBuffer` holds the stack's first ``warmup_frames`` (K) frames and replays
them through the robust seeding kernel (:func:`.kernels_accumulate.replay_warmup`): into
the stack's state when the K-th frame arrives (:meth:`WarmupBuffer.finish`), or into
scratch planes whenever a product is asked for before that (provisional results, the
banded preview). Why the stack holds frames at all, and the memory budget of the buffer
that becomes the state, are described in :mod:`livestack.pipeline.accumulate`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:  # accumulate.py imports this module
    from livestack.pipeline.accumulate import StackConfig

#: Row/column stride of the sample the sky level is taken from.
SKY_STEP = 8

#: Rows per band of a warm-up preview's replay (rounded up to the preview's block size).
_PREVIEW_BAND_ROWS = 128

#: The six state planes ``(mean, m2, wsum, count, rej_lo, rej_hi)``, each (nc, ny, nx).
Planes = tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32],
               NDArray[np.uint16], NDArray[np.uint16], NDArray[np.uint16]]


def clip_coefficients(config: StackConfig) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The rejection kernels' ``(coef_lo, coef_hi)`` for ``config``'s kappas."""
    from livestack.pipeline import kernels_accumulate as kern

    return kern.clip_coefficients(config.kappa_low), kern.clip_coefficients(config.kappa_high)


def _block_nanmean(planes: NDArray[np.float32], factor: int) -> NDArray[np.float32]:
    """NaN-aware ``factor x factor`` block mean of ``(nc, ny, nx)`` float32 planes (numpy).

    The ragged edge is dropped; a block without a finite sample is NaN (as the
    ``_block_mean`` kernel; sums in float64).
    """
    nc, ny, nx = planes.shape
    oy, ox = ny // factor, nx // factor
    blocks = planes[:, :oy * factor, :ox * factor].reshape(nc, oy, factor, ox, factor)
    valid = np.isfinite(blocks)
    total = np.where(valid, blocks, 0.0).sum(axis=(2, 4), dtype=np.float64)
    num = valid.sum(axis=(2, 4))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / num).astype(np.float32)


class WarmupBuffer:
    """The frames a ``kappa_sigma`` stack holds until its warm-up replay.

    The frames live in one buffer of ``max(K, 4)`` float32 planes, NaN outside each
    frame's footprint (so no footprint masks are kept), allocated with the first frame.

    Parameters
    ----------
    planes : tuple of int
        ``(nc, ny, nx)`` of the stack's state.
    config : StackConfig
        The stack's configuration (``warmup_frames``, ``prior_frames``, kappas).
    """

    def __init__(self, planes: tuple[int, int, int], config: StackConfig) -> None:
        self.planes = planes
        self.config = config
        self._buffer: NDArray[np.float32] | None = None
        self._weights: list[float] = []
        self._noise_sq: list[NDArray[np.float64]] = []

    def __len__(self) -> int:
        """Frames held."""
        return len(self._weights)

    @property
    def full(self) -> bool:
        """True once ``warmup_frames`` frames are held (time for :meth:`finish`)."""
        return len(self._weights) >= self.config.warmup_frames

    @property
    def nbytes(self) -> int:
        """Bytes of the frame buffer (0 before the first frame)."""
        return 0 if self._buffer is None else self._buffer.nbytes

    def _allocate(self) -> NDArray[np.float32]:
        n_planes = max(self.config.warmup_frames, 4)
        self._buffer = np.empty((n_planes, *self.planes), dtype=np.float32)
        return self._buffer

    def hold(self, img: NDArray[np.float32], fp: NDArray[np.bool_], weight: float,
             noise_sq: NDArray[np.float64]) -> None:
        """Keep one frame: ``img`` (nc, ny, nx) float32, ``fp`` (ny, nx) bool, checked."""
        from livestack.pipeline import kernels_accumulate as kern

        buf = self._buffer if self._buffer is not None else self._allocate()
        # NaN marks "not covered" (also for NaN/inf input inside the footprint).
        kern.hold_frame(buf[len(self._weights)], img, fp)
        self._weights.append(weight)
        self._noise_sq.append(noise_sq)

    def sky_level(self) -> NDArray[np.float64]:
        """Median of the held frames per channel (every 8th row and column)."""
        assert self._buffer is not None
        nc = self.planes[0]
        sample = self._buffer[:len(self), :, ::SKY_STEP, ::SKY_STEP]
        sky = np.zeros(nc, dtype=np.float64)
        for c in range(nc):
            values = sample[:, c][np.isfinite(sample[:, c])]
            if values.size:
                sky[c] = float(np.median(values))
        return sky

    def _replay_inputs(self, sky: NDArray[np.float64] | None = None) -> tuple[Any, ...]:
        """``weights, noise_sq, noise_bar_sq, sky, prior_n, coef_lo, coef_hi`` of a replay.

        ``sky`` is :meth:`sky_level`'s result when the caller has it already (a median over
        1/64 of the held pixels: 27 ms of CPU at 26 MP, 4 frames).
        """
        k = len(self)
        weights = np.asarray(self._weights, dtype=np.float64)
        noise_sq = np.asarray(self._noise_sq, dtype=np.float64).reshape(k, self.planes[0])
        coef_lo, coef_hi = clip_coefficients(self.config)
        return (weights, noise_sq, noise_sq.mean(axis=0),
                self.sky_level() if sky is None else sky,
                float(self.config.prior_frames), coef_lo, coef_hi)

    def _replay_into(self, mean: NDArray[np.float32], m2: NDArray[np.float32],
                     wsum: NDArray[np.float32], count: NDArray[np.uint16],
                     rej_lo: NDArray[np.uint16], rej_hi: NDArray[np.uint16],
                     packed: bool = False,
                     sky: NDArray[np.float64] | None = None) -> tuple[int, int]:
        """Run the warm-up seeding kernel from the held frames into the given planes.

        With ``packed`` the three counters go packed into ``rej_hi`` (see
        :func:`kernels_accumulate.replay_warmup`) and ``count``/``rej_lo`` are untouched.
        ``sky``: :meth:`sky_level`, if the caller has it.
        """
        from livestack.pipeline import kernels_accumulate as kern

        assert self._buffer is not None
        nc, ny, _ = self.planes
        rows = np.zeros((nc * ny, 2), dtype=np.int64)
        replay: Any = kern.replay_warmup  # a numba dispatcher; mypy cannot see *args
        replay(self._buffer, len(self), *self._replay_inputs(sky),
               mean, m2, wsum, count, rej_lo, rej_hi, rows, packed)
        return int(rows[:, 0].sum()), int(rows[:, 1].sum())

    def provisional(self) -> Planes:
        """The state a warm-up replay of the frames held so far gives, in new arrays.

        Returns
        -------
        tuple of ndarray
            ``(mean, m2, wsum, count, rej_lo, rej_hi)``, each (nc, ny, nx); all zero
            while no frame is held.
        """
        p = self.planes
        out = (np.zeros(p, np.float32), np.zeros(p, np.float32), np.zeros(p, np.float32),
               np.zeros(p, np.uint16), np.zeros(p, np.uint16), np.zeros(p, np.uint16))
        if self._weights:
            self._replay_into(*out)
        return out

    def preview(self, factor: int) -> NDArray[np.float32]:
        """The provisional mean block-averaged by ``factor``, ``(nc, ny // f, nx // f)``.

        One frame: its NaN-aware block mean in numpy (no replay and no block kernel, so a
        first start's first preview needs no compile). More: the replay band by band. A
        whole-frame provisional replay allocates the full state (18 B/px, 470 MB at
        26 MP) next to the held frames; the replay is row-local, so bands of rows (a
        multiple of ``factor``) give the same blocks with a few MB of scratch. No frame:
        all NaN, as a stack without samples.
        """
        from livestack.pipeline import kernels_accumulate as kern
        from livestack.pipeline.kernels_binning import block_mean_counted

        nc, ny, nx = self.planes
        if self._buffer is None:
            return np.full((nc, ny // factor, nx // factor), np.nan, dtype=np.float32)
        if len(self) == 1:
            return _block_nanmean(self._buffer[0], factor)
        k = len(self)
        inputs = self._replay_inputs()
        replay: Any = kern.replay_warmup  # a numba dispatcher; mypy cannot see *args
        band = factor * max(1, math.ceil(_PREVIEW_BAND_ROWS / factor))
        parts = []
        for y0 in range(0, ny, band):
            y1 = min(ny, y0 + band)
            frames = np.ascontiguousarray(self._buffer[:k, :, y0:y1, :])
            shape = (nc, y1 - y0, nx)
            mean, m2, wsum = (np.empty(shape, np.float32) for _ in range(3))
            count, rej_lo, rej_hi = (np.empty(shape, np.uint16) for _ in range(3))
            rows = np.zeros((nc * (y1 - y0), 2), dtype=np.int64)
            replay(frames, k, *inputs, mean, m2, wsum, count, rej_lo, rej_hi, rows, False)
            parts.append(block_mean_counted(mean, count, factor))
        return np.concatenate(parts, axis=1)

    def finish(self) -> tuple[NDArray[np.float64], Planes, tuple[int, int]]:
        """Replay the held frames into the stack's state, reusing the buffer's memory.

        Returns
        -------
        sky : ndarray, shape (nc,), float64
            The held frames' sky level (gates the structure branch from now on).
        planes : tuple of ndarray
            ``(mean, m2, wsum, count, rej_lo, rej_hi)``: with a 4-plane buffer, views
            into it (only ``rej_hi`` is new), else new arrays.
        counts : tuple of int
            Samples rejected low / high over the whole replay.

        The buffer then empties: this object holds no frame afterwards.
        """
        from livestack.pipeline import kernels_accumulate as kern

        assert self._buffer is not None
        buf = self._buffer
        planes = self.planes
        sky = self.sky_level()
        if buf.shape[0] == 4:
            # Planes 0-2 become mean/m2/wsum in place (pixel-local aliasing). Plane 3 still
            # holds frame data other rows need during the replay, so the counters travel
            # packed in the new rej_hi plane and move into plane 3 afterwards, as two
            # contiguous uint16 planes (contiguous state keeps add_clip vectorised).
            mean, m2, wsum = buf[0], buf[1], buf[2]
            rej_hi = np.empty(planes, dtype=np.uint16)
            counts = self._replay_into(mean, m2, wsum, rej_hi, rej_hi, rej_hi, packed=True,
                                       sky=sky)
            u16 = buf[3].reshape(-1).view(np.uint16)
            size = u16.size // 2
            count, rej_lo = u16[:size].reshape(planes), u16[size:].reshape(planes)
            kern.unpack_counters(rej_hi, count, rej_lo)
        else:
            # Larger warm-ups: a fresh state, then the (bigger) buffer is freed.
            mean, m2, wsum = (np.empty(planes, np.float32), np.empty(planes, np.float32),
                              np.empty(planes, np.float32))
            count, rej_lo, rej_hi = (np.empty(planes, np.uint16), np.empty(planes, np.uint16),
                                     np.empty(planes, np.uint16))
            counts = self._replay_into(mean, m2, wsum, count, rej_lo, rej_hi, sky=sky)
        self._buffer = None
        self._weights = []
        self._noise_sq = []
        return sky, (mean, m2, wsum, count, rej_lo, rej_hi), counts

    # ------------------------------------------------------------- persistence
    def state(self, *, copy: bool = True) -> dict[str, NDArray[Any]]:
        """The held frames as :meth:`RunningStack.state` records them during warm-up.

        Parameters
        ----------
        copy : bool
            False returns the buffer's planes themselves (valid until the next frame).

        Returns
        -------
        dict of str to ndarray
            ``warm_frames`` (k, nc, ny, nx) float32 with NaN outside footprints,
            ``warm_weights`` (k,) float64, ``warm_noise_sq`` (k, nc) float64.
        """
        k = len(self)
        frames = (self._buffer[:k] if self._buffer is not None
                  else np.empty((0, *self.planes), dtype=np.float32))
        return {"warm_frames": frames.copy() if copy else frames,
                "warm_weights": np.asarray(self._weights, dtype=np.float64),
                "warm_noise_sq": np.asarray(self._noise_sq,
                                            dtype=np.float64).reshape(k, self.planes[0])}

    @classmethod
    def from_state(cls, state: dict[str, NDArray[Any]], planes: tuple[int, int, int],
                   config: StackConfig) -> WarmupBuffer:
        """Rebuild the held frames from :meth:`state` output.

        Raises
        ------
        KeyError
            If a required array is missing.
        ValueError
            If the frames do not match ``planes`` or are not fewer than ``warmup_frames``.
        """
        frames = np.asarray(state["warm_frames"], dtype=np.float32)
        k = frames.shape[0]
        if frames.shape[1:] != planes:
            raise ValueError(f"warm_frames shape {frames.shape} does not match {planes}")
        if k >= config.warmup_frames:
            raise ValueError(f"state holds {k} warm-up frames but warmup_frames is "
                             f"{config.warmup_frames}")
        held = cls(planes, config)
        if k:
            held._allocate()[:k] = frames
        held._weights = [float(w) for w in np.asarray(state["warm_weights"])]
        noise = np.asarray(state["warm_noise_sq"], dtype=np.float64).reshape(k, planes[0])
        held._noise_sq = [row.copy() for row in noise]
        return held

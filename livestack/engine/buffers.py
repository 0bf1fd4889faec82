"""Full-frame buffers handed out again, frame after frame, once nothing holds them.

Every 26 MP frame used to allocate its file's bytes (52 MB), its decoded image (104 MB) and
its warp output afresh; the kernel then faults in and zeroes that memory (and, with
transparent huge pages in ``madvise`` mode, may compact for them), which showed as 35-130 ms
of system time per frame (``bench/bench_frame_account.py``). :class:`BufferPool` keeps those
arrays and hands the same memory out again to the next frame.

Safety: an array is handed out again only when the pool's own reference is the only one
left (``sys.getrefcount``). Every numpy view keeps its base alive (numpy points a view's
``base`` at the array that owns the memory), and so do a ``memoryview`` and an array made
by ``np.frombuffer`` on it, so a frame still referenced anywhere (the reference frame, a
preview, a writer thread, an exception's traceback) keeps its buffer out of the pool; the
pool then allocates a new one. Nothing has to hand a buffer back.

The memory is kept as plain byte *arenas*: a request takes the smallest free arena that is
large enough, whatever its dtype was before. The file's bytes are the exception
(:meth:`BufferPool.transient`): they take the *largest* free arena, the warp output's, and
are dropped once decoded, so the warp output (requested after that) gets its own arena back.
File bytes and warp output thus share one arena, and a colour frame's mosaic keeps an
arena of its own size instead of taking the three-plane warp output's (which made the pool
keep two of those: 313 MB more at a 26 MP colour frame's peak than fresh allocations).

The pool belongs to the engine's worker (the ingest): it is not thread-safe, and the
numeric pipeline only ever sees its :meth:`BufferPool.empty` as an ``np.empty`` stand-in.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

if TYPE_CHECKING:
    from livestack.pipeline.types import Allocator

#: Requests below this size get a plain ``np.empty``: malloc recycles small blocks itself,
#: and glibc serves blocks above its mmap threshold (32 MiB at most) with fresh pages.
MIN_POOLED_BYTES = 4 * 1024 * 1024

#: At most this many arenas are kept. A mono frame uses up to seven at once: the file's
#: bytes then the warp image (one arena), the decoded frame, the warp footprint, and the
#: saturation maps (the raw mask, the clamp's seeds and flags, the warped mask).
MAX_ARENAS = 8



def _refcount(items: list[Any], index: int) -> int:
    """``sys.getrefcount`` of ``items[index]``; the same call measures the baseline."""
    return sys.getrefcount(items[index])


#: What :func:`_refcount` reports for an object only its list holds (2 on CPython 3.10-3.13:
#: the list and the call's argument). Measured rather than assumed: an interpreter that
#: counts one reference fewer must not make a held arena look free.
_FREE_REFCOUNT = _refcount([object()], 0)


class BufferPool:
    """Recycles large arrays whose last user has dropped them.

    Parameters
    ----------
    max_arenas : int
        Most arenas kept at once; a request beyond it, with none free, gets a plain
        ``np.empty`` that is not kept.
    min_bytes : int
        Requests smaller than this are not pooled.

    Attributes
    ----------
    allocated : int
        Arenas allocated so far (tests and benches watch it stop growing).
    reused : int
        Requests served from a free arena.
    """

    def __init__(self, max_arenas: int = MAX_ARENAS, min_bytes: int = MIN_POOLED_BYTES) -> None:
        self.max_arenas = max_arenas
        self.min_bytes = min_bytes
        self._arenas: list[NDArray[np.uint8]] = []
        self.allocated = 0
        self.reused = 0

    def empty(self, shape: int | tuple[int, ...], dtype: DTypeLike = np.float32
              ) -> NDArray[Any]:
        """An uninitialised C-contiguous array, like ``np.empty(shape, dtype)``.

        Parameters
        ----------
        shape : int or tuple of int
        dtype : dtype-like

        Returns
        -------
        ndarray
            Writeable, C-contiguous, aligned; its contents are garbage (possibly another
            frame's pixels). It may be a view of a pooled arena: it goes back to the pool
            by itself when the last reference to it (and to any view of it) is dropped.
        """
        return self._get(shape, dtype, largest=False)

    def transient(self, shape: int | tuple[int, ...], dtype: DTypeLike = np.uint8
                  ) -> NDArray[Any]:
        """Like :meth:`empty`, for an array dropped early in the frame (the file's bytes).

        It is served from the *largest* free arena rather than the smallest that fits:
        that arena belongs to the frame's largest buffer, which is requested late (the
        warp output) and finds it free again by then. With the smallest fit, a colour
        frame's bytes (52 MB at 26 MP) took the mosaic's arena (104 MB), the mosaic then
        took the three-plane warp output's (313 MB) and the warp a second one of those:
        313 MB more at the frame's peak than without a pool.

        Parameters
        ----------
        shape : int or tuple of int
        dtype : dtype-like

        Returns
        -------
        ndarray
            As :meth:`empty`.
        """
        return self._get(shape, dtype, largest=True)

    def at_least(self, min_bytes: int) -> Allocator:
        """An allocator that pools only requests of ``min_bytes`` or more (and this pool's
        own minimum); smaller ones get a plain ``np.empty``.

        Parameters
        ----------
        min_bytes : int

        Returns
        -------
        Allocator
            Called as ``empty(shape, dtype)``, like :meth:`empty`.
        """
        def empty(shape: tuple[int, ...], dtype: DTypeLike, /) -> NDArray[Any]:
            return self._get(shape, dtype, largest=False, min_bytes=min_bytes)

        return empty

    def _get(self, shape: int | tuple[int, ...], dtype: DTypeLike, *, largest: bool,
             min_bytes: int = 0) -> NDArray[Any]:
        dt = np.dtype(dtype)
        dims = (int(shape),) if isinstance(shape, int | np.integer) else tuple(
            int(s) for s in shape)
        nbytes = math.prod(dims) * dt.itemsize
        if nbytes < max(self.min_bytes, min_bytes) or dt.hasobject:
            return np.empty(dims, dtype=dt)
        arena = self._take(nbytes, largest)
        if arena is None:
            return np.empty(dims, dtype=dt)
        return arena[:nbytes].view(dt).reshape(dims)

    def _take(self, nbytes: int, largest: bool) -> NDArray[np.uint8] | None:
        free = [i for i in range(len(self._arenas)) if self._is_free(i)]
        fits = [i for i in free if self._arenas[i].nbytes >= nbytes]
        if fits:
            self.reused += 1
            pick = max if largest else min
            return self._arenas[pick(fits, key=lambda i: self._arenas[i].nbytes)]
        # A free arena too small for this request is dropped: its memory goes back to the
        # system now rather than lingering next to the new one (the first frame reads its
        # file's bytes into an exact-size arena; the warp output needs a larger one).
        for i in sorted(free, reverse=True):
            del self._arenas[i]
        if len(self._arenas) >= self.max_arenas:
            return None
        arena = np.empty(nbytes, dtype=np.uint8)
        self._arenas.append(arena)
        self.allocated += 1
        return arena

    def _is_free(self, index: int) -> bool:
        return _refcount(self._arenas, index) <= _FREE_REFCOUNT

    def in_use(self) -> int:
        """How many arenas something outside the pool still references."""
        return sum(not self._is_free(i) for i in range(len(self._arenas)))

    def held_bytes(self) -> int:
        """Bytes of all arenas the pool keeps (free or in use)."""
        return sum(a.nbytes for a in self._arenas)

    def idle_bytes(self) -> int:
        """Bytes of the free arenas: memory the pool keeps that nothing uses now."""
        return sum(self._arenas[i].nbytes for i in range(len(self._arenas))
                   if self._is_free(i))

    def release(self) -> None:
        """Let go of every arena: free ones return to the system now, used ones when their
        users drop them. Called when no frame waits (the idle writes and solves then peak
        without the frame buffers)."""
        self._arenas.clear()


__all__ = ["MAX_ARENAS", "MIN_POOLED_BYTES", "BufferPool"]

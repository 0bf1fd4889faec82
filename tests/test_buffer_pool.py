"""The engine's buffer pool: memory handed out again only when nothing else holds it.

Unit tests of :class:`livestack.engine.buffers.BufferPool`, then the engine with a pool
that pools the small test frames (``min_bytes=0``): the stacks are bit-identical to an
engine that never pools, per-frame failures keep their reasons, and a frame something
still holds is never overwritten by a later one. The bit-identity tests also run with a
pool that hands every buffer out poisoned (not zeros, not the last frame's pixels): a step
that reads pooled memory before writing it (``np.empty`` read as ``np.zeros``) would then
change the stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from livestack.engine import buffers
from livestack.engine.buffers import BufferPool
from livestack.engine.core import Engine
from livestack.pipeline import session as session_mod
from livestack.sim import SimConfig, write_sequence
from tests.daemon_helpers import copy_frames, frames, last_row, make_config

__all__ = ["frames"]  # the module-scoped fixture, from tests.daemon_helpers

MB = 1 << 20


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


# ------------------------------------------------------------------------ the pool


def test_a_dropped_array_is_handed_out_again_with_any_dtype_and_shape() -> None:
    pool = BufferPool(min_bytes=0)
    a = pool.empty((512, 1024), np.float32)
    assert a.shape == (512, 1024) and a.dtype == np.float32
    assert a.flags.c_contiguous and a.flags.writeable and a.flags.aligned
    where = _address(a)
    del a
    b = pool.empty((2 * MB,), np.uint8)  # half the bytes, another dtype: the same memory
    assert _address(b) == where and b.shape == (2 * MB,) and b.dtype == np.uint8
    assert (pool.allocated, pool.reused) == (1, 1)


@pytest.mark.parametrize("holder", ["array", "view", "memoryview", "frombuffer", "traceback"])
def test_memory_still_referenced_is_never_handed_out(holder: str) -> None:
    pool = BufferPool(min_bytes=0)
    a = pool.empty((256, 256), np.float32)
    a[...] = np.arange(a.size, dtype=np.float32).reshape(a.shape)
    expected = a.copy()
    kept: Any
    if holder == "array":
        kept = a
    elif holder == "view":
        kept = a[10:20, ::3]  # a view keeps its base (the pool's arena) alive
        expected = expected[10:20, ::3]
    elif holder == "memoryview":
        kept = a.data
    elif holder == "frombuffer":
        kept = np.frombuffer(a.data, dtype=np.float32).reshape(a.shape)
    else:
        def fails(frame: np.ndarray) -> None:
            raise ValueError("a frame error whose traceback holds the frame")

        try:
            fails(a)
        except ValueError as exc:
            kept = exc  # its traceback's frame holds ``frame``
    del a
    b = pool.empty((256, 256), np.float32)
    b.fill(-1.0)
    if holder == "traceback":
        held = kept.__traceback__.tb_next.tb_frame.f_locals["frame"]
        np.testing.assert_array_equal(held, expected)
    else:
        np.testing.assert_array_equal(np.asarray(kept, dtype=np.float32).reshape(
            expected.shape), expected)
    assert pool.allocated == 2 and pool.reused == 0 and pool.in_use() == 2
    del kept
    if holder == "traceback":
        del held
    assert pool.in_use() == 1  # only ``b`` now


def test_small_requests_the_cap_and_release() -> None:
    pool = BufferPool(max_arenas=2, min_bytes=MB)
    small = pool.empty((100,), np.float64)
    assert pool.allocated == 0 and small.shape == (100,)
    a, b = pool.empty((MB,), np.uint8), pool.empty((MB,), np.uint8)
    c = pool.empty((MB,), np.uint8)  # over the cap, none free: plain memory, not kept
    assert pool.allocated == 2 and pool.held_bytes() == 2 * MB
    assert not np.may_share_memory(c, a) and not np.may_share_memory(c, b)
    del a
    # A free arena too small for a request is let go (the memory returns to the system).
    big = pool.empty((3 * MB,), np.uint8)
    assert pool.held_bytes() == 4 * MB and pool.allocated == 3
    pool.release()
    assert pool.held_bytes() == 0
    big[...] = 7  # still usable by its holder
    assert int(big[-1]) == 7 and int(b.sum()) >= 0 and c.size == MB


def test_the_smallest_free_arena_that_fits_is_taken() -> None:
    pool = BufferPool(min_bytes=0)
    large, small = pool.empty((4 * MB,), np.uint8), pool.empty((MB,), np.uint8)
    where_large, where_small = _address(large), _address(small)
    del large, small
    assert _address(pool.empty((MB // 2,), np.uint8)) == where_small
    assert _address(pool.empty((2 * MB,), np.uint8)) == where_large


def test_at_least_pools_only_the_large_requests() -> None:
    pool = BufferPool(min_bytes=0)
    empty = pool.at_least(2 * MB)
    small = empty((MB,), np.uint8)
    assert pool.allocated == 0 and small.shape == (MB,)
    large = empty((MB,), np.float32)  # 4 MiB
    assert pool.allocated == 1 and large.dtype == np.float32
    where = _address(large)
    del large
    assert _address(pool.empty((MB,), np.float32)) == where  # the same arena, pooled


def test_the_free_reference_count_is_measured_on_this_interpreter() -> None:
    probe = [np.empty(8, np.uint8)]
    held = probe[0]
    assert buffers._refcount(probe, 0) == buffers._FREE_REFCOUNT + 1
    del held
    assert buffers._refcount(probe, 0) == buffers._FREE_REFCOUNT


# ------------------------------------------------------------------------ the engine


class PoisonPool(BufferPool):
    """A pool whose arrays come filled with garbage (3e30, True, the integer maximum)."""

    def empty(self, shape: Any, dtype: Any = np.float32) -> np.ndarray:
        out = super().empty(shape, dtype)
        dt = np.dtype(dtype)
        if dt.kind == "f":
            out.fill(3.0e30)
        elif dt.kind == "b":
            out.fill(True)
        else:
            out.fill(np.iinfo(dt).max)
        return out


POOLS = pytest.mark.parametrize("pool_type", [BufferPool, PoisonPool], ids=["pool", "poison"])


def _stack(tmp_path: Path, paths: list[Path], pool: BufferPool
           ) -> tuple[Engine, np.ndarray, list[int]]:
    engine = Engine(make_config(tmp_path, checkpoint_every_frames=2), tmp_path / "stacks")
    engine.ingest.buffers = pool
    allocated = []  # the pool's count of arenas after each frame
    for path in paths:
        engine.process_path(path)
        allocated.append(pool.allocated)
    engine.finalize()
    (rt,) = engine.runtimes.values()
    with fits.open(rt.folder / "stack.fits") as hdul:
        image = np.array(hdul[0].data)
    return engine, image, allocated


def _bad_frames(folder: Path, good: Path) -> dict[str, Path]:
    blob = good.read_bytes()
    bad = {"truncated": folder / "truncated.fits", "not_fits": folder / "notes.fits",
           "all_nan": folder / "nan.fits"}
    bad["truncated"].write_bytes(blob[: len(blob) // 2])
    bad["not_fits"].write_bytes(b"observing log, not a FITS file\n" * 200)
    hdu = fits.PrimaryHDU(np.full((192, 256), np.nan, np.float32))
    hdu.header["IMAGETYP"] = "Light Frame"
    hdu.writeto(bad["all_nan"])
    return bad


@POOLS
def test_pooled_buffers_give_a_bit_identical_stack_and_keep_failure_reasons(
        tmp_path: Path, frames: list[Path], pool_type: type[BufferPool]) -> None:
    results = {}
    for name, pool in (("fresh", BufferPool(min_bytes=1 << 62)),  # never pools
                       ("pooled", pool_type(min_bytes=0))):
        good = copy_frames(frames[:6], tmp_path / name / "in")
        bad = _bad_frames(tmp_path / name / "in", good[0])
        order = [good[0], bad["truncated"], good[1], bad["all_nan"], good[2], good[3],
                 bad["not_fits"], good[4], good[5]]
        engine, image, allocated = _stack(tmp_path / name, order, pool)
        rows = [last_row(engine, p) for p in order]
        results[name] = (image, [(Path(r.path).name, r.status, r.reason, r.weight,
                                  r.transform) for r in rows])
        assert {r.reason for r in rows if r.status == "failed"} == set(bad)
        engine.close()
        if name == "pooled":
            # Reused frame after frame: the last good frames allocate nothing new (the
            # odd-sized failures before them each took an arena of their own size).
            assert allocated[-1] == allocated[-3] and pool.reused >= 3 * 6 - 4, \
                (allocated, pool.reused)
        else:
            assert pool.allocated == 0
    assert results["pooled"][0].tobytes() == results["fresh"][0].tobytes()
    assert results["pooled"][1] == results["fresh"][1]


def test_bayer_frames_through_a_poisoned_pool_stack_bit_identically(tmp_path: Path) -> None:
    lights = write_sequence(tmp_path / "lights", SimConfig(
        width=256, height=192, bayer_pattern="RGGB", drift_px_per_frame=(1.3, 0.7)),
        seed=11, n_frames=5)
    images = {}
    for name, pool in (("fresh", BufferPool(min_bytes=1 << 62)),
                       ("poison", PoisonPool(min_bytes=0))):
        good = copy_frames(lights, tmp_path / name / "in")
        engine, images[name], _ = _stack(tmp_path / name, good, pool)
        assert all(last_row(engine, p).status == "accepted" for p in good)
        engine.close()
    assert images["poison"].ndim == 3
    assert images["poison"].tobytes() == images["fresh"].tobytes()


def test_a_frame_still_held_is_not_overwritten_by_later_frames(
        tmp_path: Path, frames: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # Something keeps every raw frame and every warped frame past its end (as a preview,
    # a writer thread or a stored traceback could): later frames must get other memory.
    held: list[tuple[np.ndarray, np.ndarray]] = []  # (the array, its copy at its end)
    warped: list[np.ndarray] = []
    real_process = session_mod.StackSession.process
    real_register = session_mod.register

    def keeping_register(*args: Any, **kwargs: Any) -> Any:
        done = real_register(*args, **kwargs)
        warped.append(done.warped.image)
        return done

    def keeping_process(self: Any, raw: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        outcome = real_process(self, raw, *args, **kwargs)
        # As the frame ended: calibrated in place, normalised in place.
        held.extend((a, a.copy()) for a in (raw, *warped))
        warped.clear()
        return outcome

    def check() -> None:
        for kept, copy in held:
            assert kept.tobytes() == copy.tobytes()

    monkeypatch.setattr(session_mod.StackSession, "process", keeping_process)
    monkeypatch.setattr(session_mod, "register", keeping_register)
    good = copy_frames(frames[:5], tmp_path / "in")
    pool = BufferPool(min_bytes=0)
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    engine.ingest.buffers = pool
    for path in good:
        engine.process_path(path)
        check()
    assert all(last_row(engine, p).status == "accepted" for p in good)
    engine.close()
    assert len(held) == 2 * len(good)
    for i, (a, _) in enumerate(held):  # no held frame's memory was handed out again
        assert not any(np.may_share_memory(a, b) for b, _ in held[i + 1:])


@POOLS
def test_saturated_frames_through_pooled_masks_stack_bit_identically(
        pool_type: type[BufferPool]) -> None:
    # Flat-topped stars: the raw saturation mask, the clamp's seeds and flags and the
    # warped mask all come from the pool (the simulated frames above have none).
    from livestack.pipeline.session import PipelineConfig, StackSession
    from livestack.sim.saturated import SaturatedSky

    sky = SaturatedSky(seed=3)
    pool = pool_type(min_bytes=0)
    sessions = {name: StackSession(name, PipelineConfig()) for name in ("fresh", "pooled")}
    for index in range(6):
        for name, session in sessions.items():
            outcome = session.process(
                sky.frame(index), sky.info(index), None,
                stored_transform=sky.transform(index) if index else None,
                scratch=pool.empty if name == "pooled" else None)
            assert outcome.verdict == "accepted", outcome.message
        assert pool.in_use() == 0  # nothing keeps a frame's buffers past its end
    # Per frame after the reference: the raw mask, the warp image and footprint, the
    # clamp's seeds and flags and the warped mask (it takes the seeds' memory): 5 arenas.
    assert pool.allocated <= 6 and pool.reused >= 5 * 6 - 3, (pool.allocated, pool.reused)
    fresh, pooled = (s.product().image for s in sessions.values())
    assert pooled.tobytes() == fresh.tobytes()


@pytest.mark.parametrize("colour", [False, True], ids=["mono", "colour"])
def test_the_file_bytes_borrow_the_warp_arena_so_nothing_idles_at_the_peak(
        colour: bool) -> None:
    # One frame's requests in the ingest's order, 1 MiB per 26 MP bool plane: the file's
    # bytes (transient), the decoded frame, the raw mask; the bytes are dropped once
    # decoded; the warp output (three planes for colour), its footprint, the clamp's
    # flags and seeds. With the smallest fit, a colour frame's bytes took the mosaic's
    # arena, the mosaic the warp's and the warp a second warp-sized arena.
    pool = BufferPool(min_bytes=0)
    planes = 3 if colour else 1
    for frame in range(4):
        data = pool.transient((2 * MB + 1,), np.uint8)
        decoded = pool.empty((MB,), np.float32)
        mask = pool.empty((MB,), np.bool_)
        held = [decoded] if colour else [decoded, mask]  # colour: the debayered mask is new
        del data, mask
        warp = pool.empty((planes, MB), np.float32)
        held += [warp, *(pool.empty((MB,), dt) for dt in (np.bool_, np.uint8, np.uint8))]
        # At the frame's peak every arena the pool keeps is in use.
        assert pool.idle_bytes() == 0, frame
        assert pool.held_bytes() == sum(a.nbytes for a in held), frame
        del decoded, warp, held
        if frame == 0:
            first = pool.allocated
    assert pool.allocated == first == 7  # none after the first frame


def test_a_colour_stack_keeps_one_warp_sized_arena(tmp_path: Path) -> None:
    # The engine's own order of requests for Bayer frames: the file's bytes must not push
    # the mosaic into the three-plane warp output's arena (which made the pool keep two).
    ny, nx = 192, 256
    lights = write_sequence(tmp_path / "lights", SimConfig(
        width=nx, height=ny, bayer_pattern="RGGB", drift_px_per_frame=(1.3, 0.7)),
        seed=11, n_frames=5)
    pool = BufferPool(min_bytes=0)
    engine = Engine(make_config(tmp_path), tmp_path / "stacks")
    engine.ingest.buffers = pool
    held = []
    for path in copy_frames(lights, tmp_path / "in"):
        assert engine.process_path(path) is not None
        held.append(pool.held_bytes())
    assert len(engine.journal.rows(status="accepted")) == 5
    engine.close()
    warp, mosaic = 3 * ny * nx * 4, ny * nx * 4
    # The warp output (the file's bytes before it) and the mosaic, nothing twice; a
    # colour frame's byte maps are not pooled (Ingest._scratch).
    assert held[-1] == warp + mosaic, held
    assert held[-1] == held[-2] == held[-3], held

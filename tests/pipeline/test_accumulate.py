"""Tests of the online outlier-rejecting stack on synthetic, already aligned frames.

Frames are built here (not with livestack.sim): a smooth sky plus Gaussian stars,
Poisson (gain 1 e-/ADU) plus 5 ADU read noise, seeded.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.stats import sigma_clip
from numpy.typing import NDArray

from livestack.pipeline.accumulate import STATE_BYTES_PER_PIXEL, RunningStack, StackConfig
from livestack.pipeline.normalize import frame_stats

READ_NOISE = 5.0


class Scene:
    """A fixed sky: smooth background and stars; frames differ by seeing and noise."""

    def __init__(self, rng: np.random.Generator, ny: int = 256, nx: int = 256,
                 n_stars: int = 80) -> None:
        self.ny, self.nx = ny, nx
        y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
        self.sky = 800.0 + 60.0 * x / nx + 40.0 * y / ny
        self.xy = np.column_stack([rng.uniform(6, nx - 6, n_stars),
                                   rng.uniform(6, ny - 6, n_stars)])
        self.flux = 10 ** rng.uniform(2.5, 5.5, n_stars)

    def expected(self, fwhm_px: float = 3.0) -> NDArray[np.float64]:
        img = self.sky.copy()
        sig = fwhm_px / 2.3548
        r = int(np.ceil(4 * sig)) + 1
        for (x0, y0), f in zip(self.xy, self.flux, strict=True):
            ix, iy = round(x0), round(y0)
            xs = np.arange(max(ix - r, 0), min(ix + r + 1, self.nx))
            ys = np.arange(max(iy - r, 0), min(iy + r + 1, self.ny))
            g = np.exp(-((xs[None, :] - x0) ** 2 + (ys[:, None] - y0) ** 2) / (2 * sig * sig))
            img[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] += f * g / (2 * np.pi * sig * sig)
        return img

    @staticmethod
    def observe(rng: np.random.Generator, expected: NDArray[np.float64]) -> NDArray[np.float32]:
        counts = rng.poisson(np.maximum(expected, 0.0)).astype(np.float64)
        return (counts + rng.normal(0.0, READ_NOISE, expected.shape)).astype(np.float32)


def naive_online_clip(frames: list[NDArray[np.float32]], kappa: float = 3.0,
                      min_n: int = 4) -> tuple[int, int]:
    """Textbook online kappa-sigma: test against the running mean/std, from the 5th frame."""
    n = np.zeros(frames[0].shape)
    m = np.zeros(frames[0].shape)
    s = np.zeros(frames[0].shape)
    lo_total = hi_total = 0
    for i, frame in enumerate(frames):
        x = frame.astype(np.float64)
        std = np.sqrt(s / np.maximum(n - 1, 1))
        d = x - m
        tested = n >= min_n
        lo = tested & (d < -kappa * std)
        hi = tested & (d > kappa * std)
        acc = ~(lo | hi)
        n_new = n + acc
        m_new = np.where(acc, m + d / np.maximum(n_new, 1), m)
        s = np.where(acc, s + d * (x - m_new), s)
        n, m = n_new, m_new
        if i >= min_n:
            lo_total += int(lo.sum())
            hi_total += int(hi.sum())
    return lo_total, hi_total


def stack_frames(frames: list[NDArray[np.float32]],
                 footprints: list[NDArray[np.bool_]] | None = None,
                 config: StackConfig | None = None,
                 weights: list[float] | None = None) -> tuple[RunningStack, list[tuple[int, int]]]:
    shape = frames[0].shape
    stack = RunningStack(shape, config or StackConfig())
    out = []
    for i, frame in enumerate(frames):
        fp = np.ones(shape[-2:], bool) if footprints is None else footprints[i]
        noise = frame_stats(frame, fp).noise_adu
        out.append(stack.add(np.where(fp, frame, 0).astype(np.float32), fp,
                             1.0 if weights is None else weights[i], noise))
    return stack, out


# ----------------------------------------------------------------- rejection quality
def test_false_rejection_on_clean_frames_with_seeing_jitter() -> None:
    rng = np.random.default_rng(11)
    scene = Scene(rng)
    n_frames = 40
    frames = [scene.observe(rng, scene.expected(3.0 * (1 + 0.1 * rng.standard_normal())))
              for _ in range(n_frames)]
    stack, counts = stack_frames(frames)
    warm = stack.config.warmup_frames
    samples = scene.ny * scene.nx * (n_frames - warm)
    lo = sum(c[0] for c in counts[warm:]) / samples
    hi = sum(c[1] for c in counts[warm:]) / samples
    naive_lo, naive_hi = naive_online_clip(frames)
    naive_samples = scene.ny * scene.nx * (n_frames - 4)
    core = scene.expected() - scene.sky > 200.0
    core_lo = stack.reject_low_map()[core].mean() / n_frames
    core_hi = stack.reject_high_map()[core].mean() / n_frames
    print(f"\nfalse rejection after warm-up: low {lo:.3%} high {hi:.3%} "
          f"(naive online clip: {naive_lo / naive_samples:.2%} / {naive_hi / naive_samples:.2%});"
          f" star cores ({core.sum()} px, all frames): {core_lo:.2%} / {core_hi:.2%}")
    assert lo <= 0.01 and hi <= 0.01
    assert lo <= 0.004 and hi <= 0.004   # about the Gaussian 0.135 % plus star cores
    assert core_lo <= 0.03 and core_hi <= 0.03
    assert naive_lo + naive_hi > 5 * (lo + hi) * naive_samples / samples


def test_pure_gaussian_rejection_rate_is_nominal() -> None:
    rng = np.random.default_rng(3)
    shape = (200, 200)
    stack = RunningStack(shape)
    fp = np.ones(shape, bool)
    lo = hi = 0
    for i in range(30):
        frame = (1000.0 + 30.0 * rng.standard_normal(shape)).astype(np.float32)
        got = stack.add(frame, fp, 1.0, 30.0)
        if i >= stack.config.warmup_frames:
            lo += got[0]
            hi += got[1]
    rate = (lo + hi) / (2 * shape[0] * shape[1] * 26)
    print(f"\npure Gaussian: {rate:.4%} per side (Gaussian tail at 3 sigma: 0.135 %)")
    assert 0.0008 < rate < 0.0022


def test_satellite_trails_vanish() -> None:
    rng = np.random.default_rng(5)
    scene = Scene(rng)
    truth = scene.expected()
    n_frames = 30
    sigma = float(np.sqrt(scene.sky.mean() + READ_NOISE ** 2))
    yy, xx = np.mgrid[0:scene.ny, 0:scene.nx]
    trail_frames = set(rng.choice(n_frames, size=n_frames // 5, replace=False).tolist())
    trail = np.zeros(truth.shape, bool)
    frames = []
    for i in range(n_frames):
        frame = scene.observe(rng, truth)
        if i in trail_frames:
            angle = rng.uniform(0, np.pi)
            x0, y0 = rng.uniform(40, scene.nx - 40, 2)
            on = np.abs((xx - x0) * np.sin(angle) - (yy - y0) * np.cos(angle)) <= 1.0
            frame[on] += np.float32(20.0 * sigma)
            trail |= on
        frames.append(frame)
    stack, _ = stack_frames(frames)
    sigma_stack = sigma / np.sqrt(n_frames)
    online = np.abs(stack.mean() - truth)[trail].mean() / sigma_stack
    plain = np.abs(np.mean(frames, axis=0) - truth)[trail].mean() / sigma_stack
    print(f"\ntrail pixels: mean |stack - truth| = {online:.2f} sigma_stack "
          f"(plain mean {plain:.1f})")
    assert plain > 3.0
    assert online <= 1.0


def test_dithered_hot_pixels_do_not_survive() -> None:
    rng = np.random.default_rng(7)
    scene = Scene(rng)
    truth = scene.expected()
    n_frames, dither = 25, 8
    n_hot = 200
    hot_y = rng.integers(0, scene.ny, n_hot)
    hot_x = rng.integers(0, scene.nx, n_hot)
    hot_adu = 10 ** rng.uniform(2.3, 4.0, n_hot)
    frames, footprints = [], []
    for _ in range(n_frames):
        dx, dy = rng.integers(-dither, dither + 1, 2)
        frame = scene.observe(rng, truth)
        hy, hx = hot_y + dy, hot_x + dx     # sensor defects move with the dither
        inside = (hy >= 0) & (hy < scene.ny) & (hx >= 0) & (hx < scene.nx)
        frame[hy[inside], hx[inside]] += hot_adu[inside].astype(np.float32)
        fp = np.zeros(truth.shape, bool)
        fp[max(dy, 0):scene.ny + min(dy, 0), max(dx, 0):scene.nx + min(dx, 0)] = True
        frames.append(frame)
        footprints.append(fp)
    stack, _ = stack_frames(frames, footprints)
    coverage = np.sum(footprints, axis=0)
    sigma_pix = np.sqrt(truth + READ_NOISE ** 2)
    z = (stack.mean() - truth) / (sigma_pix / np.sqrt(np.maximum(coverage, 1)))
    plain = np.nanmean([np.where(fp, f, np.nan) for f, fp in zip(frames, footprints,
                                                                   strict=True)], axis=0)
    z_plain = (plain - truth) / (sigma_pix / np.sqrt(np.maximum(coverage, 1)))
    print(f"\nhot pixels: max z {np.nanmax(z):.1f} (plain mean: {int((z_plain > 5).sum())} px "
          f"above 5 sigma)")
    assert (z_plain > 5).sum() > 100
    assert np.nanmax(z) < 5.0


def test_stack_noise_matches_sqrt_n_and_batch_sigma_clip() -> None:
    rng = np.random.default_rng(13)
    scene = Scene(rng, 300, 300, 60)
    truth = scene.expected()
    n_frames = 30
    frames = [scene.observe(rng, truth) for _ in range(n_frames)]
    stack, _ = stack_frames(frames)
    background = truth - scene.sky < 0.5
    expected = np.sqrt(truth + READ_NOISE ** 2) / np.sqrt(n_frames)
    online = np.std(((stack.mean() - truth) / expected)[background])
    clipped = sigma_clip(np.array(frames), sigma=3.0, maxiters=5, axis=0)
    batch = np.std(((clipped.mean(axis=0).filled(np.nan) - truth) / expected)[background])
    print(f"\nbackground noise / (sigma/sqrt(N)): online {online:.4f}, "
          f"astropy sigma_clip+mean {batch:.4f}")
    assert abs(online - 1.0) <= 0.05
    assert abs(online / batch - 1.0) <= 0.02


# -------------------------------------------------------------- state and memory
@pytest.mark.parametrize("split", [2, 9])
def test_state_round_trip_is_bit_identical(split: int) -> None:
    rng = np.random.default_rng(17)
    scene = Scene(rng, 64, 96, 10)
    truth = scene.expected()
    frames = [scene.observe(rng, truth) for _ in range(12)]
    frames[6][10:12, :] += 5000.0   # a trail after the warm-up
    fps = [np.ones(truth.shape, bool) for _ in frames]
    fps[3][:, :5] = False
    weights = [1.0 + 0.1 * i for i in range(len(frames))]
    full, counts_full = stack_frames(frames, fps, weights=weights)

    first = RunningStack(truth.shape)
    for f, fp, w in zip(frames[:split], fps[:split], weights[:split], strict=True):
        first.add(np.where(fp, f, 0).astype(np.float32), fp, w, frame_stats(f, fp).noise_adu)
    saved = {k: np.array(v) for k, v in first.state().items()}    # as if via npz
    resumed = RunningStack.from_state(saved, StackConfig())
    counts = []
    for f, fp, w in zip(frames[split:], fps[split:], weights[split:], strict=True):
        counts.append(resumed.add(np.where(fp, f, 0).astype(np.float32), fp, w,
                                  frame_stats(f, fp).noise_adu))
    assert counts == counts_full[split:]
    assert resumed.n_frames == full.n_frames
    for name in ("mean", "weight_map", "count_map", "reject_low_map", "reject_high_map",
                 "std_map"):
        np.testing.assert_array_equal(getattr(resumed, name)(), getattr(full, name)())
    for key, value in full.state().items():
        np.testing.assert_array_equal(resumed.state()[key], value)


def test_state_memory_per_pixel() -> None:
    shape = (120, 160)
    npix = shape[0] * shape[1]
    rng = np.random.default_rng(1)
    stack = RunningStack(shape)
    fp = np.ones(shape, bool)
    nbytes = []
    for _ in range(6):
        stack.add((100 + rng.standard_normal(shape)).astype(np.float32), fp, 1.0, 1.0)
        nbytes.append(stack.state_nbytes() / npix)
    print(f"\nbytes per pixel while adding frames 1..6: {nbytes}")
    assert nbytes[0] == 16.0          # four warm-up planes of float32, nothing else
    assert nbytes[-1] == STATE_BYTES_PER_PIXEL == 18
    assert max(nbytes) <= 24
    state_bytes = sum(v.nbytes for v in stack.state().values())
    assert state_bytes / npix <= 18.1  # the saved state is as compact
    colour = RunningStack((3, *shape))
    for _ in range(5):
        colour.add((100 + rng.standard_normal((3, *shape))).astype(np.float32), fp, 1.0, 1.0)
    assert colour.state_nbytes() / npix == 3 * STATE_BYTES_PER_PIXEL


def test_in_place_warmup_replay_matches_a_fresh_replay() -> None:
    """The state reuses the warm-up buffer; the result must equal a replay into new arrays."""
    rng = np.random.default_rng(2)
    scene = Scene(rng, 50, 70, 8)
    frames = [scene.observe(rng, scene.expected()) for _ in range(4)]
    frames[1][5, :] += 3000.0
    in_place, _ = stack_frames(frames, config=StackConfig(warmup_frames=4))
    held, _ = stack_frames(frames, config=StackConfig(warmup_frames=5))  # still warming up
    for name in ("mean", "weight_map", "count_map", "reject_low_map", "reject_high_map",
                 "std_map"):
        np.testing.assert_array_equal(getattr(in_place, name)(), getattr(held, name)())
    assert in_place.reject_high_map()[5].sum() >= 60


def test_warmup_returns_zero_then_replay_totals() -> None:
    rng = np.random.default_rng(4)
    shape = (40, 50)
    frames = [(500 + 10 * rng.standard_normal(shape)).astype(np.float32) for _ in range(5)]
    frames[0][3, :] += 400.0
    stack, counts = stack_frames(frames)
    assert counts[:3] == [(0, 0)] * 3
    assert counts[3] == (int(stack.reject_low_map().sum()) - counts[4][0],
                         int(stack.reject_high_map().sum()) - counts[4][1])
    assert counts[3][1] >= shape[1]


def test_uncovered_pixels_are_nan_and_late_coverage_is_used() -> None:
    rng = np.random.default_rng(6)
    shape = (30, 40)
    stack = RunningStack(shape)
    fp_left = np.zeros(shape, bool)
    fp_left[:, :20] = True
    for i in range(8):
        fp = fp_left if i < 6 else np.ones(shape, bool)
        frame = (200 + rng.standard_normal(shape)).astype(np.float32)
        stack.add(np.where(fp, frame, 0).astype(np.float32), fp, 1.0, 1.0)
    count = stack.count_map()
    assert (count[:, :20] >= 7).mean() > 0.98 and np.all(count[:, 20:] >= 1)
    assert (count[:, 20:] == 2).mean() > 0.98   # two samples disagree at 3 sigma: 0.27 %
    mean = stack.mean()
    assert np.all(np.isfinite(mean))
    assert np.all(np.abs(mean - 200) < 4)
    lonely = RunningStack(shape, StackConfig(method="mean"))
    lonely.add(np.zeros(shape, np.float32), fp_left, 1.0, 1.0)
    assert np.isnan(lonely.mean()[:, 20:]).all() and not np.isnan(lonely.mean()[:, :20]).any()


@pytest.mark.parametrize("method", ["kappa_sigma", "mean", "sum"])
def test_nan_inside_the_footprint_is_not_a_sample(method: str) -> None:
    rng = np.random.default_rng(12)
    shape = (20, 30)
    stack = RunningStack(shape, StackConfig(method=method))
    fp = np.ones(shape, bool)
    for i in range(7):
        frame = (300 + 3 * rng.standard_normal(shape)).astype(np.float32)
        frame[2, 3] = np.nan if i % 2 else np.inf
        stack.add(frame, fp, 1.0, 3.0)
    assert stack.count_map()[2, 3] == 0 and np.isnan(stack.mean()[2, 3])
    assert np.isfinite(np.delete(stack.mean().ravel(), 2 * 30 + 3)).all()


def test_colour_channels_match_independent_mono_stacks() -> None:
    rng = np.random.default_rng(8)
    scene = Scene(rng, 48, 64, 8)
    truth = scene.expected()
    frames = [np.stack([scene.observe(rng, truth * g) for g in (0.8, 1.0, 1.3)])
              for _ in range(7)]
    frames[5][1, 20, :] += 900.0      # a trail in green only
    colour = RunningStack((3, *truth.shape))
    monos = [RunningStack(truth.shape) for _ in range(3)]
    fp = np.ones(truth.shape, bool)
    for f in frames:
        noise = np.asarray(frame_stats(f, fp).noise_adu)
        colour.add(f, fp, 1.0, noise)
        for c in range(3):
            monos[c].add(f[c], fp, 1.0, float(noise[c]))
    for c in range(3):
        np.testing.assert_array_equal(colour.mean()[c], monos[c].mean())
        np.testing.assert_array_equal(colour.count_map()[c], monos[c].count_map())
    assert colour.reject_high_map()[1, 20].sum() >= 60
    assert colour.weight_map().shape == truth.shape


# ------------------------------------------------------------- mean and sum methods
def test_mean_method_equals_numpy_weighted_mean() -> None:
    rng = np.random.default_rng(9)
    shape = (20, 30)
    frames = [(100 + 10 * rng.standard_normal(shape)).astype(np.float32) for _ in range(6)]
    weights = [0.5, 1.0, 2.0, 1.5, 0.7, 1.2]
    stack, counts = stack_frames(frames, config=StackConfig(method="mean"), weights=weights)
    assert counts == [(0, 0)] * 6
    expected = np.average(np.array(frames, dtype=np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(stack.mean(), expected, rtol=2e-7, atol=0)
    np.testing.assert_allclose(stack.weight_map(), sum(weights), rtol=1e-6)
    var = np.average((np.array(frames) - expected) ** 2, axis=0, weights=weights) * 6 / 5
    np.testing.assert_allclose(stack.std_map(), np.sqrt(var), rtol=1e-4)


def test_sum_method_is_the_sum_of_samples() -> None:
    rng = np.random.default_rng(10)
    shape = (20, 30)
    frames = [(100 + 10 * rng.standard_normal(shape)).astype(np.float32) for _ in range(5)]
    fps = [np.ones(shape, bool) for _ in frames]
    fps[2][:, :10] = False
    stack, _ = stack_frames(frames, fps, config=StackConfig(method="sum"),
                            weights=[2.0, 1.0, 1.0, 3.0, 1.0])
    expected = np.sum([np.where(fp, f, 0.0) for f, fp in zip(frames, fps, strict=True)],
                      axis=0, dtype=np.float64)
    np.testing.assert_allclose(stack.image(), expected, rtol=3e-7)
    np.testing.assert_allclose(stack.mean() * stack.count_map(), expected, rtol=3e-7)
    assert stack.count_map()[0, 0] == 4 and stack.count_map()[0, 15] == 5


@pytest.mark.parametrize("bad", [{"weight": 0.0}, {"weight": float("nan")},
                                 {"noise_adu": 0.0}, {"shape": (10, 11)}])
def test_add_rejects_bad_input(bad: dict[str, object]) -> None:
    stack = RunningStack((10, 10))
    shape = bad.get("shape", (10, 10))
    assert isinstance(shape, tuple)
    with pytest.raises(ValueError):
        stack.add(np.zeros(shape, np.float32), np.ones((10, 10), bool),
                  float(bad.get("weight", 1.0)), float(bad.get("noise_adu", 1.0)))  # type: ignore[arg-type]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="method"):
        StackConfig(method="median")
    with pytest.raises(ValueError, match="kappa"):
        StackConfig(kappa_low=0.0)
    with pytest.raises(ValueError, match="warmup"):
        StackConfig(warmup_frames=0)
    with pytest.raises(ValueError, match="shape"):
        RunningStack((2, 10, 10))


def test_preview_mean_equals_block_average_of_mean() -> None:
    from livestack.pipeline.kernels_binning import block_mean

    rng = np.random.default_rng(17)
    for shape in ((101, 77), (3, 64, 90)):
        stack = RunningStack(shape, StackConfig(method="mean"))
        plane_shape = shape[-2:]
        footprint = np.ones(plane_shape, dtype=bool)
        footprint[:10, :] = False  # a strip no frame covers -> NaN blocks
        for _ in range(3):
            frame = rng.normal(100.0, 5.0, size=shape).astype(np.float32)
            stack.add(np.where(footprint, frame, 0.0).astype(np.float32), footprint, 1.0, 5.0)
        full = stack.mean()
        planes = full.reshape((-1, *plane_shape))
        for size in (40, 200):
            factor = max(1, -(-max(plane_shape) // size))
            expected = block_mean(np.ascontiguousarray(planes), factor)
            got = stack.preview_mean(size).reshape(expected.shape)
            assert np.array_equal(np.isnan(got), np.isnan(expected))
            assert np.allclose(got[~np.isnan(got)], expected[~np.isnan(expected)], rtol=1e-6)


def test_warm_up_preview_replayed_in_bands_equals_the_whole_replay(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import livestack.pipeline.warmup as warmup
    from livestack.pipeline.kernels_binning import block_mean

    monkeypatch.setattr(warmup, "_PREVIEW_BAND_ROWS", 5)  # many bands, a ragged last one
    rng = np.random.default_rng(23)
    for shape in ((101, 77), (3, 64, 90)):
        stack = RunningStack(shape, StackConfig(warmup_frames=5))
        plane_shape = shape[-2:]
        footprint = np.ones(plane_shape, dtype=bool)
        footprint[:, :9] = False
        for i in range(3):  # still warming up: the preview comes from a replay
            frame = rng.normal(100.0, 5.0, size=shape).astype(np.float32)
            if i == 1:
                frame[..., 30, :] += 500.0  # a trail the replay rejects
            stack.add(np.where(footprint, frame, 0.0).astype(np.float32), footprint, 1.0, 5.0)
        planes = stack.mean().reshape((-1, *plane_shape))  # the whole-frame replay
        for size in (40, 200):
            factor = max(1, -(-max(plane_shape) // size))
            expected = block_mean(np.ascontiguousarray(planes), factor)
            got = stack.preview_mean(size).reshape(expected.shape)
            assert np.array_equal(np.isnan(got), np.isnan(expected))
            assert np.allclose(got[~np.isnan(got)], expected[~np.isnan(expected)], rtol=1e-6)
        assert stack.reject_high_map().sum() > 0  # the trail was rejected


@pytest.mark.parametrize("config", [StackConfig(), StackConfig(method="mean")])
def test_the_preview_of_an_empty_stack_is_blank_like_its_mean(config: StackConfig) -> None:
    # Before the first frame (e.g. a daemon asked for a preview at once) there is no
    # warm-up buffer yet: no crash, NaN blocks of the usual shape, as mean() is all NaN.
    stack = RunningStack((3, 50, 81), config)
    assert np.isnan(stack.mean()).all()
    got = stack.preview_mean(40)
    assert got.shape == (3, 50 // 3, 81 // 3) and got.dtype == np.float32
    assert np.isnan(got).all()


# ------------------------------------------------------------ seeding from a batch result
def test_a_stack_seeded_from_batch_maps_continues_like_the_live_one() -> None:
    rng = np.random.default_rng(11)
    scene = Scene(rng)
    truth = scene.expected()
    sigma = float(np.sqrt(scene.sky.mean() + READ_NOISE ** 2))
    frames = [scene.observe(rng, truth) for _ in range(20)]
    yy, xx = np.mgrid[0:scene.ny, 0:scene.nx]
    trail = np.abs(xx - 0.7 * yy - 40.0) <= 1.0
    frames[15][trail] += np.float32(20.0 * sigma)  # a satellite after the seeding
    live, _ = stack_frames(frames[:10])
    noise = np.array([frame_stats(f, None).noise_adu for f in frames[:10]])
    seeded = RunningStack.from_maps(
        StackConfig(), mean=live.mean(), weight=live.weight_map(), count=live.count_map(),
        std=live.std_map(), rejected_low=live.reject_low_map(),
        rejected_high=live.reject_high_map(), n_frames=10, frame_noise_adu=noise)
    # The maps come back as given.
    np.testing.assert_array_equal(seeded.mean(), live.mean())
    np.testing.assert_array_equal(seeded.count_map(), live.count_map())
    np.testing.assert_array_equal(seeded.weight_map(), live.weight_map())
    np.testing.assert_allclose(seeded.std_map(), live.std_map(), rtol=1e-5)
    assert seeded.n_frames == 10
    # Ten more frames (one with a trail) into both: the same rejections, the same image.
    counts_live, counts_seeded = [], []
    for frame in frames[10:]:
        fp = np.ones(frame.shape, bool)
        n = frame_stats(frame, fp).noise_adu
        counts_live.append(live.add(frame, fp, 1.0, n))
        counts_seeded.append(seeded.add(frame, fp, 1.0, n))
    sigma_stack = sigma / np.sqrt(len(frames))
    diff = np.abs(seeded.mean() - live.mean()) / sigma_stack
    print(f"\nseeded vs live after 10 more frames: max {diff.max():.3f}, "
          f"p99.9 {np.quantile(diff, 0.999):.3f} sigma_stack; rejections "
          f"{sum(c[1] for c in counts_seeded)} vs {sum(c[1] for c in counts_live)} high")
    assert np.quantile(diff, 0.999) < 0.05
    assert np.abs(seeded.mean() - truth)[trail].mean() / sigma_stack <= 1.0
    high_live = sum(c[1] for c in counts_live)
    assert abs(sum(c[1] for c in counts_seeded) - high_live) <= 0.05 * high_live


def test_seeding_rejects_mismatched_maps() -> None:
    mean = np.zeros((8, 8), np.float32)
    ok = {"weight": np.ones((8, 8), np.float32), "count": np.ones((8, 8), np.uint16),
          "std": None, "rejected_low": np.zeros((8, 8), np.uint16),
          "rejected_high": np.zeros((8, 8), np.uint16)}
    with pytest.raises(ValueError, match="count has shape"):
        RunningStack.from_maps(StackConfig(), mean=mean, **{**ok, "count": np.ones((4, 8))},
                               n_frames=1, frame_noise_adu=np.ones(1))
    with pytest.raises(ValueError, match="frame_noise_adu"):
        RunningStack.from_maps(StackConfig(), mean=mean, **ok, n_frames=1,
                               frame_noise_adu=np.zeros(1))
    with pytest.raises(ValueError, match="n_frames"):
        RunningStack.from_maps(StackConfig(), mean=mean, **ok, n_frames=0,
                               frame_noise_adu=np.ones(0))

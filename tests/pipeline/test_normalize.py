"""Tests of frame statistics, normalisation and weights."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from livestack.pipeline.normalize import (
    FrameStats,
    NormalizeConfig,
    apply_normalization,
    frame_stats,
    normalization,
    normalized_noise,
)
from livestack.pipeline.types import Normalization


def sky_frame(rng: np.random.Generator, shape: tuple[int, int] = (400, 600),
              level: float = 1000.0, sigma: float = 20.0, n_stars: int = 60
              ) -> NDArray[np.float32]:
    """A sky with a gradient, some bright stars and Gaussian noise."""
    y, x = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    img = level + 30.0 * x / shape[1] + rng.normal(0.0, sigma, shape)
    for _ in range(n_stars):
        x0, y0 = rng.uniform(0, shape[1]), rng.uniform(0, shape[0])
        img += rng.uniform(200, 5000) * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / 4.0)
    return img.astype(np.float32)


def test_frame_stats_mono_is_robust_to_stars_and_gradient() -> None:
    rng = np.random.default_rng(1)
    img = sky_frame(rng)
    stats = frame_stats(img)
    assert isinstance(stats.location, float)
    assert abs(float(stats.location) - 1015.0) < 3.0
    assert abs(float(stats.noise_adu) - 20.0) / 20.0 < 0.04
    assert 20.0 < float(stats.scale) < 25.0


def test_frame_stats_ignores_pixels_outside_footprint_and_nan() -> None:
    rng = np.random.default_rng(2)
    img = sky_frame(rng, n_stars=0)
    fp = np.ones(img.shape, bool)
    img[:, :200] = 60000.0
    fp[:, :200] = False
    img[5:9, 300:310] = np.nan
    stats = frame_stats(img, fp)
    assert abs(float(stats.location) - 1020.0) < 3.0
    assert abs(float(stats.noise_adu) - 20.0) / 20.0 < 0.04


def _numpy_stats(plane: NDArray[np.float32], mask: NDArray[np.bool_] | None,
                 step: int) -> tuple[float, float, float]:
    """The estimators with numpy's medians (the implementation before the kernel)."""
    rows = plane[::step]
    valid = np.isfinite(rows[:, ::step])
    if mask is not None:
        valid &= mask[::step, ::step]
    values = rows[:, ::step][valid]
    if values.size == 0:
        return np.nan, np.nan, np.nan
    location = float(np.median(values))
    scale = 1.4826 * float(np.median(np.abs(values - np.float32(location))))
    a, b = rows[:, :-3:step], rows[:, 3::step]
    n = min(a.shape[1], b.shape[1])
    a, b = a[:, :n], b[:, :n]
    ok = np.isfinite(a) & np.isfinite(b)
    if mask is not None:
        mrows = mask[::step]
        ok &= mrows[:, :-3:step][:, :n] & mrows[:, 3::step][:, :n]
    diff = a[ok] - b[ok]
    if diff.size == 0:
        return location, scale, np.nan
    med = np.median(diff)
    return location, scale, 1.4826 * float(np.median(np.abs(diff - med))) / np.sqrt(2.0)


@pytest.mark.parametrize("seed", range(40))
def test_frame_stats_equal_numpys_medians_bit_for_bit(seed: int) -> None:
    # The kernel's radix selection against np.median on the same samples: odd and even
    # counts, ties (integer ADU), negative values, NaN/inf, footprints, tiny frames.
    rng = np.random.default_rng(seed)
    ny, nx = (int(v) for v in rng.integers(1, 70, 2))
    img = rng.normal(rng.choice([-50.0, 0.0, 1000.0]), rng.choice([0.0, 0.3, 15.0]),
                     (ny, nx)).astype(np.float32)
    if seed % 3 == 0:
        img = np.round(img)
    if seed % 4 == 1:
        img[rng.random((ny, nx)) < 0.25] = np.nan
    if seed % 5 == 2:
        img[rng.random((ny, nx)) < 0.1] = -np.inf
    mask = rng.random((ny, nx)) < 0.7 if seed % 2 else None
    step = int(rng.integers(1, 5))
    got = frame_stats(img, mask, sample_step=step, max_samples=10**9)
    want = _numpy_stats(img, mask, step)
    np.testing.assert_array_equal([got.location, got.scale, got.noise_adu], want)
    planes = np.stack([img, img * 2.0 + 7.0, img[::-1]]).astype(np.float32)
    got3 = frame_stats(planes, mask, sample_step=step, max_samples=10**9)
    want3 = np.array([_numpy_stats(p, mask, step) for p in planes])
    np.testing.assert_array_equal(np.stack([got3.location, got3.scale, got3.noise_adu], 1),
                                  want3)
    view = np.asfortranarray(img)  # any strides: no copy, the same numbers
    np.testing.assert_array_equal(
        [frame_stats(view, mask, sample_step=step, max_samples=10**9).location], want[:1])


def test_frame_stats_refuses_a_footprint_of_another_shape() -> None:
    with pytest.raises(ValueError, match="footprint shape"):
        frame_stats(np.zeros((10, 12), np.float32), np.ones((12, 10), bool))


def test_noise_is_the_per_pixel_sigma_of_an_interpolated_frame() -> None:
    """After a half-pixel bilinear shift neighbours correlate; the estimate must follow
    the per-pixel sigma (what outlier rejection needs), not the lag-1 difference."""
    rng = np.random.default_rng(3)
    white = rng.normal(1000.0, 20.0, (600, 800))
    averaged = 0.25 * (white + np.roll(white, 1, 0) + np.roll(white, 1, 1)
                       + np.roll(np.roll(white, 1, 0), 1, 1))
    shifted = averaged[2:-2, 2:-2].astype(np.float32)
    true_sigma = float(np.std(shifted))
    lag1 = 1.4826 * np.median(np.abs(np.diff(shifted, axis=1))) / np.sqrt(2)
    got = float(frame_stats(shifted).noise_adu)
    assert abs(got - true_sigma) / true_sigma < 0.05
    assert abs(lag1 - true_sigma) / true_sigma > 0.2          # the naive way is biased


def test_frame_stats_colour_is_per_channel() -> None:
    rng = np.random.default_rng(4)
    planes = np.stack([sky_frame(rng, level=lv, sigma=sg, n_stars=5)
                       for lv, sg in ((500, 10), (1000, 20), (1500, 30))])
    stats = frame_stats(planes)
    assert isinstance(stats.location, np.ndarray) and stats.location.shape == (3,)
    np.testing.assert_allclose(stats.noise_adu, [10, 20, 30], rtol=0.05)
    np.testing.assert_allclose(stats.location, [515, 1015, 1515], atol=4)
    with pytest.raises(ValueError):
        frame_stats(np.zeros((2, 5, 5), np.float32))


@pytest.mark.parametrize(("method", "make"), [
    ("additive_scaling", lambda r: r * 2.0 + 300.0),
    ("multiplicative", lambda r: r * 1.5),
    ("additive", lambda r: r + 250.0),
])
def test_normalisation_recovers_the_reference(method: str, make: object) -> None:
    rng = np.random.default_rng(5)
    ref = sky_frame(rng)
    frame = make(ref).astype(np.float32)  # type: ignore[operator]
    cfg = NormalizeConfig(method=method, weights="none")
    norm = normalization(frame_stats(frame), frame_stats(ref), cfg)
    out = apply_normalization(frame, None, norm)
    assert out.dtype == np.float32 and out is not frame
    np.testing.assert_allclose(out, ref, rtol=2e-4, atol=0.5)


def test_none_method_is_identity() -> None:
    rng = np.random.default_rng(6)
    img = sky_frame(rng)
    norm = normalization(frame_stats(img + 100), frame_stats(img), NormalizeConfig("none"))
    np.testing.assert_array_equal(apply_normalization(img, None, norm), img)


def test_apply_normalization_zeroes_outside_footprint_and_keeps_input() -> None:
    img = np.full((4, 5), 10.0, np.float32)
    img[0, 0] = np.nan
    before = img.copy()
    fp = np.ones((4, 5), bool)
    fp[3] = False
    out = apply_normalization(img, fp, Normalization(2.0, 3.0, 100.0))
    assert out[0, 0] == 0.0 and np.all(out[3] == 0.0)
    np.testing.assert_array_equal(out[1:3], 124.0)
    np.testing.assert_array_equal(img, before)
    colour = np.ones((3, 4, 5), np.float32)
    norm = Normalization(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]),
                         np.array([0.0, 0.0, 10.0]))
    out3 = apply_normalization(colour, fp, norm)
    np.testing.assert_array_equal(out3[:, 0, 0], [0.0, -2.0, 2.0])
    assert np.all(out3[:, 3] == 0.0)


def test_noise_weights_are_inverse_variance_relative_to_the_reference() -> None:
    ref = FrameStats(1000.0, 20.0, 10.0)
    noisy = FrameStats(1000.0, 40.0, 20.0)
    additive = NormalizeConfig("additive", "noise")
    assert normalization(ref, ref, additive).weight == pytest.approx(1.0)
    assert normalization(noisy, ref, additive).weight == pytest.approx(0.25)
    # With additive scaling the scale matches the noise, so the weights equalise.
    scaled = normalization(noisy, ref, NormalizeConfig("additive_scaling", "noise"))
    assert scaled.weight == pytest.approx(1.0)
    assert normalized_noise(noisy, scaled) == pytest.approx(10.0)
    # An explicit noise (e.g. from the detector's metrics) takes precedence.
    assert normalization(ref, ref, additive, noise_adu=5.0,
                         reference_noise_adu=10.0).weight == pytest.approx(4.0)


def test_star_and_fwhm_weights_and_fallbacks() -> None:
    ref = FrameStats(1000.0, 20.0, 10.0)
    stars = NormalizeConfig("additive", "stars")
    fwhm = NormalizeConfig("additive", "fwhm")
    assert normalization(ref, ref, stars, star_count=50,
                         reference_star_count=100).weight == pytest.approx(0.5)
    assert normalization(ref, ref, fwhm, fwhm_px=4.0,
                         reference_fwhm_px=2.0).weight == pytest.approx(0.25)
    assert normalization(ref, ref, fwhm, fwhm_px=float("nan"),
                         reference_fwhm_px=2.0).weight == 1.0
    assert normalization(ref, ref, stars, star_count=0,
                         reference_star_count=100).weight == 1.0
    assert normalization(ref, ref, stars, star_count=10 ** 6,
                         reference_star_count=1).weight == 1000.0


def test_colour_weight_is_a_float() -> None:
    ref = FrameStats(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0]),
                     np.array([1.0, 1.0, 1.0]))
    frame = FrameStats(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0]),
                       np.array([2.0, 2.0, 2.0]))
    norm = normalization(frame, ref, NormalizeConfig("additive", "noise"))
    assert isinstance(norm.weight, float) and norm.weight == pytest.approx(0.25)
    assert isinstance(norm.scale, np.ndarray) and norm.scale.shape == (3,)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="method"):
        NormalizeConfig(method="linear")
    with pytest.raises(ValueError, match="weights"):
        NormalizeConfig(weights="snr")


def test_star_flux_scale_follows_transparency_not_the_sky_gradient() -> None:
    from livestack.pipeline.normalize import star_flux_scale

    rng = np.random.default_rng(42)
    ref_xy = rng.uniform(0, 500, size=(60, 2))
    ref_flux = rng.uniform(1e3, 1e5, size=60)
    # The frame sees 70 % transparency, with 2 % flux noise and small centroid noise.
    frame_xy = ref_xy + rng.normal(0, 0.05, size=ref_xy.shape)
    frame_flux = 0.7 * ref_flux * rng.normal(1.0, 0.02, size=60)
    scale = star_flux_scale(frame_xy, frame_flux, ref_xy, ref_flux)
    assert scale is not None and abs(scale - 1 / 0.7) < 0.01
    # Too few pairs within the radius: no estimate (the caller falls back to dispersion).
    assert star_flux_scale(frame_xy[:4], frame_flux[:4], ref_xy, ref_flux) is None
    assert star_flux_scale(frame_xy + 10.0, frame_flux, ref_xy, ref_flux) is None
    # It overrides the dispersion ratio in additive_scaling.
    stats = FrameStats(100.0, 20.0, 5.0)
    ref = FrameStats(100.0, 10.0, 5.0)
    norm = normalization(stats, ref, NormalizeConfig(), signal_scale=scale)
    assert norm.scale == pytest.approx(scale)
    assert normalization(stats, ref, NormalizeConfig()).scale == pytest.approx(0.5)

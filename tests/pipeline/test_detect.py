"""Tests of livestack.pipeline.detect, plus the synthetic star-field renderer that the
other pipeline tests and the bench scripts import (``render_stars``, ``star_field``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from livestack.pipeline.detect import DetectConfig, _detect, detect_stars, measure

# --------------------------------------------------------------------------- renderer


def moffat_alpha(fwhm_px: float, beta: float) -> float:
    """Moffat core width alpha for a given FWHM."""
    return fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def render_stars(shape: tuple[int, int], xy: NDArray[np.float64], flux: NDArray[np.float64],
                 fwhm_px: float = 2.5, beta: float = 3.5, radius_px: int | None = None,
                 oversample: int = 5, elongation: float = 1.0,
                 angle_deg: float = 0.0) -> NDArray[np.float32]:
    """Noiseless, pixel-integrated Moffat stars (total flux ``flux``) on a zero sky.

    The analytic profile is integrated over each pixel by ``oversample**2`` midpoint
    samples; stars are rendered inside ``radius_px`` of their nearest pixel (default
    6 FWHM, which holds > 99.9 % of the flux for beta 3.5). ``elongation`` stretches the
    profile along ``angle_deg`` (area-preserving) to mimic trailing.
    """
    ny, nx = shape
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    flux = np.asarray(flux, dtype=np.float64).reshape(-1)
    r = radius_px if radius_px is not None else max(8, math.ceil(6 * fwhm_px))
    alpha = moffat_alpha(fwhm_px, beta)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    off = np.arange(-r, r + 1)
    img = np.zeros(shape, dtype=np.float64)
    q = math.sqrt(elongation)
    ca, sa = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    norm = (beta - 1.0) / (math.pi * alpha**2)
    for (x, y), f in zip(xy, flux, strict=True):
        ix, iy = round(x), round(y)
        if ix + r < 0 or iy + r < 0 or ix - r >= nx or iy - r >= ny:
            continue
        px = ix + off[None, :, None, None] + sub[None, None, None, :] - x
        py = iy + off[:, None, None, None] + sub[None, None, :, None] - y
        u = (ca * px + sa * py) / q
        v = (-sa * px + ca * py) * q
        prof = norm * (1.0 + (u * u + v * v) / alpha**2) ** (-beta)
        stamp = f * prof.mean(axis=(2, 3))
        y0, y1 = max(iy - r, 0), min(iy + r + 1, ny)
        x0, x1 = max(ix - r, 0), min(ix + r + 1, nx)
        img[y0:y1, x0:x1] += stamp[y0 - (iy - r):y1 - (iy - r), x0 - (ix - r):x1 - (ix - r)]
    return img.astype(np.float32)


def star_field(rng: np.random.Generator, shape: tuple[int, int], n: int,
               margin: float = 15.0, flux_min: float = 300.0,
               slope: float = 1.5) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Random positions (``margin`` px from the edges) and power-law fluxes."""
    ny, nx = shape
    xy = np.column_stack([rng.uniform(margin, nx - 1 - margin, n),
                          rng.uniform(margin, ny - 1 - margin, n)])
    flux = flux_min * (1.0 + rng.pareto(slope, n))
    order = np.argsort(-flux)
    return xy[order], flux[order]


def noisy(rng: np.random.Generator, img: NDArray[np.float32], sky: float = 1000.0,
          noise: float = 5.0) -> NDArray[np.float32]:
    """Add a flat sky and Gaussian noise."""
    return (img + sky + rng.normal(0.0, noise, img.shape)).astype(np.float32)


def match(found: NDArray[np.float64], truth: NDArray[np.float64],
          radius: float = 1.0) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Index of the nearest true star for each found star, and its offset (found - true)."""
    dist, idx = cKDTree(truth).query(found)
    ok = dist < radius
    return idx[ok], (found[ok] - truth[idx[ok]])


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fwhm", [2.0, 2.5, 3.5, 5.0])
def test_measure_fwhm_within_5_percent(fwhm: float) -> None:
    rng = np.random.default_rng(int(fwhm * 10))
    shape = (600, 700)
    xy, flux = star_field(rng, shape, 150, margin=20)
    img = noisy(rng, render_stars(shape, xy, flux * 4, fwhm_px=fwhm))
    _stars, m = measure(img, DetectConfig(pixel_scale_arcsec=1.5))
    assert m.star_count >= 60
    assert abs(m.fwhm_px / fwhm - 1.0) < 0.05
    assert m.fwhm_arcsec == pytest.approx(1.5 * m.fwhm_px)
    assert 1.0 <= m.elongation < 1.1
    assert m.background_adu == pytest.approx(1000.0, abs=1.0)
    assert m.noise_adu == pytest.approx(5.0, rel=0.1)
    assert m.snr > 10


def test_centroids_are_accurate_and_unbiased_at_full_res_and_binned() -> None:
    rng = np.random.default_rng(1)
    shape = (600, 800)
    xy, flux = star_field(rng, shape, 120, margin=20, flux_min=3000)
    img = noisy(rng, render_stars(shape, xy, flux))
    nn, _ = cKDTree(xy).query(xy, k=2)
    isolated = nn[:, 1] > 8.0  # unresolved pairs bias any centroid; registration clips them
    for factor in (1, 2, 4):
        stars, _bkg, _noise = detect_stars(img, DetectConfig(bin_factor=factor))
        idx, err = match(stars.xy, xy)
        bright = (flux[idx] > 6000) & isolated[idx]  # SNR > ~100
        assert bright.sum() > 20
        rms = float(np.sqrt(np.mean(err[bright] ** 2)))
        assert rms < 0.03, (factor, rms)
        assert np.all(np.abs(err[bright].mean(axis=0)) < 0.01), factor
        assert len(stars) >= 90


def test_brightest_first_and_max_stars() -> None:
    rng = np.random.default_rng(2)
    shape = (400, 400)
    xy, flux = star_field(rng, shape, 80)
    img = noisy(rng, render_stars(shape, xy, flux * 3))
    stars, _, _ = detect_stars(img, DetectConfig(max_stars=25))
    assert len(stars) == 25
    assert np.all(np.diff(stars.flux) <= 0)
    idx, _ = match(stars.xy, xy)
    assert set(idx[:5]) <= set(range(12))  # the brightest found are among the brightest true


def test_hot_pixels_and_saturated_stars_are_excluded() -> None:
    rng = np.random.default_rng(3)
    shape = (400, 500)
    xy, flux = star_field(rng, shape, 40, margin=30, flux_min=2000)
    img = noisy(rng, render_stars(shape, xy, flux))
    hot = np.column_stack([rng.integers(20, 480, 30), rng.integers(20, 380, 30)])
    img[hot[:, 1], hot[:, 0]] += 3000.0
    # One saturated star: a bright star clipped at a full-well level.
    sat_xy = np.array([[250.3, 200.6]])
    star = render_stars(shape, sat_xy, np.array([4e6]))
    img = np.minimum(img + star, 60000.0).astype(np.float32)
    stars, _, _ = detect_stars(img)
    d_hot, _ = cKDTree(hot.astype(float)).query(stars.xy)
    assert np.all(d_hot > 1.5), "a hot pixel was detected as a star"
    assert np.min(np.hypot(*(stars.xy - sat_xy[0]).T)) > 3.0, "saturated star kept"
    idx, _ = match(stars.xy, xy)
    assert len(idx) >= 30
    # With an explicit saturation level the same star is excluded as well.
    stars2, _, _ = detect_stars(img, DetectConfig(saturation_adu=50000.0))
    assert np.min(np.hypot(*(stars2.xy - sat_xy[0]).T)) > 3.0


def test_nan_safe_and_blank_frames() -> None:
    rng = np.random.default_rng(4)
    shape = (300, 400)
    xy, flux = star_field(rng, shape, 40, flux_min=2000)
    img = noisy(rng, render_stars(shape, xy, flux))
    img[100:150, 50:120] = np.nan
    img[0, :] = np.inf
    stars, m = measure(img)
    assert m.star_count > 20
    assert np.all(np.isfinite(stars.xy)) and np.isfinite(m.fwhm_px)
    assert math.isfinite(m.background_adu)
    blank = noisy(rng, np.zeros(shape, np.float32))
    stars, m = measure(blank)
    assert m.star_count == 0 and math.isnan(m.fwhm_px) and m.snr == 0.0
    nan_img = np.full(shape, np.nan, np.float32)
    stars, m = measure(nan_img)
    assert m.star_count == 0 and math.isnan(m.background_adu)
    flat = np.full(shape, 100.0, np.float32)  # zero noise must not make sep explode
    stars, m = measure(flat)
    assert m.star_count == 0


def test_big_endian_and_non_contiguous_input_are_accepted() -> None:
    rng = np.random.default_rng(5)
    shape = (300, 300)
    xy, flux = star_field(rng, shape, 30, flux_min=3000)
    img = noisy(rng, render_stars(shape, xy, flux))
    ref, _, _ = detect_stars(img)
    big = img.astype(">f4")
    strided = np.asfortranarray(img)
    for variant in (big, strided):
        s, _, _ = detect_stars(variant)
        np.testing.assert_allclose(s.xy, ref.xy, atol=1e-6)


def test_sep_overflow_raises_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """sep's buffer/deblend overflows (plain Exception) are retried at a higher threshold."""
    import sep

    rng = np.random.default_rng(9)
    shape = (300, 300)
    xy, flux = star_field(rng, shape, 30, flux_min=3000)
    img = noisy(rng, render_stars(shape, xy, flux))
    real_extract = sep.extract
    thresholds: list[float] = []

    def flaky(data: Any, thresh: float, *args: Any, **kwargs: Any) -> Any:
        thresholds.append(thresh)
        if len(thresholds) < 3:
            raise Exception("object deblending overflow: limit of sub-objects reached")
        return real_extract(data, thresh, *args, **kwargs)

    monkeypatch.setattr(sep, "extract", flaky)
    stars, _, _ = detect_stars(img)
    assert thresholds == [5.0, 10.0, 20.0]
    assert len(stars) > 10

    def always(data: Any, thresh: float, *args: Any, **kwargs: Any) -> Any:
        raise Exception("internal pixel buffer full: The limit of 300000 active pixels")

    monkeypatch.setattr(sep, "extract", always)
    stars, bkg, _noise = detect_stars(img)
    assert len(stars) == 0 and bkg == pytest.approx(1000.0, abs=1.0)

    def other(data: Any, thresh: float, *args: Any, **kwargs: Any) -> Any:
        raise Exception("something unexpected")

    monkeypatch.setattr(sep, "extract", other)
    with pytest.raises(Exception, match="unexpected"):
        detect_stars(img)


def test_dense_field_does_not_crash_sep() -> None:
    """Thousands of blended sources overflow sep's buffers; detection must still return."""
    rng = np.random.default_rng(6)
    shape = (256, 256)
    xy, flux = star_field(rng, shape, 3000, margin=0, flux_min=5000)
    img = noisy(rng, render_stars(shape, xy, flux, fwhm_px=3.0, radius_px=10))
    stars, m = measure(img, DetectConfig(threshold_sigma=1.5, min_area_px=1))
    assert m.star_count == len(stars)


def test_elongated_stars_are_measured() -> None:
    rng = np.random.default_rng(7)
    shape = (400, 400)
    xy, flux = star_field(rng, shape, 60, margin=25, flux_min=3000)
    img = noisy(rng, render_stars(shape, xy, flux, fwhm_px=3.0, elongation=2.0, angle_deg=30))
    _, m = measure(img)
    assert m.elongation == pytest.approx(2.0, rel=0.1)


def test_auto_binning_on_large_frames() -> None:
    """>= 8 MP frames are binned; tiny stars force a finer binning, positions stay full-res."""
    rng = np.random.default_rng(8)
    shape = (2900, 2900)
    xy, flux = star_field(rng, shape, 150, margin=30, flux_min=5000)
    # (FWHM, min_binned_fwhm_px, expected binning)
    for fwhm, min_binned, expected in ((6.0, 0.6, 4), (2.0, 0.6, 2), (2.0, 1.2, 1)):
        img = noisy(rng, render_stars(shape, xy, flux, fwhm_px=fwhm, radius_px=16))
        det = _detect(img, DetectConfig(min_binned_fwhm_px=min_binned))
        assert det.bin_factor == expected
        stars = det.stars
        idx, err = match(stars.xy, xy)
        assert len(idx) > 100
        assert float(np.sqrt(np.mean(err**2))) < 0.05


def test_rejects_3d_input_and_bad_config() -> None:
    with pytest.raises(ValueError, match="2-D"):
        detect_stars(np.zeros((3, 20, 20), np.float32))
    with pytest.raises(ValueError, match="bin_factor"):
        DetectConfig(bin_factor=0)
    with pytest.raises(ValueError, match="threshold_sigma"):
        DetectConfig(threshold_sigma=-1.0)


@pytest.mark.parametrize("sigma_guess", [1.1, 2.4])  # 2.4: the window is refitted
@pytest.mark.parametrize("saturation_adu", [None, 50000.0])
def test_refine_kernel_matches_the_numpy_oracle(sigma_guess: float,
                                                saturation_adu: float | None) -> None:
    """The numba refinement gives the numpy version's centroids, shapes, flux and cuts."""
    from livestack.pipeline.detect import _refine
    from tests.oracles import refine_numpy

    rng = np.random.default_rng(11)
    shape = (300, 360)
    xy, flux = star_field(rng, shape, 70, margin=2, flux_min=1500)
    img = noisy(rng, render_stars(shape, xy, flux))
    img[rng.integers(5, 295, 10), rng.integers(5, 355, 10)] += 4000.0  # hot pixels
    img += render_stars(shape, np.array([[180.2, 150.7]]), np.array([4e6]))
    img = np.minimum(img, 60000.0).astype(np.float32)  # one saturated star
    img[40:60, 200:230] = np.nan
    guess = np.vstack([xy, [[180.2, 150.7]], rng.uniform(0, 360, (10, 2))])
    guess += rng.uniform(-1.5, 1.5, guess.shape)  # binning leaves the guesses off
    sky = np.full(len(guess), 1000.0)
    got = _refine(img, guess[:, 0], guess[:, 1], sky, sigma_guess, 2, saturation_adu)
    want = refine_numpy(img, guess[:, 0], guess[:, 1], sky, sigma_guess, 2, saturation_adu)
    assert float(got["radius"]) == float(want["radius"])
    np.testing.assert_array_equal(got["keep"], want["keep"])
    assert 40 < np.count_nonzero(got["keep"]) < len(guess)  # the cuts do cut
    keep = got["keep"]
    np.testing.assert_allclose(got["xy"][keep], want["xy"][keep], rtol=0, atol=1e-9)
    for key in ("flux", "fwhm", "elong"):
        np.testing.assert_allclose(got[key][keep], want[key][keep], rtol=1e-9)


def test_peak_pass_on_large_frames_matches_the_sep_path() -> None:
    """Large frames take the peak pass and the 8x8 sky: the same stars, centroids, sky and
    noise as sep.extract on the 4x4 sky (the path before issue 16), and neither a
    satellite trail nor hot pixels crowd the brightest stars out."""
    rng = np.random.default_rng(16)
    shape = (2900, 2900)  # 8.4 MP: just past auto_bin_min_mpix
    xy, flux = star_field(rng, shape, 700, margin=30, flux_min=4000)
    img = noisy(rng, render_stars(shape, xy, flux, fwhm_px=4.0, radius_px=16))
    # A satellite trail brighter than most stars, across the whole frame.
    cols = np.arange(shape[1])
    rows = np.rint(0.37 * cols + 600).astype(int)
    for dy, gain in ((-1, 0.4), (0, 1.0), (1, 0.4)):
        img[rows + dy, cols] += 400.0 * gain
    hot = np.column_stack([rng.integers(20, 2880, 300), rng.integers(20, 2880, 300)])
    img[hot[:, 1], hot[:, 0]] += 5000.0
    config = DetectConfig(max_stars=300)
    new = _detect(img, config)
    old = _detect(img, config, legacy=True)
    assert new.bin_factor == old.bin_factor == 4
    assert len(new.stars) == len(old.stars) == 300
    on_trail = np.abs(new.stars.xy[:, 1] - (0.37 * new.stars.xy[:, 0] + 600)) < 8.0
    d_true, _ = cKDTree(xy).query(new.stars.xy[on_trail])
    assert np.all(d_true < 0.5), "a trail fragment was kept as a star"
    d_hot, _ = cKDTree(hot.astype(float)).query(new.stars.xy)
    assert np.all(d_hot > 1.5), "a hot pixel was kept as a star"
    # Every star is a true one, and at least as many of the 300 brightest true stars are
    # found as sep finds (sep drops blended pairs that the refinement keeps).
    truth_idx, err = match(new.stars.xy, xy, radius=0.5)
    assert len(truth_idx) == len(new.stars)
    nn, _ = cKDTree(xy).query(xy, k=2)
    isolated = nn[truth_idx, 1] > 12.0  # blended pairs bias any centroid
    assert float(np.sqrt(np.mean(err[isolated] ** 2))) < 0.03
    old_idx, _ = match(old.stars.xy, xy, radius=0.5)
    assert np.count_nonzero(truth_idx < 300) >= np.count_nonzero(old_idx < 300) >= 250
    # Stars both paths found have the same centroids, up to the local sky (the sky maps
    # differ by the grid they are measured on).
    dist, _ = cKDTree(old.stars.xy).query(new.stars.xy)
    same = dist < 0.05
    assert np.count_nonzero(same) >= 0.8 * len(new.stars)
    assert float(np.median(dist[same])) < 0.002
    assert float(np.percentile(dist[same], 95)) < 0.01
    assert new.background_adu == pytest.approx(old.background_adu, rel=1e-3)
    assert new.noise_adu == pytest.approx(old.noise_adu, rel=0.02)
    assert new.noise_adu == pytest.approx(5.0, rel=0.05)

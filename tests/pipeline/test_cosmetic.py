"""Defect correction and hot-pixel detection without darks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from livestack.pipeline.cosmetic import (
    correct_defects,
    find_isolated_hot_pixels,
)
from livestack.pipeline.debayer import cfa_channel_masks
from tests.oracles import find_isolated_hot_pixels_numpy


def _star_field(shape: tuple[int, int], seed: int, fwhm_px: float,
                n_stars: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Sky 1000 ADU, noise 10 ADU, Gaussian stars with peaks 300-20000 ADU; returns (image, xy)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    image = 1000.0 + rng.normal(0, 10.0, shape)
    xy = np.column_stack([rng.uniform(8, nx - 8, n_stars), rng.uniform(8, ny - 8, n_stars)])
    peaks = rng.uniform(300, 20000, n_stars)
    sigma = fwhm_px / 2.3548
    yy, xx = np.mgrid[:ny, :nx]
    for (x, y), peak in zip(xy, peaks, strict=True):
        image += peak * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return image.astype(np.float32), xy


def test_correct_defects_mono_and_copy() -> None:
    img = np.arange(25, dtype=np.float32).reshape(5, 5)
    mask = np.zeros((5, 5), dtype=bool)
    mask[2, 2] = True
    mask[0, 0] = True  # corner: only 3 neighbours
    out = correct_defects(img, mask)
    assert out is not img
    assert out[2, 2] == pytest.approx(np.median([6, 7, 8, 11, 13, 16, 17, 18]))
    assert out[0, 0] == pytest.approx(np.median([1, 5, 6]))
    assert img[2, 2] == 12  # input untouched
    np.testing.assert_array_equal(out[~mask], img[~mask])


def test_correct_defects_cfa_keeps_colours() -> None:
    codes = cfa_channel_masks("GRBG", (10, 10))
    img = np.choose(codes, [200.0, 800.0, 50.0]).astype(np.float32)
    mask = np.zeros((10, 10), dtype=bool)
    mask[4, 5] = mask[5, 4] = mask[4, 4] = True  # one pixel of each colour
    img[mask] = 65000.0
    out = correct_defects(img, mask, "GRBG")
    np.testing.assert_array_equal(out, np.choose(codes, [200.0, 800.0, 50.0]))


def test_correct_defects_nan_and_errors() -> None:
    img = np.ones((6, 6), dtype=np.float32)
    img[2, 2] = np.nan
    mask = np.isnan(img)
    assert correct_defects(img, mask)[2, 2] == 1.0
    with pytest.raises(ValueError, match="shape"):
        correct_defects(img, np.zeros((5, 5), dtype=bool))


@pytest.mark.parametrize("fwhm_px", [1.5, 2.5, 4.0])
def test_isolated_hot_pixels_mono_spare_stars(fwhm_px: float) -> None:
    image, xy = _star_field((160, 200), seed=1, fwhm_px=fwhm_px)
    rng = np.random.default_rng(2)
    hot_y = rng.integers(2, 158, 25)
    hot_x = rng.integers(2, 198, 25)
    image[hot_y, hot_x] += rng.uniform(300, 5000, 25).astype(np.float32)
    hot = find_isolated_hot_pixels(image, sigma=8.0)
    star_pix = {(round(y), round(x)) for x, y in xy}
    found = {(int(y), int(x)) for y, x in zip(*np.nonzero(hot), strict=True)}
    planted = {(int(y), int(x)) for y, x in zip(hot_y, hot_x, strict=True)}
    planted_off_stars = {p for p in planted
                         if min(np.hypot(p[0] - y, p[1] - x) for x, y in xy) > 3 * fwhm_px}
    assert planted_off_stars <= found
    assert not (found & star_pix), "a star peak was flagged as hot"
    assert found <= planted


def test_isolated_hot_pixels_cfa_coloured_stars() -> None:
    shape = (120, 160)
    codes = cfa_channel_masks("RGGB", shape)
    lum, xy = _star_field(shape, seed=3, fwhm_px=2.0)
    # Red-ish stars on a neutral sky: response R 1.0, G 0.5, B 0.25 for the star light.
    response = np.choose(codes, [1.0, 0.5, 0.25]).astype(np.float32)
    image = 1000.0 + (lum - 1000.0) * response
    hot_list = [(10, 10), (41, 57), (80, 121), (101, 33)]  # R, B, G, G sites
    for y, x in hot_list:
        image[y, x] += 3000.0
    hot = find_isolated_hot_pixels(image, sigma=8.0, bayer_pattern="RGGB")
    assert all(hot[y, x] for y, x in hot_list)
    star_pix = {(round(y), round(x)) for x, y in xy}
    flagged = {(int(y), int(x)) for y, x in zip(*np.nonzero(hot), strict=True)}
    assert not (flagged & star_pix)
    assert hot.sum() <= len(hot_list) + 2


@pytest.mark.parametrize("pattern", [None, "RGGB"])
def test_isolated_hot_pixels_kernel_matches_numpy(pattern: str | None) -> None:
    image, _ = _star_field((90, 110), seed=5, fwhm_px=1.8, n_stars=30)
    rng = np.random.default_rng(6)
    image[rng.integers(0, 90, 40), rng.integers(0, 110, 40)] += 2000.0
    image[0, 0] += 5000.0  # corner and edge cases
    image[45, 109] += 5000.0
    image[10, 10] = np.nan
    kernel = find_isolated_hot_pixels(image, 6.0, pattern)
    reference = find_isolated_hot_pixels_numpy(image, 6.0, pattern)
    assert kernel.sum() >= 30
    np.testing.assert_array_equal(kernel, reference)


def test_isolated_hot_pixels_flat_frame_finds_nothing() -> None:
    image = np.random.default_rng(4).normal(500, 5, (50, 60)).astype(np.float32)
    assert not find_isolated_hot_pixels(image).any()
    assert not find_isolated_hot_pixels(np.zeros((2, 2), dtype=np.float32)).any()


def test_seestar_planted_hot_pixels_found_stars_spared(seestar_dir: Path) -> None:
    from scipy import ndimage

    from livestack.storage.fitsio import read_frame

    raw, info, _ = read_frame(sorted((seestar_dir / "lights").glob("*.fit"))[0])
    assert info.bayer_pattern == "GRBG"
    # The brightest star peaks: maxima of the 2x2-smoothed frame, strongest first.
    smooth = ndimage.uniform_filter(raw, 2)
    peaks = (smooth == ndimage.maximum_filter(smooth, 15)) & (smooth > np.median(smooth) + 2000)
    py, px = np.nonzero(peaks)
    order = np.argsort(smooth[py, px])[::-1][:15]
    assert order.size >= 5
    rng = np.random.default_rng(8)
    planted = [(int(y), int(x)) for y, x in zip(rng.integers(50, 1870, 30),
                                                 rng.integers(50, 1030, 30), strict=True)
               if np.hypot(py - y, px - x).min() > 20]
    image = raw.copy()
    for y, x in planted:
        image[y, x] += 3000.0
    hot = find_isolated_hot_pixels(image, sigma=8.0, bayer_pattern=info.bayer_pattern)
    assert all(hot[y, x] for y, x in planted)
    assert hot.sum() < len(planted) + 0.0001 * raw.size
    for i in order:
        y, x = py[i], px[i]
        assert not hot[max(y - 3, 0):y + 4, max(x - 3, 0):x + 4].any(), (y, x)
    fixed = correct_defects(image, hot, info.bayer_pattern)
    assert all(abs(fixed[y, x] - raw[y, x]) < 1000 for y, x in planted)


def test_sparse_nonzero_matches_numpy() -> None:
    from livestack.pipeline.cosmetic import sparse_nonzero

    rng = np.random.default_rng(5)
    for shape, density in (((37, 53), 0.01), ((64, 64), 0.5), ((3, 5), 0.0), ((1, 13), 1.0)):
        mask = rng.random(shape) < density
        ys, xs = sparse_nonzero(mask)
        ey, ex = np.nonzero(mask)
        assert np.array_equal(ys, ey) and np.array_equal(xs, ex)

"""Demosaicing and the Bayer-pattern conventions of the FITS headers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from livestack.pipeline.debayer import (
    BAYER_PATTERNS,
    cfa_channel_masks,
    debayer,
    flip_pattern_rows,
    luminance,
    shift_pattern,
    superpixel,
)
from livestack.storage.headers import parse_frame_info
from tests.oracles import debayer_numpy


def _mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """Sample an RGB scene (3, ny, nx) through a CFA."""
    codes = cfa_channel_masks(pattern, rgb.shape[1:])
    return np.take_along_axis(rgb, codes[None].astype(np.intp), axis=0)[0].astype(np.float32)


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
@pytest.mark.parametrize("channel", [0, 1, 2])
def test_uniform_colour_field(pattern: str, channel: int) -> None:
    scene = np.zeros((3, 12, 16), dtype=np.float32)
    scene[channel] = 1.0
    rgb = debayer(_mosaic(scene, pattern), pattern)
    assert rgb.shape == (3, 12, 16) and rgb.dtype == np.float32
    # Away from the edges (and in fact everywhere) the field comes back exactly.
    np.testing.assert_array_equal(rgb[:, 1:-1, 1:-1], scene[:, 1:-1, 1:-1])
    np.testing.assert_array_equal(rgb, scene)


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_native_sites_exact_and_kernel_matches_numpy(pattern: str) -> None:
    cfa = np.random.default_rng(1).uniform(0, 1000, (21, 30)).astype(np.float32)
    rgb = debayer(cfa, pattern, "bilinear")
    codes = cfa_channel_masks(pattern, cfa.shape)
    for k in range(3):
        np.testing.assert_array_equal(rgb[k][codes == k], cfa[codes == k])
    np.testing.assert_allclose(rgb, debayer_numpy(cfa, pattern), rtol=1e-6)


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_linear_ramp_reproduced_inside(pattern: str) -> None:
    yy, xx = np.mgrid[:20, :24].astype(np.float32)
    scene = np.stack([2 * xx + yy, 3 * yy + 1, xx - yy + 50])
    rgb = debayer(_mosaic(scene, pattern), pattern, "bilinear")
    np.testing.assert_allclose(rgb[:, 1:-1, 1:-1], scene[:, 1:-1, 1:-1], atol=1e-4)


def test_wrong_pattern_swaps_red_and_blue() -> None:
    scene = np.zeros((3, 8, 8), dtype=np.float32)
    scene[0] = 1.0
    rgb = debayer(_mosaic(scene, "RGGB"), "BGGR")
    assert rgb[2, 2:-2, 2:-2].min() == 1.0 and rgb[0].max() == 0.0


def test_pattern_helpers() -> None:
    assert shift_pattern("RGGB", 1, 0) == "GRBG"
    assert shift_pattern("RGGB", 0, 1) == "GBRG"
    assert shift_pattern("RGGB", 1, 1) == "BGGR"
    assert flip_pattern_rows("RGGB", 10) == "GBRG"
    assert flip_pattern_rows("RGGB", 11) == "RGGB"
    with pytest.raises(ValueError, match="Bayer pattern"):
        debayer(np.zeros((4, 4)), "RGBW")
    with pytest.raises(ValueError, match="2-D"):
        debayer(np.zeros((3, 4, 4)), "RGGB")


# ----------------------------------------------------------------------------- header conventions


@pytest.mark.parametrize("ny", [12, 13])
def test_bottom_up_file_debayers_to_the_right_colours(ny: int) -> None:
    """A sensor with RGGB at its top-left, written bottom-up (first stored row = bottom row)."""
    scene = np.zeros((3, ny, 16), dtype=np.float32)
    scene[0] = 1.0  # pure red light
    sensor = _mosaic(scene, "RGGB")  # row 0 = top row of the sensor
    stored = sensor[::-1]  # what a BOTTOM-UP writer puts first
    info = parse_frame_info({"BAYERPAT": "RGGB", "ROWORDER": "BOTTOM-UP"}, "f.fits", stored.shape)
    assert info.bayer_pattern == ("GBRG" if ny % 2 == 0 else "RGGB")
    rgb = debayer(stored, info.bayer_pattern or "")
    np.testing.assert_array_equal(rgb[0], 1.0)
    np.testing.assert_array_equal(rgb[1:], 0.0)


def test_xbayroff_shifts_pattern_to_the_right_colours() -> None:
    """The file starts one column into an RGGB sensor (XBAYROFF=1): effective GRBG."""
    scene = np.zeros((3, 10, 17), dtype=np.float32)
    scene[2] = 1.0  # pure blue light
    stored = _mosaic(scene, "RGGB")[:, 1:]
    info = parse_frame_info({"BAYERPAT": "RGGB", "XBAYROFF": 1}, "f.fits", stored.shape)
    assert info.bayer_pattern == "GRBG"
    rgb = debayer(stored, info.bayer_pattern or "")
    np.testing.assert_array_equal(rgb[2], 1.0)
    np.testing.assert_array_equal(rgb[:2], 0.0)


# ------------------------------------------------------------------------ superpixel, luminance


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_superpixel(pattern: str) -> None:
    scene = np.stack([np.full((10, 13), v, dtype=np.float32) for v in (3.0, 5.0, 7.0)])
    cfa = _mosaic(scene, pattern)
    cfa[cfa == 5.0] += np.tile([[0.5, -0.5]], (10, 7))[:, :13][cfa == 5.0]  # greens 5.5/4.5
    sp = superpixel(cfa, pattern)
    assert sp.shape == (3, 5, 6)
    np.testing.assert_allclose(sp[0], 3.0)
    np.testing.assert_allclose(sp[1], 5.0)
    np.testing.assert_allclose(sp[2], 7.0)


def test_luminance_weights() -> None:
    rgb = np.stack([np.full((2, 3), v, dtype=np.float32) for v in (4.0, 8.0, 12.0)])
    lum = luminance(rgb)
    assert lum.shape == (2, 3) and lum.dtype == np.float32
    np.testing.assert_allclose(lum, (4 + 16 + 12) / 4)
    with pytest.raises(ValueError, match="3, ny, nx"):
        luminance(np.zeros((4, 4)))


def test_seestar_debayer_consistent_with_superpixel(seestar_dir: Path) -> None:
    from livestack.storage.fitsio import read_frame

    raw, info, _ = read_frame(sorted((seestar_dir / "lights").glob("*.fit"))[0])
    assert info.bayer_pattern == "GRBG"
    rgb = debayer(raw, info.bayer_pattern)
    sp = superpixel(raw, info.bayer_pattern)
    assert rgb.shape == (3, 1920, 1080) and sp.shape == (3, 960, 540)
    for k in range(3):
        # Channel background levels agree between the two demosaics.
        assert np.median(rgb[k]) == pytest.approx(np.median(sp[k]), rel=0.02)
    codes = cfa_channel_masks("GRBG", raw.shape)
    np.testing.assert_array_equal(rgb[0][codes == 0], raw[codes == 0])

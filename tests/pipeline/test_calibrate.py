"""Calibration kernel, its numpy reference, and the defect map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from livestack.errors import CalibrationError
from livestack.pipeline.calibrate import (
    MasterSet,
    calibrate,
    find_cold_pixels,
    find_defects,
    local_level,
)
from tests.oracles import calibrate_numpy


def _random_set(shape: tuple[int, int], seed: int, defect_fraction: float = 0.01) -> MasterSet:
    rng = np.random.default_rng(seed)
    subtract = rng.normal(500, 10, shape).astype(np.float32)
    flat = rng.uniform(0.7, 1.2, shape).astype(np.float32)
    flat[3, 3] = 0.0  # dead pixel: must not produce inf
    defects = rng.random(shape) < defect_fraction
    defects[3, 3] = True
    defects[:3, :3] = True  # a cluster in the corner
    return MasterSet(subtract, flat, defects, ("test",))


@pytest.mark.parametrize("pattern", [None, "RGGB", "GBRG"])
def test_kernel_matches_numpy_reference(pattern: str | None) -> None:
    shape = (57, 83)
    rng = np.random.default_rng(1)
    raw = rng.normal(2000, 50, shape).astype(np.float32)
    masters = _random_set(shape, seed=2)
    fused = calibrate(raw, masters, pattern)
    reference = calibrate_numpy(raw, masters, pattern)
    assert fused.dtype == np.float32 and fused.shape == shape
    assert np.isfinite(fused).all()
    np.testing.assert_allclose(fused, reference, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("parts", [("subtract",), ("flat",), ("defects",),
                                   ("subtract", "flat")])
def test_partial_master_sets(parts: tuple[str, ...]) -> None:
    shape = (20, 30)
    full = _random_set(shape, seed=3)
    partial = MasterSet(**{name: getattr(full, name) for name in parts})
    raw = np.random.default_rng(4).normal(1000, 30, shape).astype(np.float32)
    np.testing.assert_allclose(calibrate(raw, partial), calibrate_numpy(raw, partial),
                               rtol=1e-6, atol=1e-4)


def test_arithmetic_and_input_untouched() -> None:
    raw = np.full((4, 5), 1100.0, dtype=np.float32)
    raw_copy = raw.copy()
    sub = np.full((4, 5), 100.0, dtype=np.float32)
    flat = np.full((4, 5), 2.0, dtype=np.float32)
    out = calibrate(raw, MasterSet(sub, flat, None))
    np.testing.assert_array_equal(out, 500.0)
    np.testing.assert_array_equal(raw, raw_copy)
    np.testing.assert_array_equal(sub, 100.0)


def test_out_buffer_reused() -> None:
    shape = (30, 40)
    masters = _random_set(shape, seed=9)
    raw = np.random.default_rng(10).normal(900, 20, shape).astype(np.float32)
    buf = np.empty(shape, dtype=np.float32)
    result = calibrate(raw, masters, out=buf)
    assert result is buf
    np.testing.assert_allclose(buf, calibrate_numpy(raw, masters), rtol=1e-6, atol=1e-4)
    assert calibrate(raw, None, out=buf) is buf
    np.testing.assert_array_equal(buf, raw)
    with pytest.raises(ValueError, match="out"):
        calibrate(raw, masters, out=np.empty((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="share"):
        calibrate(raw, masters, out=raw)


def test_no_masters_returns_a_float32_copy() -> None:
    raw = np.arange(12, dtype=np.float32).reshape(3, 4)
    for masters in (None, MasterSet()):
        out = calibrate(raw, masters)
        assert out is not raw and not np.shares_memory(out, raw)
        np.testing.assert_array_equal(out, raw)
    out16 = calibrate(raw.astype(np.uint16), None)
    assert out16.dtype == np.float32


def test_shape_mismatch_names_both_shapes() -> None:
    raw = np.zeros((10, 12), dtype=np.float32)
    masters = MasterSet(subtract=np.zeros((12, 10), dtype=np.float32))
    with pytest.raises(CalibrationError) as exc:
        calibrate(raw, masters, frame_name="light_001.fits")
    assert exc.value.reason == "master_shape_mismatch"
    assert "(12, 10)" in str(exc.value) and "(10, 12)" in str(exc.value)
    assert "light_001.fits" in str(exc.value)


def test_mono_defect_uses_3x3_ring() -> None:
    img = np.arange(49, dtype=np.float32).reshape(7, 7)
    img[3, 3] = 1e6
    mask = np.zeros((7, 7), dtype=bool)
    mask[3, 3] = True
    out = calibrate(img, MasterSet(defects=mask))
    ring = [img[3 + dy, 3 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    assert out[3, 3] == pytest.approx(np.median(ring))


def test_cfa_defect_uses_same_colour_neighbours_2px_away() -> None:
    # RGGB mosaic: red sites 100, everything else 1000.
    img = np.full((9, 9), 1000.0, dtype=np.float32)
    img[0::2, 0::2] = 100.0
    img[4, 4] = 60000.0  # a hot red pixel
    mask = np.zeros((9, 9), dtype=bool)
    mask[4, 4] = True
    assert calibrate(img, MasterSet(defects=mask), "RGGB")[4, 4] == 100.0
    # Without the pattern the mono ring mixes colours.
    assert calibrate(img, MasterSet(defects=mask), None)[4, 4] == 1000.0


def test_defect_whose_ring_is_all_defects_still_corrected() -> None:
    img = np.full((15, 15), 10.0, dtype=np.float32)
    img[5:10, 5:10] = 5000.0
    mask = np.zeros((15, 15), dtype=bool)
    mask[5:10, 5:10] = True  # 5x5 block: the centre's 3x3 ring is all defects
    out = calibrate(img, MasterSet(defects=mask))
    assert np.isfinite(out).all()
    assert out[7, 7] == 10.0
    np.testing.assert_allclose(out, calibrate_numpy(img, MasterSet(defects=mask)))


@pytest.mark.parametrize("pattern", [None, "RGGB"])
@pytest.mark.parametrize("parts", [("subtract", "flat", "defects"), ("defects",), ("flat",)])
def test_in_place_calibration_is_bit_identical(pattern: str | None,
                                               parts: tuple[str, ...]) -> None:
    shape = (61, 90)
    rng = np.random.default_rng(3)
    raw = rng.normal(2000, 50, shape).astype(np.float32)
    raw[20, 30] = np.nan
    full = _random_set(shape, seed=4, defect_fraction=0.03)
    chosen = {name: getattr(full, name) for name in parts}
    if "defects" in chosen:
        chosen["defects"] = chosen["defects"].copy()
        chosen["defects"][30:37, 30:37] = True  # a block whose centre needs the fallback
    masters = MasterSet(**chosen)
    expected = calibrate(raw, masters, pattern)
    frame = raw.copy()
    got = calibrate(frame, masters, pattern, overwrite_raw=True)
    assert got is frame  # calibrated where it was read: no second frame in memory
    np.testing.assert_array_equal(got, expected)  # NaN == NaN, and bit for bit
    untouched = raw.copy()
    calibrate(untouched, masters, pattern)
    np.testing.assert_array_equal(untouched, raw)  # the default never writes raw


def test_in_place_needs_a_float32_frame() -> None:
    raw = np.arange(12 * 10, dtype=np.uint16).reshape(12, 10)
    masters = MasterSet(subtract=np.ones((12, 10), dtype=np.float32))
    got = calibrate(raw, masters, overwrite_raw=True)  # cannot hold float32: a new array
    assert got.dtype == np.float32 and raw[0, 1] == 1
    np.testing.assert_array_equal(got, raw.astype(np.float32) - 1)


# ----------------------------------------------------------------------------- find_defects


def test_find_defects_hot_pixels_despite_amp_glow() -> None:
    rng = np.random.default_rng(5)
    shape = (200, 300)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    glow = 400.0 * np.exp(-((yy - 0) ** 2 + (xx - 300) ** 2) / (2 * 60.0**2))
    dark = (1000.0 + glow + rng.normal(0, 3, shape)).astype(np.float32)
    hot = [(10, 20), (150, 250), (100, 100), (5, 290)]  # one inside the glow
    for y, x in hot:
        dark[y, x] += 200.0
    defects = find_defects(dark, 60.0)
    assert all(defects[y, x] for y, x in hot)
    assert defects.sum() < 40  # the glow itself is not flagged
    # An absolute floor of 5 ADU/s * 60 s = 300 ADU removes the 200 ADU pixels.
    assert not find_defects(dark, 60.0, min_rate_adu_s=5.0).any()


def test_find_defects_cold_pixels_from_flat_but_not_vignetting() -> None:
    shape = (120, 160)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r2 = ((yy - 60) / 60.0) ** 2 + ((xx - 80) / 80.0) ** 2
    flat = (1.2 - 0.9 * r2).clip(0.05, None).astype(np.float32)  # corners at ~0.1 of centre
    flat[30, 40] *= 0.3  # dead-ish pixel
    flat[90, 100] = 0.0
    dark = np.random.default_rng(6).normal(100, 2, shape).astype(np.float32)
    defects = find_defects(dark, 10.0, master_flat=flat)
    assert defects[30, 40] and defects[90, 100]
    assert not defects[0, 0] and not defects[-1, -1]
    assert defects.sum() < 10
    cold = find_cold_pixels(flat)
    assert cold[30, 40] and cold[90, 100] and cold.sum() < 10


def test_find_defects_validates_arguments() -> None:
    dark = np.zeros((8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="exposure_s"):
        find_defects(dark, -1.0)
    with pytest.raises(ValueError, match="cold_fraction"):
        find_defects(dark, 1.0, cold_fraction=1.5)
    with pytest.raises(ValueError, match="shape"):
        find_defects(dark, 1.0, master_flat=np.ones((4, 4), dtype=np.float32))


def test_local_level_follows_gradient_and_ignores_clusters() -> None:
    yy, xx = np.mgrid[:60, :50]
    img = (0.5 * xx + 0.2 * yy + 0.01 * xx * yy).astype(np.float32)
    truth = img.copy()
    img[30:32, 20:22] = 1e5  # a 2x2 hot cluster never enters its own pixels' rings
    img[10:13, 30:33] = 1e5  # a 3x3 one fills at most 3 of 8 ring places
    level = local_level(img)
    assert level.shape == img.shape and level.dtype == np.float32
    np.testing.assert_allclose(level[30:32, 20:22], truth[30:32, 20:22], atol=0.1)
    np.testing.assert_allclose(level[10:13, 30:33], truth[10:13, 30:33], atol=3.0)
    # Every pixel whose ring misses the clusters gets the smooth level.
    far = np.ones(img.shape, dtype=bool)
    far[28:34, 18:24] = False
    far[8:15, 28:35] = False
    far[:2] = far[-2:] = False
    far[:, :2] = far[:, -2:] = False
    np.testing.assert_allclose(level[far], truth[far], atol=0.1)
    # On a CFA mosaic the 2 px ring stays within one colour.
    cfa = np.tile(np.array([[100.0, 500.0], [500.0, 900.0]], dtype=np.float32), (10, 10))
    np.testing.assert_array_equal(local_level(cfa), cfa)


# ----------------------------------------------------------------------------- real data


def test_oscaar_light_hot_pixels_removed(oscaar_dir: Path) -> None:
    from scipy import ndimage

    from livestack.storage.fitsio import read_frame
    from livestack.storage.masters import build_master

    dark, _ = build_master("dark", sorted((oscaar_dir / "darks").glob("*.fit")))
    defects = find_defects(dark, 60.0)
    raw, info, _ = read_frame(sorted((oscaar_dir / "lights").glob("*.fit"))[10])
    out = calibrate(raw, MasterSet(dark, None, defects), info.bayer_pattern)
    np.testing.assert_allclose(out, calibrate_numpy(raw, MasterSet(dark, None, defects)),
                               rtol=1e-6, atol=1e-3)
    sky = float(np.median(out))
    noise = float(1.4826 * np.median(np.abs(out - sky)))
    footprint = np.ones((3, 3), dtype=bool)
    footprint[1, 1] = False
    neighbours = ndimage.median_filter(out, footprint=footprint, mode="nearest")
    # Judge only defects on sky (stars legitimately stand above their neighbours).
    on_sky = defects & (ndimage.median_filter(out, size=7) < sky + 3 * noise)
    assert on_sky.sum() > 100
    excess = (out - neighbours)[on_sky] / noise
    assert excess.max() < 5.0
    # Without correction (dark subtracted only) the same positions do stick out.
    plain = calibrate(raw, MasterSet(dark, None, None))
    plain_excess = (plain - ndimage.median_filter(plain, footprint=footprint,
                                                  mode="nearest"))[on_sky] / noise
    assert (plain_excess > 5.0).sum() > 5


def test_an_rgb_frame_is_calibrated_per_channel_with_rgb_masters() -> None:
    from livestack.pipeline.cosmetic import correct_defects, find_isolated_hot_pixels

    rng = np.random.default_rng(5)
    raw = rng.normal(1000.0, 20.0, (3, 40, 50)).astype(np.float32)
    dark = rng.normal(100.0, 5.0, (3, 40, 50)).astype(np.float32)
    flat = rng.uniform(0.8, 1.2, (3, 40, 50)).astype(np.float32)
    defects = np.zeros((3, 40, 50), dtype=bool)
    defects[1, 10, 20] = defects[2, 30, 5] = True
    masters = MasterSet(subtract=dark, flat=flat, defects=defects)
    out = calibrate(raw, masters)
    assert out.shape == (3, 40, 50) and out.dtype == np.float32
    for c in range(3):  # each channel exactly as a mono frame with that channel's masters
        plane = calibrate(raw[c], MasterSet(subtract=dark[c], flat=flat[c], defects=defects[c]))
        np.testing.assert_array_equal(out[c], plane)
    np.testing.assert_array_equal(calibrate(raw, None), raw)
    with pytest.raises(CalibrationError) as caught:  # 2-D masters do not fit an RGB frame
        calibrate(raw, MasterSet(subtract=dark[0]))
    assert caught.value.reason == "master_shape_mismatch"
    with pytest.raises(CalibrationError) as caught:
        calibrate(np.zeros((4, 40, 50), np.float32), None)
    assert caught.value.reason == "not_2d"
    # Cosmetic correction finds and fixes a hot pixel in its own channel only.
    sky = rng.normal(1000.0, 10.0, (3, 40, 50)).astype(np.float32)
    sky[2, 20, 25] += 5000.0
    hot = find_isolated_hot_pixels(sky, 8.0)
    assert hot.shape == (3, 40, 50) and np.argwhere(hot).tolist() == [[2, 20, 25]]
    fixed = correct_defects(sky, hot)
    assert abs(float(fixed[2, 20, 25]) - 1000.0) < 50.0
    np.testing.assert_array_equal(fixed[:2], sky[:2])

"""Tests of livestack.pipeline.warp (and its numba kernels)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from livestack.pipeline import kernels_twopass as kt
from livestack.pipeline import kernels_warp as kw
from livestack.pipeline.types import Transform, Warped
from livestack.pipeline.warp import KERNELS, resolve_kernel, warp
from tests.pipeline.test_detect import render_stars

SHAPE = (160, 200)


def _windowed_centroid(img: NDArray[np.float32], x: float, y: float,
                       sigma: float = 1.06, r: int = 6) -> tuple[float, float]:
    """XWIN-style centroid (the estimator detection and registration rely on)."""
    cx, cy = x, y
    for _ in range(40):
        ix, iy = round(cx), round(cy)
        st = img[iy - r:iy + r + 1, ix - r:ix + r + 1].astype(np.float64)
        gy, gx = np.mgrid[iy - r:iy + r + 1, ix - r:ix + r + 1]
        w = np.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * sigma**2)) * st
        cx += 2 * ((w * gx).sum() / w.sum() - cx)
        cy += 2 * ((w * gy).sum() / w.sum() - cy)
    return cx, cy


def _first_moment_x(img: NDArray[np.float32], x: float, y: float, r: int = 12) -> float:
    ix, iy = round(x), round(y)
    st = img[iy - r:iy + r + 1, ix - r:ix + r + 1].astype(np.float64)
    return float((st.sum(axis=0) * np.arange(ix - r, ix + r + 1)).sum() / st.sum())


def _star_quality(warped: NDArray[np.float32], direct: NDArray[np.float32],
                  xy: NDArray[np.float64]) -> tuple[float, float]:
    """Mean peak ratio and p95 centroid error of warped stars vs a direct render."""
    ratios = []
    errors = []
    for x, y in xy:
        ix, iy = round(x), round(y)
        sl = np.s_[iy - 2:iy + 3, ix - 2:ix + 3]
        ratios.append(warped[sl].max() / direct[sl].max())
        wx, wy = _windowed_centroid(warped, x, y)
        dx, dy = _windowed_centroid(direct, x, y)
        errors.append(math.hypot(wx - dx, wy - dy))
    return float(np.mean(ratios)), float(np.percentile(errors, 95))


def _sparse_grid(rng: np.random.Generator, shape: tuple[int, int],
                 spacing: int = 20) -> NDArray[np.float64]:
    """Isolated stars on a jittered grid with random sub-pixel phases."""
    ys, xs = np.mgrid[spacing:shape[0] - spacing:spacing, spacing:shape[1] - spacing:spacing]
    xy = np.column_stack([xs.ravel(), ys.ravel()]).astype(np.float64)
    return xy + rng.uniform(-3, 3, xy.shape)


def test_row_weights_match_the_exact_kernels() -> None:
    rng = np.random.default_rng(0)
    frac = np.concatenate([[0.0, 0.5, 1e-9, 1 - 1e-9], rng.uniform(0, 1, 500)])
    w = np.zeros((6, frac.size), np.float32)
    exact = np.zeros(6)
    for name, kind in KERNELS.items():
        kw.row_weights(kind, frac, w, frac.size)
        n = kw.N_TAPS[kind]
        for k, f in enumerate(frac):
            if kind == kw.NEAREST:
                continue
            kw.kernel_weights(kind, f, exact)
            np.testing.assert_allclose(w[:n, k], exact[:n], atol=2e-7, err_msg=name)
        assert np.allclose(w[:n].sum(axis=0), 1.0, atol=1e-6)
    kw.row_weights(KERNELS["lanczos3"], np.zeros(3), w, 3)
    assert np.array_equal(w[:, 0], [0, 0, 1, 0, 0, 0])  # integer positions: exact delta


@pytest.mark.parametrize("kernel", sorted(set(KERNELS) - {"mitchell"}))
def test_identity_and_integer_shifts_copy_exactly(kernel: str) -> None:
    rng = np.random.default_rng(1)
    img = rng.normal(100, 10, SHAPE).astype(np.float32)
    same = warp(img, Transform.identity(), SHAPE, kernel)
    assert np.array_equal(same.image, img) and same.footprint.all()
    moved = warp(img, Transform.from_params(5.0, -3.0), SHAPE, kernel)
    # x_ref = x + 5, y_ref = y - 3
    assert np.array_equal(moved.image[:-3, 5:], img[3:, :-5])
    assert moved.footprint[:-3, 5:].all()
    assert not moved.footprint[-3:].any() and not moved.footprint[:, :5].any()
    assert np.all(moved.image[~moved.footprint] == 0.0)
    # 180 deg about the centre: an exact flip, also through the general path.
    ny, nx = SHAPE
    flip = Transform(np.array([[-1.0, 0.0, nx - 1.0], [0.0, -1.0, ny - 1.0]]))
    flipped = warp(img, flip, SHAPE, kernel)
    assert np.array_equal(flipped.image, img[::-1, ::-1]) and flipped.footprint.all()


def _mitchell_at_integers(img: NDArray[np.float32]) -> NDArray[np.float64]:
    """Mitchell-Netravali at integer positions: the separable (1/18, 8/9, 1/18) filter,
    valid one pixel inside the edges (NaN on the border)."""
    w = np.array([1.0, 16.0, 1.0]) / 18.0
    rows = w[0] * img[:, :-2] + w[1] * img[:, 1:-1] + w[2] * img[:, 2:]
    both = w[0] * rows[:-2] + w[1] * rows[1:-1] + w[2] * rows[2:]
    out = np.full(img.shape, np.nan)
    out[1:-1, 1:-1] = both
    return out


def test_mitchell_smooths_identity_and_integer_shifts_like_every_other_phase() -> None:
    """Mitchell does not interpolate: at an integer position its weights are
    (1/18, 8/9, 1/18), so the reference frame (the identity) gets the same blur as every
    other frame, and its footprint loses the one-pixel border those taps need."""
    rng = np.random.default_rng(41)
    img = rng.normal(100, 10, SHAPE).astype(np.float32)
    truth = _mitchell_at_integers(img)
    inner = np.isfinite(truth)
    same = warp(img, Transform.identity(), SHAPE, "mitchell")
    assert np.array_equal(same.footprint, inner)
    np.testing.assert_allclose(same.image[inner], truth[inner], atol=2e-4)
    assert np.all(same.image[~inner] == 0.0)
    # The blur lowers the per-pixel noise by sqrt(sum w^2) = sqrt(0.796) per axis.
    assert float(np.std(same.image[inner])) == pytest.approx(10.0 * 0.796, rel=0.05)
    moved = warp(img, Transform.from_params(5.0, -3.0), SHAPE, "mitchell")
    # x_ref = x + 5, y_ref = y - 3: source pixels 1 .. n - 2 land on rows 0-155, columns 6-199.
    expected = np.zeros(SHAPE, dtype=bool)
    expected[:156, 6:] = True
    assert np.array_equal(moved.footprint, expected)
    np.testing.assert_allclose(moved.image[:156, 6:], truth[3:159, 1:195], atol=2e-4)
    # The 180 degree flip through the 2-D kernel: the same filter (it is symmetric).
    ny, nx = SHAPE
    flip = Transform(np.array([[-1.0, 0.0, nx - 1.0], [0.0, -1.0, ny - 1.0]]))
    flipped = warp(img, flip, SHAPE, "mitchell")
    assert np.array_equal(flipped.footprint, inner)
    np.testing.assert_allclose(flipped.image[inner], truth[::-1, ::-1][inner], atol=2e-4)


def test_mitchell_blur_is_the_same_at_every_phase_and_keeps_flux() -> None:
    """Against the truth (a direct render at the target positions), Mitchell widens every
    star by the same second moment, 1/9 px^2 per axis, whatever its sub-pixel phase
    (bilinear's varies from 0 to 1/4), moves no centroid and keeps every star's flux."""
    rng = np.random.default_rng(42)
    shape = (120, 160)
    xy_ref = _sparse_grid(rng, shape, spacing=30)
    flux = rng.uniform(2000.0, 8000.0, len(xy_ref))
    direct = render_stars(shape, xy_ref, flux, radius_px=14).astype(np.float64)

    def moments(img: NDArray[np.float64], x: float, y: float) -> tuple[float, ...]:
        ix, iy = round(x), round(y)
        r = 9
        st = img[iy - r:iy + r + 1, ix - r:ix + r + 1]
        gy, gx = np.mgrid[iy - r:iy + r + 1, ix - r:ix + r + 1]
        total = st.sum()
        mx, my = (st * gx).sum() / total, (st * gy).sum() / total
        return (total, mx, my, (st * (gx - mx) ** 2).sum() / total,
                (st * (gy - my) ** 2).sum() / total)

    added: dict[str, list[float]] = {"mitchell": [], "bilinear": []}
    for _ in range(3):
        t = Transform.from_params(rng.uniform(-5, 5), rng.uniform(-5, 5))
        frame = render_stars(shape, t.inverse().apply(xy_ref), flux, radius_px=14)
        for kernel in added:
            out = warp(frame, t, shape, kernel).image.astype(np.float64)
            for x, y in xy_ref:
                got, want = moments(out, x, y), moments(direct, x, y)
                added[kernel] += [got[3] - want[3], got[4] - want[4]]
                if kernel == "mitchell":
                    assert got[0] == pytest.approx(want[0], rel=2e-3)  # flux
                    assert abs(got[1] - want[1]) < 2e-3 and abs(got[2] - want[2]) < 2e-3
    mitchell, bilinear = np.array(added["mitchell"]), np.array(added["bilinear"])
    np.testing.assert_allclose(mitchell, 1.0 / 9.0, atol=0.003)  # measured 0.1100-0.1102
    assert bilinear.max() - bilinear.min() > 0.1  # bilinear's blur depends on the phase


def test_auto_is_lanczos3_on_mono_and_mitchell_on_colour() -> None:
    rng = np.random.default_rng(43)
    rgb = rng.normal(100, 10, (3, 50, 60)).astype(np.float32)
    t = Transform.from_params(1.3, -0.4, 0.6)
    for kernel, image in (("lanczos3", rgb[0]), ("mitchell", rgb)):
        auto = warp(image, t, (50, 60), "auto")
        explicit = warp(image, t, (50, 60), kernel)
        assert np.array_equal(auto.image, explicit.image), kernel
        assert np.array_equal(auto.footprint, explicit.footprint), kernel
    # The two differ (proof that the comparison above can fail).
    assert not np.array_equal(warp(rgb[0], t, (50, 60), "mitchell").image,
                              warp(rgb[0], t, (50, 60), "lanczos3").image)
    assert [resolve_kernel(k, c) for k, c in (("auto", False), ("auto", True),
                                              ("bicubic", True))] == [
        "lanczos3", "mitchell", "bicubic"]
    with pytest.raises(ValueError, match="unknown warp kernel"):
        resolve_kernel("cubic", False)


def test_translation_fast_path_matches_general_path() -> None:
    rng = np.random.default_rng(2)
    img = rng.normal(100, 10, (2, 70, 90)).astype(np.float32)
    img[1, 30:33, 40:45] = np.nan
    for name, kind in KERNELS.items():
        t = Transform.from_params(3.37, -2.81)
        fast = warp(img, t, (70, 90), name)
        out = np.empty_like(img)
        foot = np.empty((70, 90), bool)
        kw.warp_affine_kernel(img, t.inverse().matrix.copy(), kind, out, foot)
        assert np.array_equal(fast.footprint, foot), name
        np.testing.assert_allclose(fast.image, out, atol=2e-4, err_msg=name)


def test_lanczos3_keeps_peaks_and_centroids_bilinear_does_not() -> None:
    """FWHM 2.5 px stars at random sub-pixel phases, shifts and a rotation."""
    rng = np.random.default_rng(3)
    shape = (220, 260)
    xy_ref = _sparse_grid(rng, shape)
    flux = np.full(len(xy_ref), 5000.0)
    direct = render_stars(shape, xy_ref, flux, radius_px=10)
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in KERNELS}
    for rot in (0.0, 0.0, 1.3, -0.7):
        t = Transform.from_params(rng.uniform(-6, 6), rng.uniform(-6, 6), rot)
        frame = render_stars(shape, t.inverse().apply(xy_ref), flux, radius_px=10)
        for kernel in ("bilinear", "bicubic", "lanczos3", "mitchell"):
            out = warp(frame, t, shape, kernel)
            results[kernel].append(_star_quality(out.image, direct, xy_ref))
    peak = {k: float(np.mean([r[0] for r in v])) for k, v in results.items() if v}
    cen = {k: float(np.max([r[1] for r in v])) for k, v in results.items() if v}
    assert peak["lanczos3"] >= 0.97 and cen["lanczos3"] <= 0.03
    assert peak["bilinear"] < 0.92 < peak["bicubic"] < peak["lanczos3"]
    assert cen["bicubic"] <= 0.04
    # Mitchell smooths (less than bilinear on average) and keeps centroids.
    assert peak["bilinear"] < peak["mitchell"] < peak["bicubic"]
    assert cen["mitchell"] <= 0.04


def test_nan_block_is_excluded_and_never_spreads() -> None:
    rng = np.random.default_rng(4)
    img = rng.normal(100, 10, SHAPE).astype(np.float32)
    img[50:70, 80:110] = np.nan
    img[5, 5] = np.inf
    for kernel in KERNELS:
        for t in (Transform.from_params(2.4, 1.7), Transform.from_params(2.4, 1.7, 3.0)):
            out = warp(img, t, SHAPE, kernel)
            assert np.isfinite(out.image).all()
            assert np.all(out.image[~out.footprint] == 0.0)
            # Reference pixels whose source point is inside the NaN block are excluded.
            ys, xs = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
            src = t.inverse().apply(np.column_stack([xs.ravel(), ys.ravel()]).astype(float))
            in_block = ((src[:, 0] >= 79.5) & (src[:, 0] <= 109.5) & (src[:, 1] >= 49.5)
                        & (src[:, 1] <= 69.5)).reshape(SHAPE)
            assert not out.footprint[in_block].any(), kernel
            # Far from the block and the edges the footprint is full.
            far = ((np.abs(src[:, 0] - 95) > 25) | (np.abs(src[:, 1] - 60) > 20)).reshape(SHAPE)
            inner = ((src[:, 0] > 8) & (src[:, 0] < SHAPE[1] - 5) & (src[:, 1] > 8)
                     & (src[:, 1] < SHAPE[0] - 5)).reshape(SHAPE)
            assert out.footprint[far & inner].all(), kernel


def test_colour_planes_share_weights_and_footprint() -> None:
    rng = np.random.default_rng(5)
    rgb = rng.normal(100, 10, (3, *SHAPE)).astype(np.float32)
    rgb[2, 20:30, 20:30] = np.nan
    t = Transform.from_params(-4.2, 3.9, 0.8)
    out = warp(rgb, t, SHAPE, "lanczos3")
    assert out.image.shape == (3, *SHAPE) and out.image.dtype == np.float32
    mono = [warp(rgb[c], t, SHAPE, "lanczos3") for c in range(3)]
    assert np.array_equal(out.footprint, mono[0].footprint & mono[1].footprint
                          & mono[2].footprint)
    for c in range(3):
        np.testing.assert_array_equal(out.image[c][out.footprint], mono[c].image[out.footprint])


def test_other_output_shapes_offsets_and_inputs() -> None:
    rng = np.random.default_rng(6)
    img = rng.normal(100, 10, SHAPE).astype(np.float32)
    before = img.copy()
    out = warp(img.astype(">f4"), Transform.from_params(0.5, 0.25, 0.1), (100, 300))
    assert out.image.shape == (100, 300) and out.footprint.shape == (100, 300)
    assert not out.footprint[:, 210:].any()
    assert np.array_equal(img, before)
    gone = warp(img, Transform.from_params(5000.0, 0.0), SHAPE)
    assert not gone.footprint.any() and not gone.image.any()
    scaled = warp(img, Transform.from_params(0.0, 0.0, 0.0, scale=0.5), SHAPE, "bilinear")
    assert scaled.footprint.sum() == pytest.approx(SHAPE[0] * SHAPE[1] / 4, rel=0.05)


def test_rejects_bad_arguments() -> None:
    img = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="unknown warp kernel"):
        warp(img, Transform.identity(), SHAPE, "cubic")
    with pytest.raises(ValueError, match="singular"):
        warp(img, Transform(np.zeros((2, 3))), SHAPE)
    with pytest.raises(ValueError, match="shape"):
        warp(np.zeros((2, 2, 2, 2), np.float32), Transform.identity(), SHAPE)
    with pytest.raises(ValueError, match="positive"):
        warp(img, Transform.identity(), (0, 5))


def test_opencv_cubic_offset_is_its_kernel_and_lanczos4_is_quantised() -> None:
    """Why OpenCV's cubic/Lanczos4 centroids are offset (see the warp module docstring).

    OpenCV's INTER_CUBIC is Keys' cubic with a = -0.75, which does not reproduce linear
    functions: a star's flux-weighted centroid moves by up to ~0.05 px depending on the
    sub-pixel phase. INTER_LANCZOS4 (and, in OpenCV 4.x, every kernel) rounds the source
    coordinate to 1/32 px (INTER_BITS = 5), up to 1/64 px of extra error.
    """
    cv2 = pytest.importorskip("cv2")
    shape = (64, 64)
    truth = render_stars(shape, np.array([[32.0, 32.0]]), np.array([1000.0]))
    x_true = _first_moment_x(truth, 32, 32)
    phase = 0.1875  # 6/32: exactly representable, so no rounding in any OpenCV version
    t = Transform.from_params(3 + phase, 0.0)
    frame = render_stars(shape, np.array([[32.0 - 3 - phase, 32.0]]), np.array([1000.0]))
    ours = warp(frame, t, shape, "bicubic").image
    ours_lin = warp(frame, t, shape, "bilinear").image
    cub = cv2.warpAffine(frame, t.matrix, (64, 64), flags=cv2.INTER_CUBIC)
    inv = cv2.warpAffine(frame, t.inverse().matrix, (64, 64),
                         flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP)
    # Keys a = -0.5 and bilinear reproduce linear functions: no centroid shift at all.
    assert abs(_first_moment_x(ours, 32, 32) - x_true) < 2e-4
    assert abs(_first_moment_x(ours_lin, 32, 32) - x_true) < 2e-4
    cv_err = _first_moment_x(cub, 32, 32) - x_true
    assert 0.04 < cv_err < 0.055
    # The matrix-inversion flag is not the cause: both ways agree.
    assert _first_moment_x(inv, 32, 32) - x_true == pytest.approx(cv_err, abs=1e-4)
    # Lanczos4's coordinate rounding: a 0.0123 px shift is rounded to 0/32 -> a plain copy.
    probe = np.zeros((8, 64), np.float32)
    probe[:, 32] = 1.0
    m = np.array([[1.0, 0.0, 0.0123], [0.0, 1.0, 0.0]])
    lan4 = cv2.warpAffine(probe, m, (64, 8), flags=cv2.INTER_LANCZOS4 | cv2.WARP_INVERSE_MAP)
    assert np.array_equal(lan4[4], probe[4])
    ours_small = warp(probe, Transform(m).inverse(), (8, 64), "lanczos3").image
    assert ours_small[4, 31] == pytest.approx(0.0123, abs=2e-3)  # the shift is kept


def _reference_warp(img: NDArray[np.float32], t: Transform, shape: tuple[int, int],
                    kind: int) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Plain per-pixel implementation with the exact (closed-form) kernel weights."""
    inv = t.inverse().matrix
    out = np.zeros(shape, np.float32)
    foot = np.zeros(shape, bool)
    w = np.zeros(6)
    nt = kw.N_TAPS[kind]
    for y in range(shape[0]):
        for x in range(shape[1]):
            u = inv[0, 0] * x + inv[0, 1] * y + inv[0, 2] + (0.5 if kind == kw.NEAREST else 0)
            v = inv[1, 0] * x + inv[1, 1] * y + inv[1, 2] + (0.5 if kind == kw.NEAREST else 0)
            fu, fv = math.floor(u), math.floor(v)
            kw.kernel_weights(kind, u - fu, w)
            wx = w[:nt].copy()
            kw.kernel_weights(kind, v - fv, w)
            wy = w[:nt].copy()
            iu, iv = fu + kw.FIRST_TAP[kind], fv + kw.FIRST_TAP[kind]
            ok, acc = True, 0.0
            for j in range(nt):
                for i in range(nt):
                    if wy[j] == 0 or wx[i] == 0:
                        continue
                    r, c = iv + j, iu + i
                    if not (0 <= r < img.shape[0] and 0 <= c < img.shape[1]):
                        ok = False
                        continue
                    acc += wy[j] * wx[i] * float(img[r, c])
            if ok and math.isfinite(acc):
                out[y, x] = acc
                foot[y, x] = True
    return out, foot


def _affine_2d(img: NDArray[np.float32], t: Transform, shape: tuple[int, int],
               kind: int) -> Warped:
    """The 2-D (per-pixel 6 x 6) affine kernel, whatever path warp() would take."""
    planes = np.ascontiguousarray(img[np.newaxis] if img.ndim == 2 else img, np.float32)
    out = np.empty((planes.shape[0], *shape), np.float32)
    foot = np.empty(shape, np.bool_)
    kw.warp_affine_kernel(planes, np.ascontiguousarray(t.inverse().matrix), kind, out, foot)
    return Warped(out[0] if img.ndim == 2 else out, foot)


@pytest.mark.parametrize(("rot", "scale"), [(0.7, 1.0), (90.3, 1.0), (179.6, 1.0),
                                            (1e-7, 1.0), (-3.0, 0.93), (45.0, 1.0)])
def test_general_path_matches_a_plain_reference(rot: float, scale: float) -> None:
    rng = np.random.default_rng(8)
    img = rng.normal(100, 10, (40, 50)).astype(np.float32)
    img[15:18, 20:23] = np.nan
    th = math.radians(rot)
    lin = scale * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    centre = np.array([24.5, 19.5])
    shift = centre + np.array([2.3, 1.7]) - lin @ centre  # about the centre, then a shift
    t = Transform(np.hstack([lin, shift[:, None]]))
    for name, kind in KERNELS.items():
        # The 2-D kernel itself (warp() sends small rotations of bicubic and lanczos3 to
        # the two-pass kernel, tested against the truth and this kernel below).
        got = _affine_2d(img, t, (40, 50), kind)
        out, foot = _reference_warp(img, t, (40, 50), kind)
        # Pixels whose kernel grazes the NaN block with a ~1e-10 weight may differ.
        assert np.sum(got.footprint != foot) <= 5, name
        both = got.footprint & foot
        assert both.sum() > 300
        if kind == kw.NEAREST:  # exact half-pixel ties may round either way
            ys, xs = np.mgrid[0:40, 0:50]
            src = t.inverse().apply(np.column_stack([xs.ravel(), ys.ravel()]).astype(float))
            frac = np.abs((src + 0.5) - np.rint(src + 0.5)).min(axis=1).reshape(40, 50)
            both &= frac > 1e-6
        np.testing.assert_allclose(got.image[both], out[both], atol=1e-3, err_msg=name)


def test_out_buffer_is_overwritten_and_reused() -> None:
    """``out=`` writes the same result into the given arrays, whatever they held before."""
    rng = np.random.default_rng(21)
    mono = rng.normal(100.0, 5.0, (70, 90)).astype(np.float32)
    mono[10:14, 20:25] = np.nan
    colour = rng.normal(100.0, 5.0, (3, 70, 90)).astype(np.float32)
    transforms = (Transform.identity(), Transform.from_params(2.3, -1.6),
                  Transform.from_params(2.3, -1.6, 1.2))
    for image in (mono, colour):
        for transform in transforms:
            for kernel in ("bilinear", "lanczos3", "mitchell"):
                fresh = warp(image, transform, (64, 80), kernel)
                stale = Warped(np.full(fresh.image.shape, np.nan, np.float32),
                               np.ones((64, 80), dtype=np.bool_))
                again = warp(image, transform, (64, 80), kernel, out=stale)
                assert np.shares_memory(again.image, stale.image)
                assert again.footprint is stale.footprint
                np.testing.assert_array_equal(again.image, fresh.image)
                np.testing.assert_array_equal(again.footprint, fresh.footprint)


def test_out_buffer_that_does_not_fit_is_refused() -> None:
    image = np.zeros((40, 50), dtype=np.float32)
    t = Transform.from_params(1.5, 0.5, 0.3)
    good_foot = np.zeros((40, 50), dtype=np.bool_)
    bad = [
        Warped(np.zeros((40, 51), np.float32), good_foot),  # shape
        Warped(np.zeros((40, 50), np.float64), good_foot),  # dtype
        Warped(np.zeros((50, 40), np.float32).T, good_foot),  # layout
        Warped(np.zeros((3, 40, 50), np.float32), good_foot),  # channels
        Warped(np.zeros((40, 50), np.float32), np.zeros((40, 50), np.uint8)),
        Warped(image, good_foot),  # the input itself
    ]
    for out in bad:
        with pytest.raises(ValueError, match="out"):
            warp(image, t, (40, 50), out=out)


def _two_pass(img: NDArray[np.float32], t: Transform, shape: tuple[int, int],
              kind: int) -> Warped:
    """The two-pass kernel, whatever path warp() would take."""
    planes = np.ascontiguousarray(img[np.newaxis] if img.ndim == 2 else img, np.float32)
    out = np.empty((planes.shape[0], *shape), np.float32)
    foot = np.empty(shape, np.bool_)
    kt.warp_two_pass_kernel(planes, np.ascontiguousarray(t.inverse().matrix), kind, out, foot)
    return Warped(out[0] if img.ndim == 2 else out, foot)


def _rotation(rot_deg: float, scale: float, shape: tuple[int, int],
              shift: tuple[float, float]) -> Transform:
    """Rotation by ``rot_deg`` and scaling about the frame's centre, then ``shift``."""
    th = math.radians(rot_deg)
    lin = scale * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    centre = np.array([(shape[1] - 1) / 2, (shape[0] - 1) / 2])
    offset = centre + np.asarray(shift) - lin @ centre
    return Transform(np.hstack([lin, offset[:, None]]))


@pytest.mark.parametrize(("rot", "scale"), [(0.05, 1.0), (0.5, 1.0), (2.0, 1.0), (-1.3, 1.0),
                                            (4.5, 0.97)])
def test_two_pass_is_as_accurate_against_the_truth_as_the_2d_kernel(rot: float,
                                                                     scale: float) -> None:
    """The two-pass kernel (warp's path for small rotations) vs the 2-D kernel and a render.

    Both interpolate the same samples: the 2-D kernel on the input's grid, the two-pass one
    along a sheared grid, so they differ by interpolation error, not by a bias. Against a
    direct render of FWHM 2.5 px stars at the target positions, the two-pass kernel's
    errors (pixel RMS, peak ratio, windowed centroid) must be those of the 2-D kernel to
    within 1 % (0.1 % up to 2 degrees; larger angles take the 2-D kernel).
    """
    rng = np.random.default_rng(31)
    shape = (200, 240)
    xy_ref = _sparse_grid(rng, shape, spacing=18)
    flux = rng.uniform(2000.0, 8000.0, len(xy_ref))
    t = _rotation(rot, scale, shape, (rng.uniform(-4, 4), rng.uniform(-4, 4)))
    # Resampling keeps surface brightness: a star's flux scales by scale**2, its FWHM by scale.
    direct = render_stars(shape, xy_ref, flux * scale**2, fwhm_px=2.5 * scale, radius_px=10)
    frame = render_stars(shape, t.inverse().apply(xy_ref), flux, radius_px=10)
    for name in ("bicubic", "lanczos3", "mitchell"):
        kind = KERNELS[name]
        inv = np.ascontiguousarray(t.inverse().matrix)
        assert kt.two_pass_suits(inv)
        new = _two_pass(frame, t, shape, kind)
        old = _affine_2d(frame, t, shape, kind)
        # warp() takes the two-pass kernel where it pays (>= 0.15 deg), else the 2-D one.
        via_warp = warp(frame, t, shape, name)
        np.testing.assert_array_equal(via_warp.image, (new if abs(rot) > 0.15 else old).image)
        inner = old.footprint & new.footprint
        err_new = float(np.sqrt(np.mean((new.image - direct)[inner] ** 2)))
        err_old = float(np.sqrt(np.mean((old.image - direct)[inner] ** 2)))
        assert err_new <= (1.01 if abs(rot) > 2 else 1.002) * err_old, (name, err_new, err_old)
        # The two interpolants differ by a small fraction of the peaks (interpolation error).
        assert np.max(np.abs(new.image - old.image)[inner]) <= 0.005 * direct.max(), name
        if name == "lanczos3":
            peak_new, cen_new = _star_quality(new.image, direct, xy_ref)
            peak_old, cen_old = _star_quality(old.image, direct, xy_ref)
            assert peak_new >= 0.97 and abs(peak_new - peak_old) <= 0.005
            assert cen_new <= 0.03 and cen_new <= 1.2 * cen_old + 0.002
        # Footprints agree except within one pixel of their border (the sheared grid
        # reaches the input's edge a little earlier or later).
        assert not (ndimage.binary_erosion(old.footprint, iterations=1) & ~new.footprint).any()
        assert (new.footprint & ~ndimage.binary_dilation(old.footprint)).sum() == 0
    # Larger rotations keep the 2-D kernel.
    big = _rotation(8.0, 1.0, shape, (0.0, 0.0))
    assert not kt.two_pass_suits(np.ascontiguousarray(big.inverse().matrix))


def test_two_pass_tiles_nan_and_colour() -> None:
    """Tile size does not change the result; NaN and edges leave the footprint; colour
    planes share the footprint and are the mono results."""
    rng = np.random.default_rng(32)
    img = rng.normal(100.0, 10.0, (3, 90, 130)).astype(np.float32)
    img[1, 40:44, 60:63] = np.nan
    img[2, 5, 7] = np.inf
    t = _rotation(1.7, 1.0, (90, 130), (2.3, -1.4))
    inv = np.ascontiguousarray(t.inverse().matrix)
    results = []
    for tile_rows, tile_cols in ((128, 256), (7, 13), (1, 1), (33, 64)):
        out = np.full((3, 90, 130), np.nan, np.float32)
        foot = np.zeros((90, 130), np.bool_)
        kt.warp_two_pass_kernel(img, inv, kw.LANCZOS3, out, foot, tile_rows, tile_cols)
        results.append((out, foot))
    out, foot = results[0]
    for other, other_foot in results[1:]:
        assert np.array_equal(foot, other_foot)
        np.testing.assert_allclose(other, out, atol=2e-4)
    assert np.isfinite(out).all() and np.all(out[:, ~foot] == 0.0)
    # Pixels whose 6 x 6 neighbourhood (plus the shear) holds the NaN block are out; the
    # far interior is in.
    ys, xs = np.mgrid[0:90, 0:130]
    src = t.inverse().apply(np.column_stack([xs.ravel(), ys.ravel()]).astype(float))
    near_nan = ((np.abs(src[:, 0] - 61) < 3.5) & (np.abs(src[:, 1] - 41.5) < 4)).reshape(90, 130)
    assert not foot[near_nan].any()
    inside = ((src[:, 0] > 4) & (src[:, 0] < 125) & (src[:, 1] > 4) & (src[:, 1] < 85))
    assert foot[inside.reshape(90, 130) & ~ndimage.binary_dilation(near_nan, iterations=8)
                & ((src[:, 0] - 7) ** 2 + (src[:, 1] - 5) ** 2 > 64).reshape(90, 130)].all()
    assert foot.sum() > 0.8 * 90 * 130
    mono = warp(img[0], t, (90, 130), "lanczos3")
    np.testing.assert_array_equal(out[0][foot], mono.image[foot])


@pytest.mark.parametrize("size", [(40, 7), (7, 40), (10, 10), (14, 14), (15, 9), (4, 3), (3, 4)])
@pytest.mark.parametrize("name", ["bicubic", "lanczos3", "mitchell"])
def test_inputs_narrower_than_the_kernel_read_nothing_outside_them(
        size: tuple[int, int], name: str) -> None:
    # An input narrower than the kernel's safe interior once gave an inverted, non-empty
    # interval of taps: out-of-bounds reads (values ~1e32) marked valid.
    nx, ny = size
    img = np.random.default_rng(3).uniform(100.0, 200.0, (ny, nx)).astype(np.float32)
    t = _rotation(1.0, 1.0, (ny, nx), (0.3, -0.2))
    inv = t.inverse().matrix
    # Taps at floor(u) + (-1..2) (bicubic) or (-2..3) (Lanczos3); a zero-weight tap at an
    # integer position is not read.
    lo, margin = {"bicubic": (1.0, 2.0), "lanczos3": (2.0, 3.0), "mitchell": (1.0, 2.0)}[name]
    for out in (warp(img, t, (ny, nx), name), _affine_2d(img, t, (ny, nx), KERNELS[name])):
        assert np.all(np.isfinite(out.image))
        assert np.all(out.image[~out.footprint] == 0.0)
        yy, xx = np.nonzero(out.footprint)
        if yy.size:
            # Every valid pixel's taps lie inside the input (0.1 px for the sheared grid),
            # and its value is an interpolant of the input, not memory.
            u = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
            v = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
            assert u.min() >= lo - 0.1 and u.max() <= nx - margin + 0.1
            assert v.min() >= lo - 0.1 and v.max() <= ny - margin + 0.1
            assert np.abs(out.image[out.footprint]).max() <= 2 * 200.0

"""Tests of livestack.pipeline.register."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from livestack.errors import RegistrationError
from livestack.pipeline.detect import DetectConfig, detect_stars, measure
from livestack.pipeline.register import RegisterConfig, Registrar, fit_transform
from livestack.pipeline.types import StarList, Transform
from tests.pipeline.test_detect import noisy, render_stars

SHAPE = (600, 800)


def _rotation_about(center: NDArray[np.float64], deg: float,
                    shift: NDArray[np.float64]) -> Transform:
    """Frame -> reference: rotate by ``deg`` about ``center``, then shift."""
    th = math.radians(deg)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    t = center + shift - rot @ center
    return Transform(np.hstack([rot, t[:, None]]), "similarity", 0, 0.0, "truth")


class _Sky:
    """A star field in reference coordinates, larger than the frame, rendered per frame."""

    def __init__(self, seed: int, n: int = 420, shape: tuple[int, int] = SHAPE) -> None:
        self.rng = np.random.default_rng(seed)
        self.shape = shape
        ny, nx = shape
        self.xy = np.column_stack([self.rng.uniform(-120, nx + 120, n),
                                   self.rng.uniform(-120, ny + 120, n)])
        self.flux = 300.0 * (1.0 + self.rng.pareto(1.5, n))

    def frame(self, t: Transform, noise: float = 8.0) -> NDArray[np.float32]:
        ny, nx = self.shape
        xy = t.inverse().apply(self.xy)
        inside = ((xy[:, 0] > -15) & (xy[:, 0] < nx + 15) & (xy[:, 1] > -15)
                  & (xy[:, 1] < ny + 15))
        img = render_stars(self.shape, xy[inside], self.flux[inside], radius_px=12)
        return noisy(self.rng, img, noise=noise)


def _grid_error(est: Transform, truth: Transform, shape: tuple[int, int]) -> float:
    """RMS distance between the two mappings over a grid covering the frame."""
    ys, xs = np.mgrid[0:shape[0]:25, 0:shape[1]:25]
    grid = np.column_stack([xs.ravel(), ys.ravel()]).astype(np.float64)
    return float(np.sqrt(np.mean(np.sum((est.apply(grid) - truth.apply(grid)) ** 2, axis=1))))


# --------------------------------------------------------------------------- fit_transform


@pytest.mark.parametrize("model", ["translation", "similarity", "affine"])
def test_fit_transform_recovers_exact_models(model: str) -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 500, (30, 2))
    th = math.radians(177.0)
    s_c, s_s = 1.01 * math.cos(th), 1.01 * math.sin(th)
    truths = {
        "translation": np.array([[1.0, 0.0, 12.5], [0.0, 1.0, -7.25]]),
        "similarity": np.array([[s_c, -s_s, 3.0], [s_s, s_c, -4.0]]),
        "affine": np.array([[1.01, 0.02, 5.0], [-0.015, 0.99, -3.0]]),
    }
    truth = truths[model]
    dst = src @ truth[:, :2].T + truth[:, 2]
    np.testing.assert_allclose(fit_transform(src, dst, model), truth, atol=1e-9)
    # Weights: a gross outlier with zero weight does not matter.
    dst2 = dst.copy()
    dst2[0] += 50.0
    w = np.ones(30)
    w[0] = 0.0
    np.testing.assert_allclose(fit_transform(src, dst2, model, w), truth, atol=1e-9)


def test_fit_transform_never_returns_a_reflection_and_checks_input() -> None:
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (10, 2))
    mirrored = src * [-1.0, 1.0]
    m = fit_transform(src, mirrored, "similarity")
    assert np.linalg.det(m[:, :2]) >= 0
    with pytest.raises(ValueError, match="needs >= 3"):
        fit_transform(src[:2], src[:2], "affine")
    with pytest.raises(ValueError, match="distinct"):
        fit_transform(np.ones((4, 2)), np.ones((4, 2)), "similarity")
    with pytest.raises(ValueError, match="collinear"):
        line = np.column_stack([np.arange(5.0), np.arange(5.0)])
        fit_transform(line, line, "affine")
    with pytest.raises(ValueError, match="unknown model"):
        fit_transform(src, src, "projective")
    with pytest.raises(ValueError, match="shapes"):
        fit_transform(src, src[:5], "translation")


def test_register_config_is_validated() -> None:
    with pytest.raises(ValueError, match="model"):
        RegisterConfig(model="rigid")
    with pytest.raises(ValueError, match="min_matches"):
        RegisterConfig(model="affine", min_matches=2)


# --------------------------------------------------------------------------- synthetic


def test_fifty_frames_drift_rotation_and_meridian_flip() -> None:
    """<= 0.05 px RMS over the frame on average and <= 0.1 px on the worst frame."""
    sky = _Sky(seed=11)
    ny, nx = SHAPE
    centre = np.array([nx / 2.0, ny / 2.0])
    ref_img = sky.frame(Transform.identity())
    ref_stars, _, _ = detect_stars(ref_img)
    registrar = Registrar(ref_stars, ref_img, RegisterConfig())
    errors = []
    for i in range(1, 50):
        rot = sky.rng.uniform(-2.0, 2.0) + (180.0 if i == 25 else 0.0)
        truth = _rotation_about(centre, rot, sky.rng.uniform(-40, 40, 2))
        img = sky.frame(truth)
        stars, _, _ = detect_stars(img)
        est = registrar.register(stars, img)
        assert est.method == "triangles" and est.n_matches >= 30
        assert est.rms_px < 0.3
        errors.append(_grid_error(est, truth, SHAPE))
    errors_arr = np.array(errors)
    assert float(np.sqrt(np.mean(errors_arr**2))) <= 0.05
    assert errors_arr.max() <= 0.1


@pytest.mark.parametrize("model", ["translation", "affine"])
def test_other_models(model: str) -> None:
    sky = _Sky(seed=12)
    ref_img = sky.frame(Transform.identity())
    ref_stars, _, _ = detect_stars(ref_img)
    registrar = Registrar(ref_stars, None, RegisterConfig(model=model))
    truth = Transform.from_params(13.3, -21.7) if model == "translation" else \
        Transform(np.array([[1.002, 0.004, 9.0], [-0.003, 0.998, -4.5]]))
    img = sky.frame(truth)
    est = registrar.register(detect_stars(img)[0])
    assert est.model == model
    assert _grid_error(est, truth, SHAPE) < 0.05


def test_few_stars_fall_back_to_phase_correlation() -> None:
    rng = np.random.default_rng(13)
    xy = np.array([[200.3, 150.7], [520.9, 380.2], [410.1, 90.6]])
    flux = np.array([20000.0, 15000.0, 12000.0])
    ref_img = noisy(rng, render_stars(SHAPE, xy, flux))
    truth = Transform.from_params(17.37, -9.81)
    img = noisy(rng, render_stars(SHAPE, truth.inverse().apply(xy), flux))
    ref_stars, _, _ = detect_stars(ref_img)
    stars, _, _ = detect_stars(img)
    assert len(stars) == 3
    registrar = Registrar(ref_stars, ref_img, RegisterConfig())
    est = registrar.register(stars, img)
    assert est.method == "phase_correlation" and est.model == "translation"
    assert abs(est.dx - truth.dx) < 0.2 and abs(est.dy - truth.dy) < 0.2
    assert est.n_matches == 3  # refined on the three stars
    assert abs(est.dx - truth.dx) < 0.05
    # Without the image (or with the fallback off) there is nothing to fall back on.
    with pytest.raises(RegistrationError) as err:
        registrar.register(stars)
    assert err.value.reason == "too_few_stars" and "3 stars" in err.value.message
    off = Registrar(ref_stars, ref_img, RegisterConfig(phase_correlation_fallback=False))
    with pytest.raises(RegistrationError):
        off.register(stars, img)
    # Star-less (but structured) frame: phase correlation alone.
    est = registrar.register(StarList(np.zeros((0, 2)), np.zeros(0), np.zeros(0),
                                      np.zeros(0)), img)
    assert abs(est.dx - truth.dx) < 0.2 and abs(est.dy - truth.dy) < 0.2


def test_a_binned_phase_image_registers_like_the_full_reference() -> None:
    from livestack.pipeline.register import phase_image

    rng = np.random.default_rng(31)
    xy = np.array([[200.3, 150.7], [520.9, 380.2], [410.1, 90.6]])
    flux = np.array([20000.0, 15000.0, 12000.0])
    ref_img = noisy(rng, render_stars(SHAPE, xy, flux))
    truth = Transform.from_params(-11.2, 6.45)
    img = noisy(rng, render_stars(SHAPE, truth.inverse().apply(xy), flux))
    ref_stars, _, _ = detect_stars(ref_img)
    stars, _, _ = detect_stars(img)
    config = RegisterConfig(pc_max_size_px=200)  # a block factor > 1 at this size
    phase = phase_image(ref_img, config)
    assert phase.factor > 1 and phase.binned.size * phase.factor**2 <= ref_img.size
    from_full = Registrar(ref_stars, ref_img, config).register(stars, img)
    from_phase = Registrar(ref_stars, phase, config).register(stars, img)
    assert from_phase.method == from_full.method == "phase_correlation"
    np.testing.assert_array_equal(from_phase.matrix, from_full.matrix)
    wrong = noisy(rng, render_stars((SHAPE[0] - 8, SHAPE[1]), xy, flux))
    with pytest.raises(RegistrationError) as err:
        Registrar(ref_stars, phase, config).register(
            StarList(np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0)), wrong)
    assert "differs from the reference" in err.value.message


def test_blank_and_nan_frames_raise_registration_error() -> None:
    sky = _Sky(seed=14)
    ref_img = sky.frame(Transform.identity())
    ref_stars, _, _ = detect_stars(ref_img)
    registrar = Registrar(ref_stars, ref_img, RegisterConfig())
    rng = np.random.default_rng(14)
    blank = noisy(rng, np.zeros(SHAPE, np.float32))
    empty = StarList(np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0))
    for img in (blank, np.full(SHAPE, np.nan, np.float32)):
        stars, _, _ = detect_stars(img)
        with pytest.raises(RegistrationError) as err:
            registrar.register(stars, img)
        assert err.value.reason == "too_few_stars"
        assert "phase-correlation peak" in err.value.message
    # A frame of unrelated stars: no match.
    other = _Sky(seed=99)
    img = other.frame(Transform.identity())
    with pytest.raises(RegistrationError) as err:
        registrar.register(detect_stars(img)[0])
    assert err.value.reason == "no_match"
    # Wrong-shaped image for the fallback: still a RegistrationError, never another error.
    with pytest.raises(RegistrationError, match="shape"):
        registrar.register(empty, np.zeros((10, 10), np.float32))
    # A reference without stars cannot register anything by triangles.
    lonely = Registrar(empty, None, RegisterConfig())
    with pytest.raises(RegistrationError) as err:
        lonely.register(ref_stars)
    assert err.value.reason == "too_few_stars"


def test_astroalign_gets_a_second_chance(monkeypatch: pytest.MonkeyPatch) -> None:
    sky = _Sky(seed=15)
    ref_img = sky.frame(Transform.identity())
    ref_stars, _, _ = detect_stars(ref_img)
    registrar = Registrar(ref_stars, None, RegisterConfig())
    truth = _rotation_about(np.array([400.0, 300.0]), 1.2, np.array([20.0, -15.0]))
    stars, _, _ = detect_stars(sky.frame(truth))
    monkeypatch.setattr(Registrar, "_triangle_match", lambda self, cp: None)
    est = registrar.register(stars)
    assert est.method == "triangles"
    assert _grid_error(est, truth, SHAPE) < 0.05


def test_with_the_simulator() -> None:
    """Raw simulated frames (hot pixels, gradient, dither, rotation, meridian flip)."""
    sim = pytest.importorskip("livestack.sim")
    cfg = sim.SimConfig(width=800, height=600, dither_px=15.0, rotation_deg_per_frame=0.4,
                        meridian_flip_at=3, faintest_flux_e=5000.0, n_stars=300)
    simulator = sim.Simulator(cfg, seed=3)
    frames = [simulator.light(i) for i in range(5)]
    data = [np.asarray(f.data, dtype=np.float32) for f in frames]
    registrar = Registrar(measure(data[0])[0], data[0], RegisterConfig())
    for f, img in zip(frames[1:], data[1:], strict=True):
        est = registrar.register(measure(img)[0], img)
        assert _grid_error(est, f.truth.transform, img.shape) < 0.05


# --------------------------------------------------------------------------- real data


def _superpixel_luminance(cfa: NDArray[np.float32]) -> NDArray[np.float32]:
    """Sum of each 2x2 CFA cell (R + 2G + B), half resolution."""
    ny, nx = (cfa.shape[0] // 2) * 2, (cfa.shape[1] // 2) * 2
    c = cfa[:ny, :nx]
    return (c[0::2, 0::2] + c[0::2, 1::2] + c[1::2, 0::2] + c[1::2, 1::2]).astype(np.float32)


@pytest.mark.realdata
def test_oscaar_all_lights_match_the_manifest(oscaar_dir: Path) -> None:
    from astropy.io import fits

    manifest = {m["file"]: m for m in json.loads(
        (oscaar_dir / "manifest_lights.json").read_text())}
    files = sorted((oscaar_dir / "lights").glob("*.fit"))
    assert len(files) == 50
    ref = fits.getdata(files[0]).astype(np.float32)
    registrar = Registrar(measure(ref)[0], ref, RegisterConfig())
    worst = 0.0
    for path in files[1:]:
        img = fits.getdata(path).astype(np.float32)
        est = registrar.register(measure(img)[0], img)
        row = manifest[path.name]
        worst = max(worst, abs(est.dx - row["dx"]), abs(est.dy - row["dy"]))
        assert est.method == "triangles" and est.n_matches > 100
        assert abs(est.rotation_deg) < 0.05
    assert worst < 0.3


@pytest.mark.realdata
def test_seestar_sparse_field_with_jumps(seestar_dir: Path) -> None:
    from astropy.io import fits

    manifest = {m["file"]: m for m in json.loads(
        (seestar_dir / "manifest_lights.json").read_text())}
    files = sorted((seestar_dir / "lights").glob("*.fit"))
    assert len(files) == 32
    lum = [_superpixel_luminance(fits.getdata(p).astype(np.float32)) for p in files]
    cfg = DetectConfig()
    registrar = Registrar(measure(lum[0], cfg)[0], lum[0], RegisterConfig())
    worst = 0.0
    for path, img in zip(files[1:], lum[1:], strict=True):
        est = registrar.register(measure(img, cfg)[0], img)
        row = manifest[path.name]
        worst = max(worst, abs(est.dx - row["dx"]), abs(est.dy - row["dy"]))
        assert est.n_matches >= 8
    assert worst < 0.5


def test_degenerate_star_lists_only_ever_raise_registration_error() -> None:
    """Duplicates, collinear stars, lattices, tiny fields, empty lists: a Transform or a
    RegistrationError, never another exception."""
    rng = np.random.default_rng(31)
    img = rng.normal(0, 1, (100, 100)).astype(np.float32)

    def stars(xy: NDArray[np.float64]) -> StarList:
        n = len(xy)
        return StarList(np.asarray(xy, float).reshape(-1, 2), np.ones(n), np.ones(n),
                        np.ones(n))

    cases: list[NDArray[np.float64]] = []
    for trial in range(48):
        n = int(rng.integers(0, 40))
        kind = trial % 4
        if kind == 0:
            xy = np.repeat(rng.uniform(0, 500, (1, 2)), n, axis=0)
        elif kind == 1:
            t = rng.uniform(0, 500, n)
            xy = np.column_stack([t, 2 * t + 1])
        elif kind == 2:
            xy = np.round(rng.uniform(0, 20, (n, 2)))
        else:
            xy = rng.uniform(0, 500, (n, 2))
            xy[: n // 3] = xy[0] if n else xy[:0]
        cases.append(xy)
    for i, ref in enumerate(cases):
        frame = cases[(i * 7 + 3) % len(cases)]
        for model in ("translation", "similarity", "affine"):
            registrar = Registrar(stars(ref), img, RegisterConfig(model=model))
            try:
                est = registrar.register(stars(frame), img)
            except RegistrationError as exc:
                assert exc.reason in ("too_few_stars", "no_match")
            else:
                assert np.all(np.isfinite(est.matrix))

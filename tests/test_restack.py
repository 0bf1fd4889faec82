"""The integration engine on a small simulated session with a journal.

The session is built directly (simulated FITS lights + darks, journal rows carrying the
simulator's true transforms), so these tests exercise only the engine: planning,
recalibration, registration with stored transforms, memory-limited banding, scratch
clean-up, provenance and the one-line errors.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from livestack.errors import FrameError, FrameReadError, UsageError
from livestack.pipeline.combine import IntegrateConfig
from livestack.restack import IntegrationCancelled, integrate_plan, integrate_session, plan_memory
from livestack.sessionplan import load_session, plan_integration
from livestack.sim import SimConfig, Simulator, write_calibration_set, write_sequence
from livestack.storage.journal import Journal, sha256_file

N_FRAMES = 12
TRAIL_FRAME = 3
STACK_ID = "2026-01-15/m42-l-60s"
MB = 2**20


def _sim_config() -> SimConfig:
    return SimConfig(width=1024, height=768, n_stars=300, satellite_frames=(TRAIL_FRAME,),
                     drift_px_per_frame=(0.7, 0.4), dither_px=3.0, cosmic_rays_per_frame=3.0)


def _fake_metrics(index: int) -> dict[str, Any]:
    """Journal metrics: FWHM grows with the index so --select has something to pick."""
    return {"star_count": 200 + 5 * index, "fwhm_px": 2.4 + 0.1 * index, "fwhm_arcsec": None,
            "elongation": 1.05, "background_adu": 900.0, "noise_adu": 10.0, "snr": 50.0}


def _record(journal: Journal, path: Path, status: str, transform: list[float] | None,
            index: int) -> int:
    st = path.stat()
    row = journal.mark_pending(str(path), st.st_size, st.st_mtime_ns, sha256_file(path))
    journal.finish(row, status, stack_id=STACK_ID, metrics=_fake_metrics(index),
                   transform=transform, model="similarity", weight=1.0, assign_seq=True,
                   reason=None if status == "accepted" else "fwhm_jump")
    return row


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Lights, darks and a journal whose stack holds the lights as accepted frames."""
    base = tmp_path_factory.mktemp("session")
    config = _sim_config()
    sim = Simulator(config, seed=11)
    # N.I.N.A.-like names with a space ("M 42_L_60s_0000.fits")
    lights = write_sequence(base / "lights", config, seed=11, n_frames=N_FRAMES + 1,
                            simulator=sim, name_template="{object}_{filter}_{exposure}s_"
                                                         "{index:04d}.fits")
    cal = write_calibration_set(base / "cal", config, seed=11, n_bias=0, n_darks=5, n_flats=0,
                                simulator=sim)
    out = base / "out"
    journal = Journal(out / "journal.sqlite")
    journal.ensure_stack(STACK_ID, {"object": "M 42"}, STACK_ID)
    (out / STACK_ID).mkdir(parents=True)
    for i, path in enumerate(lights[:N_FRAMES]):
        _record(journal, path, "accepted", sim.transform(i).to_list(), i)
    # a frame the live gate rejected, and an accepted one taken out of the stack later
    _record(journal, lights[N_FRAMES], "rejected", None, N_FRAMES)
    extra = base / "lights" / "late.fits"
    extra.write_bytes(lights[0].read_bytes()[:2880 * 4])  # never read: the row is inactive
    late = _record(journal, extra, "accepted", sim.transform(0).to_list(), 99)
    journal.deactivate(STACK_ID, [late])
    journal.close()
    from livestack.storage.masters import masters_for_cli

    masters = masters_for_cli(darks=cal["darks"])
    return {"base": base, "out": out, "stack": out / STACK_ID, "lights": lights[:N_FRAMES],
            "sim": sim, "masters": masters}


def _integrate(s: dict[str, Any], tmp_path: Path, **kwargs: Any) -> Any:
    kwargs.setdefault("masters", s["masters"])
    kwargs.setdefault("scratch_dir", tmp_path / "scratch")
    return integrate_session(s["stack"], **kwargs)


def _assert_same(a: Any, b: Any) -> None:
    for name in ("image", "weight", "count", "rejected_low", "rejected_high"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_session_has_the_accepted_active_frames_in_order(session_dir: dict[str, Any]) -> None:
    session = load_session(session_dir["stack"])
    assert session.stack_id == STACK_ID
    assert [f.path for f in session.frames] == [str(p) for p in session_dir["lights"]]
    plan = plan_integration(session)
    assert plan.reference.path == str(session_dir["lights"][0])
    assert not plan.reference_changed and plan.excluded == ()


def test_result_does_not_depend_on_the_memory_limit(session_dir: dict[str, Any],
                                                    tmp_path: Path) -> None:
    small = plan_memory(N_FRAMES, 1, (768, 1024), 64 * MB)
    big = plan_memory(N_FRAMES, 1, (768, 1024), 8 * 1024 * MB)
    assert not small.in_ram and small.band_rows < 768 // 2  # scratch file, several bands
    assert big.in_ram and big.band_rows == 768
    bands: list[tuple[str, int, int]] = []
    a = _integrate(session_dir, tmp_path, memory_limit_bytes=64 * MB,
                   progress=lambda stage, done, total: bands.append((stage, done, total)))
    b = _integrate(session_dir, tmp_path, memory_limit_bytes=8 * 1024 * MB)
    _assert_same(a, b)
    assert max(t for s, _, t in bands if s == "combine") >= 3
    assert sum(1 for s, _, _ in bands if s == "register") == N_FRAMES
    assert list((tmp_path / "scratch").iterdir()) == []  # scratch folder removed
    assert a.header["NCOMBINE"] == N_FRAMES
    assert np.isfinite(a.image).mean() > 0.95


def test_satellite_trail_is_rejected(session_dir: dict[str, Any], tmp_path: Path) -> None:
    sim = session_dir["sim"]
    from livestack.pipeline.warp import warp

    truth = sim.light(TRAIL_FRAME).truth
    assert truth.trail_mask is not None
    moved = warp(truth.trail_mask.astype(np.float32), truth.transform, (768, 1024), "nearest")
    trail = (moved.image > 0.5) & moved.footprint
    assert trail.sum() > 500
    clean = _integrate(session_dir, tmp_path, exclude=[session_dir["lights"][TRAIL_FRAME].name])
    plain = _integrate(session_dir, tmp_path, config=IntegrateConfig(reject="none"))
    rejected = _integrate(session_dir, tmp_path)  # winsorized 3/3
    plain_excess = np.nanmean((plain.image - clean.image)[trail])
    kept_excess = np.nanmean(np.abs(rejected.image - clean.image)[trail])
    assert plain_excess > 5.0
    assert kept_excess < 0.1 * plain_excess
    # where the trail adds > 120 ADU to its frame (> 10 ADU to a plain 12-frame mean),
    # the trail sample is always rejected as too high
    strong = trail & ((plain.image - clean.image) > 10.0)
    assert strong.sum() > 300
    assert np.mean(rejected.rejected_high[strong] >= 1) > 0.99


def test_excluding_a_frame_equals_integrating_without_it(session_dir: dict[str, Any],
                                                         tmp_path: Path) -> None:
    session = load_session(session_dir["stack"])
    for drop in (5, 0):  # an ordinary frame, then the reference itself
        victim = session.frames[drop]
        via_exclude = integrate_plan(plan_integration(session, exclude=[victim.path]),
                                     masters=session_dir["masters"])
        without = type(session)(session.stack_id,
                                tuple(f for f in session.frames if f is not victim),
                                session.folder)
        direct = integrate_plan(plan_integration(without), masters=session_dir["masters"])
        _assert_same(via_exclude, direct)
        assert via_exclude.header["NCOMBINE"] == N_FRAMES - 1
        excluded = [r for r in via_exclude.records if r.verdict == "excluded"]
        assert [r.file for r in excluded] == [victim.path]
        assert via_exclude.header["EXCL1"] == f"{os.path.basename(victim.path)} (--exclude)"
        assert via_exclude.header["NEXCLUDE"] == 1


def test_new_reference_composes_the_stored_transforms(session_dir: dict[str, Any]) -> None:
    sim = session_dir["sim"]
    session = load_session(session_dir["stack"])
    j = 7
    plan = plan_integration(session, reference=session_dir["lights"][j].name)
    assert plan.reference_changed and plan.reference.path == session.frames[j].path
    back = sim.transform(j).inverse()
    for i, frame in enumerate(plan.frames):
        expected = sim.transform(i).then(back).matrix
        np.testing.assert_allclose(frame.transform.matrix, expected, atol=1e-9)
    np.testing.assert_array_equal(plan.frames[j].transform.matrix,
                                  np.array([[1.0, 0, 0], [0, 1.0, 0]]))


def test_select_keeps_frames_by_metric_and_is_recorded(session_dir: dict[str, Any],
                                                       tmp_path: Path) -> None:
    product = _integrate(session_dir, tmp_path, select="fwhm_px < 2.95 and stars >= 200")
    # fwhm_px = 2.4 + 0.1 i < 2.95  ->  frames 0..5
    assert product.header["NCOMBINE"] == 6
    assert product.header["SELECT"] == "fwhm_px < 2.95 and stars >= 200"
    excluded = sorted(r.file for r in product.records if r.verdict == "excluded")
    assert excluded == sorted(str(p) for p in session_dir["lights"][6:])
    assert all(r.reason == "select" for r in product.records if r.verdict == "excluded")
    assert product.header["EXCL6"] == f"{session_dir['lights'][11].name} (--select)"


def test_keep_registered_writes_float32_frames(session_dir: dict[str, Any],
                                               tmp_path: Path) -> None:
    from astropy.io import fits

    keep = tmp_path / "registered"
    _integrate(session_dir, tmp_path, keep_registered_dir=keep,
               exclude=[p.name for p in session_dir["lights"][3:]])
    files = sorted(keep.iterdir())
    assert [f.name for f in files] == [f"r_{p.stem}.fits" for p in session_dir["lights"][:3]]
    with fits.open(files[2]) as hdul:
        data = hdul[0].data
        assert data.dtype.kind == "f" and data.dtype.itemsize == 4
        assert data.shape == (768, 1024)
        assert np.isnan(data[:, :1]).all()  # drift moved the frame: an uncovered edge
        assert np.isfinite(data[100:600, 100:900]).all()
        matrix = [hdul[0].header[f"LSTRANS{k}"] for k in range(1, 7)]
        np.testing.assert_allclose(matrix, session_dir["sim"].transform(2).to_list())


def test_missing_raw_file_is_named_and_nothing_is_written(session_dir: dict[str, Any],
                                                          tmp_path: Path) -> None:
    session = load_session(session_dir["stack"])
    gone = tmp_path / "gone.fits"
    frames = list(session.frames)
    frames[4] = type(frames[4])(str(gone), frames[4].transform, frames[4].metrics)
    broken = type(session)(session.stack_id, tuple(frames), session.folder)
    keep = tmp_path / "registered"
    with pytest.raises(FrameReadError, match=r"gone\.fits") as info:
        integrate_plan(plan_integration(broken), keep_registered_dir=keep,
                       scratch_dir=tmp_path / "scratch", masters=session_dir["masters"])
    assert info.value.reason == "missing"
    assert "\n" not in str(info.value)
    assert not keep.exists() or list(keep.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"select": "fwhm_px < 3 and __import__('os')"}, "--select"),
    ({"select": "seeing < 2"}, "unknown name 'seeing'"),
    ({"reference": "not-a-frame.fits"}, "not an accepted frame"),
    ({"exclude": ["nothing-like-this-*.fits"]}, "matches no accepted frame"),
    ({"exclude": ["*.fits"]}, "no frame left"),
])
def test_bad_input_is_a_one_line_usage_error(session_dir: dict[str, Any], tmp_path: Path,
                                             kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match) as info:
        _integrate(session_dir, tmp_path, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage, reason", [
    ("grown", "changed_on_disk"),     # size differs from the journal's
    ("rewritten", "changed_on_disk"),  # same size, new mtime, different content
    ("truncated", "incomplete"),      # no size on record, data unit cut short
])
def test_changed_or_broken_raw_file_is_named(session_dir: dict[str, Any], tmp_path: Path,
                                             damage: str, reason: str) -> None:
    from dataclasses import replace

    session = load_session(session_dir["stack"])
    victim = session.frames[6]
    copy = tmp_path / "copy of frame.fits"
    data = Path(victim.path).read_bytes()
    if damage == "grown":
        copy.write_bytes(data + b"\0" * 2880)
        frame = replace(victim, path=str(copy))
    elif damage == "rewritten":
        body = bytearray(data)
        body[-100] ^= 0xFF
        copy.write_bytes(bytes(body))
        frame = replace(victim, path=str(copy), mtime_ns=1)
    else:
        copy.write_bytes(data[: len(data) // 2])
        frame = replace(victim, path=str(copy), size=None, sha256=None)
    frames = tuple(frame if f is victim else f for f in session.frames)
    broken = type(session)(session.stack_id, frames, session.folder)
    with pytest.raises(FrameError) as info:
        integrate_plan(plan_integration(broken), masters=session_dir["masters"])
    assert info.value.reason == reason
    assert "copy of frame.fits" in str(info.value)


def test_excluded_reference_cannot_be_the_reference(session_dir: dict[str, Any]) -> None:
    session = load_session(session_dir["stack"])
    name = session_dir["lights"][2].name
    with pytest.raises(UsageError, match="excluded"):
        plan_integration(session, exclude=[name], reference=name)


def test_interrupt_removes_the_scratch_folder(session_dir: dict[str, Any],
                                              tmp_path: Path) -> None:
    def interrupt(stage: str, done: int, total: int) -> None:
        if stage == "combine":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _integrate(session_dir, tmp_path, memory_limit_bytes=64 * MB, progress=interrupt)
    assert list((tmp_path / "scratch").iterdir()) == []

    import threading

    cancel = threading.Event()

    def cancel_soon(stage: str, done: int, total: int) -> None:
        if done == 2:
            cancel.set()

    with pytest.raises(IntegrationCancelled):
        _integrate(session_dir, tmp_path, memory_limit_bytes=64 * MB, progress=cancel_soon,
                   cancel=cancel)
    assert list((tmp_path / "scratch").iterdir()) == []


def test_too_small_memory_limit_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="too small"):
        plan_memory(100, 1, (4176, 6248), 64 * MB)


def test_cli_writes_the_stack_fits(session_dir: dict[str, Any], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from astropy.io import fits

    from livestack import integrate_cli

    parser = argparse.ArgumentParser()
    integrate_cli.add_parser(parser.add_subparsers())
    out = tmp_path / "final.fits"
    dark_dir = session_dir["base"] / "cal" / "darks"
    args = parser.parse_args(["integrate", str(session_dir["stack"]), "-o", str(out),
                              "--darks", str(dark_dir), "--std-map", "--no-progress",
                              "--exclude", session_dir["lights"][1].name,
                              "--select", "stars > 0", "--memory-limit", "64MB"])
    assert args.func(args) == 0
    with fits.open(out) as hdul:
        header = hdul[0].header
        assert header["NCOMBINE"] == N_FRAMES - 1
        assert header["SELECT"] == "stars > 0"
        assert header["EXCL1"] == f"{session_dir['lights'][1].name} (--exclude)"
        assert "livestack integrate" in str(header["HISTORY"])
        names = {h.name for h in hdul}
        assert {"WEIGHT", "COUNT", "REJLOW", "REJHIGH", "STD", "FRAMES"} <= names
        verdicts = list(hdul["FRAMES"].data["verdict"])
        assert verdicts.count("accepted") == N_FRAMES - 1 and verdicts.count("excluded") == 1
    assert "11 frames integrated, 1 excluded" in capsys.readouterr().out
    bad = parser.parse_args(["integrate", str(session_dir["stack"]), "-o",
                             str(tmp_path / "never.fits"), "--select", "fwhm_px <",
                             "--no-progress"])
    with pytest.raises(UsageError):
        bad.func(bad)
    assert not (tmp_path / "never.fits").exists()


def _mad_noise(image: NDArray[np.float32]) -> float:
    """Robust per-pixel noise from horizontal neighbour differences (stars barely count)."""
    diff = np.diff(image, axis=1)
    diff = diff[np.isfinite(diff)]
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))


def test_cli_interpolation_overrides_the_warp_kernel(session_dir: dict[str, Any],
                                                      tmp_path: Path) -> None:
    from astropy.io import fits

    from livestack import integrate_cli

    parser = argparse.ArgumentParser()
    integrate_cli.add_parser(parser.add_subparsers())
    common = ["integrate", str(session_dir["stack"]), "--darks",
              str(session_dir["base"] / "cal" / "darks"), "--no-progress"]
    images, kernels = {}, {}
    for name, extra in (("default", []), ("bilinear", ["--interpolation", "bilinear"]),
                        ("mitchell", ["--interpolation", "mitchell"])):
        out = tmp_path / f"{name}.fits"
        args = parser.parse_args([*common, "-o", str(out), *extra])
        assert args.func(args) == 0
        with fits.open(out) as hdul:
            kernels[name] = hdul[0].header["WARPKERN"]
            images[name] = np.asarray(hdul[0].data, dtype=np.float32)
    # The default (auto) is lanczos3 on these mono frames.
    assert kernels == {"default": "lanczos3", "bilinear": "bilinear", "mitchell": "mitchell"}
    assert images["default"].shape == images["bilinear"].shape
    assert not np.allclose(images["default"], images["bilinear"], equal_nan=True)
    # bilinear averages neighbours at sub-pixel shifts: less per-pixel noise than lanczos3
    assert _mad_noise(images["bilinear"]) < 0.95 * _mad_noise(images["default"])
    # so does Mitchell, at every phase (the integer ones included)
    assert not np.allclose(images["mitchell"], images["bilinear"], equal_nan=True)
    assert _mad_noise(images["mitchell"]) < 0.95 * _mad_noise(images["default"])


def test_cli_interpolation_takes_precedence_over_the_config(
        session_dir: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import livestack.restack
    from livestack import integrate_cli
    from livestack.pipeline.warp import AUTO, KERNELS

    assert set(integrate_cli.INTERPOLATION) == {AUTO, *KERNELS}
    seen: list[str] = []

    class Stop(Exception):
        pass

    def fake_integrate_plan(plan: Any, config: Any, *, pipeline: Any, **kwargs: Any) -> Any:
        seen.append(pipeline.warp.kernel)
        raise Stop

    monkeypatch.setattr(livestack.restack, "integrate_plan", fake_integrate_plan)
    config = tmp_path / "bicubic.yaml"
    config.write_text("pipeline:\n  warp:\n    kernel: bicubic\n")
    parser = argparse.ArgumentParser()
    integrate_cli.add_parser(parser.add_subparsers())
    for extra in ([], ["--interpolation", "nearest"]):
        args = parser.parse_args(["integrate", str(session_dir["stack"]), "-c", str(config),
                                  "-o", str(tmp_path / "never.fits"), "--no-progress",
                                  "--darks", str(session_dir["base"] / "cal" / "darks"),
                                  *extra])
        with pytest.raises(Stop):
            args.func(args)
    assert seen == ["bicubic", "nearest"]


def test_cli_unknown_interpolation_is_a_one_line_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    from livestack.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["integrate", "STACK", "--interpolation", "lanczos4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--interpolation" in errors[0] and "lanczos4" in errors[0]
    assert "Traceback" not in err


def test_parse_size() -> None:
    from livestack.integrate_cli import parse_size

    assert parse_size("2GB") == 2 * 2**30
    assert parse_size("64MB") == 64 * MB
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size("512m") == 512 * MB
    assert parse_size(str(3 * MB)) == 3 * MB
    for bad in ("lots", "2XB", "-1GB", "10kB", ""):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_journal_paths_with_spaces_and_relative_exclude(session_dir: dict[str, Any]) -> None:
    session = load_session(session_dir["stack"])
    victim = session.frames[3].path
    assert " " in os.path.basename(victim)
    cwd = os.getcwd()
    try:
        os.chdir(os.path.dirname(victim))
        plan = plan_integration(session, exclude=[os.path.basename(victim)])
    finally:
        os.chdir(cwd)
    assert [p for p, _ in plan.excluded] == [victim]


def test_colour_session_integrates_per_channel(tmp_path: Path) -> None:
    config = SimConfig(width=160, height=128, n_stars=60, bayer_pattern="GRBG",
                       drift_px_per_frame=(1.3, -0.8), cosmic_rays_per_frame=2.0)
    sim = Simulator(config, seed=4)
    lights = write_sequence(tmp_path / "lights", config, seed=4, n_frames=6, simulator=sim)
    journal = Journal(tmp_path / "out" / "journal.sqlite")
    journal.ensure_stack("colour", {}, "colour")
    (tmp_path / "out" / "colour").mkdir()
    for i, path in enumerate(lights):
        st = path.stat()
        row = journal.mark_pending(str(path), st.st_size, st.st_mtime_ns, sha256_file(path))
        journal.finish(row, "accepted", stack_id="colour", metrics=_fake_metrics(i),
                       transform=sim.transform(i).to_list(), weight=1.0, assign_seq=True)
    journal.close()
    ram = integrate_session(tmp_path / "out" / "colour", config=IntegrateConfig(std_map=True))
    scratch = integrate_session(tmp_path / "out" / "colour", config=IntegrateConfig(std_map=True),
                                force_scratch=True, scratch_dir=tmp_path / "scratch",
                                memory_limit_bytes=8 * MB)
    _assert_same(ram, scratch)
    assert ram.image.shape == (3, 128, 160) and ram.count.shape == (3, 128, 160)
    assert ram.weight.shape == (128, 160) and ram.std is not None
    assert ram.std.shape == (3, 128, 160)
    # A debayered (NAXIS = 3) stack is not a mosaic: no CFA pattern (issue 9, part 3).
    assert "CFAPAT" not in ram.header and ram.header["NCOMBINE"] == 6
    centre = ram.image[:, 40:90, 50:110]
    assert np.all(np.isfinite(centre))
    assert ram.count[:, 40:90, 50:110].mean() > 5.8  # few rejections of 6 clean samples


def _cloud_session(tmp_path: Path) -> tuple[Path, Simulator, Any]:
    """Four lights, frame 2 under a cloud (about half the light); journal noise is a
    constant 10 ADU so that each frame's noise weight is exactly ``scale ** -2``."""
    config = SimConfig(width=640, height=480, n_stars=250, brightest_flux_e=2e5,
                       faintest_flux_e=3e3, cloud_frames=(2,), cloud_transparency=0.5,
                       drift_px_per_frame=(0.7, 0.4), dither_px=2.0, cosmic_rays_per_frame=2.0)
    sim = Simulator(config, seed=5)
    lights = write_sequence(tmp_path / "lights", config, seed=5, n_frames=4, simulator=sim)
    cal = write_calibration_set(tmp_path / "cal", config, seed=5, n_bias=0, n_darks=3,
                                n_flats=0, simulator=sim)
    journal = Journal(tmp_path / "out" / "journal.sqlite")
    journal.ensure_stack("cloud", {}, "cloud")
    (tmp_path / "out" / "cloud").mkdir()
    for i, path in enumerate(lights):
        st = path.stat()
        row = journal.mark_pending(str(path), st.st_size, st.st_mtime_ns, sha256_file(path))
        journal.finish(row, "accepted", stack_id="cloud", metrics=_fake_metrics(i),
                       transform=sim.transform(i).to_list(), weight=1.0, assign_seq=True)
    journal.close()
    from livestack.storage.masters import masters_for_cli

    return tmp_path / "out" / "cloud", sim, masters_for_cli(darks=cal["darks"])


def _aperture_fluxes(image: NDArray[np.float32], xy: NDArray[np.float64],
                     radius_px: float = 4.0) -> NDArray[np.float64]:
    """Background-subtracted sums in circular apertures (local median of an annulus)."""
    yy, xx = np.mgrid[-8:9, -8:9]
    r = np.hypot(xx, yy)
    out = []
    for x, y in np.round(xy).astype(int):
        stamp = image[y - 8:y + 9, x - 8:x + 9].astype(np.float64)
        sky = np.median(stamp[(r > 6) & (r <= 8)])
        out.append(float(np.sum(stamp[r <= radius_px] - sky)))
    return np.array(out)


def test_additive_scaling_follows_a_cloud_frame_by_its_star_fluxes(tmp_path: Path) -> None:
    from scipy.spatial import cKDTree

    from livestack.pipeline.detect import DetectConfig, detect_stars
    from livestack.pipeline.session import PipelineConfig

    stack, sim, masters = _cloud_session(tmp_path)
    product = integrate_session(stack, masters=masters, normalize="additive-scaling")
    scales = [r.weight ** -0.5 for r in product.records]  # noise weight = scale^-2
    # the truth: reference / cloud-frame flux of the same catalogue stars
    ref_truth, cloud_truth = sim.truth(0), sim.truth(2)
    assert ref_truth.stars_ref_xy is not None and cloud_truth.stars_ref_xy is not None
    dist, index = cKDTree(ref_truth.stars_ref_xy).query(cloud_truth.stars_ref_xy,
                                                        distance_upper_bound=1e-3)
    paired = np.isfinite(dist)
    expected = (ref_truth.stars_flux_e[index[paired]].sum()
                / cloud_truth.stars_flux_e[paired].sum())
    assert expected > 1.5  # the cloud took about half the light
    assert product.header["NSTARSCL"] == 4
    assert scales[0] == pytest.approx(1.0)
    assert scales[1] == pytest.approx(1.0, abs=0.03) and scales[3] == pytest.approx(1.0, abs=0.03)
    # the cloud is patchy: the detected (clearer) stars see a little more light than average
    assert scales[2] == pytest.approx(expected, rel=0.12)

    # Without stars the dispersion ratio is the fallback: it does not follow the cloud.
    blind = PipelineConfig(detect=DetectConfig(threshold_sigma=1e6))
    fallback = integrate_session(stack, masters=masters, normalize="additive-scaling",
                                 pipeline=blind)
    assert fallback.header["NSTARSCL"] == 1  # the reference only
    assert fallback.records[2].weight ** -0.5 < 1.2

    # In the stack, the cloud frame's normalised stars are as bright as the reference's:
    # mean of {reference, cloud} (no rejection, equal weights) minus the reference alone.
    plain = IntegrateConfig(reject="none", weights="none")
    names = [os.path.basename(r.file) for r in product.records]
    pair = integrate_session(stack, plain, masters=masters, exclude=[names[1], names[3]])
    alone = integrate_session(stack, plain, masters=masters,
                              exclude=[names[1], names[2], names[3]])
    cloud_normalised = 2.0 * pair.image - alone.image
    stars, _, _ = detect_stars(np.nan_to_num(alone.image, nan=float(np.nanmedian(alone.image))),
                               DetectConfig())
    xy = stars.xy[:40]
    inside = np.all((xy > 12) & (xy < np.array([640 - 13, 480 - 13])), axis=1)
    ratio = (_aperture_fluxes(cloud_normalised, xy[inside]).sum()
             / _aperture_fluxes(alone.image, xy[inside]).sum())
    assert ratio == pytest.approx(1.0, abs=0.15)
    additive = integrate_session(stack, plain, masters=masters, normalize="additive",
                                 exclude=[names[1], names[3]])
    dimmed = 2.0 * additive.image - alone.image
    assert (_aperture_fluxes(dimmed, xy[inside]).sum()
            / _aperture_fluxes(alone.image, xy[inside]).sum()) < 0.75

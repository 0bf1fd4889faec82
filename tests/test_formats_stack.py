"""A synthetic night written as DNG, 16-bit TIFF, PNG and XISF stacks like its FITS original.

Efficiency here is the stack's weight efficiency NEFF / NCOMBINE (NEFF = (sum w)^2 /
sum w^2 over the combined frames): it moves when the per-frame quality measurements
(FWHM, noise, background) that set the weights differ.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from livestack.batch import stack_files
from livestack.config import config_from_dict
from livestack.pipeline.saturation import SaturationConfig, resolve_level
from livestack.sim import SimConfig, Simulator, write_fits
from livestack.sim.formatwrite import SUFFIXES, rgb_frame, write_dng, write_frame
from livestack.storage import fitsio
from livestack.storage.masters import build_masters_from_dirs, masters_for_cli

N_FRAMES = 8
EXPOSURE_S = 60.0
START = datetime(2026, 1, 15, 21, 0)


def _sim(bayer: str | None) -> Simulator:
    config = SimConfig(width=256, height=192, exposure_s=EXPOSURE_S,
                       bayer_pattern=bayer, satellite_frames=(3,), cosmic_rays_per_frame=2.0,
                       hot_pixel_fraction=5e-4, drift_px_per_frame=(1.3, 0.7),
                       start_time_utc=START.isoformat())
    return Simulator(config, seed=11)


def _stack(folder: Path, out: Path, masters: Any = None,
           pipeline: dict[str, Any] | None = None) -> dict[str, Any]:
    # No plate solving: random simulated stars cannot solve, and it costs a core for minutes.
    config = config_from_dict({"formats": {"exposure_s": EXPOSURE_S},
                               "solver": {"enabled": False}, "pipeline": pipeline or {}})
    files = sorted(p for p in folder.iterdir() if p.is_file())
    stack_files(config, files, out, masters=masters)
    (path,) = out.rglob("stack.fits")
    with fits.open(path) as hdul:
        header = hdul[0].header
        table = hdul["FRAMES"].data
        result = {
            "image": np.asarray(hdul[0].data, dtype=np.float64),
            "ncombine": int(header["NCOMBINE"]),
            "efficiency": float(header["NEFF"]) / int(header["NCOMBINE"]),
            "exptime": float(header["EXPTIME"]),
            "date_obs": str(header["DATE-OBS"]),
            "rejhigh": np.asarray(hdul["REJHIGH"].data, dtype=np.int64),
            "verdicts": [str(v) for v in table["verdict"]],
            "formats": sorted({str(f) for f in table["format"]}),
        }
    db = sqlite3.connect(out / "journal.sqlite")
    rows = db.execute("SELECT status, metrics FROM frames ORDER BY id").fetchall()
    db.close()
    result["journal_formats"] = sorted({json.loads(m)["format"] for s, m in rows if m})
    return result


def _night(tmp: Path, sim: Simulator, fmt: str, rgb: bool = False) -> Path:
    folder = tmp / fmt
    folder.mkdir()
    for i in range(N_FRAMES):
        frame = rgb_frame(sim.light(i)) if rgb else sim.light(i)
        if fmt == "fits":
            write_fits(folder / f"light_{i:03d}.fits", frame)
        else:
            write_frame(folder / f"light_{i:03d}{SUFFIXES[fmt]}", frame, fmt)
    return folder


@pytest.fixture(scope="module")
def colour_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The FITS colour original: a Bayer (RGGB) night, debayered by the pipeline with the
    published RCD, as the simulated camera software debayers the RGB nights
    (``rgb_frame``), so that the two differ only by what the formats do."""
    tmp = tmp_path_factory.mktemp("colour")
    return _stack(_night(tmp, _sim("RGGB"), "fits"), tmp / "out",
                  pipeline={"debayer": {"rcd_green_diagonals": False}})


@pytest.fixture(scope="module")
def mono_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("mono")
    return _stack(_night(tmp, _sim(None), "fits"), tmp / "out")


def _assert_stacks_alike(got: dict[str, Any], ref: dict[str, Any]) -> None:
    assert got["ncombine"] == ref["ncombine"] >= N_FRAMES - 1
    assert got["verdicts"] == ref["verdicts"]
    assert abs(got["efficiency"] - ref["efficiency"]) <= 0.02
    # Trails and defects: rejected where the FITS stack rejected them ...
    total = int(ref["rejhigh"].sum())
    assert total > 100  # the satellite trail, hot pixels and cosmic rays
    assert abs(int(got["rejhigh"].sum()) - total) <= 0.01 * total
    # ... and the same pixels come out.
    diff = got["image"] - ref["image"]
    diff -= np.nanmedian(diff)
    noise = float(np.nanstd(ref["image"] - np.nanmedian(ref["image"])))
    assert float(np.nanmax(np.abs(diff))) <= 0.01 * noise


@pytest.mark.parametrize("fmt", ["tiff", "png", "xisf"])
def test_the_night_as_a_lossless_format_stacks_like_the_fits_original(
        tmp_path: Path, mono_reference: dict[str, Any], fmt: str) -> None:
    got = _stack(_night(tmp_path, _sim(None), fmt), tmp_path / "out")
    _assert_stacks_alike(got, mono_reference)
    assert got["exptime"] == mono_reference["exptime"] == N_FRAMES * EXPOSURE_S
    assert got["date_obs"] == mono_reference["date_obs"]
    assert got["formats"] == [fmt] and got["journal_formats"] == [fmt]
    assert mono_reference["formats"] == ["fits"]


@pytest.mark.parametrize("fmt", ["tiff", "png", "xisf"])
def test_the_night_as_rgb_files_gives_a_colour_stack_like_the_fits_cfa_original(
        tmp_path: Path, colour_reference: dict[str, Any], fmt: str) -> None:
    """The camera's software debayered each frame and saved 16-bit RGB.

    Not bit-equal to the FITS stack: rounding to 16 bits, and a hot pixel the pipeline
    corrects on the CFA grid is, in the RGB files, already spread by the demosaic (not
    isolated), so the stack's rejection removes it instead. Hence the tolerances below.
    """
    got = _stack(_night(tmp_path, _sim("RGGB"), fmt, rgb=True), tmp_path / "out")
    ref = colour_reference
    assert got["image"].shape == ref["image"].shape == (3, 192, 256)
    assert got["ncombine"] == ref["ncombine"] == N_FRAMES
    assert got["verdicts"] == ref["verdicts"]
    assert abs(got["efficiency"] - ref["efficiency"]) <= 0.02
    assert got["exptime"] == N_FRAMES * EXPOSURE_S
    assert got["date_obs"] == ref["date_obs"] or fmt == "png"  # PNG: mtime, ms dropped
    assert got["date_obs"].startswith(START.isoformat())
    assert got["formats"] == [fmt] and got["journal_formats"] == [fmt]
    # Trail, cosmic rays and hot pixels: rejected where the FITS stack rejected them.
    ref_rejected, got_rejected = ref["rejhigh"] > 0, got["rejhigh"] > 0
    assert int(ref_rejected.sum()) > 1000
    assert (got_rejected & ref_rejected).sum() >= 0.9 * ref_rejected.sum()
    assert abs(int(got["rejhigh"].sum()) - int(ref["rejhigh"].sum())) <= 0.05 * int(
        ref["rejhigh"].sum())
    # ... and no defect or trail is left in the colour stack: per channel it is the FITS
    # stack's image within a fraction of the sky noise (measured: 99.9 % of the pixels
    # within 0.15 sigma, at most 2 pixels of 49152 past 0.5 sigma, none past 1.01 sigma).
    for channel in range(3):
        diff = got["image"][channel] - ref["image"][channel]
        diff -= np.nanmedian(diff)
        noise = float(np.nanstd(ref["image"][channel] - np.nanmedian(ref["image"][channel])))
        off = np.abs(diff) / noise
        assert float(np.nanmax(off)) <= 1.5
        assert int(np.count_nonzero(off > 0.5)) <= 5
        assert float(np.nanpercentile(off, 99.9)) <= 0.2
    if fmt == "tiff":  # the batch re-stack reads the RGB files again: a colour integration
        from livestack.cli import main

        (stack_dir,) = (p.parent for p in (tmp_path / "out").rglob("stack.fits"))
        assert main(["integrate", str(stack_dir), "-o", str(tmp_path / "int.fits")]) == 0
        with fits.open(tmp_path / "int.fits") as hdul:
            assert hdul[0].data.shape == (3, 192, 256)
            assert int(hdul[0].header["NCOMBINE"]) == N_FRAMES
            assert sorted({str(f) for f in hdul["FRAMES"].data["format"]}) == ["tiff"]


def test_the_dng_night_gives_an_rgb_stack_with_the_exposure_total_and_start(
        tmp_path: Path) -> None:
    sim = _sim("RGGB")
    fits_night = _night(tmp_path, sim, "fits")
    ref = _stack(fits_night, tmp_path / "out_fits")
    # The same camera in both files: the DNG's WhiteLevel is the level the FITS night's
    # headers and data give (a RAW file states it; a FITS file without SATURATE implies it).
    raw0, fits_info, _ = fitsio.read_frame(sorted(fits_night.iterdir())[0])
    white_adu = resolve_level(raw0, fits_info, SaturationConfig())
    assert white_adu is not None
    folder = tmp_path / "dng"
    folder.mkdir()
    for i in range(N_FRAMES):  # a camera at UTC+1 that writes its offset tag
        write_dng(folder / f"IMG_{i:04d}.dng", sim.light(i), black_adu=0,
                  white_adu=int(white_adu), offset=timedelta(hours=1))
    got = _stack(folder, tmp_path / "out_dng")
    assert got["image"].shape == (3, 192, 256)
    _assert_stacks_alike(got, ref)
    assert got["exptime"] == N_FRAMES * EXPOSURE_S
    assert got["date_obs"].startswith(START.isoformat())
    assert got["formats"] == ["dng"] and got["journal_formats"] == ["dng"]
    from livestack.cli import main  # integrate reads the RAW files again

    (stack_dir,) = (p.parent for p in (tmp_path / "out_dng").rglob("stack.fits"))
    assert main(["integrate", str(stack_dir), "-o", str(tmp_path / "int.fits")]) == 0
    with fits.open(tmp_path / "int.fits") as hdul:
        assert hdul[0].data.shape == (3, 192, 256)
        assert int(hdul[0].header["NCOMBINE"]) == got["ncombine"]
        assert sorted({str(f) for f in hdul["FRAMES"].data["format"]}) == ["dng"]


def test_raw_lights_with_masters_built_from_raw_darks_and_fits_bias(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Masters build from DNG darks; DNG lights use them with a FITS bias of the same shape.

    A truncated DNG in the night is journaled with its reason and one log line.
    """
    sim = _sim("RGGB")
    darks, bias = tmp_path / "darks", tmp_path / "bias"
    darks.mkdir()
    bias.mkdir()
    for i in range(5):
        write_dng(darks / f"dark_{i}.dng", sim.dark(i), black_adu=400)
        write_fits(bias / f"bias_{i}.fits", sim.bias(i))
    masters_dir = tmp_path / "masters"
    written = build_masters_from_dirs(masters_dir, bias_dir=bias, dark_dir=darks)
    assert len(written) == 2
    lights = tmp_path / "lights"
    lights.mkdir()
    for i in range(4):
        write_dng(lights / f"IMG_{i}.dng", sim.light(i), black_adu=400)
    bad = lights / "IMG_9.dng"
    bad.write_bytes((lights / "IMG_0.dng").read_bytes()[:5000])
    library = masters_for_cli(bias=masters_dir, darks=masters_dir)
    with caplog.at_level(logging.WARNING):
        got = _stack(lights, tmp_path / "out", masters=library)
    assert got["ncombine"] == 4 and got["image"].shape == (3, 192, 256)
    db = sqlite3.connect(tmp_path / "out" / "journal.sqlite")
    (status, reason), = db.execute("SELECT status, reason FROM frames WHERE path LIKE ?",
                                   ("%IMG_9.dng",)).fetchall()
    db.close()
    assert (status, reason) == ("failed", "truncated")
    lines = [r for r in caplog.records if "IMG_9.dng" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0].getMessage()
    # Dark-subtracted with the black level kept in lights and dark alike: the sky is the
    # same as from the FITS lights (not 400 ADU lower or higher).
    fits_lights = tmp_path / "fits_lights"
    fits_lights.mkdir()
    for i in range(4):
        write_fits(fits_lights / f"l_{i}.fits", sim.light(i))
    fits_darks = tmp_path / "fits_darks"
    fits_darks.mkdir()
    for i in range(5):
        write_fits(fits_darks / f"d_{i}.fits", sim.dark(i))
    ref = _stack(fits_lights, tmp_path / "out_ref",
                 masters=masters_for_cli(bias=bias, darks=fits_darks))
    sky, ref_sky = np.nanmedian(got["image"]), np.nanmedian(ref["image"])
    assert abs(sky - ref_sky) < 0.05 * abs(ref_sky) + 5.0


def test_the_cli_stacks_raw_and_gzipped_folders_and_builds_masters_from_tiff(
        tmp_path: Path) -> None:
    import gzip
    import subprocess
    import sys

    sim = _sim("RGGB")
    lights = tmp_path / "lights"
    lights.mkdir()
    for i in range(3):
        write_dng(lights / f"IMG_{i}.DNG", sim.light(i))
        write_fits(tmp_path / "x.fits", sim.light(i + 3))
        (lights / f"light_{i}.fits.gz").write_bytes(gzip.compress(
            (tmp_path / "x.fits").read_bytes()))
    darks = tmp_path / "darks"
    darks.mkdir()
    for i in range(3):
        write_frame(darks / f"dark_{i}.tif", sim.dark(i), "tiff")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "livestack.cli", *args], text=True,
                              capture_output=True, timeout=300)

    proc = cli("masters", "build", "--darks", str(darks), "-o", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr
    (master,) = (tmp_path / "m").glob("*.fits")
    with fits.open(master) as hdul:
        assert hdul[0].header["NCOMBINE"] == 3 and hdul[0].data.shape == (192, 256)
    proc = cli("stack", str(lights), "-o", str(tmp_path / "out"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "6 accepted" in proc.stdout, proc.stdout
    formats = set()
    for path in (tmp_path / "out").rglob("stack.fits"):
        with fits.open(path) as hdul:
            formats |= {str(f) for f in hdul["FRAMES"].data["format"]}
    assert formats == {"dng", "fits.gz"}


def test_rgb_lights_with_masters_built_from_rgb_darks_and_flats(tmp_path: Path) -> None:
    """RGB darks and flats (TIFF) build (3, ny, nx) masters that calibrate RGB lights per
    channel, like FITS CFA masters calibrate the FITS CFA night; 2-D masters are refused."""
    sim = _sim("RGGB")
    darks, flats, lights = tmp_path / "darks", tmp_path / "flats", tmp_path / "lights"
    fits_darks, fits_flats, fits_lights = (tmp_path / "fd", tmp_path / "ff", tmp_path / "fl")
    for folder in (darks, flats, lights, fits_darks, fits_flats, fits_lights):
        folder.mkdir()
    for i in range(5):
        write_frame(darks / f"dark_{i}.tiff", rgb_frame(sim.dark(i)), "tiff")
        write_frame(flats / f"flat_{i}.tiff", rgb_frame(sim.flat(i)), "tiff")
        write_fits(fits_darks / f"dark_{i}.fits", sim.dark(i))
        write_fits(fits_flats / f"flat_{i}.fits", sim.flat(i))
    for i in range(4):
        write_frame(lights / f"light_{i}.tiff", rgb_frame(sim.light(i)), "tiff")
        write_fits(fits_lights / f"light_{i}.fits", sim.light(i))
    masters_dir = tmp_path / "masters"
    written = build_masters_from_dirs(masters_dir, dark_dir=darks, flat_dir=flats)
    assert len(written) == 2
    for path in written:
        with fits.open(path) as hdul:
            assert hdul[0].data.shape == (3, 192, 256) and hdul[0].header["NCOMBINE"] == 5
            if hdul[0].header["LSKIND"] == "flat":  # median 1 per channel
                medians = np.median(hdul[0].data.reshape(3, -1), axis=1)
                np.testing.assert_allclose(medians, 1.0, atol=1e-3)
    got = _stack(lights, tmp_path / "out",
                 masters=masters_for_cli(darks=masters_dir, flats=masters_dir))
    ref = _stack(fits_lights, tmp_path / "out_ref",
                 masters=masters_for_cli(darks=fits_darks, flats=fits_flats))
    assert got["image"].shape == ref["image"].shape == (3, 192, 256)
    assert got["ncombine"] == ref["ncombine"] == 4
    assert abs(got["efficiency"] - ref["efficiency"]) <= 0.02
    # Dark-subtracted and flat-fielded per channel: the sky of each channel is the FITS
    # stack's (the dark's pedestal is gone in both, the flat's vignetting divided out).
    for channel in range(3):
        sky, ref_sky = (float(np.nanmedian(x["image"][channel])) for x in (got, ref))
        assert abs(sky - ref_sky) < 0.02 * abs(ref_sky) + 5.0
        corner = got["image"][channel, 5:40, 5:40]  # vignetted corner, flattened as well
        ref_corner = ref["image"][channel, 5:40, 5:40]
        assert abs(float(np.nanmedian(corner)) - float(np.nanmedian(ref_corner))) < (
            0.02 * abs(ref_sky) + 5.0)
    # 2-D (mono/CFA) masters do not calibrate RGB lights: each frame fails with the reason.
    cfa_masters = tmp_path / "cfa_masters"
    build_masters_from_dirs(cfa_masters, dark_dir=fits_darks)
    (tmp_path / "out_bad").mkdir()
    bad = _stack_rows(lights, tmp_path / "out_bad", masters_for_cli(darks=cfa_masters))
    assert bad == [("failed", "master_shape_mismatch")] * 4


def _stack_rows(folder: Path, out: Path, masters: Any) -> list[tuple[str, str]]:
    config = config_from_dict({"formats": {"exposure_s": EXPOSURE_S},
                               "solver": {"enabled": False}})
    stack_files(config, sorted(folder.iterdir()), out, masters=masters)
    db = sqlite3.connect(out / "journal.sqlite")
    rows = db.execute("SELECT status, reason FROM frames ORDER BY id").fetchall()
    db.close()
    return [(str(a), str(b)) for a, b in rows]

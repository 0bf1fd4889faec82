"""Building master frames and choosing them per light."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from livestack.errors import MasterError
from livestack.pipeline.calibrate import find_defects
from livestack.pipeline.debayer import cfa_channel_masks
from livestack.pipeline.types import FrameInfo
from livestack.storage import masters as masters_mod
from livestack.storage.fitsio import read_frame
from livestack.storage.masters import (
    MasterEntry,
    MasterLibrary,
    build_master,
    build_masters_from_dirs,
    masters_for_cli,
)

SHAPE = (40, 56)
BIAS_ADU = 300.0
DARK_RATE_ADU_S = 2.0  # uniform dark current
HOT_RATE_ADU_S = 50.0
HOT_PIXELS = ((5, 7), (20, 31), (33, 50))
READ_NOISE_ADU = 4.0


def _write(path: Path, data: np.ndarray, **cards: object) -> Path:
    hdu = fits.PrimaryHDU(np.clip(np.rint(data), 0, 65535).astype(np.uint16))
    for key, value in cards.items():
        hdu.header[key.replace("_", "-")] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    hdu.writeto(path, overwrite=True)
    return path


def _dark_signal(exposure_s: float) -> np.ndarray:
    sig = np.full(SHAPE, DARK_RATE_ADU_S * exposure_s)
    for y, x in HOT_PIXELS:
        sig[y, x] = HOT_RATE_ADU_S * exposure_s
    return sig


def _make_frames(folder: Path, kind: str, n: int, seed: int, exposure_s: float = 0.0,
                 temp_c: float = -10.0, shape: tuple[int, int] = SHAPE, level: float = 0.0,
                 **cards: object) -> list[Path]:
    rng = np.random.default_rng(seed)
    imagetyp = {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field",
                "darkflat": "Dark Flat"}[kind]
    paths = []
    for i in range(n):
        data = BIAS_ADU + rng.normal(0, READ_NOISE_ADU, shape)
        if kind in ("dark", "darkflat"):
            data += _dark_signal(exposure_s)[: shape[0], : shape[1]]
        if kind == "flat":
            data += level * (1 + 0.1 * i) * _vignette(shape)
        paths.append(_write(folder / f"{kind}_{exposure_s:g}s_{temp_c:g}C_{i:03d}.fits", data,
                            IMAGETYP=imagetyp, EXPTIME=exposure_s, CCD_TEMP=temp_c,
                            XBINNING=1, YBINNING=1, **cards))
    return paths


def _vignette(shape: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r2 = ((yy - shape[0] / 2) / shape[0]) ** 2 + ((xx - shape[1] / 2) / shape[1]) ** 2
    return 1.0 - 0.8 * r2


def _light(exposure_s: float = 60.0, temp_c: float | None = -10.0, filter_name: str = "",
           shape: tuple[int, int] = SHAPE, binning: tuple[int, int] = (1, 1),
           bayer: str | None = None) -> FrameInfo:
    return FrameInfo(path="light.fits", image_type="light", shape=shape, exposure_s=exposure_s,
                     ccd_temp_c=temp_c, filter_name=filter_name, binning=binning,
                     bayer_pattern=bayer)


# ----------------------------------------------------------------------------- real data


def test_oscaar_master_dark_and_hot_pixels(oscaar_dir: Path) -> None:
    darks = sorted((oscaar_dir / "darks").glob("*.fit"))
    master, header = build_master("dark", darks)
    assert master.dtype == np.float32 and master.shape == (736, 1092)
    assert abs(float(np.median(master)) - 150.0) < 5.0
    assert header["NCOMBINE"] == 20
    assert header["IMAGETYP"] == "Master Dark"
    assert header["EXPTIME"] == 60.0
    assert header["XBINNING"] == 2
    assert -10.3 < header["CCD-TEMP"] < -9.7
    assert header["LSIN0001"] == "tres1-001d.fit" and header["LSIN0020"] == "tres1-020d.fit"
    assert header["LSKAPPA"] == 3.0
    assert 0 < header["LSREJECT"] < 0.01
    defects = find_defects(master, 60.0)
    # README: 166 hot pixels more than 500 ADU above the median; all must be in the map.
    very_hot = master > np.median(master) + 500
    assert 150 <= very_hot.sum() <= 180
    assert defects[very_hot].all()
    assert defects.sum() > 100
    assert defects.mean() < 0.02


# ----------------------------------------------------------------------------- build_master


def test_master_bias_and_dark_values(tmp_path: Path) -> None:
    bias_files = _make_frames(tmp_path / "bias", "bias", 9, seed=1)
    dark_files = _make_frames(tmp_path / "dark", "dark", 9, seed=2, exposure_s=60.0)
    bias, bh = build_master("bias", bias_files)
    dark, dh = build_master("dark", dark_files)
    assert abs(float(np.median(bias)) - BIAS_ADU) < 1.0
    # Noise of a mean of 9 frames: read noise / 3.
    assert np.std(bias) == pytest.approx(READ_NOISE_ADU / 3, rel=0.25)
    assert abs(float(np.median(dark)) - (BIAS_ADU + 120.0)) < 1.0
    assert dark[20, 31] == pytest.approx(BIAS_ADU + 3000.0, abs=5.0)
    assert bh["IMAGETYP"] == "Master Bias" and dh["NCOMBINE"] == 9
    assert dh["LSBIASSB"] is False
    dark_nb, dnb = build_master("dark", dark_files, bias=bias)
    assert dnb["LSBIASSB"] is True
    assert abs(float(np.median(dark_nb)) - 120.0) < 1.0


def test_sigma_clipping_rejects_cosmic_ray(tmp_path: Path) -> None:
    files = _make_frames(tmp_path, "bias", 10, seed=3)
    data = fits.getdata(files[4]).astype(np.float64)
    data[10, 10] = 60000
    _write(files[4], data, IMAGETYP="Bias Frame", EXPTIME=0.0, CCD_TEMP=-10.0)
    master, header = build_master("bias", files)
    assert master[10, 10] == pytest.approx(BIAS_ADU, abs=5 * READ_NOISE_ADU)
    plain_mean = np.mean([fits.getdata(f)[10, 10] for f in files])
    assert plain_mean > BIAS_ADU + 5000  # what an unclipped mean would give
    assert header["LSREJECT"] > 0


def test_chunked_combine_equals_single_chunk(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    files = _make_frames(tmp_path, "dark", 7, seed=4, exposure_s=30.0)
    whole, _ = build_master("dark", files)
    # 3 rows per chunk: the result must not depend on the chunking.
    monkeypatch.setattr(masters_mod, "CHUNK_BYTES", 7 * SHAPE[1] * 4 * 3)
    chunked, _ = build_master("dark", files)
    np.testing.assert_array_equal(whole, chunked)


def test_truncated_input_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    files = _make_frames(tmp_path, "dark", 4, seed=6, exposure_s=30.0)
    blob = files[2].read_bytes()
    cut = files[2].with_name("cut.fits")
    cut.write_bytes(blob[: len(blob) - 2880 * 3])  # the camera stopped writing
    with pytest.raises(MasterError, match=r"cut\.fits: .*truncated") as info:
        build_master("dark", [*files[:2], cut, files[3]])
    assert "\n" not in str(info.value)


def test_compressed_inputs(tmp_path: Path) -> None:
    plain = _make_frames(tmp_path / "plain", "bias", 5, seed=5)
    packed = []
    for path in plain:
        header = fits.getheader(path)
        header.remove("BZERO", ignore_missing=True)
        header.remove("BSCALE", ignore_missing=True)
        out = tmp_path / "fz" / (path.name + ".fz")
        out.parent.mkdir(exist_ok=True)
        data = fits.getdata(path).astype(np.int32)
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=header)]).writeto(out)
        packed.append(out)
    a, _ = build_master("bias", plain)
    b, _ = build_master("bias", packed)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)


@pytest.mark.parametrize(("field", "odd_cards", "message"), [
    ("exposure", {"EXPTIME": 30.0}, "exposure 30 s differs"),
    ("binning", {"XBINNING": 2}, "binning 2x1 differs"),
    ("gain", {"GAIN": 200}, "GAIN"),
])
def test_refuses_mixed_inputs_naming_the_odd_file(tmp_path: Path, field: str,
                                                  odd_cards: dict[str, object],
                                                  message: str) -> None:
    files = _make_frames(tmp_path, "dark", 4, seed=6, exposure_s=60.0, GAIN=100)
    odd = tmp_path / "odd one.fits"
    cards: dict[str, object] = {"IMAGETYP": "Dark Frame", "EXPTIME": 60.0, "XBINNING": 1,
                                "YBINNING": 1, "GAIN": 100}
    cards.update(odd_cards)
    _write(odd, fits.getdata(files[0]), **cards)
    with pytest.raises(MasterError) as exc:
        build_master("dark", [*files[:2], odd, *files[2:]])
    assert "odd one.fits" in str(exc.value)
    assert message in str(exc.value)


def test_refuses_mixed_shapes(tmp_path: Path) -> None:
    files = _make_frames(tmp_path, "bias", 3, seed=7)
    odd = _make_frames(tmp_path / "other", "bias", 1, seed=8, shape=(40, 50))[0]
    with pytest.raises(MasterError) as exc:
        build_master("bias", [*files, odd])
    assert odd.name in str(exc.value) and "50x40" in str(exc.value)


def test_refuses_light_in_dark_folder_and_bad_kind(tmp_path: Path) -> None:
    files = _make_frames(tmp_path, "dark", 3, seed=9, exposure_s=10.0)
    light = _write(tmp_path / "light.fits", fits.getdata(files[0]), IMAGETYP="Light Frame",
                   EXPTIME=10.0)
    with pytest.raises(MasterError, match=r"light\.fits"):
        build_master("dark", [*files, light])
    with pytest.raises(MasterError, match="unknown master kind"):
        build_master("lights", files)
    with pytest.raises(MasterError, match="no dark frames"):
        build_master("dark", [])


def test_master_flat_normalised_per_cfa_colour(tmp_path: Path) -> None:
    bias_files = _make_frames(tmp_path / "bias", "bias", 5, seed=10)
    bias, _ = build_master("bias", bias_files)
    # Colour response differs per channel (R 0.5, G 1.0, B 0.25) under the same light.
    flat_files = []
    rng = np.random.default_rng(11)
    codes = cfa_channel_masks("RGGB", SHAPE)
    response = np.choose(codes, [0.5, 1.0, 0.25])
    for i in range(6):
        signal = 20000.0 * (1 + 0.2 * i) * _vignette(SHAPE) * response
        data = BIAS_ADU + signal + rng.normal(0, 20, SHAPE)
        flat_files.append(_write(tmp_path / "flat" / f"f{i}.fits", data, IMAGETYP="Flat Field",
                                 EXPTIME=1.0 + i, FILTER="L", BAYERPAT="RGGB"))
    flat, header = build_master("flat", flat_files, bias=bias)
    for k in range(3):
        assert float(np.median(flat[codes == k])) == pytest.approx(1.0, abs=1e-6)
    # The vignetting shape survives: corners darker than the centre.
    assert flat[0, 0] < 0.9 and flat[20, 28] > 1.0
    assert header["FILTER"] == "L" and header["BAYERPAT"] == "RGGB"
    assert header["ROWORDER"] == "TOP-DOWN" and header["LSFLATPR"] == "bias"
    # Varying flat exposures are accepted (auto-exposure flats).
    assert header["NCOMBINE"] == 6


def test_flat_without_signal_is_refused(tmp_path: Path) -> None:
    files = _make_frames(tmp_path, "flat", 3, seed=12, level=0.0, exposure_s=1.0)
    bias_like = np.full(SHAPE, BIAS_ADU + 10, dtype=np.float32)
    with pytest.raises(MasterError, match="not positive"):
        build_master("flat", files, bias=bias_like)


# ----------------------------------------------------------------------------- library


def _library_from(tmp_path: Path, darks: list[tuple[float, float]], with_bias: bool = True,
                  flats: tuple[str, ...] = ()) -> MasterLibrary:
    entries = []
    if with_bias:
        data, hdr = build_master("bias", _make_frames(tmp_path / "b", "bias", 5, seed=20))
        entries.append(MasterEntry.from_array("bias", data, hdr))
    for i, (exp, temp) in enumerate(darks):
        files = _make_frames(tmp_path / f"d{i}", "dark", 5, seed=30 + i, exposure_s=exp,
                             temp_c=temp)
        data, hdr = build_master("dark", files)
        entries.append(MasterEntry.from_array("dark", data, hdr))
    for i, name in enumerate(flats):
        files = _make_frames(tmp_path / f"f{i}", "flat", 3, seed=40 + i, exposure_s=1.0,
                             level=10000.0, FILTER=name)
        data, hdr = build_master("flat", files)
        entries.append(MasterEntry.from_array("flat", data, hdr))
    return MasterLibrary(entries)


def test_library_picks_temperature_and_explains_miss(tmp_path: Path) -> None:
    lib = _library_from(tmp_path, [(60.0, -10.0), (60.0, -20.0)])
    chosen = lib.select(_light(60.0, -19.2))
    assert any("dark 60s -20.0C" in d for d in chosen.description)
    chosen = lib.select(_light(60.0, -10.9))
    assert any("dark 60s -10.0C" in d for d in chosen.description)
    miss = lib.select(_light(60.0, -30.0))
    assert "no dark within 2.0 C of -30.0 C (have -10.0 C, -20.0 C)" in miss.description
    assert miss.subtract is not None  # the bias still applies
    assert abs(float(np.median(miss.subtract)) - BIAS_ADU) < 1.0


def test_library_scales_dark_of_other_exposure(tmp_path: Path) -> None:
    lib = _library_from(tmp_path, [(120.0, -10.0)])
    direct = _library_from(tmp_path / "direct", [(60.0, -10.0)])
    scaled = lib.select(_light(60.0, -10.0))
    exact = direct.select(_light(60.0, -10.0))
    assert scaled.subtract is not None and exact.subtract is not None
    assert any("scaled x0.5" in d for d in scaled.description)
    # Scaled 120 s dark matches a real 60 s dark within the noise of two 5-frame masters.
    diff = scaled.subtract - exact.subtract
    noise = READ_NOISE_ADU * np.sqrt(1 / 5 + 1 / 5 + 1 / 5)
    assert abs(float(np.mean(diff))) < 0.5
    assert float(np.std(diff)) < 1.5 * noise
    # Hot pixels scale too: 50 ADU/s * 60 s above the bias.
    assert scaled.subtract[20, 31] == pytest.approx(BIAS_ADU + 3000.0, abs=10.0)
    assert scaled.defects is not None
    assert all(scaled.defects[y, x] for y, x in HOT_PIXELS)


def test_library_cannot_scale_without_bias(tmp_path: Path) -> None:
    lib = _library_from(tmp_path, [(120.0, -10.0)], with_bias=False)
    chosen = lib.select(_light(60.0, -10.0))
    assert chosen.subtract is None
    assert "no dark of 60 s (have 120 s) and no bias to scale one" in chosen.description


def test_library_flat_filter_choice_and_miss(tmp_path: Path) -> None:
    lib = _library_from(tmp_path, [(60.0, -10.0)], flats=("L", "Ha"))
    chosen = lib.select(_light(60.0, -10.0, filter_name="Ha"))
    assert chosen.flat is not None
    assert any(d.startswith("flat 'Ha'") for d in chosen.description)
    miss = lib.select(_light(60.0, -10.0, filter_name="OIII"))
    assert miss.flat is None
    assert "no flat for filter 'OIII' (have 'Ha', 'L')" in miss.description


def test_library_geometry_misses_and_cache(tmp_path: Path) -> None:
    lib = _library_from(tmp_path, [(60.0, -10.0)])
    miss = lib.select(_light(60.0, -10.0, binning=(2, 2)))
    assert miss.is_empty()
    assert any("no dark with binning 2x2 (have 1x1)" in d for d in miss.description)
    assert any("no bias with binning 2x2" in d for d in miss.description)
    first = lib.select(_light(60.0, -10.0))
    again = lib.select(_light(60.0, -9.5))
    assert first is again  # same masters chosen: the cached set (defect map computed once)
    assert first.defects is not None and first.defects[5, 7]


def test_empty_library_says_so() -> None:
    chosen = MasterLibrary().select(_light())
    assert chosen.is_empty()
    assert "no master dark loaded" in chosen.description


# ----------------------------------------------------------------------------- folders, CLI


def test_build_from_dirs_then_library_from_paths(tmp_path: Path) -> None:
    _make_frames(tmp_path / "raw" / "bias", "bias", 5, seed=50)
    _make_frames(tmp_path / "raw" / "darks", "dark", 4, seed=51, exposure_s=60.0, temp_c=-10.0)
    _make_frames(tmp_path / "raw" / "darks", "dark", 4, seed=52, exposure_s=60.0, temp_c=-20.0)
    _make_frames(tmp_path / "raw" / "darks", "dark", 4, seed=53, exposure_s=30.0, temp_c=-10.0)
    _make_frames(tmp_path / "raw" / "flats", "flat", 4, seed=54, exposure_s=2.0, level=9000.0,
                 FILTER="R")
    written = build_masters_from_dirs(tmp_path / "masters", bias_dir=tmp_path / "raw" / "bias",
                                      dark_dir=tmp_path / "raw" / "darks",
                                      flat_dir=tmp_path / "raw" / "flats")
    names = sorted(p.name for p in written)
    assert len(names) == 5  # 1 bias, 3 darks (two exposures, two temperatures), 1 flat
    assert "master_dark_60s_m20C_bin1x1.fits" in names
    assert "master_flat_R_bin1x1.fits" in names
    for path in written:
        data, _, header = read_frame(path)
        assert header["LSMASTER"] is True and data.dtype == np.float32
    lib = MasterLibrary.from_paths([tmp_path / "masters"])
    assert len(lib) == 5
    chosen = lib.select(_light(30.0, -10.0, filter_name="R"))
    assert any("dark 30s" in d for d in chosen.description)
    assert chosen.flat is not None and chosen.subtract is not None
    assert float(np.median(chosen.flat)) == pytest.approx(1.0, abs=1e-6)


def test_masters_for_cli_raw_folders_and_master_files(tmp_path: Path) -> None:
    _make_frames(tmp_path / "bias", "bias", 4, seed=60)
    _make_frames(tmp_path / "darks", "dark", 4, seed=61, exposure_s=60.0)
    _make_frames(tmp_path / "flats", "flat", 3, seed=62, exposure_s=1.0, level=8000.0)
    lib = masters_for_cli(bias=tmp_path / "bias", darks=tmp_path / "darks",
                          flats=tmp_path / "flats")
    assert sorted(e.kind for e in lib.entries) == ["bias", "dark", "flat"]
    flat_entry = next(e for e in lib.entries if e.kind == "flat")
    assert flat_entry.header["LSFLATPR"] == "bias"
    chosen = lib.select(_light(60.0, -10.0))
    assert chosen.subtract is not None and chosen.flat is not None
    # The same library from master files written to disk.
    out = build_masters_from_dirs(tmp_path / "m", bias_dir=tmp_path / "bias",
                                  dark_dir=tmp_path / "darks")
    dark_file = next(p for p in out if "dark" in p.name)
    lib2 = masters_for_cli(darks=dark_file, bias=tmp_path / "m")
    assert sorted(e.kind for e in lib2.entries) == ["bias", "dark"]
    with pytest.raises(MasterError, match="no such"):
        masters_for_cli(darks=tmp_path / "nowhere")

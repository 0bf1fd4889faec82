"""Non-FITS frame readers: RAW (DNG via LibRaw), TIFF, PNG, JPEG, XISF and .fits.gz."""

from __future__ import annotations

import gzip
import logging
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from livestack.errors import FrameReadError
from livestack.sim import SimConfig, SimFrame, Simulator, write_fits
from livestack.sim.formatwrite import rgb_frame, write_dng, write_frame, write_tiff
from livestack.storage import fitsio
from livestack.storage.formats import (
    FRAME_SUFFIXES,
    ReadOptions,
    check_complete,
    frame_format,
    options_for,
    read_frame,
    read_header,
)

START = datetime(2026, 1, 15, 21, 0, tzinfo=timezone.utc)


def _frame(bayer: str | None = None, index: int = 0) -> SimFrame:
    config = SimConfig(width=96, height=64, n_stars=40, exposure_s=30.0,
                       bayer_pattern=bayer, start_time_utc="2026-01-15T21:00:00")
    return Simulator(config, seed=3).light(index)


def _one_line(exc: FrameReadError, path: Path) -> None:
    assert exc.message.startswith(str(path)) and "\n" not in exc.message


def test_suffixes_map_to_formats_and_the_cli_accepts_every_one() -> None:
    from livestack.cli import FRAME_SUFFIXES as CLI_SUFFIXES
    from livestack.storage.masters import FITS_SUFFIXES

    assert set(CLI_SUFFIXES) == set(FRAME_SUFFIXES) == set(FITS_SUFFIXES)
    expected = {"a.FITS": "fits", "b.fits.fz": "fits.fz", "c.fits.gz": "fits.gz",
                "IMG_1.CR2": "cr2", "x.cr3": "cr3", "x.NEF": "nef", "x.arw": "arw",
                "x.raf": "raf", "x.orf": "orf", "x.rw2": "rw2", "x.dng": "dng",
                "x.tif": "tiff", "x.TIFF": "tiff", "x.png": "png", "x.jpg": "jpeg",
                "x.jpeg": "jpeg", "x.xisf": "xisf", "notes.txt": None, "x.gz": None}
    assert {name: frame_format(name) for name in expected} == expected


def test_dng_gives_the_cfa_black_subtracted_with_metadata_in_utc(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    frame = _frame("GBRG")
    path = tmp_path / "IMG_0001.dng"
    write_dng(path, frame, black_adu=200, white_adu=16000, offset=timedelta(hours=2),
              iso=1600, model="EOS Sim")
    with caplog.at_level(logging.INFO, logger="livestack.formats"):
        image, info, header = read_frame(path, ReadOptions(raw_black="subtract"))
    np.testing.assert_array_equal(image, frame.data.astype(np.float32) - 200)
    assert image.dtype == np.float32 and image.flags.c_contiguous
    assert info.bayer_pattern == "GBRG" and info.exposure_s == 30.0 and info.gain == 1600
    assert info.date_obs == START  # 23:00 camera clock at +02:00
    assert header["SATURATE"] == 16000 - 200 and header["INSTRUME"] == "livestack EOS Sim"
    assert header["FRAMEFMT"] == "dng" and header["BLACKSUB"] is True
    kept, _, header = read_frame(path, ReadOptions(raw_black="keep"))
    np.testing.assert_array_equal(kept, frame.data.astype(np.float32))
    assert header["SATURATE"] == 16000
    assert check_complete(path) == path.stat().st_size


def test_raw_time_offset_comes_from_the_config_without_a_tag_and_the_log_says_which(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from livestack.storage.formats import common

    common._noted.clear()  # the notes are once per process
    path = tmp_path / "a.dng"
    write_dng(path, _frame("RGGB"), offset=timedelta(hours=-5), offset_tag=False)
    with caplog.at_level(logging.INFO, logger="livestack.formats"):
        _, info, _ = read_frame(path, ReadOptions(utc_offset_h=-5.0))
        _, naive, _ = read_frame(path, ReadOptions())
    assert info.date_obs == START
    assert naive.date_obs == START - timedelta(hours=5)  # camera clock taken as UTC
    text = caplog.text
    assert "UTC-5 h from formats.utc_offset_h" in text and "camera clock taken as UTC" in text


def test_raw_black_auto_keeps_the_level_when_bias_or_dark_masters_carry_it() -> None:
    class Entry:
        def __init__(self, kind: str) -> None:
            self.kind = kind

    class Library:
        def __init__(self, *kinds: str) -> None:
            self.entries = [Entry(k) for k in kinds]

    assert options_for("auto", None, None, None).raw_black == "subtract"
    assert options_for("auto", None, None, Library("flat")).raw_black == "subtract"
    assert options_for("auto", 1.0, 5.0, Library("flat", "dark")).raw_black == "keep"
    assert options_for("subtract", None, None, Library("bias")).raw_black == "subtract"


@pytest.mark.parametrize("fmt", ["tiff", "png", "xisf"])
def test_lossless_formats_give_the_fits_pixels_and_metadata(tmp_path: Path, fmt: str) -> None:
    frame = _frame()
    write_fits(tmp_path / "a.fits", frame)
    ref, ref_info, _ = fitsio.read_frame(tmp_path / "a.fits")
    path = write_frame(tmp_path / f"a.{fmt}", frame, fmt)
    image, info, header = read_frame(path, ReadOptions(exposure_s=30.0))
    np.testing.assert_array_equal(image, ref)
    assert info.exposure_s == 30.0 and info.date_obs == ref_info.date_obs == START
    # The container's range, as for FITS: a 12/14-bit camera in 16-bit files is found from
    # the data exactly as for the FITS original (SATURATE is only for a known white level).
    assert "SATURATE" not in header and header["FRAMEFMT"] == fmt
    assert (info.saturation_adu, info.saturation_source) == (
        ref_info.saturation_adu, ref_info.saturation_source) == (65535.0, "BITPIX")
    if fmt == "xisf":  # FITSKeywords map to the same FrameInfo
        assert (info.gain, info.ccd_temp_c, info.object_name) == (
            ref_info.gain, ref_info.ccd_temp_c, ref_info.object_name)


def test_png_without_metadata_uses_config_exposure_and_mtime_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from livestack.storage.formats import common

    common._noted.clear()
    path = write_frame(tmp_path / "a.png", _frame(), "png")
    with caplog.at_level(logging.INFO, logger="livestack.formats"):
        _, info, _ = read_frame(path, ReadOptions(exposure_s=12.5))
    assert info.exposure_s == 12.5 and info.date_obs == START + timedelta(seconds=17.5)
    assert "12.5 s taken from formats.exposure_s" in caplog.text
    assert "file modification time minus the exposure" in caplog.text


@pytest.mark.parametrize(("fmt", "variant"), [
    ("tiff", "chunky"), ("tiff", "planar"), ("png", "16"), ("png", "8"), ("xisf", "16")])
def test_rgb_files_read_as_three_channels_first_with_their_pixels(
        tmp_path: Path, fmt: str, variant: str) -> None:
    rgb = rgb_frame(_frame("RGGB"))
    assert rgb.data.shape == (3, 64, 96) and "BAYERPAT" not in rgb.header
    path = tmp_path / f"c.{fmt}"
    if variant == "planar":
        write_tiff(path, rgb, planar=True)
    elif variant == "8":  # an 8-bit RGB PNG goes through Pillow, not imagecodecs
        Image.fromarray((np.moveaxis(rgb.data, 0, -1) >> 8).astype(np.uint8)).save(path)
    else:
        write_frame(path, rgb, fmt)
    image, info, header = read_frame(path, ReadOptions(exposure_s=30.0))
    expected = rgb.data >> 8 if variant == "8" else rgb.data
    assert image.dtype == np.float32 and image.flags.c_contiguous
    np.testing.assert_array_equal(image, expected.astype(np.float32))
    assert info.shape == (64, 96) and info.channels == 3 and info.bayer_pattern is None
    assert header["BITPIX"] == (8 if variant == "8" else 16)
    if fmt != "png":
        assert info.date_obs == START


def test_a_16bit_rgb_png_takes_its_metadata_from_the_exif_chunk(tmp_path: Path) -> None:
    import struct
    import zlib

    rgb = rgb_frame(_frame("RGGB"))
    path = write_frame(tmp_path / "c.png", rgb, "png")
    exif = Image.Exif()
    exif[0x0110] = "Sim RGB"  # Model
    exif.get_ifd(0x8769).update({0x829A: 30.0, 0x8827: 400,  # ExposureTime, ISO
                                 0x9003: "2026:01:15 22:00:00", 0x9011: "+01:00"})
    body = exif.tobytes()
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(
        ">I", zlib.crc32(b"eXIf" + body))
    blob = path.read_bytes()
    path.write_bytes(blob[:33] + chunk + blob[33:])  # after the signature and IHDR
    image, info, header = read_frame(path)
    np.testing.assert_array_equal(image, rgb.data.astype(np.float32))
    assert info.exposure_s == 30.0 and info.gain == 400 and info.date_obs == START
    assert header["INSTRUME"] == "Sim RGB"


def test_rgba_drops_alpha_grey_alpha_stays_mono_and_jpeg_warns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from livestack.storage.formats import common

    common._noted.clear()
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 30, 60, 90, 255
    Image.fromarray(rgba).save(tmp_path / "c.png")
    Image.fromarray(rgba[..., [1, 3]].copy(), mode="LA").save(tmp_path / "la.png")
    write_frame(tmp_path / "d.jpg", rgb_frame(_frame("RGGB")), "jpeg")
    with caplog.at_level(logging.INFO, logger="livestack.formats"):
        image, info, header = read_frame(tmp_path / "c.png")
        assert image.shape == (3, 20, 30) and info.channels == 3
        np.testing.assert_array_equal(image[:, 0, 0], [30.0, 60.0, 90.0])
        assert header["BITPIX"] == 8 and "SATURATE" not in header
        image, info, _ = read_frame(tmp_path / "la.png")
        assert image.shape == (20, 30) and info.channels == 1
        np.testing.assert_array_equal(image, 60.0)
        image, info, _ = read_frame(tmp_path / "d.jpg")
    assert image.shape == (3, 64, 96) and info.channels == 3
    assert "8-bit lossy" in caplog.text and "RGB: stacked in colour" in caplog.text
    assert "alpha channel: it is ignored" in caplog.text


def test_grey_plus_extra_sample_is_mono_and_five_samples_are_refused(tmp_path: Path) -> None:
    import tifffile

    path = tmp_path / "two.tiff"
    tifffile.imwrite(path, np.ones((20, 30, 2), dtype=np.uint16), photometric="minisblack",
                     planarconfig="contig", extrasamples=[0])
    image, info, _ = read_frame(path)  # grey + an extra sample: the grey plane
    assert image.shape == (20, 30) and info.channels == 1
    tifffile.imwrite(path, np.ones((20, 30, 5), dtype=np.uint16), photometric="minisblack",
                     planarconfig="contig", extrasamples=[0, 0, 0, 0])
    with pytest.raises(FrameReadError) as caught:  # five samples a pixel: neither mono nor RGB
        read_frame(path)
    assert caught.value.reason == "not_2d" and "(20, 30, 5)" in caught.value.message
    _one_line(caught.value, path)


def test_gzipped_fits_reads_like_the_plain_file(tmp_path: Path) -> None:
    frame = _frame("RGGB")
    write_fits(tmp_path / "a.fits", frame)
    gz = tmp_path / "a.fits.gz"
    gz.write_bytes(gzip.compress((tmp_path / "a.fits").read_bytes()))
    ref, ref_info, _ = fitsio.read_frame(tmp_path / "a.fits")
    image, info, _ = read_frame(gz)
    np.testing.assert_array_equal(image, ref)
    assert info == type(info)(**{**ref_info.__dict__, "path": str(gz)})
    header, info2 = read_header(gz)
    assert header["BAYERPAT"] == "RGGB" and info2.shape == (64, 96)


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize(("name", "make", "reason"), [
    ("trunc.dng", "dng", "truncated"),
    ("garbage.cr2", "garbage", "unsupported"),
    ("trunc.tiff", "tiff", "truncated"),
    ("garbage.tif", "garbage", "corrupt"),
    ("trunc.png", "png", "truncated"),
    ("garbage.png", "garbage", "corrupt"),
    ("trunc.jpg", "jpeg", "truncated"),
    ("trunc.xisf", "xisf", "truncated"),
    ("garbage.xisf", "garbage", "corrupt"),
    ("trunc.fits.gz", "gz", "truncated"),
    ("garbage.fits.gz", "garbage", "corrupt"),
    ("empty.nef", "empty", "empty_file"),
])
def test_a_bad_file_of_each_format_is_one_named_read_error(tmp_path: Path, name: str,
                                                           make: str, reason: str) -> None:
    path = tmp_path / name
    if make == "garbage":
        path.write_bytes(b"this is not an image " * 200)
    elif make == "empty":
        path.write_bytes(b"")
    elif make == "gz":
        write_fits(tmp_path / "a.fits", _frame())
        path.write_bytes(gzip.compress((tmp_path / "a.fits").read_bytes()))
        _truncate(path)
    else:
        write_frame(path, _frame("RGGB" if make == "dng" else None), make)
        _truncate(path, 0.6)
    with pytest.raises(FrameReadError) as caught:
        read_frame(path)
    assert caught.value.reason == reason, caught.value.message
    _one_line(caught.value, path)


@pytest.mark.parametrize(("name", "fmt", "keep", "reason"), [
    ("trunc_rgb.tiff", "tiff", 0.6, "truncated"),
    ("trunc_rgb.png", "png", 0.6, "truncated"),     # 16-bit RGB: the imagecodecs path
    ("head_rgb.png", "png", 0.02, "truncated"),     # IHDR only, no image data
    ("trunc_rgb.jpg", "jpeg", 0.6, "truncated"),
    ("trunc_rgb.xisf", "xisf", 0.6, "truncated"),
])
def test_a_bad_rgb_file_of_each_format_is_one_named_read_error(
        tmp_path: Path, name: str, fmt: str, keep: float, reason: str) -> None:
    path = tmp_path / name
    write_frame(path, rgb_frame(_frame("RGGB")), fmt)
    _truncate(path, keep)
    with pytest.raises(FrameReadError) as caught:
        read_frame(path)
    assert caught.value.reason == reason, caught.value.message
    _one_line(caught.value, path)


def test_a_16bit_rgb_png_without_imagecodecs_names_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_frame(tmp_path / "a.png", rgb_frame(_frame("RGGB")), "png")
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # import raises ImportError
    with pytest.raises(FrameReadError) as caught:
        read_frame(path)
    assert caught.value.reason == "missing_extra" and "livestack[formats]" in (
        caught.value.message)
    _one_line(caught.value, path)


@pytest.mark.parametrize(("module", "name", "extra"), [
    ("rawpy", "a.cr2", "livestack[raw]"), ("tifffile", "a.tiff", "livestack[formats]"),
    ("xisf", "a.xisf", "livestack[formats]")])
def test_a_missing_extra_is_named_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              module: str, name: str, extra: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(FrameReadError) as caught:
        read_frame(path)
    assert caught.value.reason == "missing_extra" and extra in caught.value.message
    _one_line(caught.value, path)

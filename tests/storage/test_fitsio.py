"""FITS readiness check, fast reader and atomic writer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from livestack.errors import FrameNotReadyError, FrameReadError, StorageError
from livestack.storage import fitsio
from livestack.storage.fitsio import (
    check_complete,
    read_frame,
    read_header,
    write_fits_float32,
)
from livestack.storage.journal import read_file_sha256


def _write(path: Path, data: np.ndarray | None, **cards: object) -> Path:
    hdu = fits.PrimaryHDU(data)
    for key, value in cards.items():
        hdu.header[key.replace("_", "-")] = value
    hdu.writeto(path, overwrite=True)
    return path


def _small_uint16(tmp_path: Path, name: str = "frame.fits") -> Path:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 65535, size=(48, 64), dtype=np.uint16)
    return _write(tmp_path / name, data, IMAGETYP="Light Frame", EXPTIME=30.0)


def _assert_one_line(exc: pytest.ExceptionInfo[Exception], path: Path) -> None:
    text = str(exc.value)
    assert "\n" not in text
    assert path.name in text


# ----------------------------------------------------------------------------- real data


def test_read_frame_matches_astropy_on_all_oscaar_frames(oscaar_dir: Path) -> None:
    files = sorted((oscaar_dir / "lights").glob("*.fit")) + sorted(
        (oscaar_dir / "darks").glob("*.fit"))
    assert len(files) == 70
    for path in files:
        image, info, header = read_frame(path)
        expected = fits.getdata(path)
        assert image.dtype == np.float32 and image.flags.c_contiguous
        assert image.dtype.byteorder in ("=", "|")
        np.testing.assert_array_equal(image, expected.astype(np.float32))
        assert info.shape == expected.shape
        assert header["NAXIS1"] == 1092


def test_read_frame_matches_astropy_on_seestar_with_spaces(seestar_dir: Path) -> None:
    files = sorted((seestar_dir / "lights").glob("*.fit"))[:3]
    assert all(" " in p.name for p in files)
    for path in files:
        image, info, _ = read_frame(path)
        np.testing.assert_array_equal(image, fits.getdata(path).astype(np.float32))
        assert info.path == str(path)


def test_check_complete_real_file_and_missing_padding(oscaar_dir: Path, tmp_path: Path) -> None:
    src = sorted((oscaar_dir / "lights").glob("*.fit"))[0]
    need = check_complete(src)
    assert need == 2880 + 1092 * 736 * 2
    assert need <= src.stat().st_size
    # Some writers omit the final padding: all data bytes present is enough.
    unpadded = tmp_path / "unpadded.fit"
    unpadded.write_bytes(src.read_bytes()[:need])
    assert check_complete(unpadded) == need
    np.testing.assert_array_equal(read_frame(unpadded)[0], read_frame(src)[0])
    for cut in (100, 2879, 2880, 2881, need // 2, need - 1):
        part = tmp_path / f"cut{cut}.fit"
        part.write_bytes(src.read_bytes()[:cut])
        with pytest.raises(FrameNotReadyError) as exc:
            check_complete(part)
        assert exc.value.reason == "incomplete"


# ----------------------------------------------------------------------------- readiness


def test_every_truncation_is_not_ready(tmp_path: Path) -> None:
    full = _small_uint16(tmp_path)
    blob = full.read_bytes()
    need = check_complete(full)
    assert need == 2880 + 48 * 64 * 2
    part = tmp_path / "part.fits"
    for cut in range(1, need, 97):
        part.write_bytes(blob[:cut])
        with pytest.raises(FrameNotReadyError) as exc:
            check_complete(part)
        assert exc.value.reason == "incomplete", cut
        with pytest.raises(FrameReadError) as rexc:
            read_frame(part)
        assert rexc.value.reason == "truncated", cut
    part.write_bytes(blob[:need])
    assert check_complete(part) == need


def test_zero_bytes_is_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.fits"
    path.write_bytes(b"")
    for func in (check_complete, read_frame):
        with pytest.raises(FrameReadError) as exc:
            func(path)
        assert exc.value.reason == "empty_file"
        assert not isinstance(exc.value, FrameNotReadyError)
        _assert_one_line(exc, path)


def test_text_file_named_fits_is_not_fits(tmp_path: Path) -> None:
    path = tmp_path / "notes.fits"
    path.write_text("observing log\nclouds at 23:00\n" * 200)
    for func in (check_complete, read_frame):
        with pytest.raises(FrameReadError) as exc:
            func(path)
        assert exc.value.reason == "not_fits"
        _assert_one_line(exc, path)


def test_binary_garbage_is_not_fits(tmp_path: Path) -> None:
    path = tmp_path / "garbage.fits"
    path.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(FrameReadError) as exc:
        check_complete(path)
    assert exc.value.reason == "not_fits"


def test_missing_file_is_vanished(tmp_path: Path) -> None:
    path = tmp_path / "gone.fits"
    for func in (check_complete, read_frame):
        with pytest.raises(FrameReadError) as exc:
            func(path)
        assert exc.value.reason == "vanished"


def test_file_vanishing_between_stat_and_open(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = _small_uint16(tmp_path)

    def vanished_open(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(fitsio, "open", vanished_open, raising=False)
    with pytest.raises(FrameReadError) as exc:
        read_frame(path)
    assert exc.value.reason == "vanished"


def test_permission_denied_is_unreadable(tmp_path: Path) -> None:
    path = _small_uint16(tmp_path)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running with privileges that read a chmod 000 file (root)")
        for func in (check_complete, read_frame):
            with pytest.raises(FrameReadError) as exc:
                func(path)
            assert exc.value.reason == "unreadable"
            _assert_one_line(exc, path)
    finally:
        path.chmod(0o644)


def test_permission_error_from_open_is_unreadable(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Same mapping as the chmod test, but also effective when the tests run as root."""
    path = _small_uint16(tmp_path)

    def denied_open(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fitsio, "open", denied_open, raising=False)
    for func in (check_complete, read_frame):
        with pytest.raises(FrameReadError) as exc:
            func(path)
        assert exc.value.reason == "unreadable"


def test_directory_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "dir.fits"
    path.mkdir()
    with pytest.raises(FrameReadError) as exc:
        read_frame(path)
    assert exc.value.reason == "unreadable"


# ----------------------------------------------------------------------------- shapes / values


def test_cube_is_not_2d_with_shape_in_message(tmp_path: Path) -> None:
    path = _write(tmp_path / "cube.fits", np.zeros((3, 8, 10), dtype=np.float32))
    assert check_complete(path) > 0  # complete, just not an image we stack
    with pytest.raises(FrameReadError) as exc:
        read_frame(path)
    assert exc.value.reason == "not_2d"
    assert "(3, 8, 10)" in str(exc.value)
    _assert_one_line(exc, path)


def test_single_plane_cube_reads_as_2d(tmp_path: Path) -> None:
    data = np.arange(80, dtype=np.int16).reshape(1, 8, 10)
    path = _write(tmp_path / "plane.fits", data)
    image, info, _ = read_frame(path)
    assert image.shape == (8, 10) and info.shape == (8, 10)
    np.testing.assert_array_equal(image, data[0].astype(np.float32))


def test_1d_is_not_2d(tmp_path: Path) -> None:
    path = _write(tmp_path / "spectrum.fits", np.arange(100, dtype=np.float32))
    with pytest.raises(FrameReadError) as exc:
        read_frame(path)
    assert exc.value.reason == "not_2d"
    assert "(100,)" in str(exc.value)


def test_all_nan_float_frame(tmp_path: Path) -> None:
    path = _write(tmp_path / "nan.fits", np.full((16, 16), np.nan, dtype=np.float32))
    with pytest.raises(FrameReadError) as exc:
        read_frame(path)
    assert exc.value.reason == "all_nan"
    _assert_one_line(exc, path)


def test_partial_nan_float_frame_reads(tmp_path: Path) -> None:
    data = np.arange(256, dtype=np.float32).reshape(16, 16)
    data[3, 4] = np.nan
    data[5, 6] = np.inf
    path = _write(tmp_path / "somenan.fits", data)
    image, _, _ = read_frame(path)
    np.testing.assert_array_equal(image, data)


def test_integer_blank_pixels_become_nan(tmp_path: Path) -> None:
    data = np.arange(64, dtype=np.int16).reshape(8, 8)
    data[2, 3] = -32768
    path = _write(tmp_path / "blank.fits", data, BLANK=-32768)
    image, _, _ = read_frame(path)
    assert np.isnan(image[2, 3])
    assert np.isfinite(np.delete(image.ravel(), 2 * 8 + 3)).all()


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.uint32,
                                   np.float32, np.float64])
def test_bitpix_variants_match_astropy(tmp_path: Path, dtype: type) -> None:
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is not None:
        data = rng.integers(info.min, info.max, size=(33, 47), dtype=dtype, endpoint=True)
    else:
        data = rng.normal(100.0, 30.0, size=(33, 47)).astype(dtype)
    path = _write(tmp_path / f"b_{np.dtype(dtype).name}.fits", data)
    image, _, _ = read_frame(path)
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, fits.getdata(path).astype(np.float32))


def test_bscale_bzero_applied(tmp_path: Path) -> None:
    stored = np.arange(-50, 50, dtype=np.int16).reshape(10, 10)
    hdu = fits.PrimaryHDU(stored)
    hdu.header["BSCALE"] = 0.5
    hdu.header["BZERO"] = 10.0
    path = tmp_path / "scaled.fits"
    # Write the stored integers untouched, with the scaling cards in the header.
    hdu.writeto(path, output_verify="ignore")
    image, _, _ = read_frame(path)
    np.testing.assert_allclose(image, fits.getdata(path).astype(np.float32))
    assert image[0, 0] == pytest.approx(-50 * 0.5 + 10.0)


def test_tile_compressed_fz(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 4000, size=(64, 80)).astype(np.int16)
    path = tmp_path / "frame.fits.fz"
    header = fits.Header()
    header["IMAGETYP"] = "Light"
    header["EXPTIME"] = 12.0
    fits.HDUList([fits.PrimaryHDU(),
                  fits.CompImageHDU(data, header=header, compression_type="RICE_1")]).writeto(path)
    size = path.stat().st_size
    need = check_complete(path)
    assert need <= size
    image, info, _ = read_frame(path)
    np.testing.assert_array_equal(image, data.astype(np.float32))
    assert info.exposure_s == 12.0 and info.shape == (64, 80)
    part = tmp_path / "part.fits.fz"
    part.write_bytes(path.read_bytes()[: need - 10])
    with pytest.raises(FrameNotReadyError):
        check_complete(part)
    part.write_bytes(path.read_bytes()[:2880 + 100])
    with pytest.raises(FrameNotReadyError):
        check_complete(part)


def test_read_header_matches_read_frame_info(tmp_path: Path) -> None:
    path = _small_uint16(tmp_path, "with space.fits")
    header, info = read_header(path)
    assert info == read_frame(path)[1]
    assert header["EXPTIME"] == 30.0 and info.exposure_s == 30.0


# ----------------------------------------------------------------------------- writer


def test_write_fits_float32_roundtrip_and_atomic(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    data = rng.normal(0, 1, size=(20, 30)).astype(np.float32)
    header = fits.Header()
    header["BZERO"] = 32768  # from a raw frame: must not rescale float data
    header["BSCALE"] = 1
    header["OBJECT"] = "M 94"
    ext = fits.ImageHDU(np.ones((20, 30), dtype=np.float32), name="WEIGHT")
    target = tmp_path / "stack.fits"
    target.write_bytes(b"old content")
    write_fits_float32(target, data, header, extensions=[ext])
    with fits.open(target) as hdul:
        np.testing.assert_array_equal(hdul[0].data, data)
        assert hdul[0].header["BITPIX"] == -32
        assert "BZERO" not in hdul[0].header
        assert hdul[0].header["OBJECT"] == "M 94"
        assert hdul["WEIGHT"].data.shape == (20, 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.fits"]  # no temp left
    assert "BZERO" in header  # caller's header untouched


def test_write_colour_cube(tmp_path: Path) -> None:
    data = np.zeros((3, 4, 5), dtype=np.float64)
    write_fits_float32(tmp_path / "rgb.fits", data, None)
    assert fits.getdata(tmp_path / "rgb.fits").shape == (3, 4, 5)


def test_write_failure_is_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as exc:
        write_fits_float32(tmp_path / "missing_dir" / "x.fits", np.zeros((2, 2)), None)
    assert "x.fits" in str(exc.value)


def test_fast_reader_leaves_no_handle_open(tmp_path: Path) -> None:
    path = _small_uint16(tmp_path)
    read_frame(path)
    moved = tmp_path / "moved.fits"
    shutil.move(path, moved)  # works on every OS only if no handle is left open
    assert moved.exists()


# ------------------------------------------------------------------- decoding bytes in memory


def _variants(tmp_path: Path) -> list[Path]:
    """Files of every fast BITPIX, BZERO/BSCALE, BLANK, NaNs, an extension and a .fz."""
    rng = np.random.default_rng(7)
    paths = [_small_uint16(tmp_path)]
    for dtype in (np.uint8, np.int16, np.int32, np.float32, np.float64):
        data = (rng.random((20, 30)) * 100).astype(dtype)
        paths.append(_write(tmp_path / f"{np.dtype(dtype).name}.fits", data))
    floats = rng.normal(0.0, 1.0, (20, 30)).astype(np.float32)
    floats[3, 4] = np.nan
    paths.append(_write(tmp_path / "scaled.fits", floats, BSCALE=2.0, BZERO=10.0))
    hdu = fits.PrimaryHDU(rng.integers(-100, 100, (20, 30)).astype(np.int16))
    hdu.header["BLANK"] = -100
    hdu.writeto(tmp_path / "blank.fits")
    paths.append(tmp_path / "blank.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(floats)]).writeto(tmp_path / "ext.fits")
    paths.append(tmp_path / "ext.fits")
    fits.CompImageHDU(rng.integers(0, 4000, (20, 30)).astype(np.int16)).writeto(tmp_path
                                                                                / "c.fits.fz")
    paths.append(tmp_path / "c.fits.fz")
    return paths


def test_read_frame_from_bytes_equals_the_file_read(tmp_path: Path) -> None:
    for path in _variants(tmp_path):
        image, info, header = read_frame(path)
        for data in (path.read_bytes(), read_file_sha256(path)[0]):
            got, got_info, got_header = read_frame(path, data)
            assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
            np.testing.assert_array_equal(got, image, err_msg=path.name)
            assert got_info == info and got_header.tostring() == header.tostring(), path.name


def test_read_frame_from_bytes_decodes_those_bytes_on_astropys_path_too(tmp_path: Path
                                                                      ) -> None:
    # BITPIX -64 and tile-compressed images go through astropy: it must decode the bytes
    # that were hashed, not open the file again (here: since replaced by other content).
    rng = np.random.default_rng(11)
    for name, hdul in {
            "f64.fits": fits.HDUList([fits.PrimaryHDU(rng.normal(100, 5, (20, 30)))]),
            "comp.fits": fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(
                rng.integers(0, 4000, (20, 30)).astype(np.int16))])}.items():
        path = tmp_path / name
        hdul.writeto(path)
        expected, _, _ = read_frame(path)
        data = read_file_sha256(path)[0]
        fits.PrimaryHDU(np.zeros((20, 30))).writeto(path, overwrite=True)
        got, _, _ = read_frame(path, data)
        np.testing.assert_array_equal(got, expected, err_msg=name)
        assert np.any(got != 0.0)


def test_read_frame_from_bytes_keeps_the_reasons(tmp_path: Path) -> None:
    good = _small_uint16(tmp_path).read_bytes()
    cube = tmp_path / "cube.fits"
    fits.PrimaryHDU(np.zeros((3, 4, 5), np.float32)).writeto(cube)
    cases = {"empty_file": b"", "truncated": good[: len(good) - 3000],
             "not_fits": b"observing log\n" * 300, "not_2d": cube.read_bytes(),
             "all_nan": None}
    nan = tmp_path / "nan.fits"
    fits.PrimaryHDU(np.full((4, 5), np.nan, np.float32)).writeto(nan)
    cases["all_nan"] = nan.read_bytes()
    for reason, data in cases.items():
        path = tmp_path / f"{reason}.fits"
        assert data is not None
        path.write_bytes(data)
        with pytest.raises(FrameReadError) as from_file:
            read_frame(path)
        with pytest.raises(FrameReadError) as from_bytes:
            read_frame(path, data)
        assert from_bytes.value.reason == from_file.value.reason == reason
        assert str(from_bytes.value) == str(from_file.value)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_is_a_storage_error_naming_the_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # astropy's free-space check reads the name of the file it writes to; a descriptor's
    # file object has none, so it raised AttributeError in place of the disk's OSError.
    path = tmp_path / "master_dark.fits"
    real_fdopen = os.fdopen

    def onto_a_full_disk(fd: int, mode: str = "r", *args: object, **kwargs: object) -> object:
        if "w" in mode:
            # A descriptor's file object, as the real one: every write fails with ENOSPC.
            return real_fdopen(os.open("/dev/full", os.O_WRONLY), "wb", buffering=0)
        return real_fdopen(fd, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "fdopen", onto_a_full_disk)
    with pytest.raises(StorageError, match=r"master_dark\.fits.*No space left"):
        fitsio.write_fits_float32(path, np.ones((640, 640), np.float32), fits.Header())
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # no temp file, no partial product

"""Tests of the stack FITS writer/reader."""

from __future__ import annotations

import errno
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from livestack.errors import StorageError
from livestack.pipeline.product import StackProduct
from livestack.pipeline.types import FrameMetrics, FrameRecord, Transform
from livestack.storage.stackfits import read_stack_fits, write_stack_fits

T0 = datetime(2024, 3, 1, 22, 0, 0, tzinfo=timezone.utc)


def records() -> list[FrameRecord]:
    out = []
    for i, (verdict, weight) in enumerate((("accepted", 1.0), ("accepted", 0.5),
                                           ("rejected", 0.0), ("accepted", 2.0),
                                           ("failed", 0.0))):
        metrics = None if verdict == "failed" else FrameMetrics(
            star_count=100 + i, fwhm_px=2.5 + 0.1 * i, fwhm_arcsec=None if i else 3.1,
            elongation=1.1, background_adu=1000.0 - i, noise_adu=10.0 + i, snr=40.0)
        transform = None if verdict != "accepted" else Transform.from_params(
            0.5 * i, -1.25 * i, 0.01 * i)
        out.append(FrameRecord(
            file=f"/data/night 1/light_{i:03d}.fits", verdict=verdict,
            reason={"rejected": "fwhm_jump", "failed": "not_fits"}.get(verdict),
            weight=weight, metrics=metrics, transform=transform, exposure_s=30.0,
            date_obs=T0 + timedelta(seconds=40 * i), mjd_obs=60370.9 + i * 40 / 86400))
    return out


def product(colour: bool = False, std: bool = True) -> StackProduct:
    rng = np.random.default_rng(1)
    plane_shape = (3, 24, 32) if colour else (24, 32)
    image = rng.normal(1000, 10, plane_shape).astype(np.float32)
    image[..., 0, 0] = np.nan
    count = rng.integers(0, 65535, plane_shape).astype(np.uint16)
    return StackProduct(
        image=image, weight=rng.uniform(0, 5, (24, 32)).astype(np.float32), count=count,
        rejected_low=(count // 7).astype(np.uint16), rejected_high=(count // 3).astype(np.uint16),
        records=records(), header={"EGAIN": 0.78, "OBJECT": "M 94", "FILTER": "L",
                                   "NAXIS": 99, "STACKID": "m94-l", "KAPPALO": 3.0},
        std=rng.uniform(0, 3, plane_shape).astype(np.float32) if std else None)


@pytest.mark.parametrize("colour", [False, True])
def test_round_trip_with_all_extensions(tmp_path: Path, colour: bool) -> None:
    src = product(colour)
    path = tmp_path / "stack.fits"
    write_stack_fits(path, src)
    got = read_stack_fits(path)
    np.testing.assert_array_equal(got.image, src.image)
    for name in ("weight", "count", "rejected_low", "rejected_high", "std"):
        np.testing.assert_array_equal(getattr(got, name), getattr(src, name))
        assert getattr(got, name).dtype == getattr(src, name).dtype
    assert _records_equal(got.records, src.records)
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "WEIGHT", "COUNT", "REJLOW", "REJHIGH",
                                          "STD", "FRAMES"]
        assert hdul[0].header["NAXIS"] == (3 if colour else 2)
        assert hdul["COUNT"].header["BITPIX"] == 16 and hdul["COUNT"].header["BZERO"] == 32768
        names = hdul["FRAMES"].columns.names
        for col in ("file", "verdict", "reason", "weight", "fwhm_px", "stars", "background",
                    "noise", "dx", "dy", "rotation_deg", "exposure_s", "date_obs"):
            assert col in names


def _records_equal(a: list[FrameRecord], b: list[FrameRecord]) -> bool:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert (ra.file, ra.verdict, ra.reason, ra.weight, ra.exposure_s) == \
            (rb.file, rb.verdict, rb.reason, rb.weight, rb.exposure_s)
        assert ra.metrics == rb.metrics
        assert ra.date_obs == rb.date_obs and ra.mjd_obs == pytest.approx(rb.mjd_obs)
        if rb.transform is None:
            assert ra.transform is None
        else:
            assert ra.transform is not None
            np.testing.assert_array_equal(ra.transform.matrix, rb.transform.matrix)
            assert ra.transform.method == "stored"
    return True


def test_headers(tmp_path: Path) -> None:
    src = product()
    path = tmp_path / "stack.fits"
    write_stack_fits(path, src)
    header = read_stack_fits(path).header
    accepted = [r for r in src.records if r.verdict == "accepted"]
    weights = np.array([r.weight for r in accepted])
    n_eff = weights.sum() ** 2 / np.sum(weights ** 2)
    assert header["NCOMBINE"] == 3
    assert header["EXPTIME"] == pytest.approx(90.0)
    assert header["DATE-OBS"] == "2024-03-01T22:00:00.000"
    assert header["DATE-END"] == "2024-03-01T22:02:30.000"    # frame 3 starts at +120 s
    # MJD-OBS is DATE-OBS (the start), not the mean; the mean mid-exposure of the starts
    # 0, 40 and 120 s plus 15 s is 68.333 s: DATE-AVG/MJD-AVG.
    mjd0 = 60370.0 + 22.0 / 24.0
    assert header["MJD-OBS"] == pytest.approx(mjd0, abs=1e-9)
    assert header["DATE-AVG"] == "2024-03-01T22:01:08.333"
    assert header["MJD-AVG"] == pytest.approx(mjd0 + (160.0 / 3.0 + 15.0) / 86400, abs=1e-9)
    assert header["MJD-END"] == pytest.approx(mjd0 + 150.0 / 86400, abs=1e-9)
    assert header["NEFF"] == pytest.approx(n_eff)
    assert header["EGAINEFF"] == pytest.approx(0.78 * n_eff)
    assert header["EGAIN"] == 0.78
    assert header["BUNIT"] == "ADU" and header["IMAGETYP"] == "Master Light"
    assert str(header["CREATOR"]).startswith("livestack")
    assert header["OBJECT"] == "M 94" and header["STACKID"] == "m94-l"
    assert "NAXIS" not in header          # structural keys from product.header are ignored


def test_product_header_overrides_computed_values(tmp_path: Path) -> None:
    src = product()
    src.header["NCOMBINE"] = 42
    src.header["A_LONG_KEYWORD"] = "hierarch"
    src.header["HISTORY"] = "integrated " + "x" * 100 + "\nsecond line"
    write_stack_fits(tmp_path / "s.fits", src)
    header = read_stack_fits(tmp_path / "s.fits").header
    assert header["NCOMBINE"] == 42
    assert header["A_LONG_KEYWORD"] == "hierarch"
    history = str(header["HISTORY"])
    assert history.startswith("integrated xxx") and history.endswith("second line")
    assert history.replace("\n", "").count("x") == 100


def test_disk_full_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stack.fits"
    write_stack_fits(path, product(std=False))
    old = path.read_bytes()
    real_write = os.write
    written = {"bytes": 0}

    def full_disk(fd: int, data: bytes) -> int:
        if fd <= 2:
            return real_write(fd, data)
        if written["bytes"] > 8000:   # fail part-way through, like a real ENOSPC
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, data)
        written["bytes"] += n
        return n

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(StorageError, match=r"stack\.fits"):
        write_stack_fits(path, product(colour=True))
    monkeypatch.undo()
    assert written["bytes"] > 0
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.fits"]


def test_missing_directory_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        write_stack_fits(tmp_path / "nope" / "stack.fits", product())
    with pytest.raises(StorageError):
        read_stack_fits(tmp_path / "absent.fits")


def test_written_file_is_world_readable_regardless_of_mkstemp(tmp_path: Path) -> None:
    path = tmp_path / "stack.fits"
    write_stack_fits(path, product())
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    path.chmod(0o600)  # an overwrite replaces the file and its mode
    write_stack_fits(path, product(colour=True))
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["stack.fits"]


def test_rgb_stack_drops_cfa_keys_mono_keeps_them(tmp_path: Path) -> None:
    cfa = {"CFAPAT": "RGGB", "BAYERPAT": "RGGB", "XBAYROFF": 1, "YBAYROFF": 0}
    for colour in (True, False):
        src = product(colour)
        src = StackProduct(src.image, src.weight, src.count, src.rejected_low,
                           src.rejected_high, src.records, {**src.header, **cfa}, src.std)
        path = tmp_path / f"stack{colour}.fits"
        write_stack_fits(path, src)
        header = read_stack_fits(path).header
        for key in cfa:
            assert (key in header) is (not colour), key
        assert header["OBJECT"] == "M 94"


@pytest.mark.parametrize("colour", [False, True])
def test_chunked_writer_gives_astropys_bytes(tmp_path: Path, colour: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import livestack.storage.stackfits as stackfits

    prod = product(colour=colour)
    prod.count[..., 0, :5] = [0, 1, 32767, 32768, 65535]  # both sides of the BZERO offset
    monkeypatch.setattr(stackfits, "_WRITE_CHUNK_BYTES", 1000)  # many ragged chunks
    ours = tmp_path / "ours.fits"
    write_stack_fits(ours, prod)
    reference = tmp_path / "astropy.fits"
    stackfits._build(prod).writeto(reference)
    assert ours.read_bytes() == reference.read_bytes()
    with fits.open(ours) as hdul:
        np.testing.assert_array_equal(hdul["COUNT"].data, prod.count)

"""Header parsing into FrameInfo: real headers and the variants of capture programs."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from astropy.io import fits

from livestack.pipeline.types import FrameInfo
from livestack.storage.fitsio import read_header
from livestack.storage.headers import (
    effective_bayer_pattern,
    normalize_image_type,
    parse_frame_info,
)

UTC = timezone.utc


def _info(shape: tuple[int, int] = (100, 120), **cards: object) -> FrameInfo:
    header = {k.replace("_", "-") if k in ("DATE_OBS", "MJD_OBS", "UT_OBS", "CCD_TEMP",
                                           "TIME_OBS") else k: v for k, v in cards.items()}
    return parse_frame_info(header, "some file.fits", shape)


# ----------------------------------------------------------------------------- real data


def test_oscaar_headers(oscaar_dir: Path) -> None:
    light = sorted((oscaar_dir / "lights").glob("*.fit"))[0]
    _, info = read_header(light)
    assert info.image_type == "light"
    assert info.exposure_s == 60.0
    assert info.date_obs == datetime(2012, 6, 17, 2, 27, 58, tzinfo=UTC)
    assert info.mjd_obs == pytest.approx(56095.1027546, abs=1e-6)
    assert info.binning == (2, 2)
    assert info.object_name == ""
    assert info.filter_name == "Filter 2"
    assert info.ccd_temp_c == pytest.approx(-10.2, abs=0.3)
    assert info.egain_e_per_adu == pytest.approx(0.78)
    assert info.bayer_pattern is None
    assert info.pixel_scale_arcsec is None  # FOCALLEN = 0
    assert info.shape == (736, 1092)
    dark = sorted((oscaar_dir / "darks").glob("*.fit"))[0]
    assert read_header(dark)[1].image_type == "dark"


def test_oscaar_all_lights_are_utc_and_ordered(oscaar_dir: Path) -> None:
    dates = [read_header(p)[1].date_obs for p in sorted((oscaar_dir / "lights").glob("*.fit"))]
    assert all(d is not None and d.tzinfo is not None for d in dates)
    assert dates == sorted(dates)
    assert dates[0] == datetime(2012, 6, 17, 2, 27, 58, tzinfo=UTC)
    assert dates[-1] == datetime(2012, 6, 17, 3, 20, 39, tzinfo=UTC)


def test_seestar_headers(seestar_dir: Path) -> None:
    path = sorted((seestar_dir / "lights").glob("*.fit"))[0]
    _, info = read_header(path)
    assert " " in info.path and info.path == str(path)
    assert info.image_type == "light"
    assert info.object_name == "M 94"
    assert info.filter_name == "IRCUT"
    assert info.exposure_s == 10.0
    assert info.date_obs == datetime(2025, 3, 27, 1, 20, 32, 955368, tzinfo=UTC)
    assert info.binning == (1, 1)
    assert info.gain == 80.0
    assert info.bayer_pattern == "GRBG"
    assert info.shape == (1920, 1080)
    assert info.ra_deg == pytest.approx(193.04166)
    assert info.dec_deg == pytest.approx(40.970556)
    # XPIXSZ 2.9 um (binned) at 250 mm: 2.39 arcsec per pixel.
    assert info.pixel_scale_arcsec == pytest.approx(2.9 / 250 * 206.265, rel=1e-6)


# ----------------------------------------------------------------------------- image type


@pytest.mark.parametrize(("value", "expected"), [
    ("Light Frame", "light"), ("LIGHT", "light"), ("Light", "light"), ("Object", "light"),
    ("Dark Frame", "dark"), ("DARK", "dark"), ("Bias Frame", "bias"), ("Offset", "bias"),
    ("BIAS", "bias"), ("Zero", "bias"), ("Flat Field", "flat"), ("Flat", "flat"),
    ("FLAT", "flat"), ("Dark Flat", "darkflat"), ("DARKFLAT", "darkflat"),
    ("Flat Dark", "darkflat"), ("Master Dark", "dark"), ("Master Dark Flat", "darkflat"),
    ("", "unknown"), ("Focus", "unknown"), (None, "unknown"),
])
def test_image_type_normalisation(value: object, expected: str) -> None:
    assert normalize_image_type(value) == expected


def test_frame_keyword_used_when_imagetyp_absent() -> None:
    assert _info(FRAME="Dark").image_type == "dark"
    assert _info(IMAGETYP="Light Frame", FRAME="Dark").image_type == "light"


def test_exposure_fallback_and_defaults() -> None:
    assert _info(EXPOSURE=45.0).exposure_s == 45.0
    assert _info(EXPTIME=5.0, EXPOSURE=45.0).exposure_s == 5.0
    info = _info()
    assert info.exposure_s == 0.0 and info.date_obs is None and info.binning == (1, 1)


# ----------------------------------------------------------------------------- dates


def test_date_with_z_and_offset_convert_to_utc() -> None:
    assert _info(DATE_OBS="2024-01-02T03:04:05Z").date_obs == datetime(2024, 1, 2, 3, 4, 5,
                                                                        tzinfo=UTC)
    info = _info(DATE_OBS="2024-01-02T03:04:05.250+02:00")
    assert info.date_obs == datetime(2024, 1, 2, 1, 4, 5, 250000, tzinfo=UTC)
    assert info.mjd_obs == pytest.approx(60311.0445052, abs=1e-6)


def test_local_date_obs_loses_to_mjd_obs() -> None:
    # The camera writes local time (UTC-5) in DATE-OBS and UTC in MJD-OBS.
    mjd = 60311.125  # 2024-01-02T03:00:00 UTC
    info = _info(DATE_OBS="2024-01-01T22:00:00", MJD_OBS=mjd)
    assert info.date_obs == datetime(2024, 1, 2, 3, 0, 0, tzinfo=UTC)
    assert info.mjd_obs == pytest.approx(mjd, abs=1e-9)


def test_consistent_date_obs_kept_for_its_precision() -> None:
    info = _info(DATE_OBS="2024-01-02T03:00:00.123456", MJD_OBS=60311.12500)
    assert info.date_obs == datetime(2024, 1, 2, 3, 0, 0, 123456, tzinfo=UTC)


def test_mid_exposure_jd_does_not_move_date_obs() -> None:
    # JD stamped at mid-exposure of a 60 s frame: 30 s later than DATE-OBS, which stands.
    start = datetime(2012, 6, 17, 2, 27, 58, tzinfo=UTC)
    jd_mid = 2456095.6027546297 + 30.0 / 86400.0
    assert _info(DATE_OBS="2012-06-17T02:27:58", JD=jd_mid).date_obs == start


def test_local_date_obs_with_mid_exposure_mjd_keeps_exposure_start() -> None:
    # Local time UTC+2 in DATE-OBS, MJD-OBS at mid-exposure (+60 s): subtract exactly 2 h.
    mjd_mid = 60311.125 + 60.0 / 86400.0  # 2024-01-02T03:01:00 UTC
    info = _info(DATE_OBS="2024-01-02T05:00:00.5", MJD_OBS=mjd_mid)
    assert info.date_obs == datetime(2024, 1, 2, 3, 0, 0, 500000, tzinfo=UTC)


def test_local_date_obs_loses_to_ut_obs_time_of_day() -> None:
    # Local 21:30 on the 1st, UT-OBS 02:30 on the 2nd (UTC-5): pick the nearest day.
    info = _info(DATE_OBS="2024-01-01T21:30:00", UT_OBS="02:30:00")
    assert info.date_obs == datetime(2024, 1, 2, 2, 30, tzinfo=UTC)


def test_ut_obs_full_iso() -> None:
    info = _info(DATE_OBS="2024-01-01T21:30:00", UT_OBS="2024-01-02T02:30:00.5")
    # The zone offset (5 h) is removed from DATE-OBS; the half second is not a zone.
    assert info.date_obs == datetime(2024, 1, 2, 2, 30, 0, tzinfo=UTC)
    assert _info(UT_OBS="2024-01-02T02:30:00.5").date_obs == datetime(2024, 1, 2, 2, 30, 0,
                                                                       500000, tzinfo=UTC)


def test_old_style_date_and_time_obs() -> None:
    info = _info(DATE_OBS="2008-01-15", TIME_OBS="14:34:02.476")
    assert info.date_obs == datetime(2008, 1, 15, 14, 34, 2, 476000, tzinfo=UTC)


def test_jd_only() -> None:
    info = _info(JD=2456095.6027546297)
    assert info.date_obs is not None
    expected = datetime(2012, 6, 17, 2, 27, 58, tzinfo=UTC)
    assert abs((info.date_obs - expected).total_seconds()) < 1e-3


def test_garbage_date_is_none() -> None:
    assert _info(DATE_OBS="yesterday").date_obs is None


# ----------------------------------------------------------------------------- pointing, scale


def test_sexagesimal_ra_dec() -> None:
    info = _info(OBJCTRA="12 53 27.00", OBJCTDEC="-41 07 12")
    assert info.ra_deg == pytest.approx(193.3625)
    assert info.dec_deg == pytest.approx(-41.12)
    info = _info(RA="12:53:27", DEC="+41:07:12")
    assert info.ra_deg == pytest.approx(193.3625)
    assert info.dec_deg == pytest.approx(41.12)
    assert _info(RA=10.5, DEC=-5.25).ra_deg == 10.5


def test_pixel_scale_variants() -> None:
    assert _info(SCALE=1.23, XPIXSZ=3.76, FOCALLEN=500).pixel_scale_arcsec == 1.23
    assert _info(XPIXSZ=3.76, FOCALLEN=500, XBINNING=2).pixel_scale_arcsec == pytest.approx(
        3.76 / 500 * 206.265)
    assert _info(PIXSIZE1=3.76, FOCALLEN=500, XBINNING=2).pixel_scale_arcsec == pytest.approx(
        2 * 3.76 / 500 * 206.265)
    assert _info(XPIXSZ=3.76, FOCALLEN=0).pixel_scale_arcsec is None


@pytest.mark.parametrize("key", ["IM_SCALE", "PIXSCALE", "SCALE", "SECPIX", "SECPIX1"])
def test_pixel_scale_keys_cameras_write(key: str) -> None:
    # MicroObservatory frames carry IM_SCALE = 5.21 and no FOCALLEN.
    assert _info(**{key: 5.21}).pixel_scale_arcsec == 5.21
    assert _info(**{key: 0.0}).pixel_scale_arcsec is None       # a zero is no scale
    assert _info(**{key: "n/a"}).pixel_scale_arcsec is None     # nor is text
    # A scale keyword wins over the optics.
    assert _info(**{key: 5.21}, XPIXSZ=3.76, FOCALLEN=500).pixel_scale_arcsec == 5.21


def test_no_scale_keyword_gives_none() -> None:
    assert _info().pixel_scale_arcsec is None
    assert _info(FOCALLEN=500).pixel_scale_arcsec is None
    assert _info(XPIXSZ=3.76).pixel_scale_arcsec is None


def test_saturation_level_precedence() -> None:
    # SATURATE (the camera's white level, also what the RAW reader writes) wins.
    info = _info(SATURATE=4095, DATAMAX=60000, BITPIX=16, BZERO=32768)
    assert (info.saturation_adu, info.saturation_source) == (4095.0, "SATURATE")
    info = _info(DATAMAX=60000, BITPIX=16, BZERO=32768)
    assert (info.saturation_adu, info.saturation_source) == (60000.0, "DATAMAX")
    info = _info(BITPIX=16, BZERO=32768)
    assert (info.saturation_adu, info.saturation_source) == (65535.0, "BITPIX")
    assert _info(BITPIX=16).saturation_adu == 32767.0          # signed 16-bit
    assert _info(BITPIX=8).saturation_adu == 255.0
    assert _info(BITPIX=32, BZERO=2147483648).saturation_adu == 4294967295.0
    for cards in ({"BITPIX": -32}, {}, {"BITPIX": 16, "BZERO": 32768, "BSCALE": 2.0},
                  {"SATURATE": 0, "BITPIX": -32}, {"SATURATE": "bad", "BITPIX": -64}):
        info = _info(**cards)
        assert (info.saturation_adu, info.saturation_source) == (None, ""), cards


def test_binning_gain_offset_temperature() -> None:
    info = _info(XBINNING=2, YBINNING=2, GAIN=100, OFFSET=50, CCD_TEMP=-10.5)
    assert info.binning == (2, 2)
    assert (info.gain, info.offset, info.ccd_temp_c) == (100.0, 50.0, -10.5)


def test_malformed_card_is_ignored() -> None:
    header = fits.Header.fromstring(
        "SIMPLE  =                    T" + " " * 50 + "EXPTIME =  notanumber" + " " * 59
        + "GAIN    =                  120" + " " * 50 + "END" + " " * 77)
    info = parse_frame_info(header, "x.fits", (10, 10))
    assert info.exposure_s == 0.0
    assert info.gain == 120.0


# ----------------------------------------------------------------------------- Bayer


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_bayer_plain_and_top_down(pattern: str) -> None:
    assert _info(BAYERPAT=pattern).bayer_pattern == pattern
    assert _info(BAYERPAT=pattern.lower() + "  ", ROWORDER="TOP-DOWN").bayer_pattern == pattern


@pytest.mark.parametrize(("pattern", "flipped"), [("RGGB", "GBRG"), ("BGGR", "GRBG"),
                                                   ("GRBG", "BGGR"), ("GBRG", "RGGB")])
def test_bottom_up_flips_rows_for_even_height(pattern: str, flipped: str) -> None:
    assert _info((100, 120), BAYERPAT=pattern, ROWORDER="BOTTOM-UP").bayer_pattern == flipped
    # With an odd number of rows the last stored row has row 0's parity: no change.
    assert _info((101, 120), BAYERPAT=pattern, ROWORDER="BOTTOM-UP").bayer_pattern == pattern


def test_bayer_offsets_shift_pattern() -> None:
    assert _info(BAYERPAT="RGGB", XBAYROFF=1).bayer_pattern == "GRBG"
    assert _info(BAYERPAT="RGGB", YBAYROFF=1).bayer_pattern == "GBRG"
    assert _info(BAYERPAT="RGGB", XBAYROFF=1, YBAYROFF=1).bayer_pattern == "BGGR"
    assert _info(BAYERPAT="RGGB", XBAYROFF=2, YBAYROFF=4).bayer_pattern == "RGGB"
    assert _info((100, 120), BAYERPAT="RGGB", XBAYROFF=1,
                 ROWORDER="BOTTOM-UP").bayer_pattern == "BGGR"


def test_bayer_sources_and_mono() -> None:
    assert _info(COLORTYP="BGGR").bayer_pattern == "BGGR"
    assert _info(BAYERPAT="XTRANS").bayer_pattern is None
    assert _info().bayer_pattern is None
    assert effective_bayer_pattern({"BAYERPAT": "GRBG"}, 1920) == "GRBG"

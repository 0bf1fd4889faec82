"""FITS time keywords and CFA keys of stacks (issue 9, part 3)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from livestack.pipeline.fitskeys import is_cfa_key, time_keywords
from livestack.pipeline.session import PipelineConfig, StackSession, _stack_header
from livestack.pipeline.types import FrameInfo, FrameRecord

T0 = datetime(2024, 3, 1, 22, 0, 0, tzinfo=timezone.utc)
MJD0 = 60370.0 + 22.0 / 24.0


def test_time_keywords_start_mean_end() -> None:
    # Frames out of order, unequal exposures, one without a time.
    frames = [(T0 + timedelta(seconds=600), 60.0), (T0, 30.0), (None, 10.0),
              (T0 + timedelta(seconds=100), 120.0)]
    keys = time_keywords(frames)
    assert keys["DATE-OBS"] == "2024-03-01T22:00:00.000"
    assert keys["MJD-OBS"] == pytest.approx(MJD0, abs=1e-9)
    # Mid-exposures at 630, 15 and 160 s: mean 268.333 s.
    assert keys["DATE-AVG"] == "2024-03-01T22:04:28.333"
    assert keys["MJD-AVG"] == pytest.approx(MJD0 + 805.0 / 3.0 / 86400, abs=1e-9)
    assert keys["DATE-END"] == "2024-03-01T22:11:00.000"
    assert keys["MJD-END"] == pytest.approx(MJD0 + 660.0 / 86400, abs=1e-9)


def test_time_keywords_naive_is_utc_and_empty_without_times() -> None:
    naive = time_keywords([(T0.replace(tzinfo=None), 10.0)])
    assert naive["DATE-OBS"] == "2024-03-01T22:00:00.000"
    assert naive["DATE-END"] == "2024-03-01T22:00:10.000"
    assert time_keywords([]) == {} and time_keywords([(None, 5.0)]) == {}
    # Another zone is converted to UTC.
    cet = T0.astimezone(timezone(timedelta(hours=1)))
    assert time_keywords([(cet, 0.0)])["DATE-OBS"] == "2024-03-01T22:00:00.000"


def test_cfa_keys() -> None:
    assert all(is_cfa_key(k) for k in ("CFAPAT", "bayerpat", "XBAYROFF", "YBAYROFF"))
    assert not any(is_cfa_key(k) for k in ("OBJECT", "FILTER", "NAXIS3"))


def test_live_header_times_and_no_cfa_on_colour() -> None:
    session = StackSession("s", PipelineConfig())
    session.first_info = FrameInfo("a.fits", "light", (10, 10), bayer_pattern="GRBG")
    session.records = [
        FrameRecord(f"f{i}.fits", verdict, exposure_s=60.0,
                    date_obs=T0 + timedelta(seconds=120 * i), mjd_obs=MJD0 + 120 * i / 86400)
        for i, verdict in enumerate(("accepted", "rejected", "accepted", "accepted"))]
    header = _stack_header(session)
    assert "CFAPAT" not in header and "BAYERPAT" not in header
    assert header["DATE-OBS"] == "2024-03-01T22:00:00.000"
    assert header["MJD-OBS"] == pytest.approx(MJD0, abs=1e-9)
    # Accepted starts 0, 240, 360 s; mid-exposures +30 s: mean 230 s.
    assert header["DATE-AVG"] == "2024-03-01T22:03:50.000"
    assert header["DATE-END"] == "2024-03-01T22:07:00.000"
    assert header["MJD-END"] == pytest.approx(MJD0 + 420 / 86400, abs=1e-9)


@pytest.mark.parametrize(("cards", "scale"), [({"IM_SCALE": 5.21}, 5.21),
                                              ({"SECPIX": 1.5}, 1.5), ({}, None)])
def test_fwhm_in_arcsec_from_the_header_scale(cards: dict[str, float],
                                              scale: float | None) -> None:
    # MicroObservatory writes IM_SCALE and no FOCALLEN; without any scale: null.
    from dataclasses import replace

    from livestack.sim.saturated import SaturatedSky
    from livestack.storage.headers import parse_frame_info

    sky = SaturatedSky()
    info = parse_frame_info({"IMAGETYP": "Light Frame", "EXPTIME": 60.0, **cards},
                            "f.fits", sky.config.shape)
    assert info.pixel_scale_arcsec == scale
    outcome = StackSession("s", PipelineConfig()).process(
        sky.frame(0), replace(info, saturation_adu=4095.0, saturation_source="SATURATE"),
        None)
    assert outcome.metrics is not None and outcome.metrics.fwhm_px > 1.0
    if scale is None:
        assert outcome.metrics.fwhm_arcsec is None
        assert outcome.metrics.as_dict()["fwhm_arcsec"] is None   # JSON null
    else:
        assert outcome.metrics.fwhm_arcsec == pytest.approx(outcome.metrics.fwhm_px * scale)

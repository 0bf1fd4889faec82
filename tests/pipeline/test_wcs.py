"""The pure WCS math: composition with a registration transform, geometry, pointing."""

from __future__ import annotations

import numpy as np
import pytest

from livestack.pipeline import wcs as W
from livestack.pipeline.types import Transform
from livestack.sim.tycho import tan_cards

SHAPE = (600, 800)


def _sip_cards() -> W.WcsCards:
    cards = tan_cards(286.0, 36.6, 2.37, SHAPE, rotation_deg=12.0)
    cards.update({"CTYPE1": "RA---TAN-SIP", "CTYPE2": "DEC--TAN-SIP", "A_ORDER": 2,
                  "B_ORDER": 2, "A_2_0": 2e-6, "A_1_1": -1e-6, "A_0_2": 3e-7,
                  "B_2_0": -1e-6, "B_1_1": 2e-6, "B_0_2": 1e-6, "AP_ORDER": 2,
                  "BP_ORDER": 2, "AP_2_0": -2e-6, "AP_1_1": 1e-6, "AP_0_2": -3e-7,
                  "BP_2_0": 1e-6, "BP_1_1": -2e-6, "BP_0_2": -1e-6})
    return cards


@pytest.mark.parametrize("sip", [False, True])
def test_compose_matches_reference_wcs_through_the_transform(sip: bool) -> None:
    cards = _sip_cards() if sip else tan_cards(10.0, -30.0, 1.5, SHAPE, 33.0)
    transform = Transform.from_params(25.3, -14.8, rotation_deg=3.5, scale=1.002)
    frame = W.compose(cards, transform)
    xy = np.random.default_rng(3).uniform(0, 800, (50, 2))
    direct = W.pixel_to_world(frame, xy)
    via_ref = W.pixel_to_world(cards, transform.apply(xy))
    assert np.max(np.abs(direct - via_ref)) * 3600 < 1e-6  # arcsec
    back = W.world_to_pixel(frame, direct)
    assert np.max(np.abs(back - xy)) < 1e-3 if sip else 1e-8
    if sip:
        assert frame["A_ORDER"] == 2 and "BP_1_1" in frame


def test_field_geometry_of_a_known_field() -> None:
    cards = tan_cards(83.8, -5.4, 3.0, SHAPE, rotation_deg=20.0)
    geo = W.field_geometry(cards, SHAPE)
    assert geo.ra_deg == pytest.approx(83.8, abs=1e-3)
    assert geo.dec_deg == pytest.approx(-5.4, abs=1e-3)
    assert geo.scale_arcsec == pytest.approx(3.0, rel=1e-3)
    assert geo.width_deg == pytest.approx(800 * 3.0 / 3600, rel=1e-3)
    assert geo.height_deg == pytest.approx(600 * 3.0 / 3600, rel=1e-3)
    assert geo.pa_deg == pytest.approx(20.0, abs=0.01)
    assert not geo.flipped
    mirrored = dict(cards, CD1_1=-float(cards["CD1_1"]), CD1_2=-float(cards["CD1_2"]))
    assert W.field_geometry(mirrored, SHAPE).flipped


def test_frame_pointing_follows_the_transform() -> None:
    cards = tan_cards(200.0, 60.0, 2.0, SHAPE)
    ra, dec, pa = W.frame_pointing(cards, Transform.identity(), SHAPE)
    assert (ra, dec) == pytest.approx((200.0, 60.0), abs=1e-6)
    assert pa == pytest.approx(0.0, abs=1e-6) or pa == pytest.approx(360.0, abs=1e-6)
    # A frame whose pixels land 100 px higher (+y) on the reference points 200" north.
    _ra2, dec2, pa2 = W.frame_pointing(cards, Transform.from_params(0.0, 100.0), SHAPE)
    assert dec2 - dec == pytest.approx(200.0 / 3600, rel=1e-3)
    rotated = W.frame_pointing(cards, Transform.from_params(0.0, 0.0, rotation_deg=10.0),
                               SHAPE)
    # Rotating about the origin also moves the centre ~90 px, which at Dec 60 turns
    # north by ~0.06 deg (meridians converge).
    assert abs(((rotated[2] - pa) + 180) % 360 - 180) == pytest.approx(10.0, abs=0.1)
    assert pa2 == pytest.approx(pa, abs=1e-6) or abs(pa2 - pa) == pytest.approx(360, abs=1e-6)


def test_max_offset_and_header_cards() -> None:
    cards = tan_cards(120.0, 10.0, 1.0, SHAPE)
    assert W.max_offset_px(cards, cards, SHAPE) < 1e-6
    shifted = dict(cards, CRPIX1=float(cards["CRPIX1"]) + 2.0)
    assert W.max_offset_px(cards, shifted, SHAPE) == pytest.approx(2.0, abs=1e-6)
    keys = [k for k, _, _ in W.header_cards(_sip_cards())]
    assert keys[:2] == ["CTYPE1", "CTYPE2"] and "A_2_0" in keys


def test_not_a_tan_wcs_is_refused() -> None:
    with pytest.raises(ValueError, match="not a TAN"):
        W.to_astropy({"CTYPE1": "GLON-CAR", "CTYPE2": "GLAT-CAR"})

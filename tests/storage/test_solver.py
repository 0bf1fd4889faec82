"""The solve-field adapter: hints, real solves of Tycho-2 fields, and its failure outcomes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from livestack.pipeline.detect import detect_stars
from livestack.pipeline.types import FrameInfo, StarList
from livestack.pipeline.wcs import field_geometry, max_offset_px
from livestack.sim.tycho import Catalogue, read_index_stars, render_field, tan_cards
from livestack.storage import solver as S

INDEX_DIR = "/usr/share/astrometry"
SHAPE = (600, 800)


def require_solver() -> None:
    problem = S.solver_problem(INDEX_DIR)
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem + "; CI=true requires it (.ci/run installs it)")
        pytest.skip(problem)


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    require_solver()
    return read_index_stars(Path(INDEX_DIR) / "index-tycho2-07.littleendian.fits")


def _info(**kw: object) -> FrameInfo:
    return FrameInfo(path="f.fits", image_type="light", shape=SHAPE, **kw)  # type: ignore[arg-type]


def _field(catalogue: Catalogue) -> tuple[dict, StarList]:
    cards = tan_cards(83.8, -5.4, 3.0, SHAPE, rotation_deg=20.0)
    image = render_field(catalogue, cards, SHAPE, rng=np.random.default_rng(7))
    return cards, detect_stars(image)[0]


def test_hints_prefer_an_existing_wcs_then_header_pointing_then_previous() -> None:
    cards = tan_cards(10.0, 20.0, 2.0, SHAPE)
    hints = S.hints_from_header(dict(cards), _info(ra_deg=50.0, dec_deg=5.0,
                                                   pixel_scale_arcsec=9.0))
    assert hints.ra_deg == pytest.approx(10.0) and hints.dec_deg == pytest.approx(20.0)
    assert hints.scale_low_arcsec < 2.0 < hints.scale_high_arcsec
    assert hints.sources == ("WCS",)
    hints = S.hints_from_header({}, _info(ra_deg=50.0, dec_deg=5.0, pixel_scale_arcsec=9.0))
    assert (hints.ra_deg, hints.dec_deg) == (50.0, 5.0)
    assert hints.scale_low_arcsec < 9.0 < hints.scale_high_arcsec
    assert hints.sources == ("header RA/Dec", "pixel scale")
    hints = S.hints_from_header({}, _info(), {"scale_arcsec": 1.5, "ra_deg": 1.0,
                                              "dec_deg": 2.0})
    assert hints.has_position and hints.scale_low_arcsec < 1.5 < hints.scale_high_arcsec
    assert not S.hints_from_header({}, _info(dec_deg=95.0, ra_deg=1.0)).has_position
    assert not S.hints_from_header({}, _info()).has_scale


@pytest.mark.solver
def test_synthetic_tycho_field_solves_with_hints_and_blind(catalogue: Catalogue) -> None:
    truth, stars = _field(catalogue)
    hints = S.hints_from_header({}, _info(ra_deg=84.0, dec_deg=-5.2, pixel_scale_arcsec=3.05))
    result = S.solve_stars(stars, SHAPE, hints, index_dir=INDEX_DIR, time_limit_s=30)
    assert result.solved, result.message
    assert result.attempts == ["position+scale"]
    assert result.cards is not None
    assert max_offset_px(result.cards, truth, SHAPE) < 0.5
    geo = field_geometry(result.cards, SHAPE)
    assert geo.pa_deg == pytest.approx(20.0, abs=0.1)


@pytest.mark.solver
def test_wrong_position_hint_costs_an_attempt_but_not_a_wrong_wcs(catalogue: Catalogue) -> None:
    truth, stars = _field(catalogue)
    wrong = S.SolveHints(ra_deg=250.0, dec_deg=40.0, radius_deg=1.0, scale_low_arcsec=2.9,
                         scale_high_arcsec=3.1)
    result = S.solve_stars(stars, SHAPE, wrong, index_dir=INDEX_DIR, time_limit_s=30)
    assert result.attempts[0] == "position+scale"
    if result.solved:  # found without the position: it must be the true field
        assert result.attempts == ["position+scale", "scale"]
        assert result.cards is not None and max_offset_px(result.cards, truth, SHAPE) < 0.5
    else:
        assert result.cards is None and result.reason == "not_solved"


@pytest.mark.solver
def test_wrong_scale_hint_ends_not_solved(catalogue: Catalogue) -> None:
    _truth, stars = _field(catalogue)
    wrong = S.SolveHints(ra_deg=83.8, dec_deg=-5.4, radius_deg=1.0, scale_low_arcsec=5.5,
                         scale_high_arcsec=6.5)
    result = S.solve_stars(stars, SHAPE, wrong, index_dir=INDEX_DIR, time_limit_s=8)
    assert not result.solved and result.cards is None
    assert result.reason == "not_solved" and "no confident match" in result.message


def test_too_few_stars_is_an_outcome_without_running_the_solver() -> None:
    require_solver()
    few = StarList(np.array([[10.0, 10.0], [50.0, 60.0], [300.0, 200.0]]),
                   np.ones(3), np.full(3, 3.0), np.ones(3))
    result = S.solve_stars(few, SHAPE, S.SolveHints(), index_dir=INDEX_DIR, time_limit_s=5)
    assert (result.solved, result.reason) == (False, "too_few_stars")
    assert "3 stars" in result.message and result.attempts == []


def test_missing_solver_or_index_files_is_one_line(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "no-index"
    empty.mkdir()
    if shutil.which("solve-field"):
        problem = S.solver_problem(empty)
        assert problem is not None and "no astrometry.net index files" in problem
        assert "astrometry-data-tycho2" in problem and "\n" not in problem
    monkeypatch.setenv("PATH", str(tmp_path))
    problem = S.solver_problem(INDEX_DIR)
    assert problem is not None and "solve-field is not installed" in problem
    stars = StarList(np.zeros((20, 2)), np.ones(20), np.ones(20), np.ones(20))
    result = S.solve_stars(stars, SHAPE, S.SolveHints(), index_dir=INDEX_DIR, time_limit_s=5)
    assert result.reason == "solver_missing" and not result.solved


@pytest.mark.solver
@pytest.mark.realdata
def test_real_oscaar_frame_solves_with_a_scale_hint(oscaar_dir: Path) -> None:
    require_solver()
    from livestack.storage.fitsio import read_frame

    image, info, header = read_frame(oscaar_dir / "lights" / "tres1-050.fit")
    stars = detect_stars(image)[0]
    hints = S.hints_from_header(header, FrameInfo(path=info.path, image_type="light",
                                                  shape=info.shape, pixel_scale_arcsec=2.37))
    result = S.solve_stars(stars, info.shape, hints, index_dir=INDEX_DIR, time_limit_s=30)
    assert result.solved, result.message
    assert result.cards is not None and result.cards["CTYPE1"] == "RA---TAN-SIP"
    geo = field_geometry(result.cards, info.shape)
    # TrES-1 (19:04:10 +36:38) is in the field: 0.72 x 0.49 deg at 2.37"/px.
    assert abs(geo.ra_deg - 286.04) < 0.3 and abs(geo.dec_deg - 36.63) < 0.3
    assert geo.scale_arcsec == pytest.approx(2.374, abs=0.01)
    assert fits.Header(result.cards)["CTYPE2"] == "DEC--TAN-SIP"

"""``livestack solve``: solve a file after the fact; never modify a user's frame."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from livestack.cli import main
from livestack.pipeline.wcs import clean_cards, max_offset_px
from livestack.sim.tycho import read_index_stars, render_field, tan_cards
from tests.storage.test_solver import INDEX_DIR, require_solver

SHAPE = (600, 800)


def _frame(path: Path) -> dict:
    require_solver()
    catalogue = read_index_stars(Path(INDEX_DIR) / "index-tycho2-07.littleendian.fits")
    truth = tan_cards(83.8, -5.4, 3.0, SHAPE, rotation_deg=-35.0)
    image = render_field(catalogue, truth, SHAPE, rng=np.random.default_rng(5))
    header = fits.Header({"IMAGETYP": "Light Frame", "EXPTIME": 10.0,
                          "OBJCTRA": "05 35 30", "OBJCTDEC": "-05 20 00"})
    fits.PrimaryHDU(image, header).writeto(path)
    return truth


@pytest.mark.solver
def test_solve_prints_the_field_and_writes_a_wcs_file(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    frame = tmp_path / "frame.fits"
    truth = _frame(frame)
    before = frame.read_bytes()
    wcs_out = tmp_path / "frame.wcs"
    code = main(["solve", str(frame), "--scale", "3.0", "--json", "--wcs-out", str(wcs_out)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["solved"] and report["hints"] == ["header RA/Dec",
                                                                    "pixel scale"]
    assert report["field"]["pa_deg"] == pytest.approx(325.0, abs=0.2)
    assert max_offset_px(clean_cards(fits.getheader(wcs_out)), truth, SHAPE) < 0.5
    assert frame.read_bytes() == before  # the user's frame is untouched
    # --write is refused for a file livestack did not write.
    assert main(["solve", str(frame), "--write"]) == 2
    assert "never modified" in capsys.readouterr().err


@pytest.mark.solver
def test_a_frame_that_does_not_solve_exits_3(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    require_solver()
    frame = tmp_path / "flat.fits"
    rng = np.random.default_rng(1)
    fits.PrimaryHDU(rng.normal(1000, 10, SHAPE).astype(np.float32)).writeto(frame)
    assert main(["solve", str(frame), "--scale", "3", "--time-limit", "5"]) == 3
    assert "only 0 stars detected" in capsys.readouterr().out

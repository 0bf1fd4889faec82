"""Background plate solving in the engine: stack.fits WCS, frame pointings, failure outcomes."""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from livestack.batch import stack_files
from livestack.config import Config, SolverConfig
from livestack.engine.core import Engine
from livestack.pipeline.wcs import clean_cards, field_geometry, max_offset_px
from livestack.sim.tycho import Catalogue, read_index_stars, render_field, tan_cards
from tests.storage.test_solver import INDEX_DIR, require_solver

# 13.6 um binned pixels at 1181 mm: the 2.37"/px the field solves at.
TYCHO_SHAPE = (600, 800)  # 0.67 x 0.5 deg at 3"/px: ~20 Tycho-2 stars in Orion
OSCAAR_HINTS = {"FOCALLEN": 1181.0, "OBJCTRA": "19 04 10", "OBJCTDEC": "+36 38 00"}


def _copy_with(src: Path, dest: Path, cards: dict) -> Path:
    with fits.open(src) as hdul:
        hdul[0].header.update(cards)
        hdul.writeto(dest)
    return dest


def _config(**solver: object) -> Config:
    return replace(Config(), solver=replace(SolverConfig(), **solver))


@pytest.mark.solver
@pytest.mark.realdata
def test_stack_wcs_agrees_with_an_independent_solve_field_run(oscaar_dir: Path,
                                                              tmp_path: Path) -> None:
    require_solver()
    inbox = tmp_path / "in"
    inbox.mkdir()
    frames = [_copy_with(f, inbox / f.name, OSCAAR_HINTS)
              for f in sorted((oscaar_dir / "lights").glob("*.fit"))[:4]]
    engine = stack_files(_config(time_limit_s=60), frames, tmp_path / "out")
    (stack,) = list((tmp_path / "out").glob("*/*/stack.fits"))
    header = fits.getheader(stack)
    assert header["CTYPE1"] == "RA---TAN-SIP"
    ours = clean_cards(header)
    shape = (header["NAXIS2"], header["NAXIS1"])
    assert WCS(header).has_celestial
    # An independent solve of the stacked image: solve-field's own source extraction.
    assert _independent_offset(stack, ours, shape, tmp_path / "independent") < 1.0
    # Every accepted frame has its centre and position angle in the FRAMES table.
    from livestack.storage.journal import Journal

    journal = Journal(tmp_path / "out" / "journal.sqlite")
    try:
        stack_id = journal.stacks()[0].id
        accepted = [r.id for r in journal.rows(stack_id=stack_id, status="accepted")]
        pointing = journal.pointing(stack_id)
        note = journal.get_state(f"solver:{stack_id}")
    finally:
        journal.close()
    assert sum(engine.final_counts.values()) == 4 and sorted(pointing) == sorted(accepted)
    geo = field_geometry(ours, shape)
    for ra, dec, pa in pointing.values():
        assert abs(ra - geo.ra_deg) < 0.05 and abs(dec - geo.dec_deg) < 0.05
        assert min(pa, 360 - pa) < 1.0
    assert note["solved"] and note["attempts"] == ["position+scale"]
    # `livestack integrate` on another reference carries the WCS onto that grid.
    from livestack.cli import main

    integrated = tmp_path / "integrated.fits"
    assert main(["integrate", str(stack.parent), "--reference", frames[3].name, "-o",
                 str(integrated), "--no-progress"]) == 0
    moved = clean_cards(fits.getheader(integrated))
    assert max_offset_px(moved, ours, shape) > 2.0  # the grid did move (drift)
    assert _independent_offset(integrated, moved, shape, tmp_path / "again") < 1.0


def _independent_offset(path: Path, cards: dict, shape: tuple[int, int], work: Path) -> float:
    """Largest 5x5-grid distance between ``cards`` and solve-field's own solve of ``path``."""
    subprocess.run(["solve-field", str(path), "--dir", str(work), "--no-plots",
                    "--overwrite", "--scale-units", "arcsecperpix", "--scale-low", "2.2",
                    "--scale-high", "2.5", "--cpulimit", "60", "--new-fits", "none"],
                   check=True, capture_output=True, timeout=120)
    theirs = clean_cards(fits.getheader(work / (path.stem + ".wcs")))
    return max(max_offset_px(cards, theirs, shape), max_offset_px(theirs, cards, shape))


def _random_catalogue(n: int = 400) -> Catalogue:
    """Stars at random places around the field: a sky no index file knows."""
    rng = np.random.default_rng(11)
    ra = np.radians(83.8 + rng.uniform(-0.5, 0.5, n))
    dec = np.radians(-5.4 + rng.uniform(-0.5, 0.5, n))
    xyz = np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])
    return Catalogue(xyz, rng.uniform(8.0, 12.0, n).astype(np.float32))


def _truth(i: int, drift_px: float) -> dict:
    """True WCS of frame ``i`` of a sequence drifting ``drift_px`` per frame (x; y half)."""
    cards = tan_cards(83.8, -5.4, 3.0, TYCHO_SHAPE)
    cards["CRPIX1"] = float(cards["CRPIX1"]) + drift_px * i
    cards["CRPIX2"] = float(cards["CRPIX2"]) - 0.5 * drift_px * i
    return cards


def _tycho_frames(folder: Path, n: int, catalogue: Catalogue | None = None,
                  drift_px: float = 0.0) -> list[Path]:
    if catalogue is None:
        catalogue = read_index_stars(Path(INDEX_DIR) / "index-tycho2-07.littleendian.fits")
    shape = TYCHO_SHAPE
    paths = []
    for i in range(n):
        cards = _truth(i, drift_px)
        image = render_field(catalogue, cards, shape, rng=np.random.default_rng(i))
        header = fits.Header({"IMAGETYP": "Light Frame", "EXPTIME": 30.0,
                              "DATE-OBS": f"2026-01-01T00:{i:02d}:00", "FOCALLEN": 935.0,
                              "XPIXSZ": 13.6, "RA": 83.8, "DEC": -5.4})
        path = folder / f"f{i:02d}.fits"
        fits.PrimaryHDU(np.clip(image, 0, 60000).astype(np.uint16), header).writeto(path)
        paths.append(path)
    return paths


@pytest.mark.solver
def test_not_solved_is_a_note_and_an_alert_and_is_retried_on_a_deeper_stack(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    require_solver()
    frames = _tycho_frames(tmp_path, 3, _random_catalogue())
    engine = Engine(_config(time_limit_s=5), tmp_path / "out", background_checkpoints=False)
    try:
        with caplog.at_level(logging.INFO):
            engine.process_path(frames[0])
            engine.solving.drain(20)
            (stack_id,) = engine.runtimes
            note = engine.journal.get_state(f"solver:{stack_id}")
            assert note["solved"] is False and note["reason"] == "not_solved"
            assert note["retry"] is True and note["attempt"] == 1
            assert any("alert: " in r.message and "not plate-solved" in r.message
                       for r in caplog.records)
            status = engine.solving.status(stack_id)
            assert status is not None and status["state"] == "failed"
            engine.process_path(frames[1])
            engine.solving.drain(20)
            assert engine.journal.get_state(f"solver:{stack_id}")["attempt"] == 1  # too soon
            engine.process_path(frames[2])
            engine.solving.drain(20)
            note = engine.journal.get_state(f"solver:{stack_id}")
            assert note["attempt"] == 2 and note["frames"] == 3 and not note["solved"]
        engine.finalize()
        header = fits.getheader(engine.runtimes[stack_id].folder / "stack.fits")
        assert "CTYPE1" not in header and header["NCOMBINE"] == 3
    finally:
        engine.close()


def test_without_the_solver_one_line_at_start_and_stacking_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    empty = tmp_path / "no-index"
    empty.mkdir()
    frames = _tycho_frames(tmp_path, 2) \
        if shutil.which("solve-field") and Path(INDEX_DIR).is_dir() else None
    if frames is None:
        pytest.skip("needs the Tycho-2 index files to render frames")
    with caplog.at_level(logging.WARNING):
        engine = Engine(_config(index_dir=str(empty)), tmp_path / "out",
                        background_checkpoints=False)
    try:
        lines = [r.getMessage() for r in caplog.records if "plate solving is off" in
                 r.getMessage()]
        assert len(lines) == 1 and "apt-get install astrometry.net" in lines[0]
        rows = [engine.process_path(f) for f in frames]
        assert [r.status for r in rows if r is not None] == ["accepted", "accepted"]
        (stack_id,) = engine.runtimes
        status = engine.solving.status(stack_id)
        assert status is not None and status["state"] == "unavailable"
    finally:
        engine.close()


@pytest.mark.solver
def test_a_frame_wcs_is_the_hint_and_a_disagreeing_one_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    require_solver()
    (frame,) = _tycho_frames(tmp_path, 1)
    truth = tan_cards(83.8, -5.4, 3.0, TYCHO_SHAPE)
    # The capture software's WCS is 12 px off (e.g. solved before a dither).
    wrong = dict(truth, CRPIX1=float(truth["CRPIX1"]) + 12.0)
    with fits.open(frame, mode="update") as hdul:
        for key in ("RA", "DEC", "FOCALLEN"):
            del hdul[0].header[key]
        hdul[0].header.update(wrong)
    engine = Engine(_config(time_limit_s=30), tmp_path / "out", background_checkpoints=False)
    try:
        with caplog.at_level(logging.INFO):
            engine.process_path(frame)
            engine.solving.drain(40)
        (stack_id,) = engine.runtimes
        note = engine.journal.get_state(f"solver:{stack_id}")
        assert note["solved"], note
        assert max_offset_px(note["wcs"], truth, TYCHO_SHAPE) < 0.5  # ours, not theirs
        assert any("disagrees with our solution by up to 12" in r.getMessage()
                   for r in caplog.records)
    finally:
        engine.close()


@pytest.mark.solver
def test_the_wcs_follows_a_change_of_reference(tmp_path: Path) -> None:
    require_solver()
    frames = _tycho_frames(tmp_path, 3, drift_px=6.0)
    engine = Engine(_config(time_limit_s=30), tmp_path / "out", background_checkpoints=False)
    try:
        for frame in frames:
            engine.process_path(frame)
        engine.solving.drain(40)
        (stack_id,) = engine.runtimes
        rt = engine.runtimes[stack_id]
        assert engine.journal.get_state(f"solver:{stack_id}")["solved"]
        header = fits.getheader(rt.folder / "stack.fits")
        assert max_offset_px(clean_cards(header), _truth(0, 6.0), TYCHO_SHAPE) < 0.5
        engine.execute_command("set_reference", engine.validate_command(
            "set_reference", {"file": frames[2].name}))
        for _ in range(200):
            if not engine.rebuilds:
                break
            engine.rebuild_step(wait_s=300)
        assert rt.session.reference_file == str(frames[2])
        engine.solving.drain(40)
        note = engine.journal.get_state(f"solver:{stack_id}")
        assert note["solved"] and note["reference"] == str(frames[2])
        engine.finalize()
        header = fits.getheader(rt.folder / "stack.fits")
        assert header["REFFRAME"] == str(frames[2])
        assert max_offset_px(clean_cards(header), _truth(2, 6.0), TYCHO_SHAPE) < 0.5
        # The frames' pointings are on the new solution: frame 2 is its centre.
        pointing = engine.journal.pointing(stack_id)
        rows = {r.path: r.id for r in engine.journal.rows(stack_id=stack_id,
                                                          status="accepted")}
        centre = field_geometry(_truth(2, 6.0), TYCHO_SHAPE)
        ra, dec, _pa = pointing[rows[str(frames[2])]]
        assert abs(ra - centre.ra_deg) < 1e-4 and abs(dec - centre.dec_deg) < 1e-4
    finally:
        engine.close()

"""One per-frame step for the live stack and ``integrate``, and the recorded calibration.

A small synthetic night with vignetting, amp glow and hot pixels is stacked live
(``livestack stack`` with raw bias, dark and flat folders: the masters are built in memory),
then re-stacked with ``livestack integrate``:

* the two paths agree: per-frame weights and normalisation to 1e-6 relative, pixel medians
  within 0.02 sky sigma (``--reject sigma``, the live stack's kappas);
* ``integrate`` reuses the session's recorded calibration by default (its noise efficiency
  is then the live stack's, where an uncalibrated re-stack loses most of it); a missing or
  changed master is a one-line error naming it; a flag naming other masters wins and says
  so; ``--no-calibration`` is the way out.

Noise efficiency here is ``(sigma_frame^2 / N) / sigma_residual^2``: the reference frame's
calibrated noise over N frames against the robust sigma of (stack - truth) on sky pixels
covered by every frame. Fixed patterns left by a missing calibration count as noise.
Lanczos3 smooths the noise, so a well-calibrated stack scores above 1.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from livestack.errors import MasterError, UsageError
from livestack.pipeline.combine import IntegrateConfig
from livestack.restack import integrate_session
from livestack.sessionplan import load_session
from livestack.sim import SimConfig, Simulator, write_calibration_set, write_sequence
from livestack.storage.calibration import MASTERS_DIR, RecordedMasters, master_cards
from livestack.storage.journal import Journal, sha256_file

N_FRAMES = 8
SEED = 21


def _sim_config() -> SimConfig:
    return SimConfig(width=480, height=360, n_stars=250, flux_powerlaw_index=1.0,
                     drift_px_per_frame=(0.9, 0.5), dither_px=0.0, cosmic_rays_per_frame=2.0,
                     vignetting=0.3, amp_glow_e_per_s=2.0)


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The night stacked live from raw calibration folders (masters built in memory)."""
    from livestack.batch import stack_files
    from livestack.config import load_config
    from livestack.storage.calibration import open_masters

    base = tmp_path_factory.mktemp("night")
    cfg = _sim_config()
    sim = Simulator(cfg, seed=SEED)
    lights = write_sequence(base / "lights", cfg, seed=SEED, n_frames=N_FRAMES, simulator=sim)
    cal = write_calibration_set(base / "cal", cfg, seed=SEED, n_bias=5, n_darks=5, n_flats=5,
                                simulator=sim)
    out = base / "out"
    config = load_config(None, {"output.dir": str(out), "solver.enabled": False})
    masters = open_masters(bias=cal["bias"], darks=cal["darks"], flats=cal["flats"])
    engine = stack_files(config, lights, out, masters=masters)
    (stack_id, rt), = engine.runtimes.items()
    return {"base": base, "out": out, "stack": rt.folder, "stack_id": stack_id, "sim": sim,
            "cal": cal, "lights": lights, "truth": sim.noiseless_reference()}


def _live(night: dict[str, Any]) -> tuple[NDArray[np.float32], NDArray[Any], Any]:
    from astropy.io import fits

    with fits.open(night["stack"] / "stack.fits") as hdul:
        return (np.asarray(hdul[0].data, dtype=np.float32),
                np.asarray(hdul["COUNT"].data), hdul[0].header.copy())


def _rows(night: dict[str, Any]) -> list[Any]:
    journal = Journal(night["out"] / "journal.sqlite")
    try:
        rows = journal.rows(stack_id=night["stack_id"], status="accepted")
    finally:
        journal.close()
    return sorted(rows, key=lambda r: r.seq)


def _sky_sigma(image: NDArray[np.float32], truth: NDArray[np.float32], full: NDArray[np.bool_]
               ) -> float:
    sky = full & (truth < np.percentile(truth[full], 60))
    res = (image - truth)[sky]
    return float(1.4826 * np.median(np.abs(res - np.median(res))))


def _efficiency(night: dict[str, Any], image: NDArray[np.float32], count: NDArray[Any]) -> float:
    rows = _rows(night)
    frame_noise = float(rows[0].metrics["noise_adu"])  # the calibrated reference frame
    full = count >= N_FRAMES
    return (frame_noise ** 2 / N_FRAMES) / _sky_sigma(image, night["truth"], full) ** 2


def _cli(*argv: str) -> Any:
    from livestack import integrate_cli

    parser = argparse.ArgumentParser()
    integrate_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["integrate", *argv, "--no-progress"])


def _header(path: Path) -> Any:
    from astropy.io import fits

    with fits.open(path) as hdul:
        return hdul[0].header.copy(), np.asarray(hdul[0].data), np.asarray(hdul["COUNT"].data)


# ------------------------------------------------------------------------ the record
def test_the_live_session_records_its_masters_in_the_output(night: dict[str, Any]) -> None:
    folder = night["out"] / MASTERS_DIR
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 3, files  # bias, dark and flat built in memory, written once
    rows = _rows(night)
    assert len(rows) == N_FRAMES
    for row in rows:
        assert row.masters is not None and {m["kind"] for m in row.masters} == {
            "bias", "dark", "flat"}
        for m in row.masters:
            assert sha256_file(folder / m["file"]) == m["sha256"]
        assert row.norm is not None and row.norm["reference_file"] == str(night["lights"][0])
        assert row.norm["weight"] == pytest.approx(row.weight, rel=1e-12)
    _, _, header = _live(night)
    assert header["NMASTERS"] == 3
    recorded = {(m["file"], m["sha256"]) for m in rows[0].masters}
    assert {(header[f"MASTER{k}"], header[f"MSTSHA{k}"]) for k in (1, 2, 3)} == recorded


def test_master_cards_list_each_master_once() -> None:
    a = {"kind": "dark", "file": "d.fits", "sha256": "ab" * 32}
    b = {"kind": "flat", "file": "f.fits", "sha256": ""}
    cards = master_cards([a, b, dict(a)])
    assert cards == {"MASTER1": "d.fits", "MSTSHA1": "ab" * 32, "MASTER2": "f.fits",
                     "NMASTERS": 2}


# --------------------------------------------------------------- the two paths agree
@pytest.mark.parametrize("reuse_norm", [False, True], ids=["measured", "stored"])
def test_integrate_sigma_agrees_with_the_live_stack(night: dict[str, Any], tmp_path: Path,
                                                    reuse_norm: bool) -> None:
    session = load_session(night["stack"])
    masters = RecordedMasters(night["out"], session.recorded_masters())
    product = integrate_session(night["stack"], IntegrateConfig(reject="sigma", low=3.0,
                                                                high=3.0),
                                masters=masters, scratch_dir=tmp_path, reuse_norm=reuse_norm)
    assert product.header.get("NORMSTOR", 0) == (N_FRAMES if reuse_norm else 0)
    rows = _rows(night)
    assert product.frame_norms is not None and len(product.frame_norms) == N_FRAMES
    for row, got in zip(rows, product.frame_norms, strict=True):
        live = row.norm
        assert live is not None
        for key in ("scale", "offset", "reference", "weight", "noise"):
            np.testing.assert_allclose(got[key], live[key], rtol=1e-6, err_msg=key)
    weights = [r.weight for r in product.records if r.verdict == "accepted"]
    np.testing.assert_allclose(weights, [r.weight for r in rows], rtol=1e-6)

    image, count, _ = _live(night)
    both = (count >= N_FRAMES) & (product.count >= N_FRAMES)
    sigma = _sky_sigma(image, night["truth"], both)
    diff = float(np.median((product.image - image)[both]))
    print(f"\nintegrate --reject sigma vs live: median difference {diff / sigma:+.4f} sky sigma")
    assert abs(diff) <= 0.02 * sigma


# ------------------------------------------------------- reuse of the recorded masters
def test_integrate_reuses_the_recorded_calibration_by_default(
        night: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, count, live_header = _live(night)
    live = _efficiency(night, image, count)

    default = tmp_path / "default.fits"
    args = _cli(str(night["stack"]), "-o", str(default))
    assert args.func(args) == 0
    header, data, data_count = _header(default)
    assert header["NORMSTOR"] == N_FRAMES  # the journal's normalisation, no star detection
    reused = _efficiency(night, data.astype(np.float32), data_count)
    for k in (1, 2, 3):
        assert header[f"MSTSHA{k}"] == live_header[f"MSTSHA{k}"]

    bare = tmp_path / "bare.fits"
    args = _cli(str(night["stack"]), "-o", str(bare), "--no-calibration")
    assert args.func(args) == 0
    assert "calibration off (--no-calibration)" in capsys.readouterr().err
    header, data, data_count = _header(bare)
    assert "MASTER1" not in header
    assert "NORMSTOR" not in header  # measured afresh: uncalibrated frames differ
    uncalibrated = _efficiency(night, data.astype(np.float32), data_count)
    print(f"\nnoise efficiency: live {live:.3f}, integrate {reused:.3f}, "
          f"--no-calibration {uncalibrated:.3f}")
    assert live > 0.9
    assert reused == pytest.approx(live, rel=0.1)
    assert uncalibrated < 0.5 * live


def _copy_session(night: dict[str, Any], tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(night["out"], out)
    return out / night["stack"].relative_to(night["out"])


@pytest.mark.parametrize("damage, words", [("missing", "is missing"),
                                           ("changed", "has changed")])
def test_a_missing_or_changed_master_is_a_one_line_error_naming_it(
        night: dict[str, Any], tmp_path: Path, damage: str, words: str) -> None:
    stack = _copy_session(night, tmp_path)
    masters = sorted((tmp_path / "out" / MASTERS_DIR).iterdir())
    dark = next(p for p in masters if "dark" in p.name)
    if damage == "missing":
        dark.unlink()
    else:
        with open(dark, "r+b") as fh:  # one pixel of the data unit changes
            fh.seek(-8, 2)
            fh.write(b"\x01\x02\x03\x04")
    out = tmp_path / "never.fits"
    args = _cli(str(stack), "-o", str(out))
    with pytest.raises(MasterError) as info:
        args.func(args)
    message = str(info.value)
    assert "\n" not in message and str(dark) in message and words in message
    assert not out.exists()


def test_a_flag_naming_other_masters_wins_and_says_so(
        night: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _sim_config()
    other = write_calibration_set(tmp_path / "cal", cfg, seed=SEED + 1, n_bias=0, n_darks=3,
                                  n_flats=0)
    out = tmp_path / "other.fits"
    args = _cli(str(night["stack"]), "-o", str(out), "--darks", str(other["darks"]))
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "differ from the session's recorded calibration" in err
    header, _, _ = _header(out)
    assert header["NMASTERS"] == 1 and "dark" in header["MASTER1"]
    with pytest.raises(UsageError):
        bad = _cli(str(night["stack"]), "-o", str(out), "--darks", str(other["darks"]),
                   "--no-calibration")
        bad.func(bad)


def test_an_old_journal_gains_the_columns_and_integrates_by_measuring(
        night: dict[str, Any], tmp_path: Path) -> None:
    stack = _copy_session(night, tmp_path)
    db_path = tmp_path / "out" / "journal.sqlite"
    db = sqlite3.connect(db_path)
    # A journal of an earlier version: no norm/masters columns (SQLite >= 3.35 drops them).
    db.execute("ALTER TABLE frames DROP COLUMN norm")
    db.execute("ALTER TABLE frames DROP COLUMN masters")
    db.commit()
    db.close()
    journal = Journal(db_path)
    try:
        rows = journal.rows(status="accepted")
    finally:
        journal.close()
    assert rows and all(r.norm is None and r.masters is None for r in rows)
    product = integrate_session(stack, IntegrateConfig(reject="sigma"), scratch_dir=tmp_path,
                                masters=None)
    assert "NORMSTOR" not in product.header
    assert product.frame_norms is not None and len(product.frame_norms) == N_FRAMES


def test_cluster_workers_get_the_recorded_masters_as_paths(night: dict[str, Any]) -> None:
    import io

    from livestack.config import load_config
    from livestack.distributed import master_paths

    session = load_session(night["stack"])
    recorded = RecordedMasters(night["out"], session.recorded_masters())
    settings = load_config(None)
    err = io.StringIO()
    paths = master_paths(_cli(str(night["stack"])), settings, err, recorded)
    folder = night["out"] / MASTERS_DIR
    assert sorted(paths.library) == sorted(str(p) for p in folder.iterdir())
    assert paths.bias is None and err.getvalue() == ""
    off = master_paths(_cli(str(night["stack"]), "--no-calibration"), settings, err, recorded)
    assert off.empty and err.getvalue() == ""


def test_the_live_rebuild_calibrates_with_the_recorded_masters(night: dict[str, Any],
                                                               tmp_path: Path) -> None:
    from livestack.config import Config, config_to_dict
    from livestack.engine import rebuild as rb

    rows = _rows(night)
    config = Config()  # no masters.paths: only the recorded masters can calibrate
    request = rb.RebuildRequest(
        journal=str(night["out"] / "journal.sqlite"), stack_id=night["stack_id"],
        reference=None, config={"pipeline": config_to_dict(config.pipeline),
                                "masters": config_to_dict(config.masters),
                                "formats": config_to_dict(config.formats)},
        folder=str(tmp_path), memory_limit_bytes=512 * 2**20, row_ids=[r.id for r in rows])
    rb.run_request(request)
    result = rb.read_result(tmp_path / rb.RESULT_NAME)
    header = result.product.header
    assert header["NMASTERS"] == 3 and header["NORMSTOR"] == N_FRAMES
    image, count, live_header = _live(night)
    assert {header[f"MSTSHA{k}"] for k in (1, 2, 3)} == {live_header[f"MSTSHA{k}"]
                                                         for k in (1, 2, 3)}
    rebuilt = _efficiency(night, result.product.image, result.product.count)
    assert rebuilt == pytest.approx(_efficiency(night, image, count), rel=0.1)

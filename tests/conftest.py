"""Shared fixtures: the real data sets in ../shared/data and temporary copies of them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LIVESTACK_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def require_shared_data(name: str) -> Path:
    """Return ``../shared/data/<name>``; skip if absent, but fail when ``CI=true``."""
    path = SHARED_DATA / name
    if not path.is_dir():
        msg = f"real data set {name!r} not found at {path} (clone ../shared beside the repo)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires it")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def oscaar_dir() -> Path:
    """The read-only oscaar_tres1 data set (mono CCD, darks, satellite trails)."""
    return require_shared_data("oscaar_tres1")


@pytest.fixture(scope="session")
def seestar_dir() -> Path:
    """The read-only seestar_m94_osc data set (Bayer GRBG, alt-az, sparse)."""
    return require_shared_data("seestar_m94_osc")


@pytest.fixture
def oscaar_copy(oscaar_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of oscaar_tres1 (tests must never touch the originals)."""
    dest = tmp_path / "oscaar_tres1"
    shutil.copytree(oscaar_dir, dest)
    return dest


@pytest.fixture(autouse=True)
def _background_solving_only_when_marked(request: pytest.FixtureRequest,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Background plate solving (a niced solve-field per stack) only in tests marked solver.

    Simulated skies are not real sky, so their solves would only burn the CI's 2 cores.
    """
    if request.node.get_closest_marker("solver") is None:
        from livestack.service import solving

        monkeypatch.setattr(solving.StackSolving, "active", property(lambda self: False))

"""Router: stack keys, slews, alignment-failure runs, persistence."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from livestack.pipeline.routing import (
    Router,
    StackKey,
    angular_separation_deg,
    night_of,
)
from livestack.pipeline.types import FrameInfo

T0 = datetime(2026, 1, 15, 21, 0, tzinfo=timezone.utc)


def frame(i: int, obj: str = "M 42", filt: str = "L", exp: float = 60.0,
          ra: float | None = 83.82, dec: float | None = -5.39, **kw: object) -> FrameInfo:
    return FrameInfo(path=f"/frames/{obj}_{filt}_{i:03d}.fits", image_type="light",
                     shape=(736, 1092), exposure_s=exp, date_obs=T0 + timedelta(minutes=i),
                     object_name=obj, filter_name=filt, ra_deg=ra, dec_deg=dec,
                     **kw)  # type: ignore[arg-type]


def test_slug_is_filesystem_safe() -> None:
    key = StackKey.from_info(frame(0))
    assert key.slug() == "M_42-L-60s"
    assert StackKey.from_info(frame(0, obj="", filt="", exp=0.5)).slug() == "unknown-0.5s"
    odd = StackKey.from_info(frame(0, obj="../etc/passwd  *x*", filt="H-alpha 7nm",
                                   binning=(2, 2)))
    assert odd.slug() == "etc_passwd_x-H-alpha_7nm-60s-bin2x2"
    assert "/" not in odd.slug() and not odd.slug().startswith(".")


def test_night_is_noon_to_noon_utc() -> None:
    assert night_of(frame(0)) == "2026-01-15"                      # 21:00 UTC
    after_midnight = replace(frame(0), date_obs=datetime(2026, 1, 16, 4, 0, tzinfo=timezone.utc))
    assert night_of(after_midnight) == "2026-01-15"
    next_day = replace(frame(0), date_obs=datetime(2026, 1, 16, 12, 30))     # naive = UTC
    assert night_of(next_day) == "2026-01-16"
    offset = replace(frame(0), date_obs=datetime(2026, 1, 16, 3, 0,
                                                 tzinfo=timezone(timedelta(hours=5))))
    assert night_of(offset) == "2026-01-15"                        # 22:00 UTC on the 15th
    by_mjd = replace(frame(0), date_obs=None, mjd_obs=61055.9)    # 2026-01-15T21:36 UTC
    assert night_of(by_mjd) == "2026-01-15"
    undated = replace(frame(0), date_obs=None)
    assert night_of(undated) == "undated"
    assert night_of(undated, fallback_utc=T0) == "2026-01-15"


def test_two_targets_two_filters_interleaved_make_four_stacks() -> None:
    router = Router()
    ids: dict[tuple[str, str], set[str]] = {}
    for i in range(16):
        obj = "M 42" if i % 2 == 0 else "NGC 2024"
        filt = "R" if (i // 2) % 2 == 0 else "G"
        ra, dec = (83.82, -5.39) if obj == "M 42" else (85.42, -1.9)
        ids.setdefault((obj, filt), set()).add(router.route(frame(i, obj, filt, ra=ra, dec=dec)))
    assert all(len(v) == 1 for v in ids.values())
    assert sorted(v.pop() for v in ids.values()) == [
        "2026-01-15/M_42-G-60s", "2026-01-15/M_42-R-60s",
        "2026-01-15/NGC_2024-G-60s", "2026-01-15/NGC_2024-R-60s"]


def test_key_fields_that_split_stacks() -> None:
    router = Router()
    base = router.route(frame(0))
    assert router.route(frame(1, exp=60.0004)) == base               # rounding noise
    assert router.route(frame(2, exp=120.0)) == "2026-01-15/M_42-L-120s"
    assert router.route(frame(3, gain=100.0)) == base + "-2"         # same slug, other key
    assert router.route(frame(4, binning=(2, 2))) == "2026-01-15/M_42-L-60s-bin2x2"
    assert router.key_of(base).object_name == "M 42"
    next_night = replace(frame(5), date_obs=T0 + timedelta(days=1))
    assert router.route(next_night) == "2026-01-16/M_42-L-60s"


def test_slew_starts_new_stack_and_returning_goes_back() -> None:
    router = Router(slew_threshold_deg=0.5)
    rng = np.random.default_rng(42)
    first = {router.route(frame(i, ra=83.82 + 0.002 * i + rng.normal(0, 0.003),
                                dec=-5.39 + rng.normal(0, 0.003)))     # drift + dithers
             for i in range(10)}
    assert first == {"2026-01-15/M_42-L-60s"}
    moved = router.route(frame(10, ra=84.9, dec=-5.39))               # ~1.07 deg away
    assert moved == "2026-01-15/M_42-L-60s-2"
    assert router.route(frame(11, ra=84.91, dec=-5.38)) == moved
    assert router.route(frame(12, ra=83.85, dec=-5.39)) == "2026-01-15/M_42-L-60s"
    assert router.route(frame(13, ra=None, dec=None)) == "2026-01-15/M_42-L-60s"  # most recent
    # empty OBJECT: targets are told apart by pointing alone
    a = router.route(frame(20, obj="", ra=10.0, dec=41.0))
    b = router.route(frame(21, obj="", ra=150.0, dec=12.0))
    assert (a, b) == ("2026-01-15/unknown-L-60s", "2026-01-15/unknown-L-60s-2")
    assert router.route(frame(22, obj="", ra=10.01, dec=41.0)) == a


def test_separation_wraps_ra() -> None:
    assert angular_separation_deg(359.9, 0.0, 0.1, 0.0) == pytest.approx(0.2, abs=1e-9)
    assert angular_separation_deg(0.0, 89.9, 180.0, 89.9) == pytest.approx(0.2, abs=1e-9)


def test_agreeing_alignment_failures_start_a_new_stack() -> None:
    router = Router(failure_run=3)
    sid = router.route(frame(0, ra=None, dec=None))
    router.report_alignment_success(sid)
    for i in (1, 2):
        assert router.route(frame(i, ra=None, dec=None)) == sid
        assert router.report_alignment_failure(sid, frame(i, ra=None, dec=None)) == ()
    router.report_alignment_success(sid)                   # a success resets the run
    paths: tuple[str, ...] = ()
    for i in (3, 4, 5):
        assert router.route(frame(i, ra=None, dec=None)) == sid
        paths = router.report_alignment_failure(sid, frame(i, ra=None, dec=None))
    assert [p.rsplit("_", 1)[1] for p in paths] == ["003.fits", "004.fits", "005.fits"]
    assert router.is_retired(sid)
    new = router.route(frame(6, ra=None, dec=None))
    assert new == sid + "-2"
    assert router.route(frame(7, ra=None, dec=None)) == new


def test_disagreeing_failures_do_not_split() -> None:
    router = Router(failure_run=3)
    sid = router.route(frame(0))
    # clouds: failures that do not register to each other
    for i in range(1, 8):
        assert router.report_alignment_failure(sid, frame(i), registers_to_previous=False) == ()
    # failures whose pointings jump around do not agree either
    for i, ra in enumerate((10.0, 40.0, 70.0, 100.0)):
        assert router.report_alignment_failure(sid, frame(10 + i, ra=ra)) == ()
    assert not router.is_retired(sid)
    assert router.route(frame(20)) == sid
    router.report_alignment_success(sid)
    assert len(router.report_alignment_failure(sid, frame(21), True)) == 0
    assert len(router.report_alignment_failure(sid, frame(22), True)) == 0
    assert len(router.report_alignment_failure(sid, frame(23), True)) == 3


def test_state_round_trip_routes_identically() -> None:
    router = Router(slew_threshold_deg=0.3, failure_run=2)
    seq = [frame(i, obj=o, filt=f, ra=ra, dec=-5.0)
           for i, (o, f, ra) in enumerate([("A", "R", 10.0), ("B", "R", 50.0), ("A", "G", 10.0),
                                           ("A", "R", 11.0), ("B", "R", 50.1)])]
    for info in seq:
        router.route(info)
    sid = router.route(frame(9, obj="B", filt="R", ra=50.1, dec=-5.0))
    router.report_alignment_failure(sid, frame(9, obj="B", filt="R", ra=50.1, dec=-5.0))
    restored = Router.from_dict(json.loads(json.dumps(router.to_dict())))
    assert restored.to_dict() == router.to_dict()
    tail = [frame(20, obj="A", filt="R", ra=10.05, dec=-5.0),      # back to the first A/R stack
            frame(21, obj="A", filt="R", ra=11.0, dec=-5.0),
            frame(22, obj="B", filt="R", ra=None, dec=None),
            frame(23, obj="C", filt="", ra=1.0, dec=1.0)]
    assert [restored.route(f) for f in tail] == [router.route(f) for f in tail]
    fail = frame(24, obj="B", filt="R", ra=50.1, dec=-5.0)
    assert restored.report_alignment_failure(sid, fail) == router.report_alignment_failure(
        sid, fail)
    assert restored.is_retired(sid) and router.is_retired(sid)
    assert restored.to_dict() == router.to_dict()


def test_bad_arguments_and_state() -> None:
    with pytest.raises(ValueError, match="slew_threshold_deg"):
        Router(slew_threshold_deg=0.0)
    with pytest.raises(ValueError, match="failure_run"):
        Router(failure_run=0)
    with pytest.raises(ValueError, match="version"):
        Router.from_dict({"version": 99})
    with pytest.raises(ValueError, match="malformed"):
        Router.from_dict({"version": 1, "slew_threshold_deg": 0.5})
    with pytest.raises(KeyError):
        Router().report_alignment_success("nope")


def test_an_rgb_frame_gets_its_own_stack_and_old_keys_read_as_mono() -> None:
    router = Router()
    base = router.route(frame(0))
    rgb = router.route(replace(frame(1), channels=3))
    assert rgb == base + "-2" and router.route(replace(frame(2), channels=3)) == rgb
    key = router.key_of(rgb)
    assert key.channels == 3 and StackKey.from_dict(key.to_dict()) == key
    old = {k: v for k, v in router.key_of(base).to_dict().items() if k != "channels"}
    assert StackKey.from_dict(old).channels == 1

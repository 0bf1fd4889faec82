"""Exactness of the batch rejection/combination kernels against reference implementations.

``sigma`` is checked against astropy's ``sigma_clip``; the other algorithms against
straightforward per-pixel implementations written here from the published definitions
(PixInsight forum posts by J. Conejero on winsorized and linear fit clipping; Siril and
PixInsight documentation for percentile and min/max clipping).
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.stats import sigma_clip
from numpy.typing import NDArray

from livestack.pipeline.combine import (
    IntegrateConfig,
    TileResult,
    combine_masked_tile,
    combine_tile,
    normalized_planes,
)
from livestack.pipeline.normalize import apply_normalization
from livestack.pipeline.types import Normalization

RTOL = 1e-5


def make_stack(seed: int, n: int = 21, ny: int = 7, nx: int = 9, outlier_fraction: float = 0.06,
               invalid_fraction: float = 0.08) -> tuple[NDArray[np.float32], NDArray[np.bool_],
                                                        NDArray[np.float64]]:
    """Registered frames: sky + a star + noise, with hot/cold outliers, a trail and gaps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ny, 0:nx]
    truth = 1000.0 + 3.0 * xx + 5000.0 * np.exp(-((xx - 4.2) ** 2 + (yy - 3.1) ** 2) / 3.0)
    sigma = np.sqrt(truth / 2.0 + 30.0)
    samples = truth + sigma * rng.standard_normal((n, ny, nx))
    hits = rng.random((n, ny, nx)) < outlier_fraction
    signs = np.where(rng.random((n, ny, nx)) < 0.7, 1.0, -1.0)
    samples[hits] += (signs * rng.uniform(8.0, 60.0, (n, ny, nx)) * sigma)[hits]
    samples[n // 3, 2, :] += 4000.0  # a satellite trail across one row of one frame
    valid = rng.random((n, ny, nx)) >= invalid_fraction
    valid[:, 0, 0] = False  # a pixel no frame covers
    valid[1:, 0, 1] = False  # a pixel only one frame covers
    valid[2:, 0, 2] = False  # two frames
    weights = rng.uniform(0.3, 2.0, n)
    return samples.astype(np.float32), valid, weights


# ------------------------------------------------------------------ reference implementations
def ref_winsorized(x: NDArray[np.float64], low: float, high: float
                   ) -> tuple[NDArray[np.bool_], int, int]:
    """Winsorized sigma clipping of one pixel stack, per Conejero's description."""
    keep = np.ones(x.size, dtype=bool)
    while keep.sum() >= 3:
        v = x[keep]
        m = np.median(v)
        s = np.std(v)
        if s <= 0:
            break
        for _ in range(100):
            w = np.clip(v, m - 1.5 * s, m + 1.5 * s)
            m1 = w.mean()
            s2 = 1.134 * w.std()
            done = abs(s2 - s) <= 0.0005 * s
            m, s = m1, s2
            if done or s <= 0:
                break
        bad = keep & ((x < m - low * s) | (x > m + high * s))
        if not bad.any():
            break
        keep &= ~bad
    n_low = int(np.sum(~keep & (x < np.median(x[keep])))) if keep.any() else 0
    return keep, n_low, int(np.sum(~keep)) - n_low


def ref_linear_fit(x: NDArray[np.float64], low: float, high: float
                   ) -> tuple[NDArray[np.bool_], int, int]:
    """Linear fit clipping: line through the sorted stack vs rank, mean absolute deviation."""
    order = np.argsort(x, kind="stable")  # ties: frame order
    kept = list(order)
    n_low = n_high = 0
    while len(kept) >= 3:
        y = x[kept]
        i = np.arange(len(kept), dtype=np.float64)
        slope, intercept = np.polyfit(i, y, 1)
        fit = intercept + slope * i
        sigma = np.mean(np.abs(y - fit))
        if sigma <= 0:
            break
        lo = y < fit - low * sigma
        hi = y > fit + high * sigma
        if not (lo.any() or hi.any()):
            break
        n_low += int(lo.sum())
        n_high += int(hi.sum())
        kept = [k for k, bad in zip(kept, lo | hi, strict=True) if not bad]
    keep = np.zeros(x.size, dtype=bool)
    keep[kept] = True
    return keep, n_low, n_high


def ref_percentile(x: NDArray[np.float64], low: float, high: float
                   ) -> tuple[NDArray[np.bool_], int, int]:
    """One-step clipping at fractions of the median."""
    m = np.median(x)
    lo = x < m - low * abs(m)
    hi = x > m + high * abs(m)
    return ~(lo | hi), int(lo.sum()), int(hi.sum())


def ref_minmax(x: NDArray[np.float64], low: float, high: float
               ) -> tuple[NDArray[np.bool_], int, int]:
    """Drop the int(low) lowest and int(high) highest samples (ties by frame order)."""
    order = np.argsort(x, kind="stable")
    n_low = min(int(low), x.size - 1)
    n_high = min(int(high), x.size - 1 - n_low)
    keep = np.ones(x.size, dtype=bool)
    keep[order[:n_low]] = False
    keep[order[x.size - n_high:]] = False
    return keep, n_low, n_high


def ref_sigma_astropy(x: NDArray[np.float64], low: float, high: float
                      ) -> tuple[NDArray[np.bool_], int, int]:
    clipped = sigma_clip(x, sigma_lower=low, sigma_upper=high, cenfunc="median",
                         stdfunc="std", maxiters=None, masked=True)
    keep = ~np.ma.getmaskarray(clipped)
    m = np.median(x[keep])
    return keep, int(np.sum(~keep & (x < m))), int(np.sum(~keep & (x > m)))


REFERENCES = {
    "winsorized": ref_winsorized,
    "linear-fit": ref_linear_fit,
    "percentile": ref_percentile,
    "minmax": ref_minmax,
    "sigma": ref_sigma_astropy,
    "none": lambda x, low, high: (np.ones(x.size, dtype=bool), 0, 0),
}


def reference_combine(samples: NDArray[np.float32], valid: NDArray[np.bool_],
                      weights: NDArray[np.float64], config: IntegrateConfig
                      ) -> dict[str, NDArray[np.float64]]:
    """Loop over pixels with the reference rejection, then combine the kept samples."""
    _, ny, nx = samples.shape
    out = {name: np.full((ny, nx), np.nan) for name in ("image", "weight", "count", "low",
                                                       "high", "std")}
    for y in range(ny):
        for x in range(nx):
            ok = valid[:, y, x] & np.isfinite(samples[:, y, x])
            values = samples[ok, y, x].astype(np.float64)
            w = weights[ok]
            if values.size == 0:
                out["weight"][y, x] = out["count"][y, x] = 0
                out["low"][y, x] = out["high"][y, x] = 0
                continue
            keep, n_low, n_high = REFERENCES[config.reject](values, config.low, config.high)
            kept = values[keep]
            out["count"][y, x] = keep.sum()
            out["low"][y, x] = n_low
            out["high"][y, x] = n_high
            out["weight"][y, x] = w[keep].sum()
            if kept.size and config.combine == "mean":
                out["image"][y, x] = np.sum(w[keep] * kept) / np.sum(w[keep])
            elif kept.size:
                out["image"][y, x] = {"median": np.median(kept), "max": np.max(kept),
                                      "min": np.min(kept)}[config.combine]
            if kept.size >= 2:
                wk = w[keep]
                mean = np.sum(wk * kept) / wk.sum()
                v1, v2 = wk.sum(), np.sum(wk ** 2)
                out["std"][y, x] = np.sqrt(np.sum(wk * (kept - mean) ** 2) / (v1 - v2 / v1))
    return out


def assert_matches(result: TileResult, ref: dict[str, NDArray[np.float64]]) -> None:
    np.testing.assert_array_equal(result.count, ref["count"])
    np.testing.assert_array_equal(result.rejected_low, ref["low"])
    np.testing.assert_array_equal(result.rejected_high, ref["high"])
    np.testing.assert_allclose(result.image, ref["image"], rtol=RTOL, equal_nan=True)
    np.testing.assert_allclose(result.weight, ref["weight"], rtol=RTOL)
    if result.std is not None:
        np.testing.assert_allclose(result.std, ref["std"], rtol=RTOL, equal_nan=True)


# ------------------------------------------------------------------------------------ tests
@pytest.mark.filterwarnings("ignore:Input data contains invalid values")
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(("low", "high"), [(3.0, 3.0), (2.0, 2.5), (4.0, 1.5)])
def test_sigma_matches_astropy_sigma_clip_plus_weighted_mean(seed: int, low: float,
                                                             high: float) -> None:
    samples, valid, weights = make_stack(seed)
    config = IntegrateConfig(reject="sigma", low=low, high=high, std_map=True)
    result = combine_tile(samples, valid, weights, config)
    # Whole-cube astropy call, as the issue states it: NaN marks the missing samples.
    cube = np.where(valid, samples, np.nan).astype(np.float64)
    clipped = sigma_clip(cube, sigma_lower=low, sigma_upper=high, axis=0, cenfunc="median",
                         stdfunc="std", maxiters=None, masked=True)
    keep = ~np.ma.getmaskarray(clipped)
    w = weights[:, None, None]
    with np.errstate(invalid="ignore"):
        expected = np.sum(np.where(keep, cube * w, 0.0), axis=0) / np.sum(keep * w, axis=0)
    np.testing.assert_allclose(result.image, expected, rtol=RTOL, equal_nan=True)
    np.testing.assert_array_equal(result.count, keep.sum(axis=0))
    rejected = (valid.sum(axis=0) - keep.sum(axis=0))
    np.testing.assert_array_equal(result.rejected_low.astype(int)
                                  + result.rejected_high.astype(int), rejected)
    assert_matches(result, reference_combine(samples, valid, weights, config))
    assert rejected.sum() > 0  # the data did contain outliers to clip


@pytest.mark.parametrize("reject,low,high", [
    ("winsorized", 3.0, 3.0),
    ("winsorized", 2.0, 4.0),
    ("linear-fit", 3.0, 3.0),
    ("linear-fit", 5.0, 2.5),
    ("percentile", 0.2, 0.1),
    ("percentile", 0.05, 0.5),
    ("minmax", 1, 1),
    ("minmax", 2, 3),
    ("minmax", 0, 30),
    ("none", 0, 0),
])
@pytest.mark.parametrize("seed", [4, 5])
def test_rejection_matches_reference_definitions(reject: str, low: float, high: float,
                                                 seed: int) -> None:
    samples, valid, weights = make_stack(seed)
    config = IntegrateConfig(reject=reject, low=low, high=high, std_map=True)
    result = combine_tile(samples, valid, weights, config)
    ref = reference_combine(samples, valid, weights, config)
    assert_matches(result, ref)
    if reject != "none":
        assert (result.rejected_low.sum() + result.rejected_high.sum()) > 0


@pytest.mark.parametrize("combine", ["mean", "median", "max", "min"])
@pytest.mark.parametrize("reject", ["winsorized", "sigma", "minmax", "none"])
def test_combination_of_kept_samples(combine: str, reject: str) -> None:
    samples, valid, weights = make_stack(6)
    config = IntegrateConfig(combine=combine, reject=reject, low=2 if reject == "minmax" else 3,
                             high=2 if reject == "minmax" else 3)
    result = combine_tile(samples, valid, weights, config)
    assert result.std is None
    assert_matches(result, reference_combine(samples, valid, weights, config))


def test_ties_are_broken_by_frame_order_for_rank_based_rejection() -> None:
    # Quantised samples (many equal values) with very different weights: which tied
    # frame is dropped changes the weighted mean, so the tie rule is observable.
    rng = np.random.default_rng(7)
    samples = np.round(rng.normal(100.0, 2.0, (15, 4, 5))).astype(np.float32)
    valid = np.ones(samples.shape, dtype=bool)
    weights = rng.uniform(0.1, 5.0, 15)
    for reject, low, high in (("minmax", 2, 2), ("linear-fit", 2.0, 2.0),
                              ("winsorized", 1.5, 1.5), ("sigma", 1.0, 1.0)):
        config = IntegrateConfig(reject=reject, low=low, high=high)
        result = combine_tile(samples, valid, weights, config)
        assert_matches(result, reference_combine(samples, valid, weights, config))


def test_satellite_trail_and_hot_pixels_are_rejected() -> None:
    samples, valid, weights = make_stack(8, n=30, outlier_fraction=0.0, invalid_fraction=0.0)
    truth_like = combine_tile(np.delete(samples, 10, axis=0), np.delete(valid, 10, axis=0),
                              np.delete(weights, 10), IntegrateConfig(reject="none"))
    for reject in ("winsorized", "sigma", "linear-fit"):
        result = combine_tile(samples, valid, weights, IntegrateConfig(reject=reject))
        # Frame 10 = n // 3 carries the trail on row 2: every trail sample rejected high.
        assert np.all(result.rejected_high[2, 3:] >= 1), reject
        plain = combine_tile(samples, valid, weights, IntegrateConfig(reject="none"))
        trail_error = np.abs(result.image[2] - truth_like.image[2])
        plain_error = np.abs(plain.image[2] - truth_like.image[2])
        assert np.all(trail_error < 0.25 * plain_error), reject


def test_missing_samples_and_empty_pixels() -> None:
    samples, valid, weights = make_stack(9)
    samples[3, 4, 4] = np.nan  # a NaN marked valid is still missing
    samples[5, 4, 5] = np.inf
    result = combine_tile(samples, valid, weights, IntegrateConfig(std_map=True))
    assert np.isnan(result.image[0, 0]) and result.count[0, 0] == 0
    assert result.weight[0, 0] == 0.0 and np.isnan(result.std[0, 0])  # type: ignore[index]
    assert result.count[0, 1] == 1 and result.image[0, 1] == samples[0, 0, 1]
    assert np.isnan(result.std[0, 1])  # type: ignore[index]
    assert result.count[0, 2] == 2
    valid2 = valid.copy()
    valid2[3, 4, 4] = False
    valid2[5, 4, 5] = False
    ref = reference_combine(samples, valid2, weights, IntegrateConfig(std_map=True))
    assert_matches(result, ref)


def test_masked_form_equals_mask_form_and_tiles_are_independent() -> None:
    samples, valid, weights = make_stack(10, ny=12, nx=10)
    config = IntegrateConfig(reject="winsorized", std_map=True)
    whole = combine_tile(samples, valid, weights, config)
    masked = combine_masked_tile(np.where(valid, samples, np.nan).astype(np.float32), weights,
                                 config)
    parts = [combine_tile(samples[:, a:b], valid[:, a:b], weights, config)
             for a, b in ((0, 5), (5, 6), (6, 12))]
    for name in ("image", "weight", "count", "rejected_low", "rejected_high", "std"):
        np.testing.assert_array_equal(getattr(masked, name), getattr(whole, name))
        np.testing.assert_array_equal(np.concatenate([getattr(p, name) for p in parts]),
                                      getattr(whole, name))


def test_negative_zero_and_negative_values_sort_correctly() -> None:
    rng = np.random.default_rng(11)
    samples = rng.normal(0.0, 1.0, (12, 3, 4)).astype(np.float32)
    samples[0, 0, 0] = -0.0
    samples[1, 0, 0] = 0.0
    samples[2, 1, 1] = -50.0
    valid = np.ones(samples.shape, dtype=bool)
    weights = np.ones(12)
    for reject in ("minmax", "sigma", "percentile", "linear-fit"):
        config = IntegrateConfig(reject=reject, low=1.0, high=1.0, combine="median")
        assert_matches(combine_tile(samples, valid, weights, config),
                       reference_combine(samples, valid, weights, config))


@pytest.mark.parametrize("kwargs", [
    {"combine": "sum"}, {"reject": "kappa"}, {"weights": "snr"}, {"low": -1.0},
    {"high": float("nan")},
])
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        IntegrateConfig(**kwargs)  # type: ignore[arg-type]


def test_bad_shapes_and_weights_raise() -> None:
    samples, valid, weights = make_stack(12)
    with pytest.raises(ValueError, match="valid"):
        combine_tile(samples, valid[:, :-1], weights, IntegrateConfig())
    with pytest.raises(ValueError, match="weights"):
        combine_tile(samples, valid, weights[:-1], IntegrateConfig())
    bad = weights.copy()
    bad[0] = -1.0
    with pytest.raises(ValueError, match="weights"):
        combine_tile(samples, valid, bad, IntegrateConfig())
    with pytest.raises(ValueError, match="n_frames"):
        combine_tile(samples[0], valid[0], weights, IntegrateConfig())


def test_no_frames_gives_an_empty_tile() -> None:
    result = combine_tile(np.empty((0, 2, 3), np.float32), np.empty((0, 2, 3), bool),
                          np.empty(0), IntegrateConfig(std_map=True))
    assert np.all(np.isnan(result.image)) and np.all(result.count == 0)


def test_std_map_with_equal_weights_is_the_sample_std() -> None:
    samples, _, _ = make_stack(13, outlier_fraction=0.0, invalid_fraction=0.0)
    valid = np.ones(samples.shape, dtype=bool)
    result = combine_tile(samples, valid, np.full(samples.shape[0], 0.7),
                          IntegrateConfig(reject="none", std_map=True))
    assert result.std is not None
    np.testing.assert_allclose(result.std, np.std(samples.astype(np.float64), axis=0, ddof=1),
                               rtol=1e-5)


def test_normalized_planes_equal_apply_normalization_with_nan_outside() -> None:
    rng = np.random.default_rng(14)
    footprint = rng.random((40, 50)) > 0.2
    mono = rng.normal(1000.0, 30.0, (40, 50)).astype(np.float32)
    mono[3, 4] = np.nan
    norm = Normalization(location=1012.3456, scale=0.987654321, reference_location=998.7654)
    colour = rng.normal(1000.0, 30.0, (3, 40, 50)).astype(np.float32)
    norm3 = Normalization(location=np.array([1000.1, 1010.2, 990.3]),
                          scale=np.array([0.9, 1.1, 1.0000001]),
                          reference_location=np.array([995.0, 1001.0, 1003.0]))
    for image, n in ((mono, norm), (colour, norm3)):
        expected = apply_normalization(image, footprint, n).reshape(-1, 40, 50)
        got = normalized_planes(image, footprint, n)
        inside = footprint & np.all(np.isfinite(image.reshape(-1, 40, 50)), axis=0)
        np.testing.assert_array_equal(got[:, inside], expected[:, inside])  # bit for bit
        assert np.all(np.isnan(got[:, ~inside]))
    with pytest.raises(ValueError):
        normalized_planes(mono, footprint[:-1], norm)

"""The branch-free ``add_clip`` kernel against the per-pixel rules written as plain branches.

The kernel computes every branch for every pixel and stores the state through selects so
that its row loop vectorises. This pins it, bit for bit, to a scalar reference that follows
the rules of the module docstring with early exits: covered or not, first sample, model or
structure branch, the two-sample :func:`resolve_pair` case and the saturating counters.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from livestack.pipeline import kernels_accumulate as ka

State = list[NDArray[np.generic]]


def reference_add_clip(image: NDArray[np.float32], footprint: NDArray[np.bool_], weight: float,
                       noise_sq: NDArray[np.float64], noise_bar_sq: NDArray[np.float64],
                       sky: NDArray[np.float64], prior_n: float, coef_lo: NDArray[np.float64],
                       coef_hi: NDArray[np.float64], state: State) -> tuple[int, int]:
    """One frame into ``state`` (mean, m2, wsum, count, rej_lo, rej_hi), pixel by pixel.

    In float32 numpy scalars, like the kernel: the per-frame and per-row constants are
    rounded once from float64, then every operation is a float32 one (same order).
    """
    f32 = np.float32
    mean, m2, wsum, count, rej_lo, rej_hi = state
    n_lo = n_hi = 0
    nc, ny, nx = image.shape
    one, quarter = f32(1.0), f32(0.25)
    shrink_per_rej = f32(ka.WINSOR_C ** 2 - 1.0)
    klo = [f32(coef_lo[i]) for i in range(ka.N_COEF)]
    khi = [f32(coef_hi[i]) for i in range(ka.N_COEF)]
    w_this, prior = f32(weight), f32(prior_n)

    def t_factor(k: list[np.float32], inv_nu: np.float32) -> np.float32:
        return k[ka.COEF_KAPPA] + inv_nu * (k[ka.COEF_T1] + inv_nu * (k[ka.COEF_T2]
                                                                      + inv_nu * k[ka.COEF_T3]))

    for c in range(nc):
        sb2 = f32(noise_bar_sq[c])
        ratio = f32(float(noise_sq[c]) / float(noise_bar_sq[c]))
        sky_c = f32(sky[c])
        gate2 = f32(ka.STRUCTURE_GATE * ka.STRUCTURE_GATE * float(noise_bar_sq[c]))
        prior_ss = f32(prior_n * float(noise_bar_sq[c]))
        for y in range(ny):
            for x in range(nx):
                v = image[c, y, x]
                if not footprint[y, x] or not abs(v) < np.inf:
                    continue
                n_int = int(count[c, y, x])
                if n_int == 0:
                    mean[c, y, x], m2[c, y, x], wsum[c, y, x], count[c, y, x] = v, 0, w_this, 1
                    continue
                n = f32(n_int)
                mu, w_old, s = mean[c, y, x], wsum[c, y, x], m2[c, y, x]
                shrink = shrink_per_rej * (f32(rej_lo[c, y, x]) + f32(rej_hi[c, y, x]))
                d, excess, nm1 = v - mu, mu - sky_c, n - one
                sn = s * n
                inv_nu = one / max(nm1, one)
                a = f32(2.0 / 9.0) * inv_nu
                b = one - a + f32(ka._Z99) * np.sqrt(a)
                if (n_int >= 2 and excess > 0 and excess * excess > gate2
                        and sn > b * b * b * nm1 * sb2 * w_old):
                    num, den = sn, max(nm1 - shrink, quarter * nm1)
                    k_lo, k_hi = t_factor(klo, inv_nu), t_factor(khi, inv_nu)
                else:
                    dof = prior + nm1
                    num, den = prior_ss * w_old + sn, max(dof - shrink, quarter * dof)
                    spread = nm1 / (dof * dof) if dof > 0 else f32(0.0)
                    k_lo = klo[ka.COEF_KAPPA] + klo[ka.COEF_MODEL] * spread
                    k_hi = khi[ka.COEF_KAPPA] + khi[ka.COEF_MODEL] * spread
                lhs, rhs = d * d * (w_old * den * n), num * (ratio * n + one)
                side = 0
                if d > 0:
                    side = 1 if lhs > k_hi * k_hi * rhs else 0
                elif lhs > k_lo * k_lo * rhs:
                    side = -1
                if side != 0 and n_int == 1:
                    lower_excess = min(v, mu) - sky_c
                    if lower_excess * abs(lower_excess) > gate2:   # resolve_pair: keep both
                        side = 0
                    elif side < 0:
                        mean[c, y, x], m2[c, y, x], wsum[c, y, x] = v, 0, w_this
                        rej_hi[c, y, x] = min(int(rej_hi[c, y, x]) + 1, ka.U16_MAX)
                        n_hi += 1
                        continue
                if side > 0:
                    rej_hi[c, y, x] = min(int(rej_hi[c, y, x]) + 1, ka.U16_MAX)
                    n_hi += 1
                elif side < 0:
                    rej_lo[c, y, x] = min(int(rej_lo[c, y, x]) + 1, ka.U16_MAX)
                    n_lo += 1
                else:
                    w_new = w_old + w_this
                    mu_new = mu + d * (w_this / w_new)
                    mean[c, y, x], wsum[c, y, x] = mu_new, w_new
                    m2[c, y, x] = s + w_this * d * (v - mu_new)
                    count[c, y, x] = min(n_int + 1, ka.U16_MAX)
    return n_lo, n_hi


def test_add_clip_is_bit_identical_to_the_branching_rules() -> None:
    rng = np.random.default_rng(16)
    nc, ny, nx = 2, 9, 47

    def empty() -> State:
        planes: State = [np.zeros((nc, ny, nx), np.float32) for _ in range(3)]
        return planes + [np.zeros((nc, ny, nx), np.uint16) for _ in range(3)]

    kernel, reference = empty(), empty()
    for state in (kernel, reference):  # saturated counters on a few pixels
        state[0][0, :2, :4], state[1][0, :2, :4], state[2][0, :2, :4] = 100.0, 500.0, 3.0
        state[3][0, :2, :4] = ka.U16_MAX
        state[4][1, :2, :5] = ka.U16_MAX
        state[5][1, 2, :5] = ka.U16_MAX - 1
    sky = np.array([100.0, 40.0])
    truth = sky[:, None, None] + np.where(rng.random((nc, ny, nx)) < 0.15,
                                          rng.exponential(300.0, (nc, ny, nx)), 0.0)
    coef_lo, coef_hi = ka.clip_coefficients(2.5), ka.clip_coefficients(3.0)
    rejected = np.zeros(2, np.int64)
    for frame in range(14):
        noise = rng.uniform(3.0, 8.0, nc)
        image = truth * rng.uniform(0.9, 1.1) + rng.normal(0.0, 1.0, truth.shape) * noise[:, None,
                                                                                           None]
        hot = rng.random(truth.shape) < 0.03
        image[hot] += rng.exponential(400.0, int(hot.sum()))
        cold = rng.random(truth.shape) < 0.02
        image[cold] -= rng.exponential(100.0, int(cold.sum()))
        image[rng.random(truth.shape) < 0.01] = np.nan
        image[0, 4, 4] = np.inf
        footprint = rng.random((ny, nx)) < 0.9
        if frame < 3:
            footprint[:, : nx // 3] = False  # covered late: one- and two-sample pixels
        image32 = image.astype(np.float32)
        weight = float(rng.uniform(0.5, 2.0))
        noise_bar_sq = noise ** 2 * rng.uniform(0.8, 1.2, nc)
        rows = np.zeros((nc * ny, 2), np.int64)
        ka.add_clip(image32, footprint, weight, noise ** 2, noise_bar_sq, sky, 5.0, coef_lo,
                    coef_hi, *kernel, rows)
        expected = reference_add_clip(image32, footprint, weight, noise ** 2, noise_bar_sq,
                                      sky, 5.0, coef_lo, coef_hi, reference)
        assert tuple(rows.sum(axis=0)) == expected, frame
        for got, want in zip(kernel, reference, strict=True):
            assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (frame, got.dtype)
        rejected += rows.sum(axis=0)
    assert rejected.min() > 100  # both sides were exercised


def test_warmup_replay_fast_path_is_the_weighted_west_fit_bit_for_bit() -> None:
    """Pixels all held frames cover and agree on take the replay's vectorised path: their
    state must be the per-pixel path's, i.e. West's weighted update over the frames in
    order (float64, rounded on store). A hot sample sends its pixel down the per-pixel
    path, which must reject it and fit the others."""
    rng = np.random.default_rng(21)
    nc, ny, nx, k_frames = 2, 7, 53, 4
    sky = np.array([500.0, 80.0])
    noise_sq = rng.uniform(9.0, 25.0, (k_frames, nc))
    # Scatter at a tenth of the declared noise: every sample agrees with the others.
    frames = (sky[None, :, None, None]
              + 0.1 * np.sqrt(noise_sq)[:, :, None, None]
              * rng.standard_normal((k_frames, nc, ny, nx))).astype(np.float32)
    hot = np.zeros((nc, ny, nx), bool)
    hot[0, 3, 10:20] = True
    frames[2][hot] += np.float32(5000.0)
    weights = rng.uniform(0.5, 2.0, k_frames)
    state: State = ([np.zeros((nc, ny, nx), np.float32) for _ in range(3)]
                    + [np.zeros((nc, ny, nx), np.uint16) for _ in range(3)])
    rows = np.zeros((nc * ny, 2), np.int64)
    coef = ka.clip_coefficients(3.0)
    ka.replay_warmup(frames.copy(), k_frames, weights, noise_sq, noise_sq.mean(axis=0), sky,
                     5.0, coef, coef, *state, rows, False)

    mu, s, w = (np.zeros((nc, ny, nx)) for _ in range(3))
    for k in range(k_frames):
        v = frames[k].astype(np.float64)
        use = ~hot if k == 2 else np.ones_like(hot)
        w_new = w + weights[k]
        d = v - mu
        mu_new = mu + d * (weights[k] / w_new)
        s = np.where(use, s + weights[k] * d * (v - mu_new), s)
        mu = np.where(use, mu_new, mu)
        w = np.where(use, w_new, w)
    mean, m2, wsum, count, rej_lo, rej_hi = state
    for got, want in ((mean, mu), (m2, s), (wsum, w)):
        assert np.array_equal(got.view(np.uint8), want.astype(np.float32).view(np.uint8))
    assert np.array_equal(count, np.where(hot, k_frames - 1, k_frames))
    assert np.array_equal(rej_hi, hot.astype(np.uint16)) and not rej_lo.any()
    assert tuple(rows.sum(axis=0)) == (0, int(hot.sum()))

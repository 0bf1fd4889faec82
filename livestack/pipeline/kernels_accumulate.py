"""numba kernels behind :mod:`livestack.pipeline.accumulate` (and the preview's binning).

All kernels see images as ``(nc, ny, nx)`` stacks of planes (mono is ``nc == 1``) and
run one ``prange`` task per ``(channel, row)``. Per-pixel state is float32 in memory;
:func:`add_clip` computes in float32 too (16 SIMD lanes), the warm-up in float64.

Per-pixel state (one plane each, shape ``(nc, ny, nx)``)
--------------------------------------------------------
``mean``   float32  weighted mean of the accepted samples (West's incremental form, so it
                    stays at data magnitude and float32 keeps ~1e-7 relative precision).
``m2``     float32  ``sum w_i (x_i - mean)^2`` over accepted samples (West 1979).
``wsum``   float32  ``sum w_i`` over accepted samples.
``count``  uint16   accepted samples (saturates at 65535; the mean keeps updating).
``rej_lo``, ``rej_hi`` uint16  rejected samples per side (saturating).

Rejection test (method ``kappa_sigma``), for a new sample ``x`` with frame noise ``s_x``
----------------------------------------------------------------------------------------
With ``n`` accepted and ``r`` rejected samples, ``sb2`` the mean squared frame noise of
the stack and ``R = m2 * n / wsum`` (``(n - 1) s^2``; the reliability-weight correction is
approximated by ``n``, so no per-pixel sum of squared weights is stored)::

    model branch:      v = (n0 sb2 + R) / (n0 + n - 1 - (c^2 - 1) r),  k = k_model(n)
    structure branch:  v = R / (n - 1 - (c^2 - 1) r),                  k = t_{n-1}(kappa)
    reject low  if x - mean < -k_low  sqrt(v (s_x^2 / sb2 + 1 / n))
    reject high if x - mean >  k_high sqrt(v (s_x^2 / sb2 + 1 / n))

* **Shrinkage** (model branch): the frames' noise model ``sb2`` is a prior worth ``n0``
  samples; it keeps the band stable while the pixel has few samples.
* **Structure branch**: taken when the pixel is ``STRUCTURE_GATE`` noise sigma above the
  sky *and* ``R / (n - 1)`` exceeds the model at 99 % (Wilson-Hilferty chi-square point).
  Star cores whose peak varies with seeing and bright nebulae get their own variance and
  a Student-t factor (the honest predictive band with ``n - 1`` dof). The signal gate
  keeps sky pixels on the model: with few samples, an outlier plus a noise fluke would
  otherwise look like structure and widen the band enough to let the outlier in.
* **Calibrated factors**: ``k_model(n) = kappa (1 + (kappa^2 + 1) Var(v) / 8)`` with
  ``Var(v) = 2 (n - 1) / (n0 + n - 1)^2`` (second-order expansion of the Gaussian tail
  averaged over the chi-square noise of ``s^2``): without it the random error of a
  per-pixel variance doubles the false rejections (0.29 % instead of 0.135 % per side at
  kappa = 3, n0 = 5). ``t_nu(kappa)`` is the Cornish-Fisher series to 1/nu^3.
  Closed forms instead of lookup tables keep the row loop SIMD-vectorisable (3x faster).
* **Winsorised rejections** (``- (c^2 - 1) r``, ``c = WINSOR_C``): the fixed point of
  counting each rejected sample as a sample at ``c`` sigma (Huber's scale). It needs no
  extra state and breaks the lock-in where a variance that came out low keeps
  rejecting the samples that would correct it. Breakdown 1/c^2 = 44 % outliers; the
  denominator is floored at a quarter of its value (sigma inflated at most 2x).
* Rejected samples update only the counters, so an outlier cannot inflate ``m2``; a
  sample that passes is within ``k`` sigma, which bounds its influence.
* The variance is kept in units of the *mean* frame noise and scaled by each sample's own
  ``s_x^2 / sb2``, so a noisier frame gets a proportionally wider band.

One-sample pixels (dither edges covered late): when the second sample disagrees with
the first, :func:`resolve_pair` keeps the lower one if it is at sky level (outliers are
overwhelmingly high), else keeps both.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

#: Saturation value of the uint16 counters.
U16_MAX = 65535
#: Rejected samples count as samples at this many sigma in the variance.
WINSOR_C = 1.5
#: The structure branch needs the pixel this many frame-noise sigma above the sky.
STRUCTURE_GATE = 3.0
#: Standard normal 99 % point (the structure test's significance).
_Z99 = 2.3263478740408408

#: Layout of the ``coef`` array: kappa, its Cornish-Fisher t coefficients, model coefficient.
COEF_KAPPA = 0
COEF_T1 = 1
COEF_T2 = 2
COEF_T3 = 3
COEF_MODEL = 4
N_COEF = 5

#: :func:`resolve_pair` outcomes.
PAIR_KEEP_BOTH = 0
PAIR_KEEP_LOWER = 1


def clip_coefficients(kappa: float) -> NDArray[np.float64]:
    """Coefficients of the closed-form clip factors for one kappa (see module docstring).

    Returns
    -------
    ndarray (N_COEF,) float64
        ``[kappa, c1, c2, c3, cm]`` with ``t_nu = kappa + c1/nu + c2/nu^2 + c3/nu^3`` and
        ``k_model(n) = kappa + cm * (n - 1) / (n0 + n - 1)^2``.
    """
    z = float(kappa)
    return np.array([
        z,
        (z ** 3 + z) / 4.0,
        (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96.0,
        (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384.0,
        z * (z * z + 1.0) / 4.0,
    ])


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _t_factor(coef: NDArray[np.float64], inv_nu: float) -> float:
    return coef[COEF_KAPPA] + inv_nu * (coef[COEF_T1] + inv_nu * (coef[COEF_T2]
                                                                   + inv_nu * coef[COEF_T3]))


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _chi2_crit(inv_nu: float) -> float:
    """Upper 1 % point of chi2(nu) / nu (Wilson-Hilferty; 0.7 % error at nu = 1)."""
    a = (2.0 / 9.0) * inv_nu
    b = 1.0 - a + _Z99 * math.sqrt(a)
    return b * b * b


@njit(cache=True, nogil=True, fastmath=False)
def threshold(resid_ss: float, n: int, n_rej: int, excess: float, sb2: float, prior_n: float,
              coef_lo: NDArray[np.float64], coef_hi: NDArray[np.float64]
              ) -> tuple[float, float, float]:
    """Variance estimate and clip factors for a pixel with ``n`` accepted samples.

    Parameters
    ----------
    resid_ss : float
        ``(n - 1) * s^2``: sum of squared residuals of the accepted samples.
    n : int
        Accepted samples (>= 1).
    n_rej : int
        Samples rejected so far at this pixel (both sides).
    excess : float
        Pixel level minus the sky level, ADU.
    sb2 : float
        Mean squared frame noise (the noise model), > 0.
    prior_n : float
        Prior strength ``n0`` in frames.
    coef_lo, coef_hi : ndarray (N_COEF,)
        From :func:`clip_coefficients` for kappa_low and kappa_high.

    Returns
    -------
    (v_hat, k_low, k_high) : tuple of float
        Variance of one average-noise sample and the clip factors (module docstring).
        :func:`add_clip` inlines the same formulas in a division-free form.
    """
    shrink = (WINSOR_C * WINSOR_C - 1.0) * n_rej
    nm1 = n - 1.0
    if n >= 2:
        inv_nu = 1.0 / nm1
        if (excess > 0.0 and excess * excess > STRUCTURE_GATE * STRUCTURE_GATE * sb2
                and resid_ss > _chi2_crit(inv_nu) * nm1 * sb2):
            return (resid_ss / max(nm1 - shrink, 0.25 * nm1), _t_factor(coef_lo, inv_nu),
                    _t_factor(coef_hi, inv_nu))
    dof = prior_n + nm1
    v_hat = (prior_n * sb2 + resid_ss) / max(dof - shrink, 0.25 * dof)
    spread = nm1 / (dof * dof) if dof > 0.0 else 0.0
    return (v_hat, coef_lo[COEF_KAPPA] + coef_lo[COEF_MODEL] * spread,
            coef_hi[COEF_KAPPA] + coef_hi[COEF_MODEL] * spread)


@njit(cache=True, nogil=True, fastmath=False)
def resolve_pair(lower_excess: float, sb2: float) -> int:
    """Decide between two samples of a pixel that disagree beyond the noise model.

    With two samples nothing says which one is wrong, but outliers are overwhelmingly
    high (hot pixels, trails, cosmic rays) and only a pixel with signal can vary more
    than the noise model. So when the lower sample is at sky level (less than
    ``STRUCTURE_GATE`` sigma above the sky) the higher one is rejected
    (``PAIR_KEEP_LOWER``); otherwise both are kept (``PAIR_KEEP_BOTH``), as the
    difference may be seeing acting on a star.
    """
    if lower_excess * abs(lower_excess) <= STRUCTURE_GATE * STRUCTURE_GATE * sb2:
        return PAIR_KEEP_LOWER
    return PAIR_KEEP_BOTH


@njit(cache=True, nogil=True, fastmath=False, parallel=True, error_model="numpy")
def add_clip(image: NDArray[np.float32], footprint: NDArray[np.bool_], weight: float,
             noise_sq: NDArray[np.float64], noise_bar_sq: NDArray[np.float64],
             sky: NDArray[np.float64], prior_n: float, coef_lo: NDArray[np.float64],
             coef_hi: NDArray[np.float64],
             mean: NDArray[np.float32], m2: NDArray[np.float32], wsum: NDArray[np.float32],
             count: NDArray[np.uint16], rej_lo: NDArray[np.uint16], rej_hi: NDArray[np.uint16],
             row_counts: NDArray[np.int64]) -> None:
    """Fold one frame into the state with per-pixel kappa-sigma rejection (in place).

    Parameters
    ----------
    image : ndarray (nc, ny, nx) float32
        Normalised frame on the reference grid.
    footprint : ndarray (ny, nx) bool
        Pixels the frame covers (shared by all channels).
    weight : float
        Frame weight (> 0).
    noise_sq : ndarray (nc,) float64
        This frame's squared background noise per channel (ADU^2).
    noise_bar_sq : ndarray (nc,) float64
        Mean squared frame noise of the stack so far, per channel (> 0).
    sky : ndarray (nc,) float64
        Sky level per channel, ADU.
    prior_n : float
        Prior strength ``n0`` in frames.
    coef_lo, coef_hi : ndarray (N_COEF,)
        From :func:`clip_coefficients`.
    mean, m2, wsum, count, rej_lo, rej_hi : ndarray (nc, ny, nx)
        State planes, updated in place (see the module docstring).
    row_counts : ndarray (nc * ny, 2) int64
        Out: rejections (low, high) per row, summed by the caller.

    Notes
    -----
    The test is the one of :func:`threshold`, multiplied out (no division by the variance)
    and without table lookups. The row loop has no branch: every pixel evaluates both
    branches and the two-sample case, and every state plane is stored through selects.
    Bit for bit the state of the branching form (``tests/pipeline/test_accumulate_kernel``).

    Per-pixel arithmetic is float32 (the state's own precision; the per-row constants are
    rounded once from float64): LLVM then fills 16 lanes of a 512-bit register instead
    of 8. A float64 update rounded on store differs from it by at most an ulp or so of the
    mean and a few 1e-6 of ``m2`` (the rounding of ``mean`` in ``x - mean_new``), far below
    the noise of either. Rejections are flagged in a per-row byte buffer and counted after
    the row: an int64 counter in the loop made 64 bits the loop's widest type and halved
    the vector width. 26 MP mono, one thread, CPU time: 47 ms instead of 113 ms for the
    float64 form (8 lanes), measured interleaved; just loading and storing the planes
    takes 23 ms.
    """
    nc, ny, nx = image.shape
    f32 = np.float32
    zero = f32(0.0)
    one = f32(1.0)
    quarter = f32(0.25)
    shrink_per_rej = f32(WINSOR_C * WINSOR_C - 1.0)
    two_ninths = f32(2.0 / 9.0)
    z99 = f32(_Z99)
    inf32 = f32(np.inf)
    # The clip factors' coefficients: kappa, the Cornish-Fisher t terms and the model term.
    k_lo0, t1_lo, t2_lo, t3_lo, m_lo = (f32(coef_lo[COEF_KAPPA]), f32(coef_lo[COEF_T1]),
                                        f32(coef_lo[COEF_T2]), f32(coef_lo[COEF_T3]),
                                        f32(coef_lo[COEF_MODEL]))
    k_hi0, t1_hi, t2_hi, t3_hi, m_hi = (f32(coef_hi[COEF_KAPPA]), f32(coef_hi[COEF_T1]),
                                        f32(coef_hi[COEF_T2]), f32(coef_hi[COEF_T3]),
                                        f32(coef_hi[COEF_MODEL]))
    w_this = f32(weight)
    prior = f32(prior_n)
    for task in prange(nc * ny):
        c = task // ny
        y = task - c * ny
        sb2 = f32(noise_bar_sq[c])
        ratio = f32(noise_sq[c] / noise_bar_sq[c])
        sky_c = f32(sky[c])
        gate2 = f32(STRUCTURE_GATE * STRUCTURE_GATE * noise_bar_sq[c])
        prior_ss = f32(prior_n * noise_bar_sq[c])
        # Bit 0: rejected low, bit 1: rejected high (summed after the row, see Notes).
        flags = np.empty(nx, dtype=np.uint8)
        # Branch-free row: every pixel computes every branch and stores each state plane
        # back through selects (unchanged pixels get their own value). Conditional stores
        # into six planes kept LLVM from vectorising the loop; selects do not change any
        # value, so the state is bit-identical to the branching form.
        for x in range(nx):
            v = image[c, y, x]
            mu = mean[c, y, x]
            w_old = wsum[c, y, x]
            s = m2[c, y, x]
            n_int = count[c, y, x]
            r_lo = rej_lo[c, y, x]
            r_hi = rej_hi[c, y, x]
            covered = footprint[y, x] & (abs(v) < inf32)   # NaN/inf: not covered
            init = covered & (n_int == 0)
            n = f32(n_int)
            n_rej = f32(r_lo) + f32(r_hi)
            d = v - mu
            excess = mu - sky_c
            shrink = shrink_per_rej * n_rej
            nm1 = n - one
            sn = s * n                       # = R * w_old
            inv_nu = one / max(nm1, one)
            a = two_ninths * inv_nu          # _chi2_crit, in float32
            b = one - a + z99 * math.sqrt(a)
            structure = ((n_int >= 2) & (excess > zero) & (excess * excess > gate2)
                         & (sn > b * b * b * nm1 * sb2 * w_old))
            dof = prior + nm1
            spread = nm1 / (dof * dof) if dof > zero else zero
            num = sn if structure else prior_ss * w_old + sn
            den = (max(nm1 - shrink, quarter * nm1) if structure
                   else max(dof - shrink, quarter * dof))
            # Only the factor of the side the sample is on: the coefficients are selected
            # first, so one factor is evaluated instead of two (7 % less CPU).
            pos = d > zero
            k0 = k_hi0 if pos else k_lo0
            t1 = t1_hi if pos else t1_lo
            t2 = t2_hi if pos else t2_lo
            t3 = t3_hi if pos else t3_lo
            k = (k0 + inv_nu * (t1 + inv_nu * (t2 + inv_nu * t3)) if structure
                 else k0 + (m_hi if pos else m_lo) * spread)
            # d^2 > k^2 * num / (w_old * den) * (ratio + 1/n), multiplied out.
            lhs = d * d * (w_old * den * n)
            rhs = num * (ratio * n + one)
            tested = covered & (n_int > 0)
            out = tested & (lhs > k * k * rhs)
            high = out & pos
            low = out & ~pos
            # Second sample disagreeing with the first: resolve_pair, inlined.
            pair = (high | low) & (n_int == 1)
            lower_excess = min(v, mu) - sky_c
            keep_lower = lower_excess * abs(lower_excess) <= gate2
            keep_both = pair & ~keep_lower
            high = high & ~keep_both
            low = low & ~keep_both
            swap = pair & keep_lower & low   # the new, lower sample replaces the held one
            low = low & ~swap
            add_hi = high | swap
            accept = tested & ~high & ~low & ~swap
            fresh = init | swap
            w_new = w_old + w_this
            mu_new = mu + d * (w_this / w_new)
            s_new = s + w_this * d * (v - mu_new)
            mean[c, y, x] = v if fresh else (mu_new if accept else mu)
            m2[c, y, x] = zero if fresh else (s_new if accept else s)
            wsum[c, y, x] = w_this if fresh else (w_new if accept else w_old)
            grow = init | (accept & (n_int < U16_MAX))
            count[c, y, x] = n_int + 1 if grow else n_int
            rej_hi[c, y, x] = r_hi + 1 if add_hi & (r_hi < U16_MAX) else r_hi
            rej_lo[c, y, x] = r_lo + 1 if low & (r_lo < U16_MAX) else r_lo
            flags[x] = np.uint8(low) | (np.uint8(add_hi) << np.uint8(1))
        n_lo = 0
        n_hi = 0
        for x in range(nx):
            n_lo += flags[x] & 1
            n_hi += flags[x] >> 1
        row_counts[task, 0] = n_lo
        row_counts[task, 1] = n_hi


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def add_plain(image: NDArray[np.float32], footprint: NDArray[np.bool_], weight: float,
              unit_weight: bool, mean: NDArray[np.float32], m2: NDArray[np.float32],
              wsum: NDArray[np.float32], count: NDArray[np.uint16]) -> None:
    """Fold one frame into the state without rejection (methods ``mean`` and ``sum``).

    With ``unit_weight`` the running mean is unweighted (``sum`` = mean * count) while
    ``wsum`` still accumulates ``weight`` for the weight map.
    """
    nc, ny, nx = image.shape
    for task in prange(nc * ny):
        c = task // ny
        y = task - c * ny
        for x in range(nx):
            v = np.float64(image[c, y, x])
            if not footprint[y, x] or not abs(v) < np.inf:   # NaN/inf: not covered
                continue
            n = np.int64(count[c, y, x])
            w_old = np.float64(wsum[c, y, x])
            if unit_weight:
                w_mean_old = np.float64(n)
                w_this = 1.0
            else:
                w_mean_old = w_old
                w_this = weight
            if n == 0:
                mean[c, y, x] = v
                m2[c, y, x] = 0.0
            else:
                mu = np.float64(mean[c, y, x])
                d = v - mu
                mu_new = mu + d * (w_this / (w_mean_old + w_this))
                mean[c, y, x] = mu_new
                m2[c, y, x] = np.float64(m2[c, y, x]) + w_this * d * (v - mu_new)
            wsum[c, y, x] = w_old + weight
            if n < U16_MAX:
                count[c, y, x] = n + 1


@njit(cache=True, nogil=True, fastmath=False)
def _fit(vals: NDArray[np.float64], wts: NDArray[np.float64], accept: NDArray[np.int8],
         nv: int, skip: int) -> tuple[float, float, int]:
    """Weighted mean, ``(n - 1) s^2`` and count of accepted samples other than ``skip``."""
    w_tot = 0.0
    mu = 0.0
    s = 0.0
    n = 0
    for i in range(nv):
        if i != skip and accept[i] == 0:
            w_new = w_tot + wts[i]
            d = vals[i] - mu
            mu += d * (wts[i] / w_new)
            s += wts[i] * d * (vals[i] - mu)
            w_tot = w_new
            n += 1
    if n == 0:
        return 0.0, 0.0, 0
    return mu, s * n / w_tot, n


@njit(cache=True, nogil=True, fastmath=False)
def _classify(d: float, var: float, k_lo: float, k_hi: float) -> int:
    """0 = accept, 1 = reject low, 2 = reject high."""
    if d > 0.0 and d * d > k_hi * k_hi * var:
        return 2
    if d < 0.0 and d * d > k_lo * k_lo * var:
        return 1
    return 0


@njit(cache=True, nogil=True, fastmath=False)
def _seed_pixel(vals: NDArray[np.float64], wts: NDArray[np.float64], nsq: NDArray[np.float64],
                nv: int, sky: float, sb2: float, prior_n: float, coef_lo: NDArray[np.float64],
                coef_hi: NDArray[np.float64], accept: NDArray[np.int8],
                work: NDArray[np.int8]) -> None:
    """Decide which of ``nv >= 2`` warm-up samples of one pixel to accept.

    1. Mode under the noise model: the sample with the most others within kappa
       sigma (model noise) of it, ties to the lower one. Robust to any minority of
       outliers, e.g. two hot-pixel hits among four frames.
    2. Sky pixel (the mode's mean is less than ``STRUCTURE_GATE`` sigma above the sky):
       the noise model is right there, so every sample is tested against the mode's mean
       with the model variance, refitting on the accepted ones until stable.
    3. Signal pixel (star, nebula): leave-one-out. Each sample is tested, through
       :func:`threshold` (structure branch allowed), against the mean and residuals of
       the *other* samples: an outlier cannot widen its own band, and seeing-driven
       scatter is recognised as structure instead of being rejected.

    Out: ``accept[j]`` = 0 (accepted), 1 (rejected low) or 2 (rejected high); if every
    sample would be rejected, all are accepted. ``work`` is scratch of length >= nv.
    """
    k_lo1 = coef_lo[COEF_KAPPA]
    k_hi1 = coef_hi[COEF_KAPPA]
    best = 0
    best_support = -1
    for j in range(nv):
        support = 0
        for i in range(nv):
            if _classify(vals[i] - vals[j], nsq[i] + nsq[j], k_lo1, k_hi1) == 0:
                support += 1
        if support > best_support or (support == best_support and vals[j] < vals[best]):
            best = j
            best_support = support
    for i in range(nv):
        ok = _classify(vals[i] - vals[best], nsq[i] + nsq[best], k_lo1, k_hi1) == 0
        accept[i] = 0 if ok else 3
    mu, resid_ss, n = _fit(vals, wts, accept, nv, -1)

    if mu - sky <= STRUCTURE_GATE * math.sqrt(sb2):
        for _ in range(4):
            v_hat, kl, kh = threshold(resid_ss, n, 0, 0.0, sb2, prior_n, coef_lo, coef_hi)
            changed = False
            for j in range(nv):
                state = _classify(vals[j] - mu, v_hat * (nsq[j] / sb2 + 1.0 / n), kl, kh)
                if state != accept[j]:
                    changed = True
                accept[j] = state
            if not changed:
                break
            mu2, resid2, n2 = _fit(vals, wts, accept, nv, -1)
            if n2 == 0:
                break
            mu, resid_ss, n = mu2, resid2, n2
    else:
        for j in range(nv):
            work[j] = 0
        for j in range(nv):
            mu_o, resid_o, m = _fit(vals, wts, work, nv, j)
            v_hat, kl, kh = threshold(resid_o, m, 0, mu_o - sky, sb2, prior_n, coef_lo,
                                      coef_hi)
            accept[j] = _classify(vals[j] - mu_o, v_hat * (nsq[j] / sb2 + 1.0 / m), kl, kh)
    n_acc = 0
    for j in range(nv):
        if accept[j] == 0:
            n_acc += 1
    if n_acc == 0:
        for j in range(nv):
            accept[j] = 0


@njit(cache=True, nogil=True, fastmath=False)
def _all_agree(vals: NDArray[np.float64], nsq: NDArray[np.float64], nv: int, sky: float,
               sb2: float, kappa: float) -> bool:
    """Fast path of the warm-up: a sky-level pixel whose samples all lie within ``kappa``
    model sigma of their plain mean is accepted whole (the full decision would agree)."""
    mu = 0.0
    for j in range(nv):
        mu += vals[j]
    mu /= nv
    if mu - sky > STRUCTURE_GATE * math.sqrt(sb2):
        return False
    k2 = kappa * kappa
    for j in range(nv):
        d = vals[j] - mu
        if d * d > k2 * (nsq[j] + sb2 / nv):
            return False
    return True


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def replay_warmup(planes: NDArray[np.float32], n_frames: int, weights: NDArray[np.float64],
                  noise_sq: NDArray[np.float64], noise_bar_sq: NDArray[np.float64],
                  sky: NDArray[np.float64], prior_n: float, coef_lo: NDArray[np.float64],
                  coef_hi: NDArray[np.float64],
                  mean: NDArray[np.float32], m2: NDArray[np.float32], wsum: NDArray[np.float32],
                  count: NDArray[np.uint16], rej_lo: NDArray[np.uint16],
                  rej_hi: NDArray[np.uint16], row_counts: NDArray[np.int64],
                  packed: bool) -> None:
    """Seed the state from the held warm-up frames (see :func:`_seed_pixel`).

    A pixel covered by one held frame accepts it.

    Parameters
    ----------
    planes : ndarray (n_planes, nc, ny, nx) float32
        Warm-up frames ``planes[:n_frames]``; NaN marks pixels outside a frame's footprint.
    n_frames : int
        Number of held frames.
    weights : ndarray (n_frames,) float64
    noise_sq : ndarray (n_frames, nc) float64
        Squared frame noise per channel.
    noise_bar_sq : ndarray (nc,) float64
        Mean of ``noise_sq`` over the held frames.
    sky : ndarray (nc,) float64
        Sky level per channel, ADU.
    prior_n, coef_lo, coef_hi
        As for :func:`add_clip`.
    mean, m2, wsum, count, rej_lo, rej_hi : ndarray (nc, ny, nx)
        Out. ``mean``, ``m2`` and ``wsum`` MAY be planes 0-2 of ``planes`` (the stack reuses
        the warm-up buffer): each task copies its row of all frames into a scratch buffer
        before writing, and writes only that row.
    row_counts : ndarray (nc * ny, 2) int64
        Out: rejections (low, high) per row.
    packed : bool
        Write ``count | rej_lo << 5 | rej_hi << 10`` into ``rej_hi`` instead of the three
        counter planes (``n_frames <= 31``); :func:`unpack_counters` expands it. This lets
        the counters land in plane 3 of ``planes`` once no task reads it any more.
    """
    _, nc, ny, nx = planes.shape
    k_tight = min(coef_lo[COEF_KAPPA], coef_hi[COEF_KAPPA])
    for task in prange(nc * ny):
        c = task // ny
        y = task - c * ny
        rows = np.empty((n_frames, nx), dtype=np.float32)
        for k in range(n_frames):
            for x in range(nx):
                rows[k, x] = planes[k, c, y, x]
        vals = np.empty(n_frames, dtype=np.float64)
        wts = np.empty(n_frames, dtype=np.float64)
        nsq = np.empty(n_frames, dtype=np.float64)
        accept = np.zeros(n_frames, dtype=np.int8)
        work = np.zeros(n_frames, dtype=np.int8)
        sb2 = noise_bar_sq[c]
        # Fast path, vectorised over the row (frame by frame): the pixels that every held
        # frame covers and whose samples all agree (_all_agree) accept them all, and
        # their fit is the weighted West update over the frames in order. The same
        # operations in the same order as the per-pixel path below, so the same bits, but
        # the per-pixel path is a serial chain of divisions (20 ms of CPU per MP at K = 4).
        fast = np.empty(nx, dtype=np.bool_)
        mu_fit = np.zeros(nx, dtype=np.float64)
        s_fit = np.zeros(nx, dtype=np.float64)
        w_fit = np.zeros(nx, dtype=np.float64)
        for x in range(nx):
            fast[x] = n_frames >= 2
        for k in range(n_frames):
            for x in range(nx):
                v = np.float64(rows[k, x])
                fast[x] &= not math.isnan(v)
                mu_fit[x] += v                       # _all_agree's plain sum, for now
        sky_gate = STRUCTURE_GATE * math.sqrt(sb2)
        for x in range(nx):
            mu_fit[x] /= n_frames
            fast[x] &= not (mu_fit[x] - sky[c] > sky_gate)
        k2 = k_tight * k_tight
        for k in range(n_frames):
            limit = k2 * (noise_sq[k, c] + sb2 / n_frames)
            for x in range(nx):
                d = np.float64(rows[k, x]) - mu_fit[x]
                fast[x] &= not (d * d > limit)
        for x in range(nx):
            mu_fit[x] = 0.0
        for k in range(n_frames):
            w_k = weights[k]
            for x in range(nx):
                v = np.float64(rows[k, x])
                w_new = w_fit[x] + w_k
                d = v - mu_fit[x]
                mu_fit[x] += d * (w_k / w_new)
                s_fit[x] += w_k * d * (v - mu_fit[x])
                w_fit[x] = w_new
        # Every pixel gets the fast path's state (a vectorised store); the loop below
        # overwrites the others.
        for x in range(nx):
            mean[c, y, x] = mu_fit[x]
            m2[c, y, x] = s_fit[x]
            wsum[c, y, x] = w_fit[x]
        if packed:
            for x in range(nx):
                rej_hi[c, y, x] = n_frames
        else:
            for x in range(nx):
                count[c, y, x] = n_frames
                rej_lo[c, y, x] = 0
                rej_hi[c, y, x] = 0
        n_lo = 0
        n_hi = 0
        for x in range(nx):
            if fast[x]:
                continue
            nv = 0
            for k in range(n_frames):
                v = rows[k, x]
                if not math.isnan(v):
                    vals[nv] = v
                    wts[nv] = weights[k]
                    nsq[nv] = noise_sq[k, c]
                    nv += 1
            for j in range(nv):
                accept[j] = 0
            if nv >= 2 and not _all_agree(vals, nsq, nv, sky[c], sb2, k_tight):
                _seed_pixel(vals, wts, nsq, nv, sky[c], sb2, prior_n, coef_lo, coef_hi,
                            accept, work)
            w_tot = 0.0
            mu = 0.0
            s = 0.0
            n_acc = 0
            lo = 0
            hi = 0
            for j in range(nv):
                if accept[j] == 0:
                    w_new = w_tot + wts[j]
                    d = vals[j] - mu
                    mu += d * (wts[j] / w_new)
                    s += wts[j] * d * (vals[j] - mu)
                    w_tot = w_new
                    n_acc += 1
                elif accept[j] == 1:
                    lo += 1
                else:
                    hi += 1
            mean[c, y, x] = mu
            m2[c, y, x] = s
            wsum[c, y, x] = w_tot
            if packed:
                rej_hi[c, y, x] = n_acc | (lo << 5) | (hi << 10)
            else:
                count[c, y, x] = n_acc
                rej_lo[c, y, x] = lo
                rej_hi[c, y, x] = hi
            n_lo += lo
            n_hi += hi
        row_counts[task, 0] = n_lo
        row_counts[task, 1] = n_hi


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def hold_frame(plane: NDArray[np.float32], image: NDArray[np.float32],
               footprint: NDArray[np.bool_]) -> None:
    """Copy a warm-up frame into its buffer plane, NaN where not covered or not finite."""
    nc, ny, nx = image.shape
    for task in prange(nc * ny):
        c = task // ny
        y = task - c * ny
        for x in range(nx):
            v = image[c, y, x]
            plane[c, y, x] = v if footprint[y, x] and abs(v) < np.inf else np.nan


@njit(cache=True, nogil=True, fastmath=False, parallel=True)
def unpack_counters(packed: NDArray[np.uint16], count: NDArray[np.uint16],
                    rej_lo: NDArray[np.uint16]) -> None:
    """Expand :func:`replay_warmup`'s packed counters in place (``packed`` becomes rej_hi)."""
    nc, ny, nx = packed.shape
    for task in prange(nc * ny):
        c = task // ny
        y = task - c * ny
        for x in range(nx):
            p = packed[c, y, x]
            count[c, y, x] = p & 31
            rej_lo[c, y, x] = (p >> 5) & 31
            packed[c, y, x] = (p >> 10) & 31









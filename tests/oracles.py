"""Plain numpy versions of numba-backed pipeline functions: test oracles and bench baselines.

Each computes the same result as its production counterpart with numpy temporaries (several
full-frame passes), so tests can compare the kernels against an independent formulation
and ``bench/`` can time the kernels against them.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from livestack.pipeline import detect
from livestack.pipeline.calibrate import FLAT_MIN, MasterSet, _as_frame, _check_shapes
from livestack.pipeline.cosmetic import (
    _RING,
    _plane_stats,
    _ring_values,
    correct_defects,
    neighbour_step,
)
from livestack.pipeline.debayer import _as_cfa, cfa_channel_masks


def calibrate_numpy(raw: np.ndarray, masters: MasterSet | None,
                    bayer_pattern: str | None = None) -> NDArray[np.float32]:
    """Reference implementation of :func:`calibrate` with numpy temporaries.

    Same parameters, result and errors; slower (several full-frame passes).
    """
    data = _as_frame(raw, None)
    out = np.array(data, dtype=np.float32, copy=True)
    if masters is None or masters.is_empty():
        return out
    _check_shapes(data.shape, masters, None)
    if masters.subtract is not None:
        out -= masters.subtract
    if masters.flat is not None:
        flat = masters.flat.astype(np.float32, copy=False)
        divide = flat > FLAT_MIN
        np.divide(out, flat, out=out, where=divide)
    if masters.defects is not None:
        out = correct_defects(out, masters.defects, bayer_pattern)
    return out


def debayer_numpy(cfa: np.ndarray, pattern: str) -> NDArray[np.float32]:
    """Reference bilinear demosaic in vectorised numpy (as ``debayer(..., "bilinear")``).

    Slower than :func:`debayer`; kept as the test oracle and benchmark baseline.
    Parameters, returns and raises as :func:`debayer`.
    """
    data = _as_cfa(cfa).astype(np.float64)
    ny, nx = data.shape
    codes = cfa_channel_masks(pattern, (ny, nx))
    out = np.empty((3, ny, nx), dtype=np.float32)
    for k in range(3):
        mask = (codes == k).astype(np.float64)
        vals = np.pad(data * mask, 1)
        cnt = np.pad(mask, 1)
        s = np.zeros((ny, nx))
        c = np.zeros((ny, nx))
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                s += vals[dy:dy + ny, dx:dx + nx]
                c += cnt[dy:dy + ny, dx:dx + nx]
        # Native sites are copied below, so only non-native windows matter.
        with np.errstate(invalid="ignore", divide="ignore"):
            plane = s / c
        out[k] = np.where(mask > 0, data, plane)
    return out


def find_isolated_hot_pixels_numpy(image: np.ndarray, sigma: float = 8.0,
                                   bayer_pattern: str | None = None,
                                   neighbour_ratio: float | None = None) -> NDArray[np.bool_]:
    """Vectorised numpy version of :func:`find_isolated_hot_pixels` (test oracle).

    Same parameters, result and errors; several full-frame passes.
    """
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    step = neighbour_step(bayer_pattern)
    if neighbour_ratio is None:
        neighbour_ratio = 0.1 if step == 2 else 0.2
    data = np.ascontiguousarray(image, dtype=np.float32)
    ny, nx = data.shape
    hot = np.zeros((ny, nx), dtype=bool)
    if ny < 3 or nx < 3:
        return hot
    level, noise = _plane_stats(data, step)
    candidates = np.zeros((ny, nx), dtype=bool)
    for py in range(step):
        for px in range(step):
            plane = data[py::step, px::step]
            with np.errstate(invalid="ignore"):
                candidates[py::step, px::step] = plane > level[py, px] + sigma * noise[py, px]
    ys, xs = np.nonzero(candidates)
    if ys.size == 0:
        return hot
    values = data[ys, xs].astype(np.float64)
    pix_level = level[ys % step, xs % step]
    pix_noise = noise[ys % step, xs % step]
    ring = _ring_values(data, ys, xs, step, None)
    has_ring = np.isfinite(ring).any(axis=1)
    ring_med = np.full(ys.size, np.nan)
    ring_med[has_ring] = np.nanmedian(ring[has_ring], axis=1)
    test1 = has_ring & (values - ring_med > sigma * pix_noise)
    # Adjacent pixels, each relative to its own colour's background.
    adjacent = _ring_values(data, ys, xs, 1, None)
    adj_level = np.empty_like(adjacent)
    for j, (dy, dx) in enumerate(_RING):
        adj_level[:, j] = level[(ys + dy) % step, (xs + dx) % step]
    adj_excess = np.nanmax(np.where(np.isfinite(adjacent), adjacent - adj_level, -np.inf), axis=1)
    test2 = adj_excess < neighbour_ratio * (values - pix_level)
    keep = test1 & test2
    hot[ys[keep], xs[keep]] = True
    return hot


def refine_numpy(img: NDArray[np.float32], x0: NDArray[np.float64], y0: NDArray[np.float64],
            sky: NDArray[np.float64], sigma_guess: float, factor: int,
            saturation_adu: float | None) -> dict[str, NDArray]:
    """The numpy oracle of :func:`livestack.pipeline.detect._refine` (batched einsum over
    ``(n, m, m)`` stamps): windowed centroids, per-star shapes, flux and junk cuts."""
    n = x0.size
    sig_w = max(sigma_guess, 0.7)
    radius = math.ceil(max(4.0 * sig_w + 0.5 * factor, 4.0))
    cx = np.rint(x0).astype(np.intp)
    cy = np.rint(y0).astype(np.intp)
    st, valid, gx, gy = detect._stamps(img, cx, cy, radius)
    raw = st.copy()
    st = np.where(valid, st - sky[:, None, None], 0.0)

    # Separable Gaussian windows: every windowed sum is a batched mat-vec product.
    xs = gx[:, 0, :]
    ys = gy[:, :, 0]
    # Re-centre on the light near the guess with a wide window (binning leaves up to
    # factor/2 px of error), then iterate the windowed centroid.
    xc = x0.astype(np.float64).copy()
    yc = y0.astype(np.float64).copy()
    for _ in range(3):
        s0, sx, sy = _window_sums(st, xs, ys, xc, yc, 1.5 * sig_w)[:3]
        good = s0 > 0
        xc = np.where(good, xc + sx / np.where(good, s0, 1.0), xc)
        yc = np.where(good, yc + sy / np.where(good, s0, 1.0), yc)
    xc, yc, conv = _windowed_centroid(st, xs, ys, xc, yc, sig_w)
    fwhm, elong = _deconvolved_shape(st, xs, ys, xc, yc, sig_w)
    # Match the window to the stars (sep's size guess from a binned frame is rough): a
    # window near the star's own sigma is the least noisy and the deconvolution is most
    # accurate for non-Gaussian (Moffat) profiles.
    typical = fwhm[conv & np.isfinite(fwhm)]
    if typical.size >= 3:
        sig_star = float(np.clip(np.median(typical) / detect._FWHM_PER_SIGMA, 0.7, 8.0))
        if not 0.8 < sig_star / sig_w < 1.25:
            if sig_star > sig_w:  # the stamps must hold the wider window
                radius = math.ceil(max(4.0 * sig_star + 0.5 * factor, 4.0))
                st, valid, gx, gy = detect._stamps(img, cx, cy, radius)
                raw = st.copy()
                st = np.where(valid, st - sky[:, None, None], 0.0)
                xs = gx[:, 0, :]
                ys = gy[:, :, 0]
            sig_w = sig_star
            xc, yc, conv = _windowed_centroid(st, xs, ys, xc, yc, sig_w)
            fwhm, elong = _deconvolved_shape(st, xs, ys, xc, yc, sig_w)

    # Aperture flux (radius 2 sigma_guess * 1.5 ~ 1.5 FWHM), background subtracted.
    r2 = (gx - xc[:, None, None]) ** 2 + (gy - yc[:, None, None]) ** 2
    ap = (r2 <= (3.0 * sig_w) ** 2) & valid
    flux = (st * ap).sum(axis=(1, 2))

    # Junk cuts.
    ix = np.clip(np.rint(xc).astype(np.intp) - cx + radius, 1, 2 * radius - 1)
    iy = np.clip(np.rint(yc).astype(np.intp) - cy + radius, 1, 2 * radius - 1)
    rows = np.arange(n)
    core = np.zeros(n)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            core += st[rows, iy + dy, ix + dx]
    peak = st.max(axis=(1, 2))
    hot = peak > 0.7 * np.maximum(core, 1e-12)  # one pixel holds most of the 3x3 core
    raw_peak = np.where(valid, raw, -np.inf).max(axis=(1, 2))
    if saturation_adu is not None:
        saturated = raw_peak >= saturation_adu
    else:
        near_top = (raw >= raw_peak[:, None, None] - 0.01 * np.abs(peak)[:, None, None]) & valid
        saturated = near_top.sum(axis=(1, 2)) >= 5
    edge = 3.0 * sig_w
    ny, nx = img.shape
    inside = (xc >= edge) & (yc >= edge) & (xc <= nx - 1 - edge) & (yc <= ny - 1 - edge)
    moved = np.hypot(xc - x0, yc - y0) <= 0.5 * factor + 2.0 * sig_w
    keep = (conv & ~hot & ~saturated & inside & moved & (flux > 0) & np.isfinite(xc)
            & np.isfinite(yc) & valid[:, radius, radius])
    # Unresolved pairs (merged at the binned scale) look much more elongated than the
    # field's typical star; relative, so a uniformly trailed frame keeps its stars.
    if np.count_nonzero(keep) >= 5:
        typical_el = float(np.median(elong[keep]))
        keep &= elong <= max(1.3 * typical_el, typical_el + 0.25)
    return {"xy": np.column_stack([xc, yc]), "flux": flux, "fwhm": fwhm, "elong": elong,
            "keep": keep, "radius": np.float64(radius)}


def _window_sums(st: NDArray[np.float64], xs: NDArray[np.float64], ys: NDArray[np.float64],
                 xc: NDArray[np.float64], yc: NDArray[np.float64], sigma: float,
                 second: bool = False) -> tuple[NDArray[np.float64], ...]:
    """Sums of ``w I``, ``w I dx``, ``w I dy`` (and ``dx^2``, ``dy^2``, ``dx dy`` terms).

    ``st`` (n, m, m) stamps indexed [star, y, x] (0 where invalid); ``xs``, ``ys`` (n, m)
    pixel coordinates of the stamp columns/rows; ``w`` a circular Gaussian of ``sigma``
    around (xc, yc), separable so each sum is a batched mat-vec product.
    """
    dx = xs - xc[:, None]
    dy = ys - yc[:, None]
    wx = np.exp(-0.5 * dx * dx / sigma**2)
    wy = np.exp(-0.5 * dy * dy / sigma**2)
    row0 = np.einsum("nyx,nx->ny", st, wx)  # sum over x of I wx, per row
    row1 = np.einsum("nyx,nx->ny", st, wx * dx)
    s0 = np.einsum("ny,ny->n", wy, row0)
    sx = np.einsum("ny,ny->n", wy, row1)
    sy = np.einsum("ny,ny->n", wy * dy, row0)
    if not second:
        return s0, sx, sy
    row2 = np.einsum("nyx,nx->ny", st, wx * dx * dx)
    sxx = np.einsum("ny,ny->n", wy, row2)
    syy = np.einsum("ny,ny->n", wy * dy * dy, row0)
    sxy = np.einsum("ny,ny->n", wy * dy, row1)
    return s0, sx, sy, sxx, syy, sxy


def _deconvolved_shape(st: NDArray[np.float64], xs: NDArray[np.float64],
                       ys: NDArray[np.float64], xc: NDArray[np.float64],
                       yc: NDArray[np.float64],
                       sigma: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-star FWHM (px) and elongation from windowed second moments.

    For a Gaussian star of covariance C the moments under a circular Gaussian window of
    variance s^2 are (C^-1 + I/s^2)^-1, so C follows in closed form; the pixel box
    (1/12 px^2 per axis) is removed before converting to FWHM.
    """
    s0, _sx, _sy, sxx, syy, sxy = _window_sums(st, xs, ys, xc, yc, sigma, second=True)
    safe = np.where(s0 > 0, s0, 1.0)
    mxx, myy, mxy = sxx / safe, syy / safe, sxy / safe
    det_m = np.maximum(mxx * myy - mxy**2, 1e-12)
    pxx = myy / det_m - 1.0 / sigma**2
    pyy = mxx / det_m - 1.0 / sigma**2
    pxy = -mxy / det_m
    det_p = pxx * pyy - pxy**2
    ok_p = (det_p > 1e-9) & (pxx > 0) & (pyy > 0)
    safe_p = np.where(ok_p, det_p, 1.0)
    cxx = np.maximum(np.where(ok_p, pyy / safe_p, mxx) - 1.0 / 12.0, 1e-4)
    cyy = np.maximum(np.where(ok_p, pxx / safe_p, myy) - 1.0 / 12.0, 1e-4)
    cxy = np.where(ok_p, -pxy / safe_p, mxy)
    tr = cxx + cyy
    disc = np.sqrt(np.maximum((cxx - cyy) ** 2 / 4.0 + cxy**2, 0.0))
    lam1 = np.maximum(tr / 2.0 + disc, 1e-6)
    lam2 = np.maximum(tr / 2.0 - disc, 1e-6)
    return detect._FWHM_PER_SIGMA * (lam1 * lam2) ** 0.25, np.sqrt(lam1 / lam2)


def _windowed_centroid(st: NDArray[np.float64], xs: NDArray[np.float64],
                       ys: NDArray[np.float64], xc: NDArray[np.float64],
                       yc: NDArray[np.float64], sigma: float,
                       n_iter: int = 16) -> tuple[NDArray[np.float64], NDArray[np.float64],
                                                  NDArray[np.bool_]]:
    """Gaussian-windowed centroid (SExtractor XWIN fixed point), vectorised over stars.

    Update ``x <- x + 2 sum(w I (x_i - x)) / sum(w I)`` (the factor 2 makes it converge in a
    few steps for Gaussian-like stars); converged stars drop out of the active set.
    Returns x, y and a "converged" flag (last step < 0.01 px).
    """
    x = xc.copy()
    y = yc.copy()
    step = np.full(x.shape, np.inf)
    active = np.arange(x.size)
    for _ in range(n_iter):
        if active.size == 0:
            break
        s0, sx, sy = _window_sums(st[active], xs[active], ys[active], x[active], y[active],
                                  sigma)
        good = s0 > 0
        safe = np.where(good, s0, 1.0)
        dx = np.where(good, np.clip(2.0 * sx / safe, -1.0, 1.0), 0.0)
        dy = np.where(good, np.clip(2.0 * sy / safe, -1.0, 1.0), 0.0)
        x[active] += dx
        y[active] += dy
        step[active] = np.where(good, np.hypot(dx, dy), np.inf)
        active = active[step[active] >= 1e-4]
    return x, y, step < 0.01

"""Plain numpy versions of numba-backed pipeline functions: test oracles and bench baselines.

Each computes the same result as its production counterpart with numpy temporaries (several
full-frame passes), so tests can compare the kernels against an independent formulation
and ``bench/`` can time the kernels against them.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

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

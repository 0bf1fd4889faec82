"""Hot/cold pixel handling. Pure: arrays in, arrays out.

Same-colour neighbours are the 8 pixels ``step`` away (the 3x3 ring for mono
data, the ring 2 px away for CFA data, where every colour repeats every 2 px).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from livestack.pipeline import kernels_cosmetic as kcos
from livestack.pipeline.debayer import normalize_pattern

_RING = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def neighbour_step(bayer_pattern: str | None) -> int:
    """Distance in pixels to the nearest same-colour neighbours: 2 for CFA data, else 1."""
    return 2 if normalize_pattern(bayer_pattern) is not None else 1


def _ring_values(image: np.ndarray, ys: np.ndarray, xs: np.ndarray, step: int,
                 exclude: np.ndarray | None) -> NDArray[np.float64]:
    """(k, 8) same-colour neighbour values of pixels (ys, xs); NaN where unusable."""
    ny, nx = image.shape
    out = np.full((ys.size, len(_RING)), np.nan)
    for j, (dy, dx) in enumerate(_RING):
        yy = ys + dy * step
        xx = xs + dx * step
        ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        vals = np.full(ys.size, np.nan)
        vals[ok] = image[yy[ok], xx[ok]]
        if exclude is not None:
            bad = np.zeros(ys.size, dtype=bool)
            bad[ok] = exclude[yy[ok], xx[ok]]
            vals[bad] = np.nan
        vals[~np.isfinite(vals)] = np.nan
        out[:, j] = vals
    return out


def sparse_nonzero(mask: np.ndarray) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """``np.nonzero`` for a sparse 2-D bool mask, scanning 8 bytes at a time.

    Parameters
    ----------
    mask : ndarray, shape (ny, nx), bool

    Returns
    -------
    ys, xs : ndarray of intp
        Row and column of the True pixels, in row-major order (as ``np.nonzero``).
    """
    flat = np.ascontiguousarray(mask, dtype=np.bool_).reshape(-1).view(np.uint8)
    n_words = flat.size // 8
    words = flat[: n_words * 8].view(np.uint64)
    hit = np.flatnonzero(words)
    idx = (hit[:, None] * 8 + np.arange(8)).ravel()
    idx = idx[flat[idx] != 0]
    tail = n_words * 8 + np.flatnonzero(flat[n_words * 8:])
    idx = np.concatenate([idx, tail]) if tail.size else idx
    ys, xs = np.divmod(idx, mask.shape[1])
    return ys.astype(np.intp), xs.astype(np.intp)


def correct_defects(image: np.ndarray, mask: np.ndarray,
                    bayer_pattern: str | None = None, *, copy: bool = True) -> NDArray[np.float32]:
    """Replace masked pixels by the median of their unmasked same-colour neighbours.

    Parameters
    ----------
    image : ndarray, shape (ny, nx) or (3, ny, nx)
        Calibrated frame (mono, CFA mosaic or RGB, corrected per channel); not modified.
    mask : ndarray, shape of ``image``, bool
        True at defect pixels.
    bayer_pattern : str or None
        CFA pattern; any valid pattern selects 2-px neighbours.
    copy : bool
        False corrects a float32 C-contiguous ``image`` in place (the caller owns it), which
        saves a full-frame copy on the per-frame path.

    Returns
    -------
    ndarray, shape of ``image``, float32
        A corrected copy (or ``image`` itself when ``copy=False`` and it is float32).
        A defect whose whole ring is masked or non-finite takes the median of the ring
        twice as far; failing that, the median of the finite pixels of its colour.

    Raises
    ------
    ValueError
        If ``mask`` and ``image`` shapes differ or ``image`` is neither 2-D nor RGB.
    """
    if image.ndim != 2 and not (image.ndim == 3 and image.shape[0] == 3):
        raise ValueError(f"image must be 2-D or (3, ny, nx), got shape {image.shape}")
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    out = np.array(image, dtype=np.float32, copy=True) if copy else \
        np.ascontiguousarray(image, dtype=np.float32)
    if out.ndim == 3:  # RGB: each channel on its own, 1-px rings (no CFA)
        for c in range(out.shape[0]):
            correct_defects(out[c], mask[c], None, copy=False)
        return out
    bad = np.asarray(mask, dtype=bool)
    ys, xs = sparse_nonzero(bad)
    if ys.size == 0:
        return out
    step = neighbour_step(bayer_pattern)
    # Non-finite neighbours are dropped where they are gathered (_ring_values), so no
    # full-frame isfinite pass is needed on this per-frame path.
    exclude = bad
    pending = np.ones(ys.size, dtype=bool)
    for factor in (1, 2):
        idx = np.flatnonzero(pending)
        if idx.size == 0:
            break
        ring = _ring_values(out, ys[idx], xs[idx], step * factor, exclude)
        usable = np.isfinite(ring).any(axis=1)
        if usable.any():
            medians = np.nanmedian(ring[usable], axis=1)
            out[ys[idx[usable]], xs[idx[usable]]] = medians
            pending[idx[usable]] = False
    idx = np.flatnonzero(pending)
    if idx.size:
        for py in range(step):
            for px in range(step):
                sel = idx[(ys[idx] % step == py) & (xs[idx] % step == px)]
                if sel.size == 0:
                    continue
                plane = out[py::step, px::step]
                good = plane[~exclude[py::step, px::step] & np.isfinite(plane)]
                fill = float(np.median(good)) if good.size else 0.0
                out[ys[sel], xs[sel]] = fill
    return out


def _robust_sigma(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 * MAD) of the finite values; (0, 0) if none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 0.0
    med = float(np.median(finite))
    return med, float(1.4826 * np.median(np.abs(finite - med)))


def find_isolated_hot_pixels(image: np.ndarray, sigma: float = 8.0,
                             bayer_pattern: str | None = None,
                             neighbour_ratio: float | None = None) -> NDArray[np.bool_]:
    """Find single hot pixels in a frame without darks, sparing star peaks.

    One numba pass (:func:`livestack.pipeline.kernels_cosmetic.isolated_hot`).
    A pixel is hot when both hold:

    1. it is more than ``sigma`` noise above its colour's background and above
       the median of its 8 same-colour neighbours (noise and background:
       robust sigma and median of its colour plane);
    2. it stands alone: every one of its 8 *adjacent* pixels (any colour) is
       less than ``neighbour_ratio`` times its excess above the background.

    A star with FWHM >= 1.5 px puts at least ~30% of its peak into the
    adjacent pixels (a Gaussian at 1 px: ``exp(-4 ln2 / 1.5**2) = 0.29``), so
    its peak fails test 2; a hot pixel's neighbours hold only noise.

    Parameters
    ----------
    image : ndarray, shape (ny, nx) or (3, ny, nx)
        Calibrated frame (mono, CFA mosaic, or RGB: searched per channel).
    sigma : float
        Detection threshold in noise sigma.
    bayer_pattern : str or None
        CFA pattern; selects 2-px same-colour rings and per-colour noise.
    neighbour_ratio : float or None
        Isolation threshold; default 0.2 for mono and 0.1 for CFA (a star's
        adjacent pixels are of other colours and may respond less to it).

    Returns
    -------
    ndarray, shape of ``image``, bool

    Raises
    ------
    ValueError
        If ``image`` is neither 2-D nor ``(3, ny, nx)``.
    """
    if image.ndim == 3 and image.shape[0] == 3:
        return np.stack([find_isolated_hot_pixels(plane, sigma, None, neighbour_ratio)
                         for plane in image])
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D or (3, ny, nx), got shape {image.shape}")

    step = neighbour_step(bayer_pattern)
    if neighbour_ratio is None:
        neighbour_ratio = 0.1 if step == 2 else 0.2
    data = np.ascontiguousarray(image, dtype=np.float32)
    level, noise = _plane_stats(data, step)
    hot = np.zeros(data.shape, dtype=bool)
    if data.shape[0] >= 3 and data.shape[1] >= 3:
        kcos.isolated_hot(data, level, noise, float(sigma), float(neighbour_ratio), step,
                        hot.view(np.uint8))
    return hot


def _plane_stats(data: np.ndarray, step: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per colour plane (``step`` x ``step``): background median and robust sigma.

    Estimated from a subsample of about 40 000 pixels per plane. Planes
    without spread get an infinite sigma so nothing in them is flagged.
    """
    ny, nx = data.shape
    level = np.zeros((step, step))
    noise = np.full((step, step), np.inf)
    sub = max(1, int(np.sqrt(ny * nx / (step * step) / 40_000)))
    for py in range(step):
        for px in range(step):
            med, sig = _robust_sigma(data[py::step, px::step][::sub, ::sub])
            level[py, px] = med
            if sig > 0:
                noise[py, px] = sig
    return level, noise



"""Optional removal of a smooth sky gradient (light pollution, moon glow, amp glow).

Model, on a copy binned so one mesh is ~32 binned pixels:

1. the sky level of every ``mesh_px`` box: 3-sigma-clipped median of its unmasked pixels
   (stars and other sources are masked after a first pass: pixels 3 sigma above a first
   model, grown by one binned pixel; non-finite pixels are always masked);
2. a polynomial surface (degree up to 4, fewer with few meshes) fitted to the mesh
   levels; meshes whose residual from it stands out of their 3x3 neighbourhood (a
   galaxy, a bright star's halo) are replaced by the neighbourhood median. A median
   filter on the raw mesh levels (sep.Background's) flattens the curvature of vignetting;
   this keeps it (measured: 3-4x smaller residuals on a vignetted test frame);
3. the polynomial plus a bicubic spline of the cleaned mesh residuals (held flat beyond
   the outermost mesh centres, where the polynomial extrapolates), bilinearly upsampled
   to full resolution (the model is smooth on the mesh scale, so that is exact to well
   below the noise).

We chose meshes over a global low-order polynomial because gradients seen at the
telescope are not polynomial: vignetting without flats falls off steeply in the corners
and amp glow is a local bump, which a degree-2/3 surface smears over the whole frame.
Structures larger than a few meshes (a big nebula) are partly taken as sky, so the mesh is
coarse by default and the step is off by default in the pipeline. ``model -
median(model)`` is subtracted, so the frame keeps its overall sky level.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.interpolate import RectBivariateSpline
from scipy.ndimage import median_filter

from livestack.pipeline import kernels_binning as kb

#: Binned pixels per mesh box (the binning factor is chosen to get about this).
_MESH_BINNED_PX = 32
#: A mesh needs this fraction of unmasked pixels to be measured.
_MIN_MESH_FILL = 0.3


def subtract_gradient(image: NDArray[np.float32], mesh_px: int = 256,
                      mask_stars: bool = True) -> NDArray[np.float32]:
    """Return ``image`` minus its smooth sky variation (the median sky level is kept).

    Parameters
    ----------
    image : ndarray, shape (ny, nx), float32
        Calibrated frame (one plane; call per channel for colour). NaN/inf allowed: they
        are ignored by the model and stay as they are in the output.
    mesh_px : int
        Mesh box size in full-resolution pixels (>= 16; at most half the frame's short
        side is used). Structures smaller than a few meshes are kept, larger ones are
        treated as sky.
    mask_stars : bool
        Mask sources (3 sigma above a first sky model, grown by one binned pixel) before
        measuring the sky.

    Returns
    -------
    ndarray, shape (ny, nx), float32
        A new array; ``image`` is not modified. An image with no finite pixel is returned
        as a copy.

    Raises
    ------
    ValueError
        If ``image`` is not 2-D or ``mesh_px < 16``.
    """

    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"subtract_gradient: image must be 2-D, got shape {arr.shape}")
    if mesh_px < 16:
        raise ValueError(f"subtract_gradient: mesh_px must be >= 16, got {mesh_px}")
    img = np.ascontiguousarray(arr, dtype=np.float32)
    ny, nx = img.shape
    factor = max(1, min(mesh_px // _MESH_BINNED_PX, min(ny, nx) // 16))
    if factor > 1:
        binned = np.empty((ny // factor, nx // factor), dtype=np.float32)
        kb.bin_mean_kernel(img, factor, binned)
    else:
        binned = img
    data = binned.astype(np.float64)
    mask = ~np.isfinite(data)
    if mask.all():
        return img.copy()
    # At least 2x2 meshes, so a frame smaller than the mesh still gets a plane.
    box = max(4, min(round(mesh_px / factor), min(binned.shape) // 2))
    model = _sky_model(data, mask, box)
    if mask_stars:
        resid = np.where(mask, 0.0, data - model)
        sigma = 1.4826 * float(np.median(np.abs(resid[~mask])))
        if sigma > 0:
            src = resid > 3.0 * sigma
            grown = src.copy()
            grown[1:, :] |= src[:-1, :]
            grown[:-1, :] |= src[1:, :]
            grown[:, 1:] |= src[:, :-1]
            grown[:, :-1] |= src[:, 1:]
            model = _sky_model(data, mask | grown, box)
    model -= float(np.median(model))
    return (img - _upsample_linear(model, factor, (ny, nx))).astype(np.float32)


def _mesh_edges(n: int, box: int) -> NDArray[np.intp]:
    count = max(1, round(n / box))
    return np.round(np.linspace(0, n, count + 1)).astype(np.intp)


def _sky_model(data: NDArray[np.float64], mask: NDArray[np.bool_],
               box: int) -> NDArray[np.float64]:
    """Smooth sky model of ``data`` (binned), ignoring ``mask``; same shape as ``data``."""

    nyb, nxb = data.shape
    ey = _mesh_edges(nyb, box)
    ex = _mesh_edges(nxb, box)
    levels = np.full((ey.size - 1, ex.size - 1), np.nan)
    for i in range(ey.size - 1):
        for j in range(ex.size - 1):
            block = data[ey[i]:ey[i + 1], ex[j]:ex[j + 1]]
            keep = ~mask[ey[i]:ey[i + 1], ex[j]:ex[j + 1]]
            if keep.mean() >= _MIN_MESH_FILL:
                levels[i, j] = _clipped_median(block[keep])
    yc = (ey[:-1] + ey[1:] - 1) / 2.0
    xc = (ex[:-1] + ex[1:] - 1) / 2.0
    good = np.isfinite(levels)
    if not good.any():
        vals = data[~mask]
        return np.full(data.shape, float(np.median(vals)) if vals.size else 0.0)
    # Polynomial base surface: degree 4 (enough for cos^4-like vignetting) when the mesh
    # grid supports it, lower with few meshes.
    n_good = int(good.sum())
    degree = 4 if n_good >= 40 else 3 if n_good >= 20 else 2 if n_good >= 12 else \
        1 if n_good >= 4 else 0
    u = (xc / max(nxb - 1, 1)) * 2.0 - 1.0
    v = (yc / max(nyb - 1, 1)) * 2.0 - 1.0
    gv, gu = np.meshgrid(v, u, indexing="ij")
    powers = [(a, b) for total in range(degree + 1) for a in range(total + 1)
              for b in [total - a]]
    design = np.stack([gu[good] ** a * gv[good] ** b for a, b in powers], axis=1)
    coef, *_ = np.linalg.lstsq(design, levels[good], rcond=None)
    base = np.zeros_like(gu)
    for c, (a, b) in zip(coef, powers, strict=True):
        base += c * gu**a * gv**b
    resid = np.where(good, levels - base, 0.0)
    if min(resid.shape) >= 3:
        # Replace only meshes that stand out from their 3x3 neighbourhood (a galaxy, a
        # halo); filtering every mesh would flatten real structure such as amp glow.
        med = median_filter(resid, size=3, mode="nearest")
        diff = resid - med
        scatter = 1.4826 * float(np.median(np.abs(diff)))
        outlier = np.abs(diff) > 4.0 * max(scatter, 1e-12)
        resid = np.where(outlier | ~good, med, resid)
    # Full-resolution (binned) model: the polynomial everywhere, plus a bicubic spline of
    # the mesh residuals held flat beyond the outermost mesh centres (the polynomial, not
    # the spline, extrapolates into the frame's edge strip).
    pv, pu = np.meshgrid(np.arange(nyb) / max(nyb - 1, 1) * 2.0 - 1.0,
                         np.arange(nxb) / max(nxb - 1, 1) * 2.0 - 1.0, indexing="ij")
    model = np.zeros(data.shape)
    for c, (a, b) in zip(coef, powers, strict=True):
        model += c * pu**a * pv**b
    ky = min(3, resid.shape[0] - 1)
    kx = min(3, resid.shape[1] - 1)
    if ky >= 1 and kx >= 1:
        spline = RectBivariateSpline(yc, xc, resid, kx=ky, ky=kx)
        ys = np.clip(np.arange(nyb, dtype=np.float64), yc[0], yc[-1])
        xs = np.clip(np.arange(nxb, dtype=np.float64), xc[0], xc[-1])
        model += spline(ys, xs)
    return model


def _clipped_median(values: NDArray[np.float64]) -> float:
    """Median after three passes of 3-sigma (MAD) clipping."""
    vals = values
    med = float(np.median(vals))
    for _ in range(3):
        sigma = 1.4826 * float(np.median(np.abs(vals - med)))
        if sigma <= 0:
            break
        kept = vals[np.abs(vals - med) <= 3.0 * sigma]
        if kept.size == vals.size or kept.size < 10:
            break
        vals = kept
        med = float(np.median(vals))
    return med


def _upsample_linear(model: NDArray[np.float64], factor: int,
                     shape: tuple[int, int]) -> NDArray[np.float32]:
    """Bilinear interpolation of a binned map back to full resolution.

    Binned pixel ``i`` is centred on full-resolution coordinate ``factor*i + (factor-1)/2``;
    beyond the outermost centres the map is extended flat.
    """
    ny, nx = shape
    if model.shape == shape:
        return model.astype(np.float32)

    def axis(n_full: int, n_binned: int) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
        pos = (np.arange(n_full) - (factor - 1) / 2.0) / factor
        pos = np.clip(pos, 0.0, n_binned - 1.0)
        i0 = np.minimum(np.floor(pos).astype(np.intp), max(n_binned - 2, 0))
        return i0, pos - i0

    iy, wy = axis(ny, model.shape[0])
    ix, wx = axis(nx, model.shape[1])
    iy1 = np.minimum(iy + 1, model.shape[0] - 1)
    ix1 = np.minimum(ix + 1, model.shape[1] - 1)
    rows = (model[:, ix] * (1.0 - wx) + model[:, ix1] * wx).astype(np.float32)
    out = rows[iy] * (1.0 - wy[:, None]).astype(np.float32)
    out += rows[iy1] * wy[:, None].astype(np.float32)
    return out

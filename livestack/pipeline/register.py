"""Register a frame's stars to the stack's reference: frame -> reference transforms.

Three steps (see :meth:`Registrar.register`):

1. **Triangle matching** on the brightest ``max_control_points`` stars. Each star and its
   four nearest neighbours give ten triangles; a triangle's invariants are its side ratios
   ``(L3/L2, L2/L1)`` (the same invariants as astroalign, rotation/scale/translation
   invariant, so meridian flips and field rotation are handled). The reference's
   triangles, invariants and KD-tree are built once in the constructor. Candidate triangle
   pairs (closest invariants first) each give a similarity transform; the first whose
   prediction lands most frame control points on reference control points wins
   (deterministic, unlike astroalign's unseeded RANSAC). If our matcher finds nothing,
   ``astroalign.find_transform`` gets a second chance on the same point lists.
2. **Least-squares refit** of the configured model on *all* stars paired by nearest
   neighbour within ``match_radius_px`` under the current transform, with iterative
   sigma clipping of the residuals and re-pairing.
3. **Phase-correlation fallback** for too few stars or no match: a pure shift from a
   binned, Hann-windowed, whitened and low-passed cross-power spectrum against the cached
   reference spectrum, accepted only if the peak stands out (``min_pc_peak_ratio`` times
   the next peak), then refined on any stars it pairs up.

Otherwise :class:`~livestack.errors.RegistrationError` with reason ``"too_few_stars"``
or ``"no_match"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from livestack.errors import RegistrationError
from livestack.pipeline.ranges import rng
from livestack.pipeline.types import StarList, Transform
from livestack.reasons import Reason

MODELS = ("translation", "similarity", "affine")
_MIN_POINTS = {"translation": 1, "similarity": 2, "affine": 3}
#: Combinations of 3 among a star's 5 nearest neighbours (itself first).
_TRIPLETS_5 = np.array([(a, b, c) for a in range(5) for b in range(a + 1, 5)
                        for c in range(b + 1, 5)], dtype=np.intp)


@dataclass(frozen=True)
class RegisterConfig:
    """Registration settings.

    Attributes
    ----------
    model : str
        ``"translation"``, ``"similarity"`` (rotation + scale + shift) or ``"affine"``.
    max_control_points : int
        Brightest stars used for triangle matching.
    match_radius_px : float
        Pairing radius for the least-squares refit (and the triangle-hypothesis check).
    min_matches : int
        Fewest paired stars for a star-based transform.
    phase_correlation_fallback : bool
        Try phase correlation when the stars cannot give a transform.
    max_scale_change : float
        Triangle hypotheses whose scale differs from 1 by more than this are discarded
        (frames of one stack share the camera and optics).
    invariant_tolerance : float
        Search radius in triangle-invariant space.
    clip_sigma : float
        Residual clipping threshold of the refit, in robust sigmas.
    min_pc_peak_ratio : float
        Significance test of the phase-correlation peak: its height above the surface's
        mean must be at least this multiple of the second-highest peak's (outside 3 px of
        the first). True shifts give 20-100, pure noise 1.0-1.6.
    pc_max_size_px : int
        The phase-correlation image is binned so its longer side is at most this.
    """

    model: str = "similarity"
    max_control_points: int = field(default=50, metadata=rng(3, 10_000))
    match_radius_px: float = field(default=3.0, metadata=rng(0.0, 1000.0, lo_open=True))
    min_matches: int = field(default=6, metadata=rng(1, 10_000))
    phase_correlation_fallback: bool = True
    max_scale_change: float = field(default=0.2, metadata=rng(0.0, 1.0, lo_open=True))
    invariant_tolerance: float = field(default=0.1, metadata=rng(0.0, 10.0, lo_open=True))
    clip_sigma: float = field(default=3.0, metadata=rng(0.0, 100.0, lo_open=True))
    min_pc_peak_ratio: float = field(default=3.0, metadata=rng(1.0, 1e6, lo_open=True))
    pc_max_size_px: int = field(default=1024, metadata=rng(64, 65_536))

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.max_control_points < 3:
            raise ValueError(f"max_control_points must be >= 3, got {self.max_control_points}")
        if self.match_radius_px <= 0:
            raise ValueError(f"match_radius_px must be > 0, got {self.match_radius_px}")
        if self.min_matches < _MIN_POINTS[self.model]:
            raise ValueError(f"min_matches must be >= {_MIN_POINTS[self.model]} for the "
                             f"{self.model} model, got {self.min_matches}")
        if not 0 < self.max_scale_change < 1:
            raise ValueError(f"max_scale_change must be in (0, 1), got {self.max_scale_change}")
        if self.min_pc_peak_ratio <= 1.0:
            raise ValueError(f"min_pc_peak_ratio must be > 1, got {self.min_pc_peak_ratio}")
        if self.invariant_tolerance <= 0 or self.clip_sigma <= 0:
            raise ValueError("invariant_tolerance and clip_sigma must be > 0")
        if self.pc_max_size_px < 64:
            raise ValueError(f"pc_max_size_px must be >= 64, got {self.pc_max_size_px}")


# --------------------------------------------------------------------------- fitting


def fit_transform(src_xy: NDArray[np.float64], dst_xy: NDArray[np.float64], model: str,
                  weights: NDArray[np.float64] | None = None) -> NDArray[np.float64]:
    """Least-squares transform mapping ``src_xy`` onto ``dst_xy``.

    Parameters
    ----------
    src_xy, dst_xy : ndarray, shape (n, 2)
        Corresponding points (pixels).
    model : str
        ``"translation"``, ``"similarity"`` (Umeyama: rotation, isotropic scale, shift;
        never a reflection) or ``"affine"``.
    weights : ndarray, shape (n,), optional
        Non-negative weights (default: all 1).

    Returns
    -------
    ndarray, shape (2, 3), float64
        ``[[a, b, tx], [c, d, ty]]`` with ``dst ~ A @ src + t``.

    Raises
    ------
    ValueError
        Unknown model, mismatched shapes, too few points (1/2/3 for
        translation/similarity/affine) or degenerate points.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    src = np.asarray(src_xy, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst_xy, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape:
        raise ValueError(f"src and dst shapes differ: {src.shape} vs {dst.shape}")
    n = src.shape[0]
    if n < _MIN_POINTS[model]:
        raise ValueError(f"{model} needs >= {_MIN_POINTS[model]} points, got {n}")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n or np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError("weights must be n finite non-negative values with a positive sum")
    w = w / w.sum()
    mu_s = w @ src
    mu_d = w @ dst
    if model == "translation":
        t = mu_d - mu_s
        return np.array([[1.0, 0.0, t[0]], [0.0, 1.0, t[1]]])
    sc = src - mu_s
    dc = dst - mu_d
    if model == "similarity":
        var_s = float(w @ np.sum(sc * sc, axis=1))
        if var_s <= 1e-18:
            raise ValueError("similarity fit needs at least two distinct points")
        cov = (dc * w[:, None]).T @ sc  # 2x2, sum w * d s^T
        u, sv, vt = np.linalg.svd(cov)
        corr = np.diag([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) > 0 else -1.0])
        rot = u @ corr @ vt
        scale = float(np.sum(sv * np.diag(corr))) / var_s
        a = scale * rot
        t = mu_d - a @ mu_s
        return np.hstack([a, t[:, None]])
    # affine: weighted least squares on centred coordinates
    sw = sc * np.sqrt(w)[:, None]
    dw = dc * np.sqrt(w)[:, None]
    if np.linalg.matrix_rank(sw) < 2:
        raise ValueError("affine fit needs at least three non-collinear points")
    sol, *_ = np.linalg.lstsq(sw, dw, rcond=None)  # (2, 2): dc ~ sc @ sol
    a = sol.T
    t = mu_d - a @ mu_s
    return np.hstack([a, t[:, None]])


def _apply(matrix: NDArray[np.float64], xy: NDArray[np.float64]) -> NDArray[np.float64]:
    return xy @ matrix[:, :2].T + matrix[:, 2]


# --------------------------------------------------------------------------- triangles


@dataclass(frozen=True)
class _Triangles:
    """Triangles of a point list: vertex indices ordered by opposite side, invariants."""

    vertices: NDArray[np.intp]  # (m, 3)
    invariants: NDArray[np.float64]  # (m, 2)


def _triangles(xy: NDArray[np.float64]) -> _Triangles:
    """Triangles of each point with its nearest neighbours and their invariants.

    Vertices are ordered so that vertex k is opposite the k-th shortest side, which makes
    corresponding vertices of similar triangles line up.
    """
    from scipy.spatial import cKDTree

    n = xy.shape[0]
    if n < 3:
        return _Triangles(np.zeros((0, 3), np.intp), np.zeros((0, 2)))
    k = min(n, 5)
    _, nn = cKDTree(xy).query(xy, k=k)
    nn = np.asarray(nn, dtype=np.intp).reshape(n, k)
    combos = _TRIPLETS_5[np.all(_TRIPLETS_5 < k, axis=1)]
    tri = nn[:, combos].reshape(-1, 3)
    tri = np.unique(np.sort(tri, axis=1), axis=0)
    p = xy[tri]  # (m, 3, 2)
    opp = np.stack([np.linalg.norm(p[:, 1] - p[:, 2], axis=1),
                    np.linalg.norm(p[:, 0] - p[:, 2], axis=1),
                    np.linalg.norm(p[:, 0] - p[:, 1], axis=1)], axis=1)
    order = np.argsort(opp, axis=1, kind="stable")
    sides = np.take_along_axis(opp, order, axis=1)
    verts = np.take_along_axis(tri, order, axis=1)
    good = sides[:, 0] > 1.0  # sub-pixel sides carry no shape information
    sides = sides[good]
    verts = verts[good]
    inv = np.stack([sides[:, 2] / sides[:, 1], sides[:, 1] / sides[:, 0]], axis=1)
    return _Triangles(verts, inv)


def _similarity_batch(src: NDArray[np.float64],
                      dst: NDArray[np.float64]) -> NDArray[np.float64]:
    """Least-squares similarity for many small point sets at once.

    ``src``, ``dst``: (h, k, 2). Returns (h, 2, 3). Uses complex numbers: the map is
    ``z -> a z + b`` with complex ``a`` (rotation and scale), which excludes reflections.
    """
    zs = src[..., 0] + 1j * src[..., 1]
    zd = dst[..., 0] + 1j * dst[..., 1]
    ms = zs.mean(axis=1, keepdims=True)
    md = zd.mean(axis=1, keepdims=True)
    cs = zs - ms
    cd = zd - md
    denom = np.sum(np.abs(cs) ** 2, axis=1)
    a = np.sum(np.conj(cs) * cd, axis=1) / np.where(denom > 0, denom, 1.0)
    b = md[:, 0] - a * ms[:, 0]
    out = np.empty((src.shape[0], 2, 3))
    out[:, 0, 0] = a.real
    out[:, 0, 1] = -a.imag
    out[:, 1, 0] = a.imag
    out[:, 1, 1] = a.real
    out[:, 0, 2] = b.real
    out[:, 1, 2] = b.imag
    return out


# --------------------------------------------------------------------------- phase correlation


@dataclass(frozen=True)
class _PhaseReference:
    """Cached spectrum of the reference for phase correlation."""

    factor: int
    shape: tuple[int, int]  # binned shape
    window: NDArray[np.float64]
    spectrum: NDArray[np.complex128]
    lowpass: NDArray[np.float64]


def _pc_prepare(image: NDArray[np.float32], factor: int,
                window: NDArray[np.float64] | None) -> tuple[NDArray[np.float64],
                                                            NDArray[np.float64]]:
    """Bin, remove the sky, zero non-finite pixels, clip and window an image."""
    from livestack.pipeline import kernels_binning as kb

    img = np.ascontiguousarray(image, dtype=np.float32)
    if factor > 1:
        binned = np.empty((img.shape[0] // factor, img.shape[1] // factor), dtype=np.float32)
        kb.bin_mean_kernel(img, factor, binned)
    else:
        binned = img
    data = binned.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        data = np.zeros_like(data)
    else:
        vals = data[finite]
        med = float(np.median(vals))
        mad = float(np.median(np.abs(vals - med))) * 1.4826
        data = np.where(finite, data - med, 0.0)
        # Only the bright, compact structure (stars) should correlate: cut the faint sky
        # structure (gradients, noise) and cap the brightest pixels so one star cannot
        # dominate.
        if mad > 0:
            data = np.clip(data, 0.0, 200.0 * mad)
            data = np.where(data > 3.0 * mad, data, 0.0)
    if window is None:
        wy = np.hanning(data.shape[0])
        wx = np.hanning(data.shape[1])
        window = np.outer(wy, wx)
    return data * window, window


@dataclass(frozen=True)
class PhaseImage:
    """A reference luminance binned as the phase-correlation fallback uses it.

    All the registrar needs of the reference image: a stack keeps this (about 2 MB at
    26 MP with the default 1024 px) instead of the full-resolution luminance (104 MB).

    Attributes
    ----------
    binned : ndarray, shape (ny // factor, nx // factor), float32
        Block means of the luminance (ADU).
    factor : int
        Block size in pixels.
    shape : tuple of int
        The full-resolution ``(ny, nx)``.
    """

    binned: NDArray[np.float32]
    factor: int
    shape: tuple[int, int]


def phase_image(image: NDArray[np.float32], config: RegisterConfig) -> PhaseImage:
    """Bin a reference luminance for :class:`Registrar` (see :class:`PhaseImage`).

    Parameters
    ----------
    image : ndarray, shape (ny, nx), float32
    config : RegisterConfig
        ``pc_max_size_px`` sets the block size.

    Raises
    ------
    ValueError
        ``image`` is not 2-D.
    """
    from livestack.pipeline import kernels_binning as kb

    img = np.ascontiguousarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"reference_image must be 2-D, got shape {img.shape}")
    ny, nx = img.shape
    factor = max(1, math.ceil(max(ny, nx) / config.pc_max_size_px))
    if factor > 1:
        binned = np.empty((ny // factor, nx // factor), dtype=np.float32)
        kb.bin_mean_kernel(img, factor, binned)
    else:
        binned = img.copy()
    return PhaseImage(binned, factor, (int(ny), int(nx)))


def _phase_reference(image: PhaseImage) -> _PhaseReference:
    from scipy import fft

    # _pc_prepare of the binned image with factor 1 is what it does to the full image
    # with ``image.factor``: it bins with the same kernel first.
    factor = image.factor
    data, window = _pc_prepare(image.binned, 1, None)
    spec = fft.rfft2(data)
    ky = fft.fftfreq(data.shape[0])[:, None]
    kx = fft.rfftfreq(data.shape[1])[None, :]
    # Gaussian low-pass (sigma ~ 1 binned px) against pixel noise and hot pixels.
    lowpass = np.exp(-2.0 * (math.pi**2) * (kx**2 + ky**2) * 1.0**2)
    return _PhaseReference(factor, data.shape, window, spec, lowpass)


def _phase_correlate(ref: _PhaseReference,
                     image: NDArray[np.float32]) -> tuple[float, float, float]:
    """Shift ``(dx, dy)`` (full-res px) with ``ref(x + d) ~ image(x)``, and the peak ratio."""
    from scipy import fft

    data, _ = _pc_prepare(image, ref.factor, ref.window)
    if data.shape != ref.shape:
        raise ValueError(f"phase correlation: image binned shape {data.shape} differs from "
                         f"the reference {ref.shape}")
    spec = fft.rfft2(data)
    cross = ref.spectrum * np.conj(spec)
    cross /= np.maximum(np.abs(cross), 1e-30)
    corr = fft.irfft2(cross * ref.lowpass, s=data.shape)
    iy, ix = np.unravel_index(int(np.argmax(corr)), corr.shape)
    peak = float(corr[iy, ix])
    mean = float(corr.mean())
    ny, nx = corr.shape
    others = corr.copy()
    others[np.ix_(np.arange(iy - 3, iy + 4) % ny, np.arange(ix - 3, ix + 4) % nx)] = -np.inf
    second = float(others.max())
    if second > mean:
        ratio = (peak - mean) / (second - mean)
    else:  # a flat surface (e.g. an all-NaN frame) carries no shift at all
        ratio = float("inf") if peak > mean else 0.0

    def parabola(m1: float, c0: float, p1: float) -> float:
        den = m1 - 2.0 * c0 + p1
        return 0.0 if den >= 0 else 0.5 * (m1 - p1) / den

    sub_y = parabola(corr[(iy - 1) % ny, ix], peak, corr[(iy + 1) % ny, ix])
    sub_x = parabola(corr[iy, (ix - 1) % nx], peak, corr[iy, (ix + 1) % nx])
    sy = iy + sub_y
    sx = ix + sub_x
    if sy > ny / 2:
        sy -= ny
    if sx > nx / 2:
        sx -= nx
    f = ref.factor
    return sx * f, sy * f, ratio


# --------------------------------------------------------------------------- registrar


class Registrar:
    """Aligns frames to one reference; caches everything derived from the reference.

    Parameters
    ----------
    reference_stars : StarList
        The reference frame's stars (brightest first).
    reference_image : ndarray, shape (ny, nx), float32, PhaseImage, or None
        The reference luminance (or its :func:`phase_image`), needed only for the
        phase-correlation fallback.
    config : RegisterConfig
    """

    def __init__(self, reference_stars: StarList,
                 reference_image: NDArray[np.float32] | PhaseImage | None,
                 config: RegisterConfig) -> None:
        from scipy.spatial import cKDTree

        self.config = config
        ref_xy = np.asarray(reference_stars.xy, dtype=np.float64).reshape(-1, 2)
        self._ref_xy = ref_xy[np.all(np.isfinite(ref_xy), axis=1)]
        self._ref_tree = cKDTree(self._ref_xy) if len(self._ref_xy) else None
        self._ref_cp = self._ref_xy[: config.max_control_points]
        self._ref_cp_tree = cKDTree(self._ref_cp) if len(self._ref_cp) else None
        self._ref_tri = _triangles(self._ref_cp)
        self._ref_inv_tree = (cKDTree(self._ref_tri.invariants)
                              if len(self._ref_tri.invariants) else None)
        self._ref_shape: tuple[int, int] | None = None
        self._pc: _PhaseReference | None = None
        if reference_image is not None:
            phase = (reference_image if isinstance(reference_image, PhaseImage)
                     else phase_image(reference_image, config))
            self._ref_shape = phase.shape
            if config.phase_correlation_fallback:
                self._pc = _phase_reference(phase)

    @property
    def n_reference_stars(self) -> int:
        """Number of reference stars."""
        return int(self._ref_xy.shape[0])

    def register(self, stars: StarList, image: NDArray[np.float32] | None = None) -> Transform:
        """Find the transform from this frame to the reference.

        Parameters
        ----------
        stars : StarList
            The frame's stars (brightest first, full-resolution pixels).
        image : ndarray, shape (ny, nx), float32, optional
            The frame's luminance, used only by the phase-correlation fallback.

        Returns
        -------
        Transform
            Frame -> reference, with ``n_matches``, ``rms_px`` and ``method``
            (``"triangles"`` or ``"phase_correlation"``).

        Raises
        ------
        RegistrationError
            ``reason="too_few_stars"`` when the frame (or reference) has too few stars and
            no fallback succeeded, ``reason="no_match"`` when stars were there but no
            consistent transform (and no fallback) was found.
        """
        cfg = self.config
        xy = np.asarray(stars.xy, dtype=np.float64).reshape(-1, 2)
        xy = xy[np.all(np.isfinite(xy), axis=1)]
        n = xy.shape[0]
        n_ref = self._ref_xy.shape[0]
        detail = ""
        if n >= 3 and n_ref >= 3:
            init = self._triangle_match(xy[: cfg.max_control_points])
            if init is None:
                init = self._astroalign_match(xy[: cfg.max_control_points])
            if init is not None:
                fitted = self._refine(init, xy, cfg.model)
                if fitted is not None and fitted[1] >= cfg.min_matches:
                    matrix, n_match, rms = fitted
                    if self._plausible(matrix):
                        return Transform(matrix, cfg.model, n_match, rms, "triangles")
                detail = (f"; the best triangle match paired only "
                          f"{0 if fitted is None else fitted[1]} stars (need {cfg.min_matches})")
            else:
                detail = "; no consistent triangle match"
        pc_note = ""
        if cfg.phase_correlation_fallback and image is not None and self._pc is not None:
            result, pc_note = self._phase_fallback(xy, image)
            if result is not None:
                return result
        reason = (Reason.TOO_FEW_STARS if min(n, n_ref) < max(3, cfg.min_matches)
                  else Reason.NO_MATCH)
        raise RegistrationError(
            reason,
            f"cannot register: {n} stars in the frame, {n_ref} in the reference{detail}"
            f"{pc_note}",
        )

    # ------------------------------------------------------------------ internals

    def _plausible(self, matrix: NDArray[np.float64]) -> bool:
        det = float(np.linalg.det(matrix[:, :2]))
        if det <= 0:  # a reflection is never a real frame-to-frame motion
            return False
        scale = math.sqrt(det)
        return abs(scale - 1.0) <= self.config.max_scale_change

    def _triangle_match(self, cp: NDArray[np.float64]) -> NDArray[np.float64] | None:
        """Best similarity from triangle correspondences, or None."""
        if self._ref_inv_tree is None or self._ref_cp_tree is None:
            return None
        tri = _triangles(cp)
        if len(tri.invariants) == 0:
            return None
        cfg = self.config
        dist, idx = self._ref_inv_tree.query(tri.invariants, k=8,
                                             distance_upper_bound=cfg.invariant_tolerance)
        hit = np.isfinite(dist)
        f_idx = np.nonzero(hit)[0]
        r_idx = idx[hit]
        d = dist[hit]
        if f_idx.size == 0:
            return None
        order = np.argsort(d, kind="stable")
        f_idx = f_idx[order]
        r_idx = r_idx[order]
        src = cp[tri.vertices[f_idx]]  # (h, 3, 2)
        dst = self._ref_cp[self._ref_tri.vertices[r_idx]]
        hyps = _similarity_batch(src, dst)
        scale = np.hypot(hyps[:, 0, 0], hyps[:, 1, 0])
        hyps = hyps[np.abs(scale - 1.0) <= cfg.max_scale_change]
        if hyps.shape[0] == 0:
            return None
        n_cp = cp.shape[0]
        n_common = min(n_cp, self._ref_cp.shape[0])
        enough = max(4, min(cfg.min_matches, n_common), int(0.5 * n_common))
        best_count = 0
        best: NDArray[np.float64] | None = None
        batch = 256
        for start in range(0, min(hyps.shape[0], 8192), batch):
            h = hyps[start:start + batch]
            pred = np.einsum("hij,nj->hni", h[:, :, :2], cp) + h[:, None, :, 2]
            dd, _ = self._ref_cp_tree.query(pred.reshape(-1, 2),
                                            distance_upper_bound=cfg.match_radius_px)
            counts = np.isfinite(dd).reshape(h.shape[0], n_cp).sum(axis=1)
            k = int(np.argmax(counts))
            if counts[k] > best_count:
                best_count = int(counts[k])
                best = h[k]
            if best_count >= enough:
                break
        if best is None or best_count < 4:
            return None
        return best

    def _astroalign_match(self, cp: NDArray[np.float64]) -> NDArray[np.float64] | None:
        """Second chance: astroalign's own triangle matcher on the control points."""
        import astroalign

        if cp.shape[0] < 3 or self._ref_cp.shape[0] < 3:
            return None
        try:
            # Degenerate triangles (duplicate points) divide by zero inside astroalign.
            with np.errstate(divide="ignore", invalid="ignore"):
                tf, _ = astroalign.find_transform(
                    cp, self._ref_cp, max_control_points=self.config.max_control_points)
        except (astroalign.MaxIterError, ValueError, TypeError):
            return None
        matrix = np.asarray(tf.params, dtype=np.float64)[:2]
        return matrix if self._plausible(matrix) else None

    def _pairs(self, matrix: NDArray[np.float64], xy: NDArray[np.float64],
               radius: float) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
        """One-to-one nearest-neighbour pairs (frame index, reference index) within radius."""
        assert self._ref_tree is not None
        pred = _apply(matrix, xy)
        dist, j = self._ref_tree.query(pred, distance_upper_bound=radius)
        fi = np.nonzero(np.isfinite(dist))[0]
        if fi.size == 0:
            return fi, fi
        rj = j[fi]
        # Keep the closest frame star for each reference star.
        order = np.lexsort((dist[fi], rj))
        fi, rj = fi[order], rj[order]
        first = np.ones(fi.size, dtype=bool)
        first[1:] = rj[1:] != rj[:-1]
        return fi[first], rj[first]

    def _refine(self, init: NDArray[np.float64], xy: NDArray[np.float64],
                model: str) -> tuple[NDArray[np.float64], int, float] | None:
        """Iterated pairing + least-squares fit with sigma clipping of the residuals."""
        cfg = self.config
        matrix = init
        need = _MIN_POINTS[model]
        n_used = 0
        rms = float("nan")
        prev: tuple[Any, ...] | None = None
        for _ in range(6):
            fi, rj = self._pairs(matrix, xy, cfg.match_radius_px)
            if fi.size < need:
                return None
            src = xy[fi]
            dst = self._ref_xy[rj]
            use = np.ones(fi.size, dtype=bool)
            for _clip in range(5):
                if use.sum() < need:
                    return None
                try:
                    matrix = fit_transform(src[use], dst[use], model)
                except ValueError:
                    return None
                resid = np.hypot(*(_apply(matrix, src) - dst).T)
                # Per-axis sigma from the median radial residual (Rayleigh: median = 1.1774 s).
                sigma = float(np.median(resid[use])) / 1.1774
                # Floor: do not clip below 0.05 px (centroid noise of bright stars).
                cut = max(cfg.clip_sigma * sigma, 0.05)
                new_use = resid <= cut
                if np.array_equal(new_use, use):
                    break
                use = new_use
            n_used = int(use.sum())
            rms = float(np.sqrt(np.mean(resid[use] ** 2))) if n_used else float("nan")
            key = (tuple(fi[use]), tuple(rj[use]))
            if key == prev:
                break
            prev = key
        return matrix, n_used, rms

    def _phase_fallback(self, xy: NDArray[np.float64],
                        image: NDArray[np.float32]) -> tuple[Transform | None, str]:
        assert self._pc is not None
        img = np.asarray(image)
        if img.ndim != 2 or (self._ref_shape is not None and img.shape != self._ref_shape):
            return None, (f"; phase correlation skipped: image shape {img.shape} differs "
                          f"from the reference {self._ref_shape}")
        dx, dy, ratio = _phase_correlate(self._pc, img)
        if not ratio >= self.config.min_pc_peak_ratio:
            return None, (f"; phase-correlation peak is only {ratio:.1f}x the next one "
                          f"(need {self.config.min_pc_peak_ratio:.1f})")
        matrix = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])
        n_match = 0
        rms = float("nan")
        if xy.shape[0] and self._ref_tree is not None:
            fitted = self._refine(matrix, xy, "translation")
            if fitted is not None and fitted[1] >= 1:
                matrix, n_match, rms = fitted
        return Transform(matrix, "translation", n_match, rms, "phase_correlation"), ""

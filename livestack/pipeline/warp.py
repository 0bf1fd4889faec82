"""Resample a frame onto the reference grid.

``warp(image, transform, out_shape, kernel)`` returns ``out(x_ref) = in(T^-1(x_ref))`` with
a footprint of the output pixels whose interpolation kernel lies entirely on finite input
samples. NaN never spreads into the output: such pixels are 0.0 and outside the footprint.

Kernels: ``"nearest"``, ``"bilinear"``, ``"bicubic"`` (Keys, a = -0.5), ``"lanczos3"``
(the default: the only one that keeps >= 0.97 of a 2.5 px FWHM star's peak; see
``bench/bench_warp.py``), ``"mitchell"`` (Mitchell-Netravali, B = C = 1/3: nearly
bilinear's noise reduction with two thirds of its blur; it does not interpolate, so an
identity or integer shift smooths too, by the same 1/9 px^2 as every other phase). The
kernels are linear; Lanczos (and Mitchell's smaller) ringing is NOT clamped here, because
a clamp is a non-linear, signal-dependent bias that the stack's mean and outlier
rejection would then average in. The stacking pipelines clamp it only where it digs holes:
next to steep steps and saturated pixels, as a post-pass
(:func:`livestack.pipeline.saturation.clamp_ringing`, issue 9); elsewhere this output is
kept bit for bit.

Coordinates are float64 end to end; Lanczos3 weights are evaluated at the exact phase from
an even/odd polynomial fit of the normalised kernel (error < 1e-8, no coordinate tables).
Pure translations take a separable two-pass fast path. Bicubic, Mitchell and Lanczos3
rotations of 0.15 to ~5 degrees (every stack's frame-to-frame case) take a two-pass
(Catmull-Smith) separable kernel, horizontal then vertical 1-D passes in tiles
(``kernels_twopass``): it interpolates along a sheared grid, so it is not bit-identical
to the 2-D kernel, but as accurate against the truth (within 0.1 % pixel RMS up to 2
degrees) and vectorised.
Everything else (including rotations under 0.15 degrees, where it is as fast) sums the 2-D
separable kernel per output pixel, vectorised over runs of pixels (see ``kernels_warp``).

Why OpenCV's cubic/Lanczos4 looked offset by ~0.05 px
-----------------------------------------------------
Not the pixel-centre convention (OpenCV, sep and livestack all put pixel centres on integer
coordinates) and not the matrix inversion (forward matrix and ``WARP_INVERSE_MAP`` with
the inverse agree to 1e-4 px). Two causes, measured in ``tests/pipeline/test_warp.py``
and ``bench/bench_warp.py``:

1. ``INTER_CUBIC`` is Keys' cubic with a = -0.75, which, unlike a = -0.5, does not
   reproduce linear functions: the sum of its weights times the tap offsets is not the
   sub-pixel phase. A star's flux-weighted centroid moves by up to +-0.048 px depending
   on the phase (+0.047 px at phase 3/16; 0 at phases 0 and 1/2). Lanczos4 has the same
   defect at +-0.014 px (our normalised Lanczos3: +-0.020 px on the first moment, but
   < 0.003 px on the windowed centroid that detection and registration use).
2. ``remap``/``warpAffine`` round the source coordinate to 1/32 px (``INTER_BITS = 5``,
   ``INTER_TAB_SIZE = 32`` weight tables): up to 1/64 = 0.016 px extra, the same for every
   star of a pure shift. OpenCV 5.0 still does this for Lanczos4 (a 0.0123 px shift is
   rounded to a copy) but no longer for linear/cubic on float32.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from livestack.pipeline.types import OutputMap, Transform, Warped

KERNELS: dict[str, int] = {"nearest": 0, "bilinear": 1, "bicubic": 2, "lanczos3": 3,
                           "mitchell": 4}
#: Not a kernel: the choice of one by the image's layout (:func:`resolve_kernel`).
AUTO = "auto"
#: The kernels ``"auto"`` picks for a mono (2-D) image and for a colour (3-plane) one.
#: Mono keeps Lanczos3, the sharpest (its FWHM and efficiency bars). Colour frames are
#: debayered, whose demosaic (RCD) already correlates neighbouring pixels' noise; there
#: Mitchell-Netravali meets both of issue 9's goals against Siril 1.0.6 on the Seestar
#: frames, where Lanczos3 misses the SNR one: median FWHM 2.924 px vs Siril's 2.954 at
#: 1.010 x its star SNR (Lanczos3: 2.722 px at 0.983 x; bench/bench_demosaic_siril.py).
AUTO_MONO = "lanczos3"
AUTO_COLOUR = "mitchell"

#: Output rows per block of the translation fast path (keeps its scratch rows in cache).
_SHIFT_BLOCK_ROWS = 16
#: Output tile of the two-pass (rotation) kernel: its scratch rows (~150 x 256 floats at
#: 2 deg) stay in L2, and 33 row-of-tile tasks per 26 MP frame balance two threads.
_TILE_ROWS = 128
_TILE_COLS = 256
#: A transform whose linear part differs from the identity by less than this is treated
#: as a pure translation (the coordinate error over a 10k px frame is then < 1e-8 px).
_TRANSLATION_TOL = 1e-12


def resolve_kernel(kernel: str, colour: bool) -> str:
    """The kernel ``kernel`` names for a mono or colour image: itself, or for ``"auto"``
    :data:`AUTO_MONO` / :data:`AUTO_COLOUR`.

    Raises
    ------
    ValueError
        An unknown kernel name.
    """
    if kernel == AUTO:
        return AUTO_COLOUR if colour else AUTO_MONO
    if kernel not in KERNELS:
        raise ValueError(f"unknown warp kernel {kernel!r}; expected one of "
                         f"{sorted(KERNELS)} or {AUTO!r}")
    return kernel


def warp(image: NDArray[np.float32], transform: Transform, out_shape: tuple[int, int],
         kernel: str = "lanczos3", *, out: Warped | None = None,
         post: OutputMap | None = None) -> Warped:
    """Resample ``image`` onto the reference grid described by ``transform``.

    Parameters
    ----------
    image : ndarray, shape (ny, nx) or (3, ny, nx), float32
        The frame (any float dtype is converted to native float32; NaN/inf allowed).
    transform : Transform
        Frame -> reference pixel mapping.
    out_shape : tuple of int
        ``(ny_ref, nx_ref)`` of the reference grid.
    kernel : str
        ``"nearest"``, ``"bilinear"``, ``"bicubic"``, ``"lanczos3"``, ``"mitchell"``,
        or ``"auto"``: Lanczos3 for a 2-D image, Mitchell for a 3-plane one
        (:func:`resolve_kernel`).
    out : Warped, optional
        A previous result to overwrite instead of allocating a new one (the live stack
        warps every frame onto the same grid; reusing the buffer saves the page faults of
        a fresh 100 MB array per 26 MP frame, ``bench/bench_warp.py``). Its image must be
        float32, C-contiguous, of the result's shape and not overlap ``image``; its
        footprint bool, C-contiguous, ``out_shape``. The returned object holds these same
        arrays, so a caller must not keep a result it passes back as ``out``.
    post : OutputMap, optional
        A per-plane affine map and ceiling applied to every output sample in the
        footprint (the live stack's normalisation and saturation level; its ``saturate``
        is the clamp's business, :func:`livestack.pipeline.saturation.clamp_ringing`).
        The two-pass kernel applies it as it writes its output, saving two passes over
        the frame; the other paths in one pass after their kernel. Either way the numbers
        are those of ``apply_normalization`` then the level clip, bit for bit.

    Returns
    -------
    Warped
        ``image`` float32 with the input's channel layout and ``out_shape`` spatial shape
        (0.0 outside the footprint); ``footprint`` bool ``out_shape``.

    Raises
    ------
    ValueError
        Unknown kernel, bad image dimensions, non-positive ``out_shape``, a singular
        transform, an ``out`` that does not fit, or a ``post`` whose arrays do not
        broadcast to the planes.
    """
    from livestack.pipeline import kernels_saturation as ks  # numba only when warping
    from livestack.pipeline import kernels_twopass as kt
    from livestack.pipeline import kernels_warp as kw

    arr = np.asarray(image)
    kernel = resolve_kernel(kernel, arr.ndim == 3)
    if arr.ndim == 2:
        planes = arr[np.newaxis]
    elif arr.ndim == 3:
        planes = arr
    else:
        raise ValueError(f"image must be (ny, nx) or (nc, ny, nx), got shape {arr.shape}")
    planes = np.ascontiguousarray(planes, dtype=np.float32)
    ny_out, nx_out = (int(out_shape[0]), int(out_shape[1]))
    if ny_out <= 0 or nx_out <= 0:
        raise ValueError(f"out_shape must be positive, got {out_shape}")
    matrix = np.asarray(transform.matrix, dtype=np.float64)
    if abs(np.linalg.det(matrix[:, :2])) < 1e-12:
        raise ValueError("transform is singular (determinant ~ 0)")
    inv = np.ascontiguousarray(transform.inverse().matrix, dtype=np.float64)
    kind = KERNELS[kernel]
    nc = planes.shape[0]
    if out is None:
        dest = np.empty((nc, ny_out, nx_out), dtype=np.float32)
        foot = np.empty((ny_out, nx_out), dtype=np.bool_)
    else:
        dest, foot = _check_out(out, (*arr.shape[:-2], ny_out, nx_out), planes)

    if np.all(np.abs(inv[:, :2] - np.eye(2)) < _TRANSLATION_TOL):
        ix0, wx = _shift_taps(kind, float(inv[0, 2]))
        iy0, wy = _shift_taps(kind, float(inv[1, 2]))
        if (ix0, iy0, wx.size, wy.size) == (0, 0, 1, 1) and planes.shape[1:] == dest.shape[1:]:
            # The identity (every stack's reference frame): a copy, in numpy. On a first
            # start the frame is then stacked without waiting for the shift kernel's
            # compile (livestack.precompile does it meanwhile). Same result as the kernel.
            # Mitchell smooths even here (three taps): its reference frame, a colour
            # stack's by default, takes the shift kernel, whose compile the precompile
            # helper does second, and which the colour frame's demosaic outlasts.
            np.isfinite(planes).all(axis=0, out=foot)
            np.add(planes, np.float32(0.0), out=dest)  # -0.0 -> +0.0, as the kernel's sums
            dest[:, ~foot] = 0.0
            if post is not None:  # numpy too: the same numbers as ks.map_level
                _map_numpy(dest, foot, post)
                post = None
        else:
            kw.warp_shift_kernel(planes, ix0, wx, iy0, wy, dest, foot, _SHIFT_BLOCK_ROWS)
    elif kind in kt.TWO_PASS_KINDS and kt.two_pass_pays(inv):
        kt.warp_two_pass_kernel(planes, inv, kind, dest, foot, _TILE_ROWS, _TILE_COLS, post)
        post = None  # applied on the kernel's output write
    else:
        kw.warp_affine_kernel(planes, inv, kind, dest, foot)
    if post is not None:
        ks.map_level(dest, foot, *post.arrays(nc))
    result = dest[0] if arr.ndim == 2 else dest
    return Warped(result, foot)


def _map_numpy(planes: NDArray[np.float32], foot: NDArray[np.bool_], post: OutputMap) -> None:
    """:func:`kernels_saturation.map_level` in numpy (float32 ``x * g`` then ``+ o``
    round as the kernel's), for the identity warp, which compiles nothing."""
    for plane, gain, offset, ceiling in zip(planes, *post.arrays(planes.shape[0]),
                                            strict=True):
        np.multiply(plane, gain, out=plane)
        np.add(plane, offset, out=plane)
        plane[~np.isfinite(plane)] = 0.0
        np.minimum(plane, ceiling, out=plane, where=plane > ceiling)
        plane[~foot] = 0.0


def _check_out(out: Warped, shape: tuple[int, ...], planes: NDArray[np.float32]
               ) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """The ``(nc, ny, nx)`` image and the footprint of a reusable ``out``, checked.

    Raises
    ------
    ValueError
        Wrong shape, dtype or layout, read-only, or overlapping the input.
    """
    image, foot = out.image, out.footprint
    if (image.shape != shape or image.dtype != np.float32 or not image.flags.c_contiguous
            or not image.flags.writeable):
        raise ValueError(f"out.image must be a writeable C-contiguous float32 array of shape "
                         f"{shape}, got {image.dtype} {image.shape}")
    if (foot.shape != shape[-2:] or foot.dtype != np.bool_ or not foot.flags.c_contiguous
            or not foot.flags.writeable):
        raise ValueError(f"out.footprint must be a writeable C-contiguous bool array of "
                         f"shape {shape[-2:]}, got {foot.dtype} {foot.shape}")
    if np.may_share_memory(image, planes) or np.may_share_memory(foot, planes):
        raise ValueError("out must not overlap the image being warped")
    return image.reshape((-1, *shape[-2:])), foot


def _shift_taps(kind: int, offset: float) -> tuple[int, NDArray[np.float32]]:
    """1-D taps of a constant offset: input index of the first tap for output 0, weights.

    An integer offset gives a single tap of weight 1 (zero-weight taps are dropped so
    they never need to be inside or finite), except for Mitchell, which smooths there
    too: three taps (1/18, 8/9, 1/18) around the pixel.
    """
    from livestack.pipeline import kernels_warp as kw

    if kind == kw.NEAREST:
        return math.floor(offset + 0.5), np.ones(1, dtype=np.float32)
    base = math.floor(offset)
    frac = offset - base
    if frac == 0.0 and kind == kw.MITCHELL:
        buf = np.zeros((6, 1), dtype=np.float32)
        kw.row_weights(kind, np.array([0.0]), buf, 1)  # the 4th tap is exactly 0.0
        return int(base) - 1, np.ascontiguousarray(buf[:3, 0])
    if frac == 0.0:
        return int(base), np.ones(1, dtype=np.float32)
    buf = np.zeros((6, 1), dtype=np.float32)
    kw.row_weights(kind, np.array([frac]), buf, 1)
    n = kw.N_TAPS[kind]
    first = kw.FIRST_TAP[kind]
    return int(base) + first, np.ascontiguousarray(buf[:n, 0])

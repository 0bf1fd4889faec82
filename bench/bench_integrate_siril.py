"""``livestack integrate`` against Siril 1.0.6 on the real oscaar_tres1 frames.

Both tools get the same 50 lights and 20 darks (copied to a work folder; the shared data
is never touched), dark calibration, star registration onto the first light, and a
winsorized 3/3 stack with additive-with-scaling normalisation. Siril runs as
``siril-cli -s SCRIPT`` (Debian's ``siril`` package: 1.0.6 script syntax, where
calibration is ``preprocess``); livestack runs ``livestack stack`` (the live pass that
writes the journal and the transforms) and then ``livestack integrate``.

Each tool also stacks the 48 frames without the two satellite-trail frames
(tres1-061, tres1-087), so the trail residual is measured against the same tool's clean
stack and does not mix in the tools' different interpolation or normalisation.

Printed side by side:

* background noise: median over 64x64 tiles of 1.4826 x MAD (ADU);
* median star FWHM (px), measured with the same detector (livestack's) on both images;
* because the two tools normalise to different signal scales and interpolate with
  different sharpness, also the noise per unit of signal (the stack's slope against the
  registered reference frame over star pixels) after blurring the sharper stacks to the
  blurriest one's FWHM (an exact Gaussian, its width iterated until the measured FWHM
  matches; the reached FWHM is printed). The slope is taken on the unblurred stacks and
  weights the star cores, so it still favours the sharper stacks;
* the fairer like-for-like comparison: point-source detection SNR. Every stack is
  filtered with the same Gaussian (FWHM 1.5, 2.3, 3.0 and 4.0 px) and, for isolated
  unsaturated stars found on Siril's stack in the region all the lights cover (and matched
  within 1 px on every stack; both tools register onto tres1-050, so the grids agree), the
  filtered value at the star minus the local-annulus median is divided by the filtered
  image's robust background noise. Each row is the median over stars of that SNR's
  ratio to Siril's (Siril = 1);
* trail residual: mean of (all-frames stack - clean stack) over the trail pixels, in
  units of the clean stack's noise (a plain mean is shown for scale);
* seconds per frame (wall clock; the machine may be shared, the ratio is what matters).

Which interpolation Siril's ``register`` used is measured, not assumed: one of Siril's
calibrated frames is warped with OpenCV (the library Siril warps with) onto Siril's
registered version of it, with the affine transform fitted by least squares for each
OpenCV interpolation, and the residual printed in units of the frame's noise (the
interpolation Siril used leaves a residual far below the noise). Siril 1.0.6's
``register`` has no interpolation option (``-interp=`` came with 1.2).

With ``--also-kernel bilinear bicubic`` (any of livestack's other warp kernels) the
integration is also run with each of those resampling kernels (``livestack integrate
--interpolation KERNEL``), for a like-for-like comparison with Siril's resampling. One
table shows Siril and every livestack kernel side by side; the noise-per-unit-signal row
blurs every column to the blurriest column's FWHM, and the last two rows say whether each
livestack column's background noise and star FWHM are no worse than Siril's (compared
unrounded).

    /work/venv/bin/python bench/bench_integrate_siril.py [--data DIR] [--dir WORK]
        [--also-kernel KERNEL [KERNEL ...]]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

TRAIL_FRAMES = ("tres1-061.fit", "tres1-087.fit")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "oscaar_tres1"
SNR_FILTERS = (1.5, 2.3, 3.0, 4.0)  # FWHM (px) of the common detection filters

SIRIL_SCRIPT = """requires 1.0.0
cd darks
convert dark -out=../process
cd ../process
stack dark rej 3 3 -nonorm
cd ..
cd lights
convert light -out=../process
cd ../process
preprocess light -dark=dark_stacked
register pp_light
stack r_pp_light rej w 3 3 -norm=addscale -out=../result
close
"""


def copy_inputs(data: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy lights (minus ``skip``) and darks into ``dest/lights`` and ``dest/darks``."""
    for kind in ("lights", "darks"):
        target = dest / kind
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted((data / kind).glob("*.fit")):
            if src.name not in skip:
                shutil.copy2(src, target / src.name)


def run_siril(work: Path, script: str = SIRIL_SCRIPT) -> tuple[Path, float]:
    """Run the Siril ``script`` in ``work``; return the result FITS and the wall time."""
    (work / "script.ssf").write_text(script)
    t0 = time.perf_counter()
    done = subprocess.run(["siril-cli", "-d", str(work), "-s", str(work / "script.ssf")],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    result = next(iter(sorted(work.glob("result.f*"))), None)
    if done.returncode != 0 or result is None:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-2000:])
        raise SystemExit(f"siril failed in {work}")
    return result, wall


def run_livestack(args: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "livestack.cli", *args], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"livestack {args[0]} failed")
    return time.perf_counter() - t0


def load(path: Path) -> NDArray[np.float32]:
    from astropy.io import fits

    with fits.open(path) as hdul:
        data = np.asarray(hdul[0].data, dtype=np.float32)
    if data.ndim == 3:
        data = data[0]
    if np.nanmedian(data) < 2.0:  # Siril's 32-bit output is normalised to [0, 1]
        data = data * np.float32(65535.0)
    return data


def robust_noise(image: NDArray[np.float32], tile: int = 64) -> float:
    values = []
    ny, nx = image.shape
    for y in range(tile, ny - tile, tile):
        for x in range(tile, nx - tile, tile):
            block = image[y:y + tile, x:x + tile]
            block = block[np.isfinite(block)]
            if block.size > tile * tile // 2:
                values.append(1.4826 * np.median(np.abs(block - np.median(block))))
    return float(np.median(values))


def fwhm(image: NDArray[np.float32]) -> tuple[float, int]:
    from livestack.pipeline.detect import DetectConfig, measure

    clean = np.where(np.isfinite(image), image, np.nanmedian(image)).astype(np.float32)
    _, metrics = measure(clean, DetectConfig())
    return float(metrics.fwhm_px), int(metrics.star_count)


def photometric_scale(image: NDArray[np.float32], reference: NDArray[np.float32]) -> float:
    """Slope of ``image`` against ``reference`` over star pixels (background removed)."""
    bg_r, bg_i = np.nanmedian(reference), np.nanmedian(image)
    ok = (np.isfinite(reference) & np.isfinite(image) & (reference > bg_r + 300)
          & (reference < bg_r + 20000))
    a = reference[ok] - bg_r
    return float(np.sum(a * (image[ok] - bg_i)) / np.sum(a * a))


def gaussian_blur(image: NDArray[np.float32], sigma: float) -> NDArray[np.float32]:
    """Convolve ``image`` with a Gaussian of standard deviation ``sigma`` (exact variance).

    The filter is applied in the Fourier domain (``scipy.ndimage.fourier_gaussian``), so
    the added variance is ``sigma^2`` even for sub-pixel sigmas, where a sampled kernel
    (``gaussian_filter``) adds far less (none at all below sigma 0.125 px). The image
    wraps around at the edges; NaNs are filled with the median while filtering.

    Parameters
    ----------
    image : ndarray of float32
        The image; NaN marks pixels no frame covered.
    sigma : float
        Gaussian sigma in pixels; 0 returns a copy.

    Returns
    -------
    ndarray of float32
        The filtered image, NaN where ``image`` is NaN.
    """
    from scipy import fft, ndimage

    filled = np.where(np.isfinite(image), image, np.nanmedian(image)).astype(np.float64)
    if sigma > 0:
        spectrum = ndimage.fourier_gaussian(fft.rfft2(filled), sigma, n=filled.shape[1])
        filled = fft.irfft2(spectrum, s=filled.shape)
    out = filled.astype(np.float32)
    out[~np.isfinite(image)] = np.nan
    return out


def blurred_to(image: NDArray[np.float32], fwhm_from: float, fwhm_to: float,
               tolerance: float = 0.0005, max_iterations: int = 8
               ) -> tuple[NDArray[np.float32], float]:
    """Gaussian-blur ``image`` until its measured median star FWHM reaches ``fwhm_to``.

    The first blur adds ``fwhm_to^2 - fwhm_from^2`` in quadrature; the detector's FWHM
    does not add exactly in quadrature, so the blur variance is then corrected by the
    secant method on (variance, measured FWHM^2) until the FWHM is within ``tolerance``.

    Parameters
    ----------
    image : ndarray of float32
        The stack to blur.
    fwhm_from : float
        Its measured median star FWHM (px).
    fwhm_to : float
        The FWHM to reach (px); nothing is done if ``fwhm_from >= fwhm_to``.
    tolerance : float
        Stop when the measured FWHM is within this of ``fwhm_to`` (px).
    max_iterations : int
        At most this many blur-and-measure rounds.

    Returns
    -------
    blurred : ndarray of float32
        The blurred image (the closest of the rounds).
    achieved : float
        Its measured median star FWHM (px).
    """
    if fwhm_from >= fwhm_to:
        return image, fwhm_from
    goal = fwhm_to ** 2
    tried = [(0.0, fwhm_from ** 2)]  # (blur variance, measured FWHM^2)
    variance = (goal - fwhm_from ** 2) / 2.3548 ** 2
    best: tuple[float, NDArray[np.float32], float] = (np.inf, image, fwhm_from)
    for _ in range(max_iterations):
        out = gaussian_blur(image, float(np.sqrt(variance)))
        achieved = fwhm(out)[0]
        if abs(achieved - fwhm_to) < best[0]:
            best = (abs(achieved - fwhm_to), out, achieved)
        if abs(achieved - fwhm_to) <= tolerance:
            break
        (v0, a0), (v1, a1) = tried[-1], (variance, achieved ** 2)
        tried.append((v1, a1))
        step = (goal - a1) * (v1 - v0) / (a1 - a0) if a1 != a0 else v1
        variance = float(np.clip(v1 + step, v1 / 4, v1 * 4))
    return best[1], best[2]


def full_overlap_core(stack: Path, n_frames: int, margin: int = 20) -> NDArray[np.bool_]:
    """Pixels that every light covers in a livestack output, shrunk by ``margin`` pixels.

    Parameters
    ----------
    stack : Path
        A ``livestack integrate`` output (COUNT, REJLOW and REJHIGH extensions).
    n_frames : int
        Number of lights stacked.
    margin : int
        Binary-erosion iterations, to keep star cutouts away from the overlap edge.

    Returns
    -------
    ndarray of bool
        True inside the full-overlap region.
    """
    from astropy.io import fits
    from scipy import ndimage

    with fits.open(stack) as hdul:
        covered = sum(np.asarray(hdul[name].data, dtype=np.float64)
                      for name in ("COUNT", "REJLOW", "REJHIGH"))
    if covered.ndim == 3:
        covered = covered[0]
    return ndimage.binary_erosion(covered == n_frames, iterations=margin)


def detection_stars(images: dict[str, NDArray[np.float32]], core: NDArray[np.bool_],
                    isolation: float = 20.0, peak_max: float = 30000.0,
                    tolerance: float = 1.0,
                    offsets: dict[str, NDArray[np.float64]] | None = None
                    ) -> dict[str, NDArray[np.float64]]:
    """Isolated, unsaturated stars found on the first image, matched in every image.

    Parameters
    ----------
    images : dict of str to ndarray of float32
        The stacks; the first one (Siril's) defines the star list.
    core : ndarray of bool
        Where stars may lie (full overlap).
    isolation : float
        Minimum distance (px) to the nearest other detected star.
    peak_max : float
        Maximum pixel value (ADU) within 3 px of the star on the first image (far below
        the sensor's ~60000 ADU saturation, so no frame clipped the star).
    tolerance : float
        Maximum distance (px) between a star's positions on two stacks.
    offsets : dict of str to ndarray of float64, shape (2,), optional
        Per image, the (dx, dy) from the first image's grid to its own (when the tools
        registered onto different frames); zero when absent.

    Returns
    -------
    dict of str to ndarray of float64, shape (N, 2)
        Each image's own (x, y) centroids of the N stars matched in all images.
    """
    from scipy.spatial import cKDTree

    from livestack.pipeline.detect import DetectConfig, detect_stars

    def centroids(image: NDArray[np.float32]) -> NDArray[np.float64]:
        filled = np.nan_to_num(image, nan=float(np.nanmedian(image)))
        return np.asarray(detect_stars(filled, DetectConfig())[0].xy, dtype=np.float64)

    names = list(images)
    first = images[names[0]]
    xy = centroids(first)
    neighbour = cKDTree(xy).query(xy, k=2)[0][:, 1]
    ny, nx = first.shape
    keep = []
    for (x, y), (ix, iy), distance in zip(xy, np.rint(xy).astype(int), neighbour,
                                          strict=True):
        if (distance > isolation and 3 <= ix < nx - 3 and 3 <= iy < ny - 3 and core[iy, ix]
                and np.nanmax(first[iy - 3:iy + 4, ix - 3:ix + 4]) < peak_max):
            keep.append((x, y))
    chosen = np.array(keep, dtype=np.float64).reshape(-1, 2)
    positions = {names[0]: chosen}
    found = np.ones(len(chosen), dtype=bool)
    for name in names[1:]:
        other = centroids(images[name])
        shift = (offsets or {}).get(name, np.zeros(2))
        distance, index = cKDTree(other).query(chosen + shift, distance_upper_bound=tolerance)
        found &= np.isfinite(distance)
        positions[name] = other[np.minimum(index, len(other) - 1)]
    return {name: xy_[found] for name, xy_ in positions.items()}


def detection_snr(image: NDArray[np.float32], positions: NDArray[np.float64],
                  core: NDArray[np.bool_], filter_fwhm: float, annulus: tuple[float, float]
                  = (8.0, 12.0)) -> NDArray[np.float64]:
    """Per-star detection SNR after a Gaussian matched filter of FWHM ``filter_fwhm``.

    Parameters
    ----------
    image : ndarray of float32
        The stack.
    positions : ndarray of float64, shape (N, 2)
        The stars' (x, y) centroids on this stack.
    core : ndarray of bool
        The full-overlap region, where the filtered image's noise is measured.
    filter_fwhm : float
        FWHM (px) of the Gaussian filter, the same for every stack.
    annulus : tuple of float
        Inner and outer radius (px) of the local-background annulus.

    Returns
    -------
    ndarray of float64, shape (N,)
        Filtered value at each star's centroid (cubic spline) minus the median of the
        filtered annulus, over the filtered image's robust background noise in the core.
    """
    from scipy import ndimage

    filtered = gaussian_blur(image, filter_fwhm / 2.3548)
    noise = robust_noise(np.where(core, filtered, np.nan).astype(np.float32))
    smooth = np.nan_to_num(filtered, nan=float(np.nanmedian(filtered))).astype(np.float64)
    peaks = ndimage.map_coordinates(smooth, [positions[:, 1], positions[:, 0]], order=3)
    r = int(np.ceil(annulus[1]))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    local = []
    for (x, y), (ix, iy) in zip(positions, np.rint(positions).astype(int), strict=True):
        cut = smooth[iy - r:iy + r + 1, ix - r:ix + r + 1]
        rr = np.hypot(dy - (y - iy), dx - (x - ix))
        local.append(np.median(cut[(rr >= annulus[0]) & (rr < annulus[1])]))
    return (peaks - np.array(local)) / noise


def trail_mask(registered: list[Path], clean: NDArray[np.float32]) -> NDArray[np.bool_]:
    """Pixels where a registered trail frame exceeds the clean stack by > 5 sigma, off stars."""
    from scipy import ndimage

    sigma_stack = robust_noise(clean)
    background = np.nanmedian(clean)
    mask = np.zeros(clean.shape, dtype=bool)
    for path in registered:
        frame = load(path)
        diff = frame - np.nanmedian(frame) - (clean - background)
        sigma_frame = robust_noise(diff)
        mask |= (diff > 5 * sigma_frame) & (clean < background + 3 * sigma_stack)
    # a trail is long and thin: keep only big connected pieces (drops cosmic rays)
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    keep = np.isin(labels, 1 + np.flatnonzero(sizes >= 50))
    return ndimage.binary_dilation(keep, iterations=1)


def siril_interpolation(process: Path, index: int = 10) -> dict[str, float]:
    """Residual (in noise sigmas) of reproducing Siril's registered frame ``index`` from its
    calibrated frame with each OpenCV interpolation (affine transform fitted per method)."""
    import cv2  # comparison only; not a livestack dependency
    from scipy.optimize import least_squares
    from scipy.spatial import cKDTree

    from livestack.pipeline.detect import DetectConfig, detect_stars

    def read(path: Path) -> NDArray[np.float32]:
        from astropy.io import fits

        with fits.open(path) as hdul:
            return np.asarray(hdul[0].data, dtype=np.float32)

    src = read(process / f"pp_light_{index:05d}.fit")
    dst = read(process / f"r_pp_light_{index:05d}.fit")
    s_xy = detect_stars(src, DetectConfig())[0].xy
    d_xy = detect_stars(dst, DetectConfig())[0].xy
    # the shift that pairs the most stars among the brightest, then a least-squares affine
    offsets = [s_xy[j] - d_xy[i] for i in range(min(15, len(d_xy)))
               for j in range(min(15, len(s_xy)))]
    tree = cKDTree(s_xy)
    best = max(offsets, key=lambda o: int(np.isfinite(
        tree.query(d_xy + o, distance_upper_bound=2.0)[0]).sum()))
    dist, idx = tree.query(d_xy + best, distance_upper_bound=2.0)
    ok = np.isfinite(dist)
    design = np.column_stack([d_xy[ok], np.ones(int(ok.sum()))])
    start = np.linalg.lstsq(design, s_xy[idx[ok]], rcond=None)[0].T  # dst -> src, 2x3
    ny, nx = dst.shape
    inner = (slice(40, ny - 40, 2), slice(40, nx - 40, 2))
    noise = 1.4826 * float(np.median(np.abs(np.diff(dst[40:-40, 40:-40], axis=1)))) / np.sqrt(2)

    def residual(p: NDArray[np.float64], flag: int) -> NDArray[np.float64]:
        matrix = start + p.reshape(2, 3)
        out = cv2.warpAffine(src, matrix, (nx, ny), flags=flag | cv2.WARP_INVERSE_MAP)
        return (out[inner] - dst[inner]).ravel().astype(np.float64)

    result = {}
    for name, flag in (("linear", cv2.INTER_LINEAR), ("cubic", cv2.INTER_CUBIC),
                       ("lanczos4", cv2.INTER_LANCZOS4)):
        fit = least_squares(residual, np.zeros(6), args=(flag,), diff_step=1e-3,
                            x_scale=[1e-4, 1e-4, 1e-2] * 2)
        result[name] = float(np.sqrt(np.mean(residual(fit.x, flag) ** 2)) / noise)
    return result


def register_only(stack_dir: Path, darks: Path, names: tuple[str, ...], out: Path) -> None:
    """Write the calibrated, registered frames ``names`` (on the stack's reference grid)."""
    from livestack.restack import integrate_plan
    from livestack.sessionplan import load_session, plan_integration
    from livestack.storage.masters import masters_for_cli

    session = load_session(stack_dir)
    reference = next(f for f in session.frames if np.allclose(
        f.transform.matrix, [[1, 0, 0], [0, 1, 0]]))
    keep = {*names, Path(reference.path).name}
    others = [f.path for f in session.frames if Path(f.path).name not in keep]
    plan = plan_integration(session, exclude=others)
    integrate_plan(plan, masters=masters_for_cli(darks=darks), keep_registered_dir=out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/livestack-bench-siril"))
    parser.add_argument("--also-kernel", nargs="+", default=[], metavar="KERNEL",
                        choices=("nearest", "bilinear", "bicubic", "lanczos3"),
                        help="also integrate with these warp kernels (extra table columns)")
    args = parser.parse_args()
    if shutil.which("siril-cli") is None:
        print("siril-cli not found (apt-get install siril)", file=sys.stderr)
        return 1
    work = args.dir
    if work.exists():
        shutil.rmtree(work)
    n_frames = len(list((args.data / "lights").glob("*.fit")))

    # --- Siril: all frames, then without the trail frames
    copy_inputs(args.data, work / "siril_all")
    copy_inputs(args.data, work / "siril_clean", skip=TRAIL_FRAMES)
    siril_all, siril_wall = run_siril(work / "siril_all")
    siril_clean, _ = run_siril(work / "siril_clean")
    interp = siril_interpolation(work / "siril_all" / "process")

    # --- livestack: live pass (journal + transforms), then integrate
    ours = work / "livestack"
    copy_inputs(args.data, ours)
    stack_wall = run_livestack(["stack", str(ours / "lights"), "--darks", str(ours / "darks"),
                                "-o", str(ours / "out"), "--no-progress"])
    from astropy.io import fits

    from livestack.sessionplan import load_session

    stack_dir = load_session(ours / "out").folder
    assert stack_dir is not None
    common = [str(stack_dir), "--darks", str(ours / "darks"), "--reject", "winsorized",
              "--low", "3", "--high", "3", "--normalize", "additive-scaling", "--no-progress"]
    # the default column runs without --interpolation: the configuration's kernel
    walls = {"livestack": run_livestack(["integrate", *common, "-o", str(ours / "all.fits")])}
    run_livestack(["integrate", *common, "-o", str(ours / "clean.fits"),
                   "--exclude", *TRAIL_FRAMES])
    run_livestack(["integrate", *common, "-o", str(ours / "plain.fits"), "--reject", "none"])
    run_livestack(["integrate", *common, "-o", str(ours / "additive.fits"),
                   "--normalize", "additive"])
    register_only(stack_dir, ours / "darks", (*TRAIL_FRAMES, "tres1-050.fit"),
                  ours / "registered")
    default_kernel = str(fits.getheader(ours / "all.fits")["WARPKERN"])
    kernels = [k for k in dict.fromkeys(args.also_kernel) if k != default_kernel]
    for k in kernels:
        walls[k] = run_livestack(["integrate", *common, "--interpolation", k,
                                  "-o", str(ours / f"{k}-all.fits")])
        run_livestack(["integrate", *common, "--interpolation", k,
                       "-o", str(ours / f"{k}-clean.fits"), "--exclude", *TRAIL_FRAMES])
        assert fits.getheader(ours / f"{k}-all.fits")["WARPKERN"] == k

    reference = load(ours / "registered" / "r_tres1-050.fits")
    images = {
        "siril": (load(siril_all), load(siril_clean)),
        "livestack": (load(ours / "all.fits"), load(ours / "clean.fits")),
    }
    for k in kernels:
        images[k] = (load(ours / f"{k}-all.fits"), load(ours / f"{k}-clean.fits"))
    plain = load(ours / "plain.fits")
    mask = trail_mask([ours / "registered" / f"r_{Path(name).stem}.fits"
                       for name in TRAIL_FRAMES], images["livestack"][1])
    rows = {}
    for tool, (full, clean) in images.items():
        noise = robust_noise(full)
        star_fwhm, n_stars = fwhm(full)
        scale = photometric_scale(full, reference)
        residual = float(np.nanmean((full - clean)[mask]) / robust_noise(clean))
        rows[tool] = (noise, star_fwhm, n_stars, residual, scale)
    plain_residual = float(np.nanmean((plain - images["livestack"][1])[mask])
                           / robust_noise(images["livestack"][1]))
    # per unit of signal, every column blurred to the blurriest column's resolution
    target = max(row[1] for row in rows.values())
    matched, achieved = {}, {}
    for tool in images:
        blurred, achieved[tool] = blurred_to(images[tool][0], rows[tool][1], target)
        matched[tool] = robust_noise(blurred) / rows[tool][4]
    additive = load(ours / "additive.fits")
    add_scale = photometric_scale(additive, reference)
    add_blurred, add_achieved = blurred_to(additive, fwhm(additive)[0], target)
    add_matched = robust_noise(add_blurred) / add_scale
    reached = sorted({f"{value:.3f}" for value in achieved.values()})
    # point-source detection: the same Gaussian filter on every stack, per-star SNR vs Siril
    core = full_overlap_core(ours / "all.fits", n_frames)
    stars = detection_stars({tool: images[tool][0] for tool in images}, core)
    n_common = len(stars["siril"])
    snr_ratio = {}
    for width in SNR_FILTERS:
        base = detection_snr(images["siril"][0], stars["siril"], core, width)
        snr_ratio[width] = {
            tool: float(np.median(detection_snr(images[tool][0], stars[tool], core, width)
                                  / base)) for tool in images}

    tools = list(images)
    ours_tools = tools[1:]

    def row(label: str, cell: dict[str, str]) -> None:
        print(f"| {label} | " + " | ".join(cell.get(t, "") for t in tools) + " |")

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    print()
    print(f"oscaar_tres1: {n_frames} lights 1092x736, 20 darks; trail mask {int(mask.sum())} px")
    print("| | Siril 1.0.6 | " + " | ".join(
        [f"livestack {default_kernel} (default)", *(f"livestack {k}" for k in kernels)]) + " |")
    print("|---|" + "---|" * len(tools))
    row("background noise (robust sigma, ADU)", {t: f"{rows[t][0]:.2f}" for t in tools})
    row("median star FWHM (px) [stars]",
        {t: f"{rows[t][1]:.3f} [{rows[t][2]}]" for t in tools})
    row("signal scale vs the reference frame (star pixels)",
        {t: f"{rows[t][4]:.3f}" for t in tools})
    row(f"noise per unit signal at FWHM {target:.3f} px (sharper ones Gaussian-blurred to a "
        f"measured FWHM of {' to '.join(reached)} px; scale from unblurred star pixels)",
        {t: f"{matched[t]:.2f}" for t in tools})
    for width in SNR_FILTERS:
        row(f"detection SNR vs Siril, common Gaussian filter FWHM {width} px "
            f"(median over {n_common} stars)", {t: f"{snr_ratio[width][t]:.3f}" for t in tools})
    row(f"trail residual (clean-stack sigmas; {default_kernel} --reject none "
        f"{plain_residual:+.2f})", {t: f"{rows[t][3]:+.3f}" for t in tools})
    row("seconds per frame, wall",
        {"siril": f"{siril_wall / n_frames:.3f} (convert+calibrate+register+stack)",
         **{t: f"{walls[t] / n_frames:.3f} integrate CLI" for t in ours_tools}})
    row("background noise <= Siril's", {t: yes(rows[t][0] <= rows["siril"][0])
                                        for t in ours_tools})
    row("star FWHM <= Siril's", {t: yes(rows[t][1] <= rows["siril"][1]) for t in ours_tools})
    print()
    print(f"live pass ('livestack stack', journal + transforms): {stack_wall / n_frames:.3f} s "
          f"per frame; Siril / livestack {default_kernel} integrate wall: "
          f"{siril_wall / walls['livestack']:.2f}x")
    print(f"livestack {default_kernel} with --normalize additive: noise per unit signal at "
          f"FWHM {target:.3f} px (reached {add_achieved:.3f}) {add_matched:.2f} (signal scale "
          f"{add_scale:.3f})")
    print("Siril's registered frame 10 rebuilt with OpenCV, residual in noise sigmas: "
          + ", ".join(f"{name} {value:.2f}" for name, value in interp.items())
          + f" -> Siril resampled with {min(interp, key=lambda n: interp[n])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

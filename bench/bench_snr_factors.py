"""Where the colour stack's star SNR goes: one pipeline factor at a time against Siril.

Runs ``livestack stack`` on the 32 GRBG frames of ``../shared/data/seestar_m94_osc`` once
per variant (the baseline configuration of ``bench_demosaic_siril.py`` with one setting
changed: frame weights, normalisation, rejection, warp kernel, saturation clamp...), and
measures every stack on the same stars and the same star-free places as Siril's stack
from a previous ``bench_demosaic_siril.py`` run (``--siril``: its ``siril/result.fit``).

For each variant the table gives, against Siril's stack and against the livestack
baseline: the median Gaussian FWHM, the median over stars of the aperture SNR ratio (as
``bench_demosaic_siril.star_snr``), and that ratio split into its two factors: the
aperture flux ratio (a scale) and the empirical aperture noise ratio; both are in the
stack's own units, so only their quotient (the SNR) compares across tools, while between
livestack variants that share the reference frame's photometric scale each factor is
meaningful on its own. With ``--siril-rejection`` Siril also restacks its registered
frames without rejection (``rej n``) and with plain sigma clipping (``rej s 3 3``), to
weigh its own rejection's cost against livestack's (``stack-mean``). ``--frames I ...``
compares single frames before any stacking: Siril's debayered light I (``process/``)
against livestack's ``debayer`` of the same raw frame (published RCD and the green
diagonals), per channel and on the luminance.

Measured (main 64c4253 plus this change; 80 common stars; SNR / Siril's):

| variant | FWHM (px) | SNR / Siril's | |
|---|---|---|---|
| Siril 1.0.6 (winsorized 3/3) | 2.954 | 1.000 | |
| Siril, no rejection / sigma 3/3 | 2.959 / 2.955 | 1.014 / 1.010 | its rejection costs 1.4 % |
| rcd-published (the old default) | 2.717 | 0.970 | |
| weights none / normalisation additive | 2.698 / 2.707 | 0.969 / 0.971 | no effect |
| stack-mean / kappa-5 (no rejection) | 2.727 | 0.976 | our rejection costs 0.9 % |
| saturation clamp off | 2.717 | 0.970 | no effect |
| warp bicubic / bilinear | 2.796 / 2.967 | 0.983 / 1.007 | blur buys SNR |
| rcd, green diagonals (the new default) | 2.732 | 0.984 | +1.5 % |

Siril's stack is as wide as ours warped bilinearly (2.954 against 2.967 px): its
registration smooths, which lowers the aperture noise. At its resolution livestack is
ahead; at livestack's own (8 % sharper) the rest of the gap is that smoothing.
``bench_siril_resampler.py`` confirms from Siril's pixels that its ``register`` is
bilinear.

The column "FWHM at Siril's SNR" is the trade's single figure: each stack blurred just
enough for its star SNR to equal Siril's (``bench_demosaic_siril.equal_snr_resolution``);
below Siril's 2.954 px is ahead of Siril. Measured on s7siril (main 5db6a1f), load 5-6 on
2 cores, same Siril stack:

| variant | FWHM (px) | SNR / Siril's | FWHM at Siril's SNR (px) | |
|---|---|---|---|---|
| base before the fixed-aperture scale | 2.732 | 0.984 | 2.848 | |
| stack-mean / kappa-4 | 2.731 / 2.731 | 0.987 / 0.986 | 2.824 / 2.825 | rejection: 0.2 % |
| warmup-8 | 2.733 | 0.983 | 2.848 | no effect |
| weights fwhm | 2.658 | 0.947 | 3.024 | sharper, worse trade |
| weights stars / none | 2.718 / 2.717 | 0.979 / 0.983 | 2.855 / 2.857 | |
| **base, fixed-aperture scale** | 2.722 | 0.983 | 2.836 | weights 0.95-1.04 |
| ... stack-mean / weights none | 2.725 / 2.724 | 0.989 / 0.984 | 2.814 / 2.815 | rejection: 0.7 % |

Before the fixed-aperture photometric scale, the noise weights ranged 0.91-1.35 and
followed the seeing (correlation with the frame FWHM +0.79): the detector's flux aperture
(3 window sigmas) follows each frame's seeing, so the blurred frames' stars looked up to
16 % brighter than the reference's, where a fixed aperture finds them 2-4 % fainter. Now
(-0.41) the weights follow transparency, the stack is 0.3 % sharper and the trade figure
0.4 % better; the SNR at the stack's own resolution does not move. Weighting by seeing
(``fwhm``) sharpens the stack by 2.7 % but costs 3.8 % SNR: the worst trade measured.
No setting here lifts the SNR at livestack's resolution to Siril's: the rest is the
resampler (Lanczos3 against Siril's bilinear).

    .venv/bin/python bench/bench_snr_factors.py --siril /tmp/livestack-bench-demosaic/siril
        [--data DIR] [--dir WORK] [--variants NAME ...] [--siril-rejection]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from bench_demosaic_siril import (
    DEFAULT_DATA,
    aperture_flux,
    common_stars,
    empty_places,
    equal_snr_resolution,
    gaussian_fwhm,
    load_luminance,
    star_snr,
)
from bench_integrate_siril import run_livestack
from numpy.typing import NDArray

#: The baseline pins Lanczos3, the colour warp kernel when the tables above were measured
#: (colour frames now default to Mitchell, ``pipeline.warp.kernel: auto``; the
#: ``warp-mitchell`` variant is that default), so that its figures stay comparable.
BASE_WARP = "  warp:\n    kernel: lanczos3\n"
BASE = "pipeline:\n  debayer:\n    method: rcd\n  gate:\n    max_elongation: 3.0\n" + BASE_WARP
#: Variant name -> YAML lines appended under ``pipeline:`` of the baseline.
VARIANTS: dict[str, str] = {
    "base": "",
    "weights-none": "  normalize:\n    weights: none\n",
    "norm-additive": "  normalize:\n    method: additive\n",
    "stack-mean": "  stack:\n    method: mean\n",
    "kappa-5": "  stack:\n    kappa_low: 5.0\n    kappa_high: 5.0\n",
    "kappa-4": "  stack:\n    kappa_low: 4.0\n    kappa_high: 4.0\n",
    "warmup-8": "  stack:\n    warmup_frames: 8\n",
    "weights-fwhm": "  normalize:\n    weights: fwhm\n",
    "weights-stars": "  normalize:\n    weights: stars\n",
    "warp-bicubic": "  warp:\n    kernel: bicubic\n",
    "warp-bilinear": "  warp:\n    kernel: bilinear\n",
    "warp-mitchell": "  warp:\n    kernel: mitchell\n",
    "saturation-off": "  saturation:\n    enabled: false\n",
    "rcd-published": "  debayer:\n    method: rcd\n    rcd_green_diagonals: false\n",
    "malvar": "  debayer:\n    method: malvar\n",
}


def config_text(variant: str) -> str:
    """The baseline YAML with the variant's keys merged (a variant's ``debayer`` and
    ``warp`` win)."""
    extra = VARIANTS[variant]
    base = BASE
    if "debayer:" in extra:
        base = base.replace("  debayer:\n    method: rcd\n", "")
    if "warp:" in extra:
        base = base.replace(BASE_WARP, "")
    return base + extra


def measure(images: dict[str, NDArray[np.float64]], stars: dict[str, NDArray[np.float64]],
            empty: dict[str, NDArray[np.float64]]) -> dict[str, dict[str, float]]:
    """Per image: median FWHM, and the star-wise median of SNR, flux and noise (noise as
    the aperture flux's standard deviation on empty sky)."""
    out: dict[str, dict[str, float]] = {}
    for name, image in images.items():
        xy = stars[name]
        flux = aperture_flux(image, xy)
        snr = star_snr(image, xy, empty[name])
        out[name] = {
            "fwhm": float(np.nanmedian([gaussian_fwhm(image, x, y) for x, y in xy])),
            "snr": snr, "flux": flux, "noise": flux / snr,
        }  # type: ignore[dict-item]
    return out


SIRIL_RESTACK = """requires 1.0.0
cd process
stack r_light rej n -norm=addscale -out=../result_siril-norej
stack r_light rej s 3 3 -norm=addscale -out=../result_siril-sigma
close
"""


def run_siril_restacks(siril_dir: Path) -> None:
    """Restack Siril's registered sequence (``process/r_light_``) without rejection and
    with sigma clipping, next to its ``result.fit``."""
    import subprocess

    script = siril_dir / "restack.ssf"
    script.write_text(SIRIL_RESTACK)
    done = subprocess.run(["siril-cli", "-d", str(siril_dir), "-s", str(script)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:])
        raise SystemExit("siril restack failed")


def compare_frame(siril_dir: Path, index: int) -> None:
    """Print, for light ``index``, the star SNR of livestack's RCD (published, green
    diagonals) over Siril's debayer of the same raw frame, per channel and on the
    luminance, and the RMS difference of each plane from Siril's (Siril rounds to
    integers: 0.29 ADU RMS is identity)."""
    from astropy.io import fits

    from livestack.pipeline.debayer import debayer
    from livestack.storage.fitsio import read_frame

    light = sorted((siril_dir / "lights").glob("*.fit"))[index]
    raw, info, _ = read_frame(light)
    theirs = np.asarray(fits.getdata(siril_dir / "process" / f"light_{index + 1:05d}.fit"),
                        dtype=np.float64)
    planes = {"siril": theirs,
              "rcd-published": debayer(raw, info.bayer_pattern or "GRBG", "rcd", False),
              "rcd-green": debayer(raw, info.bayer_pattern or "GRBG", "rcd", True)}
    lum = {n: (p[0] + 2.0 * p[1] + p[2]) / 4.0 for n, p in planes.items()}
    pair = {"siril": lum["siril"], "rcd-green": lum["rcd-green"]}
    xy, blank = common_stars(pair)["siril"], empty_places(pair)["siril"]
    inner = (slice(20, -20), slice(20, -20))
    print(f"\nframe {index} ({light.name}): SNR / Siril's debayer (R, G, B, luminance); "
          "RMS difference of R, G, B (ADU)")
    for name in ("rcd-published", "rcd-green"):
        ratios = [float(np.median(star_snr(planes[name][k].astype(np.float64), xy, blank)
                                  / star_snr(theirs[k], xy, blank))) for k in range(3)]
        ratios.append(float(np.median(star_snr(lum[name], xy, blank)
                                      / star_snr(lum["siril"], xy, blank))))
        rms = [float(np.sqrt(np.mean((planes[name][k][inner] - theirs[k][inner]) ** 2)))
               for k in range(3)]
        print(f"| {name} | " + " | ".join(f"{r:.4f}" for r in ratios) + " | "
              + " | ".join(f"{r:.2f}" for r in rms) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--siril", type=Path, required=True,
                        help="the siril/ folder of a bench_demosaic_siril.py run")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/livestack-bench-snr"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--reuse", action="store_true", help="keep stacks already in --dir")
    parser.add_argument("--frames", nargs="*", type=int, default=[],
                        help="also compare single debayered frames (0-based) with Siril's")
    parser.add_argument("--siril-rejection", action="store_true",
                        help="also restack Siril's registered frames with rej n and rej s 3 3")
    args = parser.parse_args()
    variants = list(dict.fromkeys(["base", *args.variants]))
    lights = args.siril / "lights"
    if not lights.is_dir():
        lights = args.data / "lights"
    args.dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, NDArray[np.float64]] = {
        "siril": load_luminance(args.siril / "result.fit")}
    from astropy.io import fits

    frames: dict[str, int] = {"siril": len(list(lights.glob("*.fit")))}
    siril_variants = []
    if args.siril_rejection:
        siril_variants = ["siril-norej", "siril-sigma"]
        run_siril_restacks(args.siril)
        for name in siril_variants:
            images[name] = load_luminance(args.siril / f"result_{name}.fit")
            frames[name] = frames["siril"]
    for variant in variants:
        out = args.dir / variant
        if not (args.reuse and any(out.glob("*/*/stack.fits"))):
            if out.exists():
                shutil.rmtree(out)
            config = args.dir / f"{variant}.yaml"
            config.write_text(config_text(variant))
            run_livestack(["stack", str(lights), "-o", str(out), "-c", str(config),
                           "--no-progress"])
        stack = next(out.glob("*/*/stack.fits"))
        images[variant] = load_luminance(stack)
        frames[variant] = int(fits.getheader(stack)["NCOMBINE"])
        print(f"stacked {variant}", file=sys.stderr)
    # The stars and blank places of Siril's stack and the baseline; every livestack
    # variant shares the baseline's grid (same reference frame).
    pair = {"siril": images["siril"], "base": images["base"]}
    stars = common_stars(pair)
    empty = empty_places(pair)
    for variant in variants:
        stars[variant], empty[variant] = stars["base"], empty["base"]
    for name in siril_variants:
        stars[name], empty[name] = stars["siril"], empty["siril"]
    result = measure(images, stars, empty)
    for index in args.frames:
        compare_frame(args.siril, index)
    # The trade's single figure: the FWHM each stack has once blurred just enough for its
    # star SNR to equal Siril's (bench_demosaic_siril.equal_snr_resolution).
    equal = {name: equal_snr_resolution(images[name], stars[name], empty[name],
                                         result["siril"]["snr"])[0] for name in images}
    print(f"\n{len(stars['siril'])} common stars, {len(empty['siril'])} blank places")
    print("| variant | frames | median FWHM (px) | SNR / Siril's | FWHM at Siril's SNR (px) | "
          "SNR / base | flux / base | aperture noise / base |")
    print("|---|---|---|---|---|---|---|---|")
    sir, base = result["siril"], result["base"]
    for name, m in result.items():
        print(f"| {name} | {frames[name]} | {m['fwhm']:.3f} | "
              f"{np.median(m['snr'] / sir['snr']):.3f} | {equal[name]:.3f} | "
              f"{np.median(m['snr'] / base['snr']):.3f} | "
              f"{np.median(m['flux'] / base['flux']):.3f} | "
              f"{np.median(m['noise'] / base['noise']):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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
meaningful on its own.

    .venv/bin/python bench/bench_snr_factors.py --siril /tmp/livestack-bench-demosaic/siril
        [--data DIR] [--dir WORK] [--variants NAME ...]
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
    gaussian_fwhm,
    load_luminance,
    star_snr,
)
from bench_integrate_siril import run_livestack
from numpy.typing import NDArray

BASE = "pipeline:\n  debayer:\n    method: rcd\n  gate:\n    max_elongation: 3.0\n"
#: Variant name -> YAML lines appended under ``pipeline:`` of the baseline.
VARIANTS: dict[str, str] = {
    "base": "",
    "weights-none": "  normalize:\n    weights: none\n",
    "norm-additive": "  normalize:\n    method: additive\n",
    "stack-mean": "  stack:\n    method: mean\n",
    "kappa-5": "  stack:\n    kappa_low: 5.0\n    kappa_high: 5.0\n",
    "warp-bicubic": "  warp:\n    kernel: bicubic\n",
    "warp-bilinear": "  warp:\n    kernel: bilinear\n",
    "saturation-off": "  saturation:\n    enabled: false\n",
    "rcd-published": "  debayer:\n    method: rcd\n    rcd_green_diagonals: false\n",
    "malvar": "  debayer:\n    method: malvar\n",
}


def config_text(variant: str) -> str:
    """The baseline YAML with the variant's keys merged (a variant's ``debayer`` wins)."""
    extra = VARIANTS[variant]
    base = BASE
    if "debayer:" in extra:
        base = base.replace("  debayer:\n    method: rcd\n", "")
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--siril", type=Path, required=True,
                        help="the siril/ folder of a bench_demosaic_siril.py run")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/livestack-bench-snr"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--reuse", action="store_true", help="keep stacks already in --dir")
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
    result = measure(images, stars, empty)
    print(f"\n{len(stars['siril'])} common stars, {len(empty['siril'])} blank places")
    print("| variant | frames | median FWHM (px) | SNR / Siril's | SNR / base | "
          "flux / base | aperture noise / base |")
    print("|---|---|---|---|---|---|---|")
    sir, base = result["siril"], result["base"]
    for name, m in result.items():
        print(f"| {name} | {frames[name]} | {m['fwhm']:.3f} | "
              f"{np.median(m['snr'] / sir['snr']):.3f} | "
              f"{np.median(m['snr'] / base['snr']):.3f} | "
              f"{np.median(m['flux'] / base['flux']):.3f} | "
              f"{np.median(m['noise'] / base['noise']):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

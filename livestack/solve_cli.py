"""``livestack solve STACK_OR_FRAME``: plate-solve a file after the fact.

Stars are detected with livestack's own detector, hints come from the header (an
existing WCS, RA/DEC, OBJCTRA/OBJCTDEC, the pixel scale) and the command line, and
``solve-field`` runs as in the daemon (:mod:`livestack.storage.solver`). The result is
printed; ``--write`` puts the WCS into a ``stack.fits`` that livestack wrote (a user's
frame is never modified: ``--wcs-out`` writes the WCS as a separate header file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from astropy.io import fits

from livestack.cli import configure_logging
from livestack.config import load_config
from livestack.errors import FrameError, StorageError, UsageError
from livestack.pipeline.debayer import debayer, luminance
from livestack.pipeline.detect import detect_stars
from livestack.pipeline.wcs import field_geometry, header_cards
from livestack.reasons import Reason
from livestack.service.solving import add_wcs_cards
from livestack.storage.atomic import atomic_write
from livestack.storage.fitsio import write_hdul
from livestack.storage.headers import parse_frame_info
from livestack.storage.solver import hints_from_header, solve_stars

#: Exit code when the file was read but did not solve.
NOT_SOLVED_EXIT = 3


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``solve`` on an ``add_subparsers()`` object; return its parser."""
    p = subparsers.add_parser(
        "solve", help="plate-solve a stack or frame (astrometry.net, offline)",
        description="Detect stars, plate-solve them with astrometry.net's solve-field and "
                    "print the WCS: centre, field size, orientation, pixel scale.")
    p.add_argument("path", metavar="STACK_OR_FRAME", help="FITS stack or frame")
    p.add_argument("-c", "--config", help="YAML configuration (solver.index_dir, "
                   "solver.time_limit_s)")
    p.add_argument("--scale", type=float, metavar="ARCSEC",
                   help="pixel-scale hint, arcseconds per pixel")
    p.add_argument("--ra", type=float, metavar="DEG", help="centre hint, RA in degrees")
    p.add_argument("--dec", type=float, metavar="DEG", help="centre hint, Dec in degrees")
    p.add_argument("--time-limit", type=float, metavar="S", help="seconds (default: config)")
    p.add_argument("--write", action="store_true",
                   help="write the WCS into the file (only a livestack stack.fits)")
    p.add_argument("--wcs-out", metavar="FILE", help="write the WCS as a FITS header file")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)
    return p


def _read(path: Path) -> tuple[Any, Any, Any]:
    """Image (2-D luminance), FrameInfo and header of a frame or stack."""


    try:
        with fits.open(path, memmap=False) as hdul:
            hdu = next((h for h in hdul if h.data is not None and h.data.ndim >= 2), None)
            if hdu is None:
                raise FrameError(Reason.NOT_2D, f"{path}: no image in the file", path)
            header = hdu.header.copy()
            data = np.asarray(hdu.data, dtype=np.float32)
    except FileNotFoundError:
        raise FrameError(Reason.VANISHED, f"{path}: no such file", path) from None
    except OSError as exc:
        raise FrameError(Reason.NOT_FITS, f"{path}: not a readable FITS file ({exc})",
                         path) from None
    if data.ndim == 3 and data.shape[0] == 3:
        data = luminance(data)
    elif data.ndim != 2:
        raise FrameError(Reason.NOT_2D, f"{path}: image of shape {data.shape} is not 2-D", path)
    info = parse_frame_info(header, str(path), (data.shape[0], data.shape[1]))
    if info.bayer_pattern and "STACKID" not in header:
        data = luminance(debayer(data, info.bayer_pattern))
    return np.ascontiguousarray(data), info, header


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``livestack solve``; return 0 (solved) or :data:`NOT_SOLVED_EXIT`.

    Raises
    ------
    UsageError
        Bad options, ``--write`` on a file livestack did not write.
    FrameError
        The file cannot be read as an image.
    StorageError
        ``--write`` / ``--wcs-out`` cannot write.
    """
    out = sys.stdout if out is None else out


    configure_logging("DEBUG" if getattr(args, "verbose", False) else "WARNING")
    if (args.ra is None) != (args.dec is None):
        raise UsageError("solve: give --ra and --dec together")
    if args.scale is not None and args.scale <= 0:
        raise UsageError("solve: --scale must be > 0")
    config = load_config(args.config).solver
    path = Path(args.path)
    if args.write and not _is_livestack_stack(path):
        raise UsageError(f"solve: {path}: --write only updates a stack.fits livestack wrote "
                         "(a user's file is never modified); use --wcs-out FILE")
    image, info, header = _read(path)
    if args.scale is not None:
        info = replace(info, pixel_scale_arcsec=args.scale)
    if args.ra is not None:
        info = replace(info, ra_deg=args.ra % 360.0, dec_deg=args.dec)
    stars = detect_stars(image)[0]
    hints = hints_from_header(header, info)
    result = solve_stars(stars, info.shape, hints, index_dir=config.index_dir,
                         time_limit_s=args.time_limit or config.time_limit_s)
    report: dict[str, Any] = {"file": str(path), **result.as_dict(),
                              "hints": list(hints.sources)}
    if result.solved and result.cards is not None:
        report["field"] = field_geometry(result.cards, info.shape).as_dict()
        report["wcs"] = result.cards
        if args.wcs_out:
            _write_wcs_file(Path(args.wcs_out), result.cards)
        if args.write:
            _write_into_stack(path, result.cards)
    if args.json:
        out.write(json.dumps(report, indent=1) + "\n")
    else:
        out.write(f"{path}: {result.message}\n")
        if "field" in report:
            f = report["field"]
            out.write(f"  centre RA {f['ra_deg']:.5f} Dec {f['dec_deg']:+.5f} deg; field "
                      f"{f['width_deg']:.3f} x {f['height_deg']:.3f} deg; "
                      f"{f['scale_arcsec']:.3f}\"/px; PA {f['pa_deg']:.2f} deg"
                      f"{' (mirrored)' if f['flipped'] else ''}\n")
    return 0 if result.solved else NOT_SOLVED_EXIT


def _is_livestack_stack(path: Path) -> bool:

    try:
        header = fits.getheader(path)
    except OSError:
        return False
    return "STACKID" in header and "NCOMBINE" in header


def _write_wcs_file(path: Path, cards: dict) -> None:


    header = fits.Header()
    for key, value, comment in header_cards(cards):
        header[key] = (value, comment)
    try:
        fits.PrimaryHDU(header=header).writeto(path, overwrite=True)
    except OSError as exc:
        raise StorageError(f"{path}: cannot write the WCS: {exc}") from None


def _write_into_stack(path: Path, cards: dict) -> None:
    """Replace the WCS of a livestack ``stack.fits`` atomically."""



    with fits.open(path, memmap=False) as hdul:
        hdul.readall()
        add_wcs_cards(hdul[0].header, cards)
        with atomic_write(path, what="stack FITS") as (fd, _tmp), \
                os.fdopen(fd, "wb", closefd=False) as fh:
            write_hdul(hdul, fh)

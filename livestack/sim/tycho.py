"""Frames of the real sky, rendered from the Tycho-2 stars of an astrometry.net index file.

The solver's tests and bench need fields that a plate solver can solve and whose true WCS
is known. astrometry.net index files (Debian ``astrometry-data-tycho2-*``) carry their
stars as a kd-tree: the ``kdtree_data_stars`` table holds unit vectors quantised to
``uint32`` (``value = min + q / scale`` with ``min``/``scale`` from
``kdtree_range_stars``), and the ``MAG_VT`` tag-along column their Tycho VT magnitudes.
Those tables are read here directly (raw bytes at the HDU's data offset), then the stars
of a field are projected through a TAN WCS and drawn as Gaussian stars on a sky
background with Poisson-like noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from numpy.typing import NDArray

from livestack.pipeline.wcs import WcsCards, world_to_pixel


@dataclass(frozen=True)
class Catalogue:
    """Stars of one index file.

    Attributes
    ----------
    xyz : ndarray, shape (n, 3), float64
        Unit vectors (ICRS).
    mag : ndarray, shape (n,), float32
        Tycho VT magnitude.
    """

    xyz: NDArray[np.float64]
    mag: NDArray[np.float32]


def read_index_stars(path: str | Path) -> Catalogue:
    """Read the star positions and magnitudes of an astrometry.net index file.

    Raises
    ------
    OSError
        The file cannot be read.
    ValueError
        The file is not an index file with ``kdtree_data_stars`` and ``MAG_VT``.
    """
    path = Path(path)
    locations: dict[str, tuple[int, int, int]] = {}
    little = True
    with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
        endian = str(hdul[0].header.get("ENDIAN", "04:03:02:01"))
        little = endian.startswith("04")
        for hdu in hdul[1:]:
            name = str(hdu.header.get("TTYPE1", ""))
            locations[name] = (int(hdu.fileinfo()["datLoc"]), int(hdu.header["NAXIS1"]),
                               int(hdu.header["NAXIS2"]))
    for needed in ("kdtree_range_stars", "kdtree_data_stars", "MAG_VT"):
        if needed not in locations:
            raise ValueError(f"{path}: no {needed} table (not an astrometry.net index?)")
    order = "<" if little else ">"
    offset, _, _ = locations["kdtree_range_stars"]
    rng = np.fromfile(path, dtype=f"{order}f8", count=7, offset=offset)
    offset, width, n = locations["kdtree_data_stars"]
    if width != 12:
        raise ValueError(f"{path}: star data of {width} bytes per star, expected 3 x uint32")
    quantised = np.fromfile(path, dtype=f"{order}u4", count=3 * n, offset=offset)
    xyz = rng[:3] + quantised.reshape(n, 3) * (1.0 / rng[6])
    offset, _, n_mag = locations["MAG_VT"]
    mag = np.fromfile(path, dtype=">f4", count=n_mag, offset=offset)  # FITS table: big-endian
    return Catalogue(xyz, mag.astype(np.float32))


def tan_cards(ra_deg: float, dec_deg: float, scale_arcsec: float, shape: tuple[int, int],
              rotation_deg: float = 0.0) -> WcsCards:
    """A TAN WCS centred on the image, north up and east left, rotated by ``rotation_deg``."""
    ny, nx = shape
    s = scale_arcsec / 3600.0
    t = math.radians(rotation_deg)
    c, n = math.cos(t), math.sin(t)
    return {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": float(ra_deg),
            "CRVAL2": float(dec_deg), "CRPIX1": (nx + 1) / 2.0, "CRPIX2": (ny + 1) / 2.0,
            "CD1_1": -s * c, "CD1_2": s * n, "CD2_1": s * n, "CD2_2": s * c,
            "CUNIT1": "deg", "CUNIT2": "deg"}


def render_field(catalogue: Catalogue, cards: WcsCards, shape: tuple[int, int], *,
                 fwhm_px: float = 3.0, sky_adu: float = 1000.0, zero_point_mag: float = 22.0,
                 read_noise_adu: float = 5.0, max_stars: int = 2000,
                 rng: np.random.Generator | None = None) -> NDArray[np.float32]:
    """Draw the catalogue's stars that fall in a field.

    Parameters
    ----------
    catalogue : Catalogue
    cards : WcsCards
        The field's WCS (TAN).
    shape : tuple of int
        ``(ny, nx)``.
    fwhm_px : float
        Gaussian star FWHM, pixels.
    sky_adu, zero_point_mag, read_noise_adu : float
        Background level, magnitude giving 1 ADU total, Gaussian read noise (ADU).
    max_stars : int
        Brightest stars drawn at most.
    rng : numpy Generator, optional
        Noise source (seed it); default ``default_rng(0)``.

    Returns
    -------
    ndarray, shape (ny, nx), float32
        ADU.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    ny, nx = shape
    ra0, dec0 = math.radians(float(cards["CRVAL1"])), math.radians(float(cards["CRVAL2"]))
    centre = np.array([math.cos(dec0) * math.cos(ra0), math.cos(dec0) * math.sin(ra0),
                       math.sin(dec0)])
    half_diag_deg = 0.6 * math.hypot(nx, ny) * math.hypot(float(cards["CD1_1"]),
                                                         float(cards["CD2_1"]))
    near = catalogue.xyz @ centre > math.cos(math.radians(half_diag_deg))
    xyz, mag = catalogue.xyz[near], catalogue.mag[near]
    ra = np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(xyz[:, 2], -1.0, 1.0)))
    xy = world_to_pixel(cards, np.column_stack([ra, dec]))
    inside = (xy[:, 0] > -5) & (xy[:, 0] < nx + 4) & (xy[:, 1] > -5) & (xy[:, 1] < ny + 4)
    xy, mag = xy[inside], mag[inside]
    order = np.argsort(mag)[:max_stars]
    image = np.full(shape, sky_adu, dtype=np.float64)
    sigma = fwhm_px / 2.3548
    r = math.ceil(4 * sigma)
    for (x, y), m in zip(xy[order], mag[order], strict=True):
        flux = 10.0 ** (-0.4 * (float(m) - zero_point_mag))
        x0, y0 = round(float(x)), round(float(y))
        xs = np.arange(max(x0 - r, 0), min(x0 + r + 1, nx))
        ys = np.arange(max(y0 - r, 0), min(y0 + r + 1, ny))
        if xs.size == 0 or ys.size == 0:
            continue
        gx = np.exp(-0.5 * ((xs - x) / sigma) ** 2)
        gy = np.exp(-0.5 * ((ys - y) / sigma) ** 2)
        image[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] += flux / (2 * math.pi * sigma ** 2) \
            * np.outer(gy, gx)
    noisy = rng.normal(image, np.sqrt(image + read_noise_adu ** 2))
    return noisy.astype(np.float32)

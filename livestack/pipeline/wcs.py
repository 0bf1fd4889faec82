"""World coordinates of a stack and of its frames (pure math, no files).

A solved reference frame gives a celestial WCS in the FITS convention: gnomonic (TAN)
projection, ``CD`` matrix in degrees per pixel, optionally SIP distortion polynomials
(``A_p_q``/``B_p_q`` forward, ``AP_p_q``/``BP_p_q`` inverse). It is carried here as a plain
dict of FITS cards (:data:`WcsCards`), which is JSON-able (journal, hub events) and turns
into an :class:`astropy.wcs.WCS` with :func:`to_astropy`.

Pixel coordinates follow livestack's convention (0-based, centre of pixel ``[0, 0]`` at
``(0, 0)``); the cards use FITS' 1-based ``CRPIX``. A frame's registration
:class:`~livestack.pipeline.types.Transform` maps frame pixels to reference pixels, so a
frame's WCS is the reference WCS composed with that transform (:func:`compose`), exactly,
SIP included.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from numpy.typing import NDArray

from livestack.pipeline.types import Transform

#: FITS WCS cards: keyword -> value (str, int or float).
WcsCards = dict[str, str | int | float]
#: Cards, or an astropy WCS built from them once (building one costs milliseconds).
WcsLike: TypeAlias = "WcsCards | WCS"

_SIP_KEY = re.compile(r"^(A|B|AP|BP)_(\d+)_(\d+)$")
_KEEP = ("CTYPE1", "CTYPE2", "CUNIT1", "CUNIT2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2",
         "CD1_1", "CD1_2", "CD2_1", "CD2_2", "EQUINOX", "RADESYS", "LONPOLE", "LATPOLE",
         "A_ORDER", "B_ORDER", "AP_ORDER", "BP_ORDER")


@dataclass(frozen=True)
class FieldGeometry:
    """Where a field points and how it lies on the sky.

    Attributes
    ----------
    ra_deg, dec_deg : float
        Sky position of the image centre, degrees (ICRS).
    width_deg, height_deg : float
        Angular size along x and y (centre lines, edge to edge), degrees.
    scale_arcsec : float
        Mean pixel scale at the centre, arcseconds per pixel.
    pa_deg : float
        Position angle of the image's +y axis (up in FITS display), east of north,
        degrees in [0, 360).
    flipped : bool
        True when the image is mirrored (east is clockwise from north as displayed).
    """

    ra_deg: float
    dec_deg: float
    width_deg: float
    height_deg: float
    scale_arcsec: float
    pa_deg: float
    flipped: bool

    def as_dict(self) -> dict[str, float | bool]:
        """JSON-able form (viewer, CLI)."""
        return dict(self.__dict__)


def clean_cards(header: fits.Header | dict) -> WcsCards:
    """Keep only the celestial WCS cards of a header (TAN or TAN-SIP, CD form).

    A ``CDELT``/``PC`` header is converted to the ``CD`` form.

    Parameters
    ----------
    header : astropy Header or dict

    Returns
    -------
    WcsCards

    Raises
    ------
    ValueError
        The header has no two-axis celestial TAN WCS.
    """
    wcs = to_astropy(dict(header))
    cards: WcsCards = {}
    for key in header:
        if key in _KEEP or _SIP_KEY.match(str(key)):
            value = header[key]
            cards[str(key)] = value.item() if isinstance(value, np.generic) else value
    if "CD1_1" not in cards:
        cd = wcs.wcs.cd if wcs.wcs.has_cd() else wcs.wcs.get_pc() * wcs.wcs.cdelt[:, None]
        for i in range(2):
            for j in range(2):
                cards[f"CD{i + 1}_{j + 1}"] = float(cd[i, j])
    for i in (1, 2):
        cards[f"CRPIX{i}"] = float(wcs.wcs.crpix[i - 1])
        cards[f"CRVAL{i}"] = float(wcs.wcs.crval[i - 1])
    return cards


def to_astropy(cards: dict | WCS) -> WCS:
    """An astropy WCS from FITS cards (a WCS is returned as it is).

    Raises
    ------
    ValueError
        The cards do not describe a two-axis celestial TAN projection.
    """
    if isinstance(cards, WCS):
        return cards
    ctype1 = str(cards.get("CTYPE1", ""))
    ctype2 = str(cards.get("CTYPE2", ""))
    if not (ctype1.startswith("RA---TAN") and ctype2.startswith("DEC--TAN")):
        raise ValueError(f"not a TAN celestial WCS (CTYPE1={ctype1!r}, CTYPE2={ctype2!r})")
    header = fits.Header()
    header["NAXIS"] = 2
    for key, value in cards.items():
        if key.upper() in ("NAXIS", "NAXIS1", "NAXIS2", "COMMENT", "HISTORY"):
            continue
        header[key] = value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(header, naxis=2)
    if not wcs.has_celestial:
        raise ValueError("no celestial axes in the WCS")
    return wcs


def pixel_to_world(cards: WcsLike, xy: NDArray[np.float64]) -> NDArray[np.float64]:
    """Map ``(n, 2)`` 0-based pixel positions to ``(n, 2)`` (RA, Dec) in degrees."""
    xy = np.atleast_2d(np.asarray(xy, dtype=np.float64))
    ra, dec = to_astropy(cards).all_pix2world(xy[:, 0], xy[:, 1], 0)
    return np.column_stack([np.mod(ra, 360.0), dec])


def world_to_pixel(cards: WcsLike, radec: NDArray[np.float64]) -> NDArray[np.float64]:
    """Map ``(n, 2)`` (RA, Dec) in degrees to 0-based pixel positions ``(n, 2)``."""
    radec = np.atleast_2d(np.asarray(radec, dtype=np.float64))
    x, y = to_astropy(cards).all_world2pix(radec[:, 0], radec[:, 1], 0, tolerance=1e-6,
                                           maxiter=50, quiet=True)
    return np.column_stack([x, y])


def position_angle_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Position angle (east of north, degrees in [0, 360)) of point 2 seen from point 1."""
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    dra = r2 - r1
    y = math.sin(dra) * math.cos(d2)
    x = math.cos(d1) * math.sin(d2) - math.sin(d1) * math.cos(d2) * math.cos(dra)
    return math.degrees(math.atan2(y, x)) % 360.0


def separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Great-circle distance between two sky positions, degrees (haversine)."""
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    h = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h))))


def field_geometry(cards: WcsLike, shape: tuple[int, int]) -> FieldGeometry:
    """Centre, size, scale and orientation of an image of ``shape`` ``(ny, nx)``."""
    ny, nx = shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    pts = np.array([[cx, cy], [cx, cy + 1.0], [cx + 1.0, cy], [-0.5, cy], [nx - 0.5, cy],
                    [cx, -0.5], [cx, ny - 0.5]])
    world = pixel_to_world(cards, pts)
    (ra, dec), up, right = world[0], world[1], world[2]
    pa_up = position_angle_deg(ra, dec, up[0], up[1])
    pa_right = position_angle_deg(ra, dec, right[0], right[1])
    # Seen on the sky with north up and east left, +x lies 90 deg clockwise of +y
    # (PA(+x) = PA(+y) - 90) for an unflipped image, counter-clockwise for a mirrored one.
    flipped = ((pa_right - pa_up) % 360.0) < 180.0
    scale_deg = math.sqrt(separation_deg(ra, dec, *up) * separation_deg(ra, dec, *right))
    return FieldGeometry(
        ra_deg=float(ra), dec_deg=float(dec),
        width_deg=separation_deg(*world[3], *world[4]),
        height_deg=separation_deg(*world[5], *world[6]),
        scale_arcsec=scale_deg * 3600.0, pa_deg=pa_up, flipped=flipped)


def frame_pointing(cards: WcsLike, transform: Transform, shape: tuple[int, int]
                   ) -> tuple[float, float, float]:
    """Centre RA, Dec and position angle (degrees) of a frame registered to the reference.

    Parameters
    ----------
    cards : WcsCards or astropy WCS
        The reference frame's WCS.
    transform : Transform
        Frame pixels -> reference pixels (the frame's registration).
    shape : tuple of int
        ``(ny, nx)`` of the frame.

    Returns
    -------
    ra_deg, dec_deg, pa_deg : float
        Sky position of the frame's centre and the position angle of its +y axis.
    """
    ny, nx = shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    ref = transform.apply(np.array([[cx, cy], [cx, cy + 1.0]]))
    world = pixel_to_world(cards, ref)
    pa = position_angle_deg(world[0, 0], world[0, 1], world[1, 0], world[1, 1])
    return float(world[0, 0]), float(world[0, 1]), pa


def _sip_terms(cards: WcsCards, name: str) -> dict[tuple[int, int], float]:
    out: dict[tuple[int, int], float] = {}
    for key, value in cards.items():
        m = _SIP_KEY.match(key)
        if m and m.group(1) == name:
            out[(int(m.group(2)), int(m.group(3)))] = float(value)
    return out


def _fit_polynomial(u: NDArray[np.float64], v: NDArray[np.float64],
                    values: NDArray[np.float64], order: int, lowest: int
                    ) -> dict[tuple[int, int], float]:
    """Least-squares coefficients of ``sum c_pq u^p v^q`` (lowest <= p + q <= order)."""
    powers = [(p, q) for p in range(order + 1) for q in range(order + 1 - p)
              if p + q >= lowest]
    # Offsets scaled to ~1 keep the design matrix well conditioned.
    scale = max(float(np.max(np.abs(u))), 1.0)
    design = np.column_stack([(u / scale) ** p * (v / scale) ** q for p, q in powers])
    coeffs, *_ = np.linalg.lstsq(design, values, rcond=None)
    return {pq: float(c) / scale ** (pq[0] + pq[1]) for pq, c in zip(powers, coeffs, strict=True)}


def _eval(terms: dict[tuple[int, int], float], u: NDArray[np.float64],
          v: NDArray[np.float64]) -> NDArray[np.float64]:
    out = np.zeros_like(u)
    for (p, q), c in terms.items():
        out += c * u ** p * v ** q
    return out


def compose(cards: WcsCards, transform: Transform) -> WcsCards:
    """The WCS of a frame whose pixels map to the reference's through ``transform``.

    The TAN part is exact (``CD' = CD A``, ``CRPIX`` moved by the inverse transform). SIP
    polynomials ``f(u)`` on reference offsets become ``A^-1 f(A u)`` on frame offsets,
    a polynomial of the same order, whose coefficients are recovered exactly by a
    least-squares fit on a grid (no approximation beyond round-off).

    Parameters
    ----------
    cards : WcsCards
        Reference WCS.
    transform : Transform
        Frame pixels -> reference pixels (affine).

    Returns
    -------
    WcsCards
        The frame's WCS (same CTYPEs).
    """
    a = transform.matrix[:, :2]
    a_inv = np.linalg.inv(a)
    out: WcsCards = {k: v for k, v in cards.items() if not _SIP_KEY.match(k)}
    crpix_ref = np.array([float(cards["CRPIX1"]) - 1.0, float(cards["CRPIX2"]) - 1.0])
    crpix = transform.inverse().apply(crpix_ref[None, :])[0]
    out["CRPIX1"], out["CRPIX2"] = float(crpix[0]) + 1.0, float(crpix[1]) + 1.0
    cd = np.array([[float(cards["CD1_1"]), float(cards["CD1_2"])],
                   [float(cards["CD2_1"]), float(cards["CD2_2"])]]) @ a
    for i in range(2):
        for j in range(2):
            out[f"CD{i + 1}_{j + 1}"] = float(cd[i, j])
    grid = np.linspace(-1000.0, 1000.0, 9)
    u, v = (g.ravel() for g in np.meshgrid(grid, grid))
    for first, second in (("A", "B"), ("AP", "BP")):
        fa, fb = _sip_terms(cards, first), _sip_terms(cards, second)
        if not fa and not fb:
            continue
        order = int(cards.get(f"{first}_ORDER", max(p + q for p, q in (fa | fb))))
        ur = a[0, 0] * u + a[0, 1] * v
        vr = a[1, 0] * u + a[1, 1] * v
        du, dv = _eval(fa, ur, vr), _eval(fb, ur, vr)
        gu = a_inv[0, 0] * du + a_inv[0, 1] * dv
        gv = a_inv[1, 0] * du + a_inv[1, 1] * dv
        # All powers from 0: the inverse polynomials (on intermediate offsets, which
        # transform like pixel offsets under the CD change above) carry constant and
        # linear terms, and a forward one may too.
        new_a = _fit_polynomial(u, v, gu, order, 0)
        new_b = _fit_polynomial(u, v, gv, order, 0)
        out[f"{first}_ORDER"] = order
        out[f"{second}_ORDER"] = order
        for (p, q), c in new_a.items():
            out[f"{first}_{p}_{q}"] = c
        for (p, q), c in new_b.items():
            out[f"{second}_{p}_{q}"] = c
    return out


def max_offset_px(cards_a: WcsCards, cards_b: WcsCards, shape: tuple[int, int],
                  n: int = 5) -> float:
    """Largest pixel distance between two WCSs over an ``n`` x ``n`` grid of the image.

    Each grid point goes to the sky through ``cards_a`` and back to pixels through
    ``cards_b``; the result is the largest distance from where it started.
    """
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, n), np.linspace(0, ny - 1, n))
    xy = np.column_stack([gx.ravel(), gy.ravel()])
    back = world_to_pixel(cards_b, pixel_to_world(cards_a, xy))
    return float(np.max(np.hypot(*(back - xy).T)))


def header_cards(cards: WcsCards) -> list[tuple[str, str | int | float, str]]:
    """The cards in FITS order with short comments, for writing into a header."""
    comments = {"CTYPE1": "TAN (gnomonic) projection", "CTYPE2": "TAN (gnomonic) projection",
                "CRVAL1": "RA of the reference point, deg", "CRVAL2": "Dec of the reference "
                "point, deg", "CRPIX1": "x of the reference point, 1-based px",
                "CRPIX2": "y of the reference point, 1-based px",
                "CD1_1": "deg per pixel", "CD1_2": "deg per pixel", "CD2_1": "deg per pixel",
                "CD2_2": "deg per pixel"}
    order = {k: i for i, k in enumerate(_KEEP)}
    keys = sorted(cards, key=lambda k: (order.get(k, len(_KEEP)), k))
    return [(k, cards[k], comments.get(k, "")) for k in keys]

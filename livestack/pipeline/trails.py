"""Satellite and aircraft trails in a detection catalogue.

A bright trail crossing a frame breaks into many detections: sep deblends it into
segments and the peak pass of large frames finds a local maximum every few binned pixels
along it. Each fragment is elongated, so the streak cuts of :mod:`detect` (relative to
the field's median elongation) remove them only while they are a minority; when a trail
yields more candidates than the stars do, the fragments set the median, survive the cuts
and make the frame "elongated" (issue found on ``bench/bench_stack_dense.py``'s frame 3).

What makes fragments a trail rather than trailed stars is geometry: they lie on one
straight, narrow line and each is oriented along that line. Stars trailed by wind or a
tracking error share an orientation too, but are scattered over the field, so few of them
fall on any one narrow line. :func:`find_trails` looks for such lines with a Hough
transform on position and orientation (each elongated detection votes for the lines
through it within a few degrees of its own orientation), then refits every candidate line
by least squares to its members, keeps only members within ``band_px`` of the line and
oriented along it, and accepts the line when it holds enough members to be far beyond
what elongated detections scattered at random would put in a band that long and narrow.

Pure: arrays in, arrays and dataclasses out. Coordinates are full-resolution pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.special import pdtrc

#: Hough angle step (degrees).
_THETA_STEP_DEG = 1.0
#: Each elongated detection votes for line angles within this many degrees of its own
#: orientation (the moment orientation of a short fragment is good to a few degrees).
_VOTE_SPREAD_DEG = 3.0
#: Least-squares refits of a candidate line to its members once the band has shrunk
#: from the Hough cell's width to ``band_px`` (halving at each refit).
_REFITS = 3
#: The search stops after this many candidate lines in a row that were not trails, or
#: when no Hough cell holds ``_MIN_VOTES`` detections.
_MAX_FAILURES = 5
_MIN_VOTES = 3
#: A line's member count must be this improbable (Poisson tail) for elongated detections
#: scattered at random, besides ``min_members``. The Hough search and the refits choose
#: the best of ~1e5 distinct lines, and a uniformly trailed field (every star elongated
#: along one direction) must keep its stars, so the bar is far below 1e-5.
_FALSE_ALARM = 1e-9


@dataclass(frozen=True)
class TrailLine:
    """A straight trail found in a catalogue.

    Attributes
    ----------
    x_px, y_px : float
        A point on the line (the centroid of its members), full-resolution pixels.
    angle_deg : float
        Direction of the line, degrees in [0, 180), counter-clockwise from +x (image
        rows increasing is +y).
    length_px : float
        Extent of the members along the line.
    members : int
        Number of elongated detections on the line and oriented along it.
    """

    x_px: float
    y_px: float
    angle_deg: float
    length_px: float
    members: int


def find_trails(xy: NDArray[np.float64], theta_rad: NDArray[np.float64],
                elongation: NDArray[np.float64], band_px: float, *,
                min_elongation: float = 1.5, min_members: int = 5,
                max_angle_deg: float = 12.0,
                max_lines: int = 6) -> tuple[NDArray[np.bool_], list[TrailLine]]:
    """Find straight trails among detections and flag every detection lying on one.

    Parameters
    ----------
    xy : ndarray, shape (n, 2), float64
        Detection positions ``(x, y)``, full-resolution pixels.
    theta_rad : ndarray, shape (n,), float64
        Orientation of each detection's major axis, radians counter-clockwise from +x
        (any branch: taken modulo pi).
    elongation : ndarray, shape (n,), float64
        Major/minor axis ratio of each detection (>= 1; non-finite = not elongated).
    band_px : float
        Half-width of a trail: detections within this distance of a line are on it.
        Must cover the positional error of the fragments plus the trail's curvature.
    min_elongation : float
        Detections at least this elongated may be trail fragments (vote and count).
    min_members : int
        Smallest number of fragments that makes a trail.
    max_angle_deg : float
        A fragment's orientation must agree with its line's direction within this.
    max_lines : int
        Stop after this many trails.

    Returns
    -------
    on_trail : ndarray, shape (n,), bool
        Detections to drop: the fragments of every trail found and any other detection
        (a star the trail crosses, whose centroid and shape the trail biases) within
        ``band_px`` of a trail, over the trail's extent.
    lines : list of TrailLine
        The trails found, most populated first.

    Raises
    ------
    ValueError
        If the arrays' lengths disagree or ``band_px`` is not positive.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    n = xy.shape[0]
    theta = np.asarray(theta_rad, dtype=np.float64).reshape(-1)
    elong = np.asarray(elongation, dtype=np.float64).reshape(-1)
    if theta.size != n or elong.size != n:
        raise ValueError(f"find_trails: {n} positions but {theta.size} orientations and "
                         f"{elong.size} elongations")
    if not band_px > 0:
        raise ValueError(f"find_trails: band_px must be > 0, got {band_px}")
    on_trail = np.zeros(n, dtype=bool)
    lines: list[TrailLine] = []
    pool = np.isfinite(elong) & (elong >= min_elongation) & np.isfinite(theta)
    pool &= np.isfinite(xy).all(axis=1)
    if np.count_nonzero(pool) < min_members:
        return on_trail, lines
    finite = np.isfinite(xy).all(axis=1)
    lo = xy[finite].min(axis=0)
    hi = xy[finite].max(axis=0)
    area = float(max(hi[0] - lo[0], band_px) * max(hi[1] - lo[1], band_px))
    origin = 0.5 * (lo + hi)
    rel = xy - origin
    # The search runs on the pool alone (a few percent of a dense field's candidates).
    pool_idx = np.flatnonzero(pool)
    prel = rel[pool_idx]
    ptheta = np.mod(theta[pool_idx], math.pi)
    live = np.ones(pool_idx.size, dtype=bool)
    tried: set[tuple[int, int]] = set()
    failures = 0
    while len(lines) < max_lines and failures < _MAX_FAILURES:
        if np.count_nonzero(live) < min_members:
            break
        seeds, cell, cell_px = _hough_seeds(prel, ptheta, live, band_px, tried)
        if seeds is None:
            break
        tried.add(cell)
        failures += 1
        line = _refit(prel, ptheta, live, seeds, cell_px, band_px, max_angle_deg)
        if line is None:
            continue
        centre, direction, members, aligned = line
        k = int(np.count_nonzero(members))
        along = prel[members] @ direction
        span = float(along.max() - along.min())
        # The other elongated detections oriented along the line, were they scattered
        # uniformly (a trailed field), would put on average ``lam`` of themselves in a
        # band this long and wide.
        n_others = int(np.count_nonzero(live & aligned)) - k
        lam = max(n_others, 1) * (2.0 * band_px * max(span, band_px)) / area
        if k < min_members or float(pdtrc(k - 1, lam)) > _FALSE_ALARM:
            continue
        failures = 0
        # Everything in the band over the trail's extent goes, round stars included.
        normal = np.array([-direction[1], direction[0]])
        d_perp = np.abs((rel - centre) @ normal)
        s = (rel - centre) @ direction
        inside = (s >= along.min() - band_px) & (s <= along.max() + band_px)
        on_trail |= (d_perp <= band_px) & inside & finite
        on_trail[pool_idx[members]] = True
        live &= ~on_trail[pool_idx]
        angle = math.degrees(math.atan2(direction[1], direction[0])) % 180.0
        lines.append(TrailLine(float(centre[0] + origin[0]), float(centre[1] + origin[1]),
                               angle, span, k))
    lines.sort(key=lambda line: -line.members)
    return on_trail, lines


def _hough_seeds(rel: NDArray[np.float64], theta: NDArray[np.float64],
                 live: NDArray[np.bool_], band_px: float, tried: set[tuple[int, int]]
                 ) -> tuple[NDArray[np.bool_] | None, tuple[int, int], float]:
    """The most voted (angle, offset) cell not yet tried, the ``live`` detections voting
    for it and the cell's width (px); (None, ...) when no cell has ``_MIN_VOTES`` votes.

    Each live detection votes for the angles within ``_VOTE_SPREAD_DEG`` of its own
    orientation, at its offset ``rho = -x sin(a) + y cos(a)`` from the origin. At the
    angle bin nearest a trail's, its fragments' offsets spread over up to ``r_max`` times
    the angle step, two offset bins; a cell's score adds both offset neighbours, so the
    cell centred on the trail holds every fragment that voted for its angle.
    """
    idx = np.flatnonzero(live)
    n_theta = round(180.0 / _THETA_STEP_DEG)
    step = math.radians(_THETA_STEP_DEG)
    r_max = float(np.max(np.hypot(rel[idx, 0], rel[idx, 1]))) + 1.0
    width = max(band_px, 0.5 * step * r_max)
    n_rho = 2 * math.ceil(r_max / width) + 5
    spread = round(_VOTE_SPREAD_DEG / _THETA_STEP_DEG)
    own = np.rint(theta[idx] / step).astype(np.intp)
    offsets = np.arange(-spread, spread + 1)
    k = np.mod(own[:, None] + offsets[None, :], n_theta)  # (m, votes)
    ang = k * step
    rho = -rel[idx, 0, None] * np.sin(ang) + rel[idx, 1, None] * np.cos(ang)
    j = np.floor(rho / width).astype(np.intp) + n_rho // 2
    acc = np.bincount((k * n_rho + j).ravel(), minlength=n_theta * n_rho)
    acc = acc.reshape(n_theta, n_rho)
    score = acc.copy()
    score[:, 1:] += acc[:, :-1]
    score[:, :-1] += acc[:, 1:]
    for cell in tried:
        score[cell] = 0
    best = int(np.argmax(score))
    kb, jb = divmod(best, n_rho)
    if score[kb, jb] < _MIN_VOTES:
        return None, (kb, jb), 3.0 * width
    voted = ((k == kb) & (np.abs(j - jb) <= 1)).any(axis=1)
    seeds = np.zeros(live.shape, dtype=bool)
    seeds[idx[voted]] = True
    return seeds, (kb, jb), 3.0 * width


def _refit(rel: NDArray[np.float64], theta: NDArray[np.float64], live: NDArray[np.bool_],
           seeds: NDArray[np.bool_], cell_px: float, band_px: float, max_angle_deg: float
           ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_],
                      NDArray[np.bool_]] | None:
    """Total-least-squares line through ``seeds`` (a Hough cell ``cell_px`` wide),
    refitted to the ``live`` detections within a band around it that halves from
    ``cell_px`` to ``band_px`` and oriented along it; (centre, unit direction, members,
    which detections are oriented along it) or None. The shrinking band keeps a chance
    detection in the cell from pulling the first fit off a trail of a few fragments."""
    members = seeds
    aligned = seeds
    centre = np.zeros(2)
    direction = np.array([1.0, 0.0])
    max_angle = math.radians(max_angle_deg)
    n_shrink = max(0, math.ceil(math.log2(max(cell_px / band_px, 1.0))))
    for it in range(n_shrink + _REFITS):
        half_width = max(band_px, cell_px / 2.0 ** (it + 1))
        if np.count_nonzero(members) < 2:
            return None
        pts = rel[members]
        centre = pts.mean(axis=0)
        # The principal axis of the members' positions (the trail's own orientation
        # breaks the tie for a compact cluster, where positions give no direction).
        try:
            _u, sv, vt = np.linalg.svd(pts - centre, full_matrices=False)
        except np.linalg.LinAlgError:  # SVD did not converge: no line from these points
            return None
        direction = vt[0]
        if sv.size < 2 or sv[0] < 2.0 * sv[1]:
            mean_angle = _mean_orientation(theta[members])
            direction = np.array([math.cos(mean_angle), math.sin(mean_angle)])
        normal = np.array([-direction[1], direction[0]])
        d_perp = np.abs((rel - centre) @ normal)
        line_angle = math.atan2(direction[1], direction[0])
        diff = np.abs(np.mod(theta - line_angle + 0.5 * math.pi, math.pi) - 0.5 * math.pi)
        aligned = diff <= max_angle
        new = live & (d_perp <= half_width) & aligned
        if half_width == band_px and np.array_equal(new, members):
            break
        members = new
    if np.count_nonzero(members) < 2:
        return None
    return centre, direction, members, aligned


def _mean_orientation(theta: NDArray[np.float64]) -> float:
    """Mean of axial angles (modulo pi), radians."""
    return 0.5 * math.atan2(float(np.sum(np.sin(2.0 * theta))),
                            float(np.sum(np.cos(2.0 * theta))))

"""Route each frame to a stack: one stack per night, target, filter, exposure, binning, ...

Pure: :class:`Router` holds a little state (which stacks exist, where each last pointed, the
current run of alignment failures) and is persisted with :meth:`Router.to_dict` /
:meth:`Router.from_dict` so that a restarted daemon routes the rest of the night identically.

Rules
-----
* Frames whose :class:`StackKey` (object, filter, exposure, binning, shape, Bayer pattern,
  gain, RGB or not) and night agree go to the same stack, even when two targets or filters are
  interleaved.
* A pointing jump (RA/DEC of the frame more than ``slew_threshold_deg`` from the stack's last
  frame) starts a new stack ``<night>/<slug>-2`` (then ``-3`` ...), unless an earlier stack of the
  same key pointed there, in which case the frame goes back to it. This also separates targets
  whose files leave ``OBJECT`` empty. Frames without pointing stay in the most recent stack of
  their key.
* ``failure_run`` consecutive alignment failures that agree among themselves mean the field
  changed without the header saying so (a re-point without RA/DEC, a rotated camera): the stack
  is retired and the next frame of that key starts a new stack.
* A frame that does not align and whose own plate solve (or WCS header) puts its centre more
  than ``solved_jump_fraction`` of the field diagonal from its stack's solved centre moved
  without the header saying so (no RA/DEC keys, a meridian flip and re-point): it goes to the
  stack of that key whose solved centre is near it, else to a new one
  (:meth:`Router.route_solved`). Solved centres come from the caller
  (:meth:`Router.set_solved_centre`); the router never solves.

The night runs from local noon to noon, approximated from UTC: the date of ``DATE-OBS - 12 h``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from livestack.pipeline.types import FrameInfo

_MJD_EPOCH = datetime(1858, 11, 17, tzinfo=timezone.utc)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")
_STATE_VERSION = 1


def _safe(text: str, limit: int = 40) -> str:
    """Make a file-name-safe token: unsafe runs become ``_``; no leading dots."""
    return _UNSAFE.sub("_", text).strip("._")[:limit].rstrip("._")


@dataclass(frozen=True)
class StackKey:
    """What must agree for two frames to be stacked together.

    Attributes
    ----------
    object_name, filter_name : str
        OBJECT and FILTER, stripped, internal whitespace collapsed (may be empty).
    exposure_s : float
        Exposure in seconds, rounded to 1 ms (0.0 when absent or not finite).
    binning : tuple of int
        ``(xbin, ybin)``.
    shape : tuple of int
        ``(ny, nx)``.
    bayer_pattern : str or None
        CFA pattern of the array as read, None for mono.
    gain : float or None
        Camera gain setting, rounded to 1e-3.
    channels : int
        1 for mono and CFA frames, 3 for RGB frames (a colour file never joins a mono
        stack of the same size).
    """

    object_name: str
    filter_name: str
    exposure_s: float
    binning: tuple[int, int]
    shape: tuple[int, int]
    bayer_pattern: str | None = None
    gain: float | None = None
    channels: int = 1

    @classmethod
    def from_info(cls, info: FrameInfo) -> StackKey:
        """Build the key of a frame from its header facts."""
        gain = None if info.gain is None or not math.isfinite(info.gain) else round(info.gain, 3)
        exposure_s = float(info.exposure_s)
        return cls(" ".join(info.object_name.split()), " ".join(info.filter_name.split()),
                   round(exposure_s, 3) if math.isfinite(exposure_s) else 0.0,
                   (int(info.binning[0]), int(info.binning[1])),
                   (int(info.shape[0]), int(info.shape[1])), info.bayer_pattern, gain,
                   int(info.channels))

    def slug(self) -> str:
        """File-system-safe name, e.g. ``"M_42-L-60s"`` or ``"unknown-0.5s-bin2x2"``.

        Object (``unknown`` when empty), filter (omitted when empty), exposure
        (``no-exptime`` when the header has none) and, when not 1x1, binning. Shape, Bayer
        pattern and gain are not in the slug: keys differing only there get distinct stack
        ids through the ``-2`` suffix.
        """
        parts = [_safe(self.object_name) or "unknown"]
        filt = _safe(self.filter_name)
        if filt:
            parts.append(filt)
        # No exposure in the header: a visible "no-exptime", never a "0s" stack.
        parts.append(f"{self.exposure_s:g}s" if self.exposure_s > 0 else "no-exptime")
        if self.binning != (1, 1):
            parts.append(f"bin{self.binning[0]}x{self.binning[1]}")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists)."""
        out = asdict(self)
        out["binning"] = list(self.binning)
        out["shape"] = list(self.shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StackKey:
        """Inverse of :meth:`to_dict`."""
        return cls(str(data["object_name"]), str(data["filter_name"]), float(data["exposure_s"]),
                   (int(data["binning"][0]), int(data["binning"][1])),
                   (int(data["shape"][0]), int(data["shape"][1])),
                   data["bayer_pattern"], None if data["gain"] is None else float(data["gain"]),
                   int(data.get("channels", 1)))  # keys journaled before RGB frames: mono


def night_of(info: FrameInfo, fallback_utc: datetime | None = None) -> str:
    """Return the observing night of a frame as ``"YYYY-MM-DD"`` (the evening's date).

    Parameters
    ----------
    info : FrameInfo
        Uses ``date_obs`` (naive values are taken as UTC), else ``mjd_obs``.
    fallback_utc : datetime, optional
        Used when the header has no date (e.g. the file's modification time).

    Returns
    -------
    str
        Date of ``UTC - 12 h``, so a night from noon to noon keeps one date; ``"undated"``
        when no time is known at all.
    """
    when = info.date_obs
    if when is None and info.mjd_obs is not None and math.isfinite(info.mjd_obs):
        when = _MJD_EPOCH + timedelta(days=info.mjd_obs)
    if when is None:
        when = fallback_utc
    if when is None:
        return "undated"
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when.astimezone(timezone.utc) - timedelta(hours=12)).date().isoformat()


def angular_separation_deg(ra1_deg: float, dec1_deg: float, ra2_deg: float,
                           dec2_deg: float) -> float:
    """Great-circle distance between two sky positions, in degrees (haversine)."""
    d1, d2 = math.radians(dec1_deg), math.radians(dec2_deg)
    h = (math.sin((d2 - d1) / 2.0) ** 2
         + math.cos(d1) * math.cos(d2) * math.sin(math.radians(ra2_deg - ra1_deg) / 2.0) ** 2)
    return math.degrees(2.0 * math.asin(min(1.0, math.sqrt(h))))


def _pointing(info: FrameInfo) -> tuple[float, float] | None:
    ra, dec = info.ra_deg, info.dec_deg
    if ra is None or dec is None or not (math.isfinite(ra) and math.isfinite(dec)):
        return None
    return float(ra), float(dec)


@dataclass
class _Stack:
    stack_id: str
    night: str
    key: StackKey
    pointing: tuple[float, float] | None = None     # (ra_deg, dec_deg) of the last frame
    last_used: int = 0
    n_frames: int = 0
    retired: bool = False
    # current run of agreeing alignment failures: (path, ra_deg, dec_deg)
    failures: list[tuple[str, float | None, float | None]] = field(default_factory=list)
    # plate-solved centre of the stack's reference and its field diagonal:
    # (ra_deg, dec_deg, diagonal_deg)
    solved: tuple[float, float, float] | None = None


class Router:
    """Assign frames to stacks (see the module docstring for the rules).

    Parameters
    ----------
    slew_threshold_deg : float
        A frame pointing farther than this from its stack's last frame starts (or returns to)
        another stack. Dithers and drift stay well below the default 0.5 deg.
    failure_run : int
        Number of consecutive, mutually agreeing alignment failures that retire a stack.
    solved_jump_fraction : float
        An unaligned frame whose solved centre is farther than this fraction of the field
        diagonal from its stack's solved centre belongs to another stack. Dithers and drift
        stay far below the default 0.5; a frame half a field away barely overlaps.

    Raises
    ------
    ValueError
        If ``slew_threshold_deg <= 0``, ``failure_run < 1`` or
        ``solved_jump_fraction <= 0``.
    """

    def __init__(self, slew_threshold_deg: float = 0.5, failure_run: int = 5,
                 solved_jump_fraction: float = 0.5) -> None:
        if not slew_threshold_deg > 0:
            raise ValueError(f"slew_threshold_deg must be > 0, got {slew_threshold_deg}")
        if failure_run < 1:
            raise ValueError(f"failure_run must be >= 1, got {failure_run}")
        if not (solved_jump_fraction > 0 and math.isfinite(solved_jump_fraction)):
            raise ValueError(f"solved_jump_fraction must be > 0, got {solved_jump_fraction}")
        self.slew_threshold_deg = float(slew_threshold_deg)
        self.failure_run = int(failure_run)
        self.solved_jump_fraction = float(solved_jump_fraction)
        self._stacks: dict[str, _Stack] = {}
        self._seq = 0

    # ------------------------------------------------------------------ routing
    def route(self, info: FrameInfo, *, fallback_utc: datetime | None = None) -> str:
        """Return the stack id ``"<night>/<slug>[-N]"`` for a frame and remember its pointing.

        Parameters
        ----------
        info : FrameInfo
            The frame's header facts.
        fallback_utc : datetime, optional
            Time used for the night when the header has no date (see :func:`night_of`).

        Returns
        -------
        str
            An existing stack id when the key, night and pointing agree, else a new one.
        """
        night = night_of(info, fallback_utc)
        key = StackKey.from_info(info)
        where = _pointing(info)
        candidates = sorted((s for s in self._stacks.values()
                             if s.night == night and s.key == key and not s.retired),
                            key=lambda s: s.last_used, reverse=True)
        chosen = next((s for s in candidates if self._near(s.pointing, where)), None)
        if chosen is None:
            chosen = self._new_stack(night, key)
        self._seq += 1
        chosen.last_used = self._seq
        chosen.n_frames += 1
        if where is not None:
            chosen.pointing = where
        return chosen.stack_id

    def report_alignment_failure(self, stack_id: str, info: FrameInfo,
                                 registers_to_previous: bool | None = None) -> tuple[str, ...]:
        """Count a frame of ``stack_id`` that could not be aligned to its reference.

        Parameters
        ----------
        stack_id : str
            The id :meth:`route` returned for the frame.
        info : FrameInfo
            The frame (its path and pointing are remembered).
        registers_to_previous : bool, optional
            Whether this frame aligns with the previous failed frame, when the caller tried.
            When None, failures agree if their pointings are within ``slew_threshold_deg``, or
            if either has no pointing (consecutive failures after the quality gate most
            likely mean the field changed).

        Returns
        -------
        tuple of str
            Empty normally. When this failure completes a run of ``failure_run`` agreeing
            failures, the stack is retired and the paths of the run are returned (oldest
            first) so the caller can route them again into the new stack.

        Raises
        ------
        KeyError
            If ``stack_id`` is unknown.
        """
        stack = self._stacks[stack_id]
        if stack.retired:
            return ()
        where = _pointing(info)
        if stack.failures:
            if registers_to_previous is None:
                _, prev_ra, prev_dec = stack.failures[-1]
                prev = None if prev_ra is None or prev_dec is None else (prev_ra, prev_dec)
                agrees = self._near(prev, where)
            else:
                agrees = registers_to_previous
            if not agrees:
                stack.failures.clear()
        stack.failures.append((info.path, None if where is None else where[0],
                               None if where is None else where[1]))
        if len(stack.failures) < self.failure_run:
            return ()
        stack.retired = True
        paths = tuple(path for path, _, _ in stack.failures)
        stack.failures.clear()
        return paths

    def report_alignment_success(self, stack_id: str) -> None:
        """A frame of ``stack_id`` aligned: the failure run starts again from zero.

        Raises
        ------
        KeyError
            If ``stack_id`` is unknown.
        """
        self._stacks[stack_id].failures.clear()

    def set_solved_centre(self, stack_id: str, ra_deg: float, dec_deg: float,
                          diagonal_deg: float) -> None:
        """Remember where a stack points, from its plate solve.

        Parameters
        ----------
        stack_id : str
            A router stack id.
        ra_deg, dec_deg : float
            Solved centre of the stack's latest aligned frame (or its reference), degrees:
            like the header pointing, the comparison is with the latest frame, so a slow
            drift over the night is not a jump.
        diagonal_deg : float
            The field's diagonal, degrees (the unit of ``solved_jump_fraction``).

        Raises
        ------
        KeyError
            If ``stack_id`` is unknown.
        ValueError
            If a value is not finite or the diagonal is not positive.
        """
        stack = self._stacks[stack_id]
        if not (math.isfinite(ra_deg) and math.isfinite(dec_deg) and math.isfinite(diagonal_deg)
                and diagonal_deg > 0):
            raise ValueError(f"solved centre ({ra_deg}, {dec_deg}) with diagonal "
                             f"{diagonal_deg} deg is not usable")
        stack.solved = (float(ra_deg) % 360.0, float(dec_deg), float(diagonal_deg))

    def solved_centre(self, stack_id: str) -> tuple[float, float, float] | None:
        """``(ra_deg, dec_deg, diagonal_deg)`` of a stack's solve, None before one
        (KeyError if unknown)."""
        return self._stacks[stack_id].solved

    def route_solved(self, stack_id: str, info: FrameInfo, ra_deg: float,
                     dec_deg: float) -> tuple[str, float] | None:
        """Route again a frame of ``stack_id`` that did not align, by its solved centre.

        Parameters
        ----------
        stack_id : str
            The router stack the frame was routed to (and did not align with).
        info : FrameInfo
            The frame (its header pointing, if any, is remembered by the new stack).
        ra_deg, dec_deg : float
            The frame's centre from its own plate solve or WCS header, degrees.

        Returns
        -------
        tuple of (str, float) or None
            None when the stack has no solved centre yet or the frame's centre is within
            ``solved_jump_fraction`` of the field diagonal of it (the frame failed for
            another reason: it stays where it is). Otherwise ``(new_stack_id, moved_deg)``:
            the most recently used stack of the same key and night whose solved centre is
            that near the frame, else a new stack ``<night>/<slug>-N`` centred on the frame;
            it becomes the key's most recent stack, so the frames that follow (without
            header pointing) go there, and the frame leaves the old stack's failure run.

        Raises
        ------
        KeyError
            If ``stack_id`` is unknown.
        ValueError
            If the centre is not finite.
        """
        stack = self._stacks[stack_id]
        if not (math.isfinite(ra_deg) and math.isfinite(dec_deg)):
            raise ValueError(f"solved centre ({ra_deg}, {dec_deg}) is not finite")
        if stack.solved is None:
            return None
        moved_deg = angular_separation_deg(stack.solved[0], stack.solved[1], ra_deg, dec_deg)
        if moved_deg <= self.solved_jump_fraction * stack.solved[2]:
            return None
        candidates = sorted((s for s in self._stacks.values()
                             if s.night == stack.night and s.key == stack.key and not s.retired
                             and s is not stack and s.solved is not None),
                            key=lambda s: s.last_used, reverse=True)
        chosen = next((s for s in candidates if s.solved is not None and angular_separation_deg(
            s.solved[0], s.solved[1], ra_deg, dec_deg)
            <= self.solved_jump_fraction * s.solved[2]), None)
        if chosen is None:
            chosen = self._new_stack(stack.night, stack.key)
            # The frame is the new stack's first: its centre stands for the stack until
            # the stack's own solve replaces it.
            chosen.solved = (float(ra_deg) % 360.0, float(dec_deg), stack.solved[2])
        self._seq += 1
        chosen.last_used = self._seq
        chosen.n_frames += 1
        stack.n_frames = max(0, stack.n_frames - 1)
        stack.failures = [f for f in stack.failures if f[0] != info.path]
        where = _pointing(info)
        if where is not None:
            chosen.pointing = where
        return chosen.stack_id, moved_deg

    def key_of(self, stack_id: str) -> StackKey:
        """The :class:`StackKey` of a stack (KeyError if unknown)."""
        return self._stacks[stack_id].key

    def is_retired(self, stack_id: str) -> bool:
        """True once a failure run has closed the stack (KeyError if unknown)."""
        return self._stacks[stack_id].retired

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state; :meth:`from_dict` restores a router that routes identically."""
        return {
            "version": _STATE_VERSION,
            "slew_threshold_deg": self.slew_threshold_deg,
            "failure_run": self.failure_run,
            "solved_jump_fraction": self.solved_jump_fraction,
            "seq": self._seq,
            "stacks": [{
                "stack_id": s.stack_id, "night": s.night, "key": s.key.to_dict(),
                "pointing": None if s.pointing is None else list(s.pointing),
                "last_used": s.last_used, "n_frames": s.n_frames, "retired": s.retired,
                "failures": [list(f) for f in s.failures],
                "solved": None if s.solved is None else list(s.solved),
            } for s in self._stacks.values()],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Router:
        """Rebuild a router from :meth:`to_dict` output.

        Raises
        ------
        ValueError
            If the state has another version or a missing or malformed field.
        """
        if data.get("version") != _STATE_VERSION:
            raise ValueError(f"router state version {data.get('version')!r} is not "
                             f"{_STATE_VERSION}")
        try:
            # States written before solved routing have no fraction and no solved centres.
            router = cls(float(data["slew_threshold_deg"]), int(data["failure_run"]),
                         float(data.get("solved_jump_fraction", 0.5)))
            router._seq = int(data["seq"])
            for item in data["stacks"]:
                pointing = item["pointing"]
                solved = item.get("solved")
                stack = _Stack(
                    str(item["stack_id"]), str(item["night"]), StackKey.from_dict(item["key"]),
                    None if pointing is None else (float(pointing[0]), float(pointing[1])),
                    int(item["last_used"]), int(item["n_frames"]), bool(item["retired"]),
                    [(str(p), None if ra is None else float(ra), None if dec is None else
                      float(dec)) for p, ra, dec in item["failures"]],
                    None if solved is None else (float(solved[0]), float(solved[1]),
                                                 float(solved[2])))
                router._stacks[stack.stack_id] = stack
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"router state is malformed: {exc!r}") from exc
        return router

    # ------------------------------------------------------------------ internals
    def _near(self, a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
        if a is None or b is None:
            return True
        return angular_separation_deg(a[0], a[1], b[0], b[1]) <= self.slew_threshold_deg

    def _new_stack(self, night: str, key: StackKey) -> _Stack:
        base = f"{night}/{key.slug()}"
        stack_id, n = base, 1
        while stack_id in self._stacks:
            n += 1
            stack_id = f"{base}-{n}"
        stack = _Stack(stack_id, night, key)
        self._stacks[stack_id] = stack
        return stack

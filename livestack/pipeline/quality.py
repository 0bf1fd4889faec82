"""The quality gate: accept or reject a frame from its :class:`FrameMetrics`.

Two kinds of test, checked in this order (the first failing one is the reason):

``no_finite_pixels``, ``background_too_high``, ``background_jump`` (dawn, moon,
headlights), ``too_few_stars``, ``elongated`` (wind, trailing), ``fwhm_too_large``,
``fwhm_jump`` (seeing, focus), ``star_count_drop`` (clouds).

The ``*_jump`` and ``*_drop`` tests compare with running medians of the last ``window``
*accepted* frames and start once ``min_history`` frames were accepted; the others hold
from the first frame. Background checks come first because a brighter sky also costs
stars; shape checks come before the star-count drop because bad seeing and trailing
also cost stars (spread light), while clouds dim stars without changing their shape.

The background jump is measured in units of the running median sky noise (``sigma``), not
as a ratio: sky-limited frames have a noise that tracks the sky level, so 10 sigma is
~10 % on a bright suburban sky and a much smaller step on a dark one, where a small step
already costs depth. Only increases are rejected (a falling sky is harmless). A slow
twilight drift passes because the median follows it.

:meth:`QualityGate.evaluate` is pure; the caller feeds accepted frames back with
:meth:`QualityGate.record_accepted` (frames rejected later, e.g. by registration, should
not enter the history).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livestack.pipeline.ranges import rng
from livestack.pipeline.types import FrameMetrics, Verdict


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the quality gate.

    Attributes
    ----------
    min_stars : int
        Fewer detected stars -> ``too_few_stars``.
    max_fwhm_px : float or None
        Absolute FWHM limit in pixels (None = off) -> ``fwhm_too_large``.
    max_elongation : float
        Median major/minor axis ratio limit -> ``elongated``. 2.0: the real Seestar frames
        measure 1.25-1.77 once debayered with RCD (as on Siril's own RCD frames; bilinear's
        blur had hidden it at 1.21-1.51), and wind or trailing gives more.
    max_background_adu : float or None
        Absolute sky limit in ADU (None = off) -> ``background_too_high``.
    fwhm_jump_ratio : float
        FWHM above this multiple of the running median -> ``fwhm_jump``.
    star_drop_ratio : float
        Star count below this fraction of the running median -> ``star_count_drop``.
    background_jump_sigma : float
        Sky level more than this many running-median noise sigmas above the running
        median sky -> ``background_jump``.
    window : int
        Running medians use the last ``window`` accepted frames.
    min_history : int
        Jump tests start once this many frames were accepted.
    """

    min_stars: int = field(default=8, metadata=rng(0, 100_000))
    max_fwhm_px: float | None = field(default=None, metadata=rng(0.0, None, lo_open=True))
    max_elongation: float = field(default=2.0, metadata=rng(1.0, 100.0))
    max_background_adu: float | None = field(default=None, metadata=rng(0.0, None))
    fwhm_jump_ratio: float = field(default=1.5, metadata=rng(1.0, 100.0, lo_open=True))
    star_drop_ratio: float = field(default=0.5, metadata=rng(0.0, 1.0, lo_open=True))
    background_jump_sigma: float = field(default=10.0, metadata=rng(0.0, 1e6, lo_open=True))
    window: int = field(default=20, metadata=rng(1, 10_000))
    min_history: int = field(default=3, metadata=rng(1, 10_000))

    def __post_init__(self) -> None:
        if self.min_stars < 0:
            raise ValueError(f"min_stars must be >= 0, got {self.min_stars}")
        if self.max_elongation < 1.0:
            raise ValueError(f"max_elongation must be >= 1, got {self.max_elongation}")
        if self.fwhm_jump_ratio <= 1.0:
            raise ValueError(f"fwhm_jump_ratio must be > 1, got {self.fwhm_jump_ratio}")
        if not 0.0 < self.star_drop_ratio < 1.0:
            raise ValueError(f"star_drop_ratio must be in (0, 1), got {self.star_drop_ratio}")
        if self.background_jump_sigma <= 0:
            raise ValueError("background_jump_sigma must be > 0, got "
                             f"{self.background_jump_sigma}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if not 1 <= self.min_history <= self.window:
            raise ValueError(f"min_history must be in [1, window={self.window}], got "
                             f"{self.min_history}")


class QualityGate:
    """Accept/reject frames against absolute limits and the recent accepted history.

    Parameters
    ----------
    config : GateConfig
    """

    def __init__(self, config: GateConfig) -> None:
        self.config = config
        self._history: deque[FrameMetrics] = deque(maxlen=config.window)

    @property
    def history_length(self) -> int:
        """Number of accepted frames in the running window."""
        return len(self._history)

    def evaluate(self, metrics: FrameMetrics) -> Verdict:
        """Judge one frame (does not change the history).

        Parameters
        ----------
        metrics : FrameMetrics

        Returns
        -------
        Verdict
            Accepted, or rejected with a reason code and one sentence with the numbers.
        """
        cfg = self.config
        m = metrics
        if not math.isfinite(m.background_adu):
            return _reject("no_finite_pixels", "the frame has no finite pixel to measure")
        if cfg.max_background_adu is not None and m.background_adu > cfg.max_background_adu:
            return _reject("background_too_high",
                           f"sky background {m.background_adu:.0f} ADU is above the limit "
                           f"{cfg.max_background_adu:.0f} ADU")
        ref = self._medians()
        if ref is not None:
            jump = m.background_adu - ref["background_adu"]
            sigma = ref["noise_adu"]
            if sigma > 0 and jump > cfg.background_jump_sigma * sigma:
                return _reject("background_jump",
                               f"sky background {m.background_adu:.0f} ADU is "
                               f"{jump / sigma:.0f} sigma above the running median "
                               f"{ref['background_adu']:.0f} ADU (dawn, moon or lights?)")
        if m.star_count < cfg.min_stars:
            return _reject("too_few_stars",
                           f"only {m.star_count} stars detected, at least {cfg.min_stars} "
                           "needed")
        if math.isfinite(m.elongation) and m.elongation > cfg.max_elongation:
            return _reject("elongated",
                           f"stars are elongated {m.elongation:.2f}:1, limit "
                           f"{cfg.max_elongation:.2f} (wind or trailing?)")
        if (cfg.max_fwhm_px is not None and math.isfinite(m.fwhm_px)
                and m.fwhm_px > cfg.max_fwhm_px):
            return _reject("fwhm_too_large",
                           f"FWHM {m.fwhm_px:.2f} px is above the limit {cfg.max_fwhm_px:.2f} px")
        if (ref is not None and math.isfinite(m.fwhm_px) and ref["fwhm_px"] > 0
                and m.fwhm_px > cfg.fwhm_jump_ratio * ref["fwhm_px"]):
            return _reject("fwhm_jump",
                           f"FWHM {m.fwhm_px:.2f} px is {m.fwhm_px / ref['fwhm_px']:.1f}x the "
                           f"running median {ref['fwhm_px']:.2f} px (seeing, focus or wind?)")
        if ref is not None and m.star_count < cfg.star_drop_ratio * ref["star_count"]:
            return _reject("star_count_drop",
                           f"star count {m.star_count} is "
                           f"{m.star_count / ref['star_count']:.1f}x the running median "
                           f"{ref['star_count']:.0f} (clouds?)")
        return Verdict(True, None, "accepted")

    def record_accepted(self, metrics: FrameMetrics) -> None:
        """Add an accepted frame's metrics to the running window."""
        self._history.append(metrics)

    def _medians(self) -> dict[str, float] | None:
        """Running medians of the accepted history, None before ``min_history`` frames."""
        if len(self._history) < self.config.min_history:
            return None
        out: dict[str, float] = {}
        for key in ("background_adu", "noise_adu", "star_count", "fwhm_px"):
            vals = np.array([float(getattr(h, key)) for h in self._history], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            out[key] = float(np.median(vals)) if vals.size else float("nan")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state for checkpoints (the accepted history)."""
        return {"version": 1, "history": [h.as_dict() for h in self._history]}

    @classmethod
    def from_dict(cls, config: GateConfig, d: dict[str, Any]) -> QualityGate:
        """Rebuild a gate from :meth:`to_dict` output.

        Parameters
        ----------
        config : GateConfig
            The (possibly new) configuration; a shorter window keeps the newest frames.
        d : dict
            As produced by :meth:`to_dict`.

        Raises
        ------
        ValueError
            If ``d`` is not a gate state.
        """
        if not isinstance(d, dict) or not isinstance(d.get("history"), list):
            raise ValueError("not a quality-gate state: missing 'history' list")
        gate = cls(config)
        for row in d["history"]:
            gate.record_accepted(_metrics_from_dict(row))
        return gate


def _reject(reason: str, message: str) -> Verdict:
    return Verdict(False, reason, message)


def _metrics_from_dict(row: dict[str, Any]) -> FrameMetrics:
    """Inverse of ``FrameMetrics.as_dict`` (None -> NaN for the float fields)."""
    try:
        def num(key: str) -> float:
            value = row.get(key)
            return float("nan") if value is None else float(value)

        scale = row.get("fwhm_arcsec")
        return FrameMetrics(
            star_count=int(row["star_count"]),
            fwhm_px=num("fwhm_px"),
            fwhm_arcsec=None if scale is None else float(scale),
            elongation=num("elongation"),
            background_adu=num("background_adu"),
            noise_adu=num("noise_adu"),
            snr=num("snr"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad quality-gate history row {row!r}: {exc}") from exc

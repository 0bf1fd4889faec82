"""Integrate several sessions (nights) of one target into one stack.

``livestack integrate S1 S2 ... -o OUT.fits`` goes through :func:`plan_sessions`:

1. Every stack folder is read with :func:`livestack.sessionplan.load_session`; the same
   folder twice is a usage error.
2. The sessions must agree on target (``OBJECT``, compared without spaces and case),
   filter, binning and frame size, read from the header of each session's reference
   frame. A mismatch is one :class:`~livestack.errors.UsageError` line naming both
   sessions.
3. Every frame is expressed on the first session's reference grid: each later
   session's reference frame is calibrated and registered afresh onto the first
   session's reference (:class:`~livestack.pipeline.register.Registrar`, the live
   pipeline's matcher), and each stored frame -> session-reference transform is composed
   with it (``T = T_cross o T_frame``). The journals' transforms are never re-matched.
4. The frames of all sessions form one :class:`~livestack.sessionplan.Session`, so
   :func:`~livestack.sessionplan.plan_integration` applies ``--exclude``, ``--select`` and
   ``--reference`` across sessions, and :func:`~livestack.restack.integrate_plan` uses
   the same normalisation and weights across nights as within one (a hazy night
   weighs less).

:func:`add_provenance` lists every session in the product's header; every frame is
already one of the product's records. Calibration uses the masters given on the command
line for every session (recorded per-session calibration has not landed yet).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from livestack.errors import RegistrationError, UsageError
from livestack.pipeline.register import Registrar
from livestack.pipeline.session import PipelineConfig
from livestack.pipeline.types import FrameInfo, Transform
from livestack.restack import _calibrated, _luminance
from livestack.sessionplan import (
    IntegrationPlan,
    MasterSource,
    Session,
    SessionFrame,
    _is_identity,
    check_frame_file,
    load_session,
    plan_integration,
)
from livestack.storage.fitsio import read_header

#: Most general model last: a composed transform keeps the more general of its parts.
_MODELS = ("translation", "similarity", "affine", "homography")


@dataclass(frozen=True)
class SessionSummary:
    """One session of a multi-session integration (for mismatch checks and provenance).

    Attributes
    ----------
    stack_id : str
    folder : str
        The stack folder as given on the command line.
    n_frames : int
        Accepted, active frames in its journal.
    reference : str
        Path of the session's own reference frame.
    info : FrameInfo
        Header facts of that reference frame (target, filter, binning, size).
    cross : Transform
        Session reference -> first session's reference (identity for the first).
    """

    stack_id: str
    folder: str
    n_frames: int
    reference: str
    info: FrameInfo
    cross: Transform


def _reference_of(session: Session) -> SessionFrame:
    """The session's reference: the frame with the identity transform, else the first."""
    return next((f for f in session.frames if _is_identity(f.transform)), session.frames[0])


def _target_key(name: str) -> str:
    return "".join(name.split()).casefold()


def _check_same(a: SessionSummary, b: SessionSummary) -> None:
    """Raise a one-line UsageError when ``b`` cannot be stacked with ``a``."""
    checks = (
        ("target", _target_key(a.info.object_name), _target_key(b.info.object_name),
         a.info.object_name, b.info.object_name),
        ("filter", a.info.filter_name.strip().casefold(), b.info.filter_name.strip().casefold(),
         a.info.filter_name, b.info.filter_name),
        ("binning", tuple(a.info.binning), tuple(b.info.binning),
         "x".join(map(str, a.info.binning)), "x".join(map(str, b.info.binning))),
        ("frame size", tuple(a.info.shape), tuple(b.info.shape),
         f"{a.info.shape[1]}x{a.info.shape[0]}", f"{b.info.shape[1]}x{b.info.shape[0]}"),
        ("colour (Bayer pattern)", a.info.bayer_pattern or "mono", b.info.bayer_pattern or "mono",
         a.info.bayer_pattern or "mono", b.info.bayer_pattern or "mono"),
    )
    for what, key_a, key_b, shown_a, shown_b in checks:
        if key_a != key_b:
            raise UsageError(f"sessions {a.stack_id} and {b.stack_id} differ in {what}: "
                             f"{shown_a!r} vs {shown_b!r}")


def _general_model(a: str, b: str) -> str:
    rank = {m: i for i, m in enumerate(_MODELS)}
    return a if rank.get(a, len(_MODELS)) >= rank.get(b, len(_MODELS)) else b


def cross_register(reference: SessionFrame, frame: SessionFrame,
                   masters: MasterSource | None, pipeline: Any) -> Transform:
    """Register one session's reference frame onto another's, afresh from the raw files.

    Parameters
    ----------
    reference, frame : SessionFrame
        The target reference and the frame to map onto it.
    masters : MasterSource or None
        Calibration for both frames.
    pipeline : PipelineConfig
        Calibration, detection (``detect``) and matching (``register``) settings.

    Returns
    -------
    Transform
        ``frame`` pixel -> ``reference`` pixel.

    Raises
    ------
    FrameError
        A raw file is missing, changed or unreadable (named).
    RegistrationError
        The frames share too few stars.
    """

    ref_image, _, _, ref_stars, _ = _calibrated(reference, masters, pipeline, find_stars=True)
    image, _, _, stars, _ = _calibrated(frame, masters, pipeline, find_stars=True)
    assert ref_stars is not None and stars is not None
    ref_lum = ref_image if ref_image.ndim == 2 else _luminance(ref_image)
    lum = image if image.ndim == 2 else _luminance(image)
    return Registrar(ref_stars, ref_lum, pipeline.register).register(stars, lum)


def load_sessions(stack_dirs: Sequence[str | Path], *, masters: MasterSource | None,
                  pipeline: Any) -> tuple[Session, list[SessionSummary]]:
    """Read several stack folders and merge them onto the first session's reference.

    Parameters
    ----------
    stack_dirs : sequence of str or Path
        Stack folders (see :func:`~livestack.sessionplan.load_session`), first = reference
        session.
    masters : MasterSource or None
        Calibration for the cross-session registration.
    pipeline : PipelineConfig

    Returns
    -------
    session : Session
        All frames in session order, transforms onto the first session's reference;
        ``stack_id`` joins the sessions' ids with ``" + "``.
    summaries : list of SessionSummary

    Raises
    ------
    UsageError
        A folder given twice, a session without frames, mismatching sessions (named),
        or a session that cannot be registered onto the first.
    FrameError
        A session's reference frame is missing, changed or unreadable (named).
    """

    seen: dict[str, str] = {}
    sessions: list[Session] = []
    for folder in stack_dirs:
        key = os.path.realpath(folder)
        if key in seen:
            raise UsageError(f"{folder}: the same session is given twice ({seen[key]})")
        seen[key] = str(folder)
        sessions.append(load_session(folder))
    summaries: list[SessionSummary] = []
    merged: list[SessionFrame] = []
    first_ref = _reference_of(sessions[0])
    for folder, session in zip(stack_dirs, sessions, strict=True):
        ref = _reference_of(session)
        check_frame_file(ref)
        _, info = read_header(Path(ref.path))
        summary = SessionSummary(session.stack_id, str(folder), len(session.frames), ref.path,
                                 info, Transform.identity())
        if summaries:
            _check_same(summaries[0], summary)
            try:
                cross = cross_register(first_ref, ref, masters, pipeline)
            except RegistrationError as exc:
                raise UsageError(f"session {session.stack_id} cannot be registered onto "
                                 f"session {summaries[0].stack_id}: {exc}") from None
            summary = replace(summary, cross=cross)
        summaries.append(summary)
        merged.extend(_onto(session.frames, summary.cross, first=not merged))
    stack_id = " + ".join(s.stack_id for s in summaries)
    return Session(stack_id, tuple(merged), sessions[0].folder), summaries


def _onto(frames: Sequence[SessionFrame], cross: Transform, first: bool
          ) -> list[SessionFrame]:
    """The frames with their transforms composed onto the first session's reference."""
    if first:
        return list(frames)
    out = []
    for frame in frames:
        composed = frame.transform.then(cross)
        model = _general_model(frame.transform.model, cross.model)
        out.append(replace(frame, transform=Transform(composed.matrix, model, 0, math.nan,
                                                      "stored")))
    return out


def plan_sessions(stack_dirs: Sequence[str | Path], *, exclude: Sequence[str] = (),
                  select: str | None = None, reference: str | None = None,
                  masters: MasterSource | None = None, pipeline: Any = None
                  ) -> tuple[IntegrationPlan, list[SessionSummary], Session]:
    """Plan the integration of one or several sessions.

    With one folder this is exactly ``plan_integration(load_session(folder), ...)``.

    Parameters
    ----------
    stack_dirs : sequence of str or Path
        One or more stack folders.
    exclude, select, reference
        See :func:`~livestack.sessionplan.plan_integration`; they apply across sessions.
    masters : MasterSource or None
        Calibration for the cross-session registration.
    pipeline : PipelineConfig, optional
        Default ``PipelineConfig()``.

    Returns
    -------
    plan : IntegrationPlan
    summaries : list of SessionSummary
        Empty for a single session.
    session : Session
        The (merged) session.

    Raises
    ------
    UsageError, FrameError
        As :func:`load_sessions` and :func:`~livestack.sessionplan.plan_integration`.
    """
    if not stack_dirs:
        raise UsageError("integrate: give at least one stack folder")
    if len(stack_dirs) == 1:
        session = load_session(stack_dirs[0])
        return (plan_integration(session, exclude=exclude, select=select,
                                 reference=reference), [], session)
    if pipeline is None:

        pipeline = PipelineConfig()
    session, summaries = load_sessions(stack_dirs, masters=masters, pipeline=pipeline)
    plan = plan_integration(session, exclude=exclude, select=select, reference=reference)
    return plan, list(summaries), session


def add_provenance(product: Any, summaries: Sequence[SessionSummary]) -> None:
    """List the sessions of a multi-session integration in ``product.header``.

    Adds ``NSESSION``, one ``SESSnnnn`` card per session (``stack id: frames, reference``)
    and a ``HISTORY`` line per session with its cross-session transform; ``STACKID``
    becomes the first session's id (the reference session). Does nothing for one session.
    """
    sessions = list(summaries)
    if len(sessions) < 2:
        return
    header = product.header
    header["STACKID"] = sessions[0].stack_id
    header["NSESSION"] = len(sessions)
    for k, s in enumerate(sessions, start=1):
        if k > 9999:
            break
        header[f"SESS{k}"] = (f"{s.stack_id}: {s.n_frames} frames, reference "
                              f"{os.path.basename(s.reference)}")
    lines = [f"session {s.stack_id} ({s.folder}): {s.n_frames} frames; onto the first "
             f"session's reference by [{', '.join(f'{v:.4f}' for v in np.ravel(s.cross.matrix))}]"
             for s in sessions]
    history = header.get("HISTORY")
    header["HISTORY"] = "\n".join([*([str(history)] if history else []), *lines])


__all__ = ["SessionSummary", "add_provenance", "cross_register", "load_sessions",
           "plan_sessions"]

"""Sessions and plans: what an integration starts from, read from the journal.

Steps 1 and 2 of ``livestack integrate`` (the engine, :mod:`livestack.restack`, does the
rest):

1. **Session** (:func:`load_session`): the stack's accepted, active journal rows in
   processing order, each with its raw file, stored transform, metrics and weight.
2. **Plan** (:func:`plan_integration`): drop ``--exclude`` files and frames failing the
   ``--select`` expression, and pick the reference. When the reference changes, every
   stored transform is composed onto the new reference: ``T_new = inv(T_ref) o T_frame``.

Also the journal facts a frame carries into the engine: the check that its raw file is
unchanged (:func:`check_frame_file`), its stored metrics and the live stack's stored
normalisation when it applies.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from livestack.errors import FrameReadError, UsageError
from livestack.pipeline.calibrate import MasterSet
from livestack.pipeline.frame import FrameNorm
from livestack.pipeline.normalize import NormalizeConfig
from livestack.pipeline.select import parse_select, selection_values
from livestack.pipeline.types import FrameInfo, FrameMetrics, Transform
from livestack.reasons import Reason
from livestack.storage.calibration import MASTERS_DIR

JOURNAL_NAME = "journal.sqlite"

_IDENTITY_TOL = 1e-12


class MasterSource(Protocol):
    """Anything that picks the masters for a light (``MasterLibrary``)."""

    def select(self, info: FrameInfo) -> MasterSet:
        """Return the masters that calibrate a light described by ``info``."""
        ...


@dataclass(frozen=True, eq=False)
class SessionFrame:
    """One accepted frame of a session, as the journal recorded it.

    Compared by identity (two rows may name the same file).

    Attributes
    ----------
    path : str
        The raw file.
    transform : Transform
        Frame -> reference of the stack when it was recorded.
    metrics : dict or None
        ``FrameMetrics.as_dict()`` from the journal.
    weight : float or None
        The live stack's weight for the frame.
    row_id, seq : int or None
        Journal row id and processing order.
    size, mtime_ns : int or None
        File size and modification time when it was stacked (to detect changed files).
    sha256 : str or None
        Content hash when it was stacked.
    norm : dict or None
        The live stack's normalisation of the frame (``FrameNorm.to_json()`` plus
        ``reference_file``), when the journal has it.
    masters : list of dict or None
        The masters that calibrated it (``{"kind", "file", "sha256"}``), when recorded.
    """

    path: str
    transform: Transform
    metrics: dict[str, Any] | None = None
    weight: float | None = None
    row_id: int | None = None
    seq: int | None = None
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    norm: dict[str, Any] | None = None
    masters: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class Session:
    """The frames of one stack that an integration starts from.

    Attributes
    ----------
    stack_id : str
    frames : tuple of SessionFrame
        Accepted, active frames in processing order.
    folder : Path or None
        The stack's output folder (where ``stack.fits`` lives), when known.
    root : Path or None
        The output root (journal and ``masters/``), when known.
    """

    stack_id: str
    frames: tuple[SessionFrame, ...]
    folder: Path | None = None
    root: Path | None = None

    def recorded_masters(self) -> dict[str, list[dict[str, str]]]:
        """The recorded masters of each frame that has them, by path, each naming its
        folder (``<root>/masters/``) in ``"dir"``."""
        folder = str(self.root / MASTERS_DIR) if self.root is not None else None
        return {f.path: [{**m, **({"dir": folder} if folder else {})} for m in f.masters]
                for f in self.frames if f.masters}


@dataclass(frozen=True)
class IntegrationPlan:
    """What :func:`integrate_plan` will combine.

    Attributes
    ----------
    stack_id : str
    frames : tuple of SessionFrame
        Frames to integrate, processing order, transforms relative to ``reference``.
    reference : SessionFrame
        The reference frame (one of ``frames``; its transform is the identity).
    excluded : tuple of (str, str)
        ``(path, why)`` of the session frames left out (``"--exclude"`` or
        ``"--select"``).
    selection : str or None
        The ``--select`` expression applied.
    reference_changed : bool
        True when the reference differs from the one the transforms were stored for.
    """

    stack_id: str
    frames: tuple[SessionFrame, ...]
    reference: SessionFrame
    excluded: tuple[tuple[str, str], ...] = ()
    selection: str | None = None
    reference_changed: bool = False


# ----------------------------------------------------------------------------- session
def find_journal(stack_dir: Path) -> Path:
    """Return the ``journal.sqlite`` of the output root holding ``stack_dir``.

    Raises
    ------
    UsageError
        If ``stack_dir`` is not a folder or no parent folder holds a journal.
    """
    folder = Path(os.path.abspath(stack_dir))
    if not folder.is_dir():
        raise UsageError(f"{stack_dir}: no such stack folder")
    for candidate in (folder, *folder.parents):
        if (candidate / JOURNAL_NAME).is_file():
            return candidate / JOURNAL_NAME
    raise UsageError(f"{stack_dir}: no {JOURNAL_NAME} in this folder or above it "
                     "(give a stack folder written by 'livestack run' or 'livestack stack')")


def load_session(stack_dir: str | Path | None = None, *, journal: Any = None,
                 stack_id: str | None = None) -> Session:
    """Read a stack's accepted frames from its journal.

    Parameters
    ----------
    stack_dir : str or Path, optional
        A stack folder (``<output>/<night>/<target>``) or the output root when it holds
        a single stack. The journal is found in it or above it.
    journal : Journal, optional
        An open journal (the daemon's); then ``stack_id`` is required.
    stack_id : str, optional
        Which stack of the journal.

    Returns
    -------
    Session

    Raises
    ------
    UsageError
        No journal, no such stack, several stacks to choose from, or no accepted frame.
    JournalError
        The journal cannot be read.
    """
    from livestack.storage.journal import Journal

    owned = None
    if journal is None:
        if stack_dir is None:
            raise UsageError("integrate: give a stack folder (or a journal and a stack id)")
        journal_path = find_journal(Path(stack_dir))
        owned = journal = Journal(journal_path)
        root = journal_path.parent
    else:
        root = Path(journal.path).parent
    try:
        stacks = journal.stacks()
        if stack_id is None:
            wanted = Path(os.path.abspath(stack_dir)) if stack_dir is not None else root
            matching = [s for s in stacks if (root / s.folder).resolve() == wanted.resolve()]
            if not matching and wanted.resolve() == root.resolve() and len(stacks) == 1:
                matching = stacks
            if not matching:
                names = ", ".join(s.folder for s in stacks) or "none"
                raise UsageError(f"{stack_dir}: not a stack folder of {root / JOURNAL_NAME} "
                                 f"(stacks: {names})")
            stack = matching[0]
        else:
            found = journal.stack(stack_id)
            if found is None:
                raise UsageError(f"no stack {stack_id!r} in {root / JOURNAL_NAME}")
            stack = found
        rows = [r for r in journal.rows(stack_id=stack.id, status="accepted") if r.active]
    finally:
        if owned is not None:
            owned.close()
    rows.sort(key=lambda r: (r.seq if r.seq is not None else math.inf, r.id))
    frames = []
    for r in rows:
        if r.transform is None:
            raise UsageError(f"{r.path}: accepted in the journal without a stored transform")
        frames.append(SessionFrame(
            path=r.path, transform=Transform.from_list(r.transform, r.model or "similarity"),
            metrics=r.metrics, weight=r.weight, row_id=r.id, seq=r.seq, size=r.size,
            mtime_ns=r.mtime_ns, sha256=r.sha256, norm=r.norm, masters=r.masters))
    if not frames:
        raise UsageError(f"stack {stack.id}: no accepted frame in the journal")
    return Session(stack.id, tuple(frames), root / stack.folder, root)


# -------------------------------------------------------------------------------- plan
def _matches(frame: SessionFrame, pattern: str) -> bool:
    """True when ``pattern`` (a path or a glob) names the frame's file."""
    path = frame.path
    if pattern == path or os.path.abspath(pattern) == os.path.abspath(path):
        return True
    name = os.path.basename(path)
    return (fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(name, pattern)
            or fnmatch.fnmatchcase(path, os.path.abspath(pattern)))


def _is_identity(transform: Transform) -> bool:
    return bool(np.all(np.abs(transform.matrix - np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
                       < _IDENTITY_TOL))


def plan_integration(session: Session, *, exclude: Sequence[str] = (),
                     select: str | None = None, reference: str | None = None
                     ) -> IntegrationPlan:
    """Choose the frames and the reference, and express every transform on it.

    Parameters
    ----------
    session : Session
    exclude : sequence of str
        Paths, file names or globs (``"tres1-06?.fit"``); each must match a frame.
    select : str, optional
        A ``--select`` expression over the journal metrics
        (see :mod:`livestack.pipeline.select`).
    reference : str, optional
        Path or file name of the new reference; by default the stack's reference
        (the frame with the identity transform) or, when it is left out, the first
        remaining frame.

    Returns
    -------
    IntegrationPlan

    Raises
    ------
    UsageError
        An ``--exclude`` pattern matching no frame, a bad ``--select`` expression,
        a reference not in the (remaining) session, or nothing left to integrate.
    """
    selection = parse_select(select) if select is not None else None
    excluded: list[tuple[str, str]] = []
    kept: list[SessionFrame] = []
    used = dict.fromkeys(exclude, False)
    for frame in session.frames:
        hit = [p for p in exclude if _matches(frame, p)]
        for p in hit:
            used[p] = True
        if hit:
            excluded.append((frame.path, "--exclude"))
        elif selection is not None and not selection(selection_values(frame.metrics,
                                                                      frame.weight)):
            excluded.append((frame.path, "--select"))
        else:
            kept.append(frame)
    unused = [p for p, u in used.items() if not u]
    if unused:
        raise UsageError(f"--exclude {unused[0]!r} matches no accepted frame of stack "
                         f"{session.stack_id}")
    if not kept:
        raise UsageError(f"stack {session.stack_id}: no frame left to integrate after "
                         "--exclude/--select")

    stored_ref = next((f for f in session.frames if _is_identity(f.transform)), None)
    if reference is not None:
        candidates = [f for f in kept if _matches(f, reference)]
        if len(candidates) != 1:
            if any(_matches(f, reference) for f in session.frames):
                raise UsageError(f"--reference {reference!r} is excluded from the integration")
            if len(candidates) > 1:
                raise UsageError(f"--reference {reference!r} names {len(candidates)} frames; "
                                 "give one file")
            raise UsageError(f"--reference {reference!r} is not an accepted frame of stack "
                             f"{session.stack_id}")
        new_ref = candidates[0]
    elif stored_ref is not None and stored_ref in kept:
        new_ref = stored_ref
    else:
        new_ref = kept[0]

    changed = stored_ref is None or new_ref is not stored_ref
    frames: list[SessionFrame] = []
    back = new_ref.transform.inverse()  # old reference grid -> new reference grid
    for frame in kept:
        if frame is new_ref:
            transform = Transform.identity()
        elif changed:
            composed = frame.transform.then(back)
            transform = Transform(composed.matrix, frame.transform.model, 0, math.nan, "stored")
        else:
            transform = frame.transform
        frames.append(replace(frame, transform=transform))
    ref_index = kept.index(new_ref)
    return IntegrationPlan(session.stack_id, tuple(frames), frames[ref_index], tuple(excluded),
                           selection.expression if selection is not None else None, changed)


# ------------------------------------------------------------------------- frame checks
def check_frame_file(frame: SessionFrame) -> None:
    """Check that a session frame's raw file exists, is a complete FITS file and is
    unchanged since it was stacked.

    Unchanged means the same size and, when the modification time differs, the same
    SHA-256 as recorded in the journal.

    Raises
    ------
    FrameReadError
        ``missing``, ``unreadable``, ``changed_on_disk`` or a FITS completeness reason,
        in one message naming the file.
    """
    from livestack.storage.formats import check_complete
    from livestack.storage.journal import sha256_file

    try:
        st = os.stat(frame.path)
    except FileNotFoundError:
        raise FrameReadError(Reason.MISSING, f"{frame.path}: raw frame listed in the journal "
                                        "is missing", frame.path) from None
    except OSError as exc:
        raise FrameReadError(Reason.UNREADABLE, f"{frame.path}: cannot read: "
                                           f"{exc.strerror or exc}", frame.path) from None
    changed = frame.size is not None and st.st_size != frame.size
    if (not changed and frame.mtime_ns is not None and st.st_mtime_ns != frame.mtime_ns
            and frame.sha256 is not None):
        try:
            changed = sha256_file(frame.path) != frame.sha256
        except OSError as exc:
            raise FrameReadError(Reason.UNREADABLE, f"{frame.path}: cannot read: "
                                               f"{exc.strerror or exc}", frame.path) from None
    if changed:
        raise FrameReadError(Reason.CHANGED_ON_DISK, f"{frame.path}: content changed since it "
                                                "was stacked", frame.path)
    check_complete(Path(frame.path))


def _metrics_of(frame: SessionFrame) -> FrameMetrics | None:
    m = frame.metrics
    if not m:
        return None
    try:
        return FrameMetrics(
            star_count=int(m.get("star_count") or 0),
            fwhm_px=_f(m.get("fwhm_px")), fwhm_arcsec=m.get("fwhm_arcsec"),
            elongation=_f(m.get("elongation")), background_adu=_f(m.get("background_adu")),
            noise_adu=_f(m.get("noise_adu")), snr=_f(m.get("snr")))
    except (TypeError, ValueError):
        return None


def _f(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _stored_norm(frame: SessionFrame, plan: IntegrationPlan, config: NormalizeConfig,
                 masters: MasterSource | None) -> FrameNorm | None:
    """The live stack's normalisation of a frame when it applies to this integration.

    It applies when it was computed onto the plan's reference (the transforms were not
    composed onto another one), with the same method and weights, and the frame is
    calibrated as the live stack calibrated it (its recorded masters, or none when it
    recorded none): other masters move the frame's location and scale.
    """
    if frame.norm is None or plan.reference_changed:
        return None
    masters_of = getattr(masters, "masters_of", None)
    used = masters_of(frame.path) if callable(masters_of) else None
    if masters is None:
        used = []
    if used is None or sorted(m["sha256"] for m in used) != sorted(
            m["sha256"] for m in frame.masters or ()):
        return None
    if frame.norm.get("reference_file") != plan.reference.path:
        return None
    try:
        norm = FrameNorm.from_json(frame.norm)
    except (KeyError, TypeError, ValueError):
        return None
    return norm if norm.matches(config) else None


__all__ = [
    "IntegrationPlan",
    "MasterSource",
    "Session",
    "SessionFrame",
    "check_frame_file",
    "find_journal",
    "load_session",
    "plan_integration",
]

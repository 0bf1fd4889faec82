"""``livestack recover OUTPUT``: a new journal after the old one was lost or corrupted.

A truncated or garbage ``journal.sqlite`` stops the daemon with a one-line refusal. This
rebuilds the journal from what the output folder still holds:

1. The bad file (with its ``-wal``/``-shm`` companions) is moved aside as
   ``journal.sqlite.corrupt-YYYYmmddTHHMMSS``, never deleted.
2. For every stack folder with a ``stack.fits``, its ``FRAMES`` table (one row per frame
   the stack has seen, in processing order, with verdict, weight and the exact transform)
   becomes the stack's journal rows; file size, mtime and SHA-256 are read from the frames
   still on disk.
3. The stack's checkpoint is kept when it holds exactly the frames of ``stack.fits`` (the
   normal state after a clean stop): the journal rows are numbered so that the checkpoint
   covers them all, and the restart restores it as it is, bit for bit. Otherwise the
   checkpoint is moved aside (``checkpoint.npz.stale-...``) and the restart replays the
   rows from the frame files with their stored transforms.
4. Frames in the watch folder that no ``stack.fits`` lists are left alone: the next start
   processes them as new (frames that arrived after the last ``stack.fits`` write). Frames
   an operator had excluded are among them and must be excluded again; the report says
   how many there are.

Without any ``stack.fits`` the result is a fresh, empty journal, and the report says so.
Routing state (which stack a target's next frame goes to after ``new_stack``) is not
recoverable; frames route by their headers again.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from livestack.errors import JournalError, LivestackError, StorageError, UsageError
from livestack.storage.checkpoint import CHECKPOINT_NAME, load_checkpoint
from livestack.storage.fitsio import read_header
from livestack.storage.formats import FRAME_SUFFIXES
from livestack.storage.journal import JOURNAL_NAME, Journal, sha256_file
from livestack.storage.stackfits import read_stack_fits

__all__ = ["RecoveryReport", "journal_problem", "recover"]

log = logging.getLogger("livestack.recover")

FITS_NAME = "stack.fits"


@dataclass
class RecoveryReport:
    """What :func:`recover` did.

    Attributes
    ----------
    moved_aside : list of Path
        The old journal file(s), renamed.
    stacks : dict of str to int
        Stack id -> journal rows rebuilt from its ``FRAMES`` table.
    checkpoints_kept, checkpoints_stale : list of str
        Stacks whose checkpoint was kept / moved aside (replayed at the next start).
    unlisted : int
        Frames in the watch folder that no stack lists (processed at the next start).
    """

    moved_aside: list[Path] = field(default_factory=list)
    stacks: dict[str, int] = field(default_factory=dict)
    checkpoints_kept: list[str] = field(default_factory=list)
    checkpoints_stale: list[str] = field(default_factory=list)
    unlisted: int = 0

    def lines(self) -> list[str]:
        """A human summary, one fact per line."""
        out = [f"moved aside: {p}" for p in self.moved_aside]
        if not self.stacks:
            out.append("no stack.fits found: started a fresh, empty journal")
        for stack_id, n in self.stacks.items():
            how = ("checkpoint kept" if stack_id in self.checkpoints_kept else
                   "checkpoint set aside, frames are replayed at the next start")
            out.append(f"{stack_id}: {n} frame(s) rebuilt from stack.fits ({how})")
        if self.unlisted:
            out.append(f"{self.unlisted} frame(s) in the watch folder are in no stack: the "
                       "next start processes them (exclude again any you had excluded)")
        return out


def journal_problem(output_root: Path) -> str | None:
    """Why the journal in ``output_root`` is unusable, or None when it is fine.

    A missing journal is not a problem (a first start creates it).
    """
    path = Path(output_root) / JOURNAL_NAME
    if not path.exists():
        return None
    try:
        journal = Journal(path)
    except JournalError as exc:
        return str(exc)
    try:
        check = journal.quick_check()
        journal.counts()
        journal.stacks()
    except JournalError as exc:
        return str(exc)
    finally:
        try:
            journal.close()
        except JournalError:
            pass
    return None if check == "ok" else f"{path}: integrity check failed: {check[:200]}"


def recover(output_root: Path, watch_dir: Path | None = None, *,
            force: bool = False) -> RecoveryReport:
    """Rebuild ``output_root/journal.sqlite`` (see the module docstring).

    Parameters
    ----------
    output_root : Path
        The daemon's output folder.
    watch_dir : Path or None
        The watch folder, to count the frames no stack lists.
    force : bool
        Rebuild even when the journal looks intact.

    Returns
    -------
    RecoveryReport

    Raises
    ------
    UsageError
        ``output_root`` is not a folder, or the journal is intact and ``force`` is False.
    StorageError
        The old journal cannot be moved aside or the new one written.
    """
    output_root = Path(os.path.abspath(output_root))
    if not output_root.is_dir():
        raise UsageError(f"{output_root}: not a folder")
    problem = journal_problem(output_root)
    if problem is None and not force:
        raise UsageError(f"{output_root / JOURNAL_NAME}: the journal is intact (or absent); "
                         "nothing to recover (use --force to rebuild it anyway)")
    report = RecoveryReport()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        old = output_root / (JOURNAL_NAME + suffix)
        if old.exists():
            aside = old.with_name(f"{JOURNAL_NAME}.corrupt-{stamp}{suffix}")
            try:
                os.replace(old, aside)
            except OSError as exc:
                raise StorageError(f"{old}: cannot move aside: {exc.strerror}") from None
            report.moved_aside.append(aside)
    journal = Journal(output_root / JOURNAL_NAME)
    listed: set[str] = set()
    try:
        for fits_path in sorted(output_root.glob(f"*/*/{FITS_NAME}")):
            stack_id = fits_path.parent.relative_to(output_root).as_posix()
            files = _rebuild_stack(journal, output_root, stack_id, fits_path, report, stamp)
            listed.update(files)
    finally:
        journal.close()
    if watch_dir is not None and Path(watch_dir).is_dir():
        report.unlisted = sum(
            1 for p in Path(watch_dir).rglob("*")
            if p.name.lower().endswith(FRAME_SUFFIXES) and str(p.absolute()) not in listed
            and not p.name.startswith((".", "~")))
    for line in report.lines():
        log.info("recover: %s", line)
    return report


def _rebuild_stack(journal: Journal, output_root: Path, stack_id: str, fits_path: Path,
                   report: RecoveryReport, stamp: str) -> list[str]:
    """Journal rows of one stack from its FRAMES table; return the frame paths listed."""

    try:
        records = read_stack_fits(fits_path).records
    except StorageError as exc:
        log.warning("recover: %s; this stack is skipped", exc)
        return []
    folder = fits_path.parent
    key: dict = {}
    for record in records:  # the stack key, from the first frame still on disk
        try:
            _header, info = read_header(Path(record.file))
        except (OSError, LivestackError, ValueError) as exc:  # FrameReadError, gone
            log.debug("recover: %s: %s", record.file, exc)
            continue
        from livestack.engine.state import stack_key_of

        key = stack_key_of(info)
        break
    journal.ensure_stack(stack_id, key, folder.relative_to(output_root).as_posix())
    seqs, generation = _checkpoint_plan(folder, stack_id, records, report, stamp)
    journal.set_generation(stack_id, generation)
    for record, seq in zip(records, seqs, strict=True):
        size: int | None = None
        mtime_ns: int | None = None
        sha: str | None = None
        try:
            st = os.stat(record.file)
            size, mtime_ns, sha = st.st_size, st.st_mtime_ns, sha256_file(record.file)
        except OSError:  # gone: the row documents it, a replay would report it
            pass
        row = journal.mark_pending(record.file, size, mtime_ns, sha)
        transform = record.transform
        journal.finish(row, record.verdict, reason=record.reason,
                       message=f"{record.file}: recovered from {FITS_NAME}",
                       stack_id=stack_id,
                       metrics=record.metrics.as_dict() if record.metrics else None,
                       transform=transform.to_list() if transform is not None else None,
                       model=transform.model if transform is not None else None,
                       weight=record.weight, seq=seq)
    if stack_id in report.checkpoints_kept:
        journal.note_checkpoint(stack_id, seqs[-1] if seqs else 0, len(records), generation,
                                str(folder / CHECKPOINT_NAME))
    report.stacks[stack_id] = len(records)
    return [str(Path(r.file).absolute()) for r in records]


def _checkpoint_plan(folder: Path, stack_id: str, records: list, report: RecoveryReport,
                     stamp: str) -> tuple[list[int], int]:
    """Journal ``seq`` per record and the stack generation; keep or set aside the checkpoint.

    The checkpoint is kept only when it holds exactly the FRAMES table's frames: the rows
    then end at the checkpoint's own ``seq`` so that nothing is replayed on top of it.
    """
    n = len(records)
    plain = list(range(1, n + 1))
    path = folder / CHECKPOINT_NAME
    if not path.exists():
        return plain, 0
    try:
        _arrays, meta = load_checkpoint(path)
    except StorageError as exc:
        log.warning("recover: %s", exc)
        meta = {}
    n_accepted = sum(1 for r in records if r.verdict == "accepted")
    session_records = meta.get("session", {}).get("records") if isinstance(
        meta.get("session"), dict) else None
    seq = meta.get("seq")
    usable = (meta.get("stack_id") == stack_id and meta.get("n_accepted") == n_accepted
              and isinstance(seq, int) and seq >= n
              and (session_records is None or len(session_records) == n))
    if usable and isinstance(seq, int):
        report.checkpoints_kept.append(stack_id)
        return list(range(seq - n + 1, seq + 1)), int(meta.get("generation", 0))
    aside = path.with_name(f"{CHECKPOINT_NAME}.stale-{stamp}")
    shutil.move(str(path), str(aside))
    report.checkpoints_stale.append(stack_id)
    return plain, 0

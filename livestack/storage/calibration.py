"""Master frames, opened one way, and the calibration a session records.

Three pieces:

* :func:`open_masters`: the one way to open masters for every path (``run``, ``stack``,
  ``integrate``, the rebuild child). Each argument is a master file, a folder of masters
  or a folder of raw frames (masters are then built in memory). The result,
  :class:`OpenedMasters`, picks the masters of a light with the configured temperature
  tolerance bound in.
* :class:`CalibrationRecord`: what the live session used. Every master that calibrated a
  frame is copied (or hard-linked) into ``<output>/masters/`` with its SHA-256, so a
  session folder is self-contained; :meth:`CalibrationRecord.select` returns the frame's
  :class:`~livestack.pipeline.calibrate.MasterSet` together with the list of
  ``{"kind", "file", "sha256"}`` that the journal stores with the frame.
* :class:`RecordedMasters`: re-opens the recorded masters of a session, each checked
  against its hash before anything is computed. A missing or changed master is a
  one-line :class:`~livestack.errors.MasterError` that names it.

Provenance: :func:`master_cards` turns a list of recorded masters into FITS cards
``MASTERn`` (file name) and ``MSTSHAn`` (SHA-256).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from livestack.errors import MasterError
from livestack.pipeline.calibrate import MasterSet
from livestack.pipeline.types import FrameInfo
from livestack.storage.journal import sha256_file
from livestack.storage.masters import MasterEntry, MasterLibrary, masters_for_cli

#: Sub-folder of the output root that holds the masters a session used.
MASTERS_DIR = "masters"

#: One recorded master: ``{"kind": ..., "file": <name in masters/>, "sha256": ...}``.
RecordedMaster = dict[str, str]


class OpenedMasters:
    """A :class:`MasterLibrary` with the configured temperature tolerance bound in.

    Parameters
    ----------
    library : MasterLibrary
    temp_tolerance_c : float
        Largest CCD temperature difference, in degrees C, between a light and its dark.
    """

    def __init__(self, library: MasterLibrary, temp_tolerance_c: float = 2.0) -> None:
        self.library = library
        self.temp_tolerance_c = temp_tolerance_c

    @property
    def entries(self) -> list[MasterEntry]:
        """The library's masters."""
        return self.library.entries

    def __len__(self) -> int:
        return len(self.library)

    def select(self, info: FrameInfo, temp_tolerance_c: float | None = None) -> MasterSet:
        """The masters that calibrate a light described by ``info``.

        Raises
        ------
        MasterError
            A chosen master file can no longer be read.
        """
        tol = self.temp_tolerance_c if temp_tolerance_c is None else temp_tolerance_c
        return self.library.select(info, temp_tolerance_c=tol)

    def chosen_entries(self, info: FrameInfo, temp_tolerance_c: float | None = None
                       ) -> list[MasterEntry]:
        """The bias, dark and flat entries :meth:`select` applies to ``info`` (metadata only)."""
        tol = self.temp_tolerance_c if temp_tolerance_c is None else temp_tolerance_c
        choice = self.library.choose(info, tol)
        return [e for e in (choice.bias, choice.dark, choice.flat) if e is not None]

    def provenance(self) -> list[RecordedMaster]:
        """Every master of the library as ``{"kind", "file", "sha256"}`` (in-memory: no hash).

        Raises
        ------
        MasterError
            A master file cannot be read to hash it.
        """
        out: list[RecordedMaster] = []
        for entry in self.entries:
            sha = ""
            if entry.path is not None:
                try:
                    sha = sha256_file(entry.path)
                except OSError as exc:
                    raise MasterError(f"{entry.path}: cannot read master: "
                                      f"{exc.strerror or exc}") from None
            out.append({"kind": entry.kind, "file": entry.label, "sha256": sha})
        return out


def open_masters(*, bias: Path | str | None = None, darks: Path | str | None = None,
                 flats: Path | str | None = None, darkflats: Path | str | None = None,
                 paths: Iterable[Path | str] = (), temp_tolerance_c: float = 2.0
                 ) -> OpenedMasters | None:
    """Open masters from ``--bias/--darks/--flats`` flags or ``masters.paths``.

    Parameters
    ----------
    bias, darks, flats, darkflats : path, optional
        A master file, a folder of masters or a folder of raw frames (built in memory).
        When any is given, ``paths`` is ignored: the flags win.
    paths : iterable of path
        Master files or folders of masters (``masters.paths`` of the configuration).
    temp_tolerance_c : float
        Dark temperature tolerance in degrees C (``masters.temp_tolerance_c``).

    Returns
    -------
    OpenedMasters or None
        None when nothing is given.

    Raises
    ------
    MasterError
        A path that does not exist, an empty folder, a file that is not a master, or a
        master that cannot be built.
    """
    if any(p is not None for p in (bias, darks, flats, darkflats)):
        def opt(value: Path | str | None) -> Path | None:
            return Path(value) if value is not None else None

        library = masters_for_cli(bias=opt(bias), darks=opt(darks), flats=opt(flats),
                                  darkflats=opt(darkflats))
        return OpenedMasters(library, temp_tolerance_c)
    listed = [Path(p) for p in paths]
    if not listed:
        return None
    return OpenedMasters(MasterLibrary.from_paths(listed), temp_tolerance_c)


def master_cards(recorded: Sequence[RecordedMaster]) -> dict[str, object]:
    """FITS provenance cards for the masters used: ``MASTERn`` and ``MSTSHAn``.

    Parameters
    ----------
    recorded : sequence of dict
        ``{"kind", "file", "sha256"}`` per master, in order; duplicates (same hash and
        name) are listed once.

    Returns
    -------
    dict of str to object
        ``MASTER1``, ``MSTSHA1``, ... (``NMASTERS`` with their number).
    """
    cards: dict[str, object] = {}
    seen: set[tuple[str, str]] = set()
    n = 0
    for m in recorded:
        key = (m.get("file", ""), m.get("sha256", ""))
        if key in seen:
            continue
        seen.add(key)
        n += 1
        if n > 999:  # 8-character keywords: MSTSHA999 is the last
            break
        cards[f"MASTER{n}"] = str(m.get("file", ""))
        if m.get("sha256"):
            cards[f"MSTSHA{n}"] = str(m["sha256"])
    if n:
        cards["NMASTERS"] = n
    return cards


def distinct_masters(lists: Iterable[Sequence[RecordedMaster] | None]) -> list[RecordedMaster]:
    """The masters of several frames, each once, in order of first use."""
    out: list[RecordedMaster] = []
    seen: set[tuple[str, str]] = set()
    for masters in lists:
        for m in masters or ():
            key = (m.get("file", ""), m.get("sha256", ""))
            if key not in seen:
                seen.add(key)
                out.append(dict(m))
    return out


class CalibrationRecord:
    """The masters a live session used, kept in ``<output>/masters/`` with their hashes.

    Parameters
    ----------
    output_root : Path
        The session's output root (holds ``journal.sqlite``).
    masters : OpenedMasters or MasterLibrary or None
        What the session calibrates with.
    temp_tolerance_c : float
        Tolerance for a bare :class:`MasterLibrary`.

    Notes
    -----
    A master is recorded on the first frame that uses it: hard-linked when it lives on
    the same file system (no copy of a large master), else copied; a master built in
    memory is written as float32 FITS. Its SHA-256 is computed once.
    """

    def __init__(self, output_root: Path, masters: Any,
                 temp_tolerance_c: float = 2.0) -> None:
        self.folder = Path(output_root) / MASTERS_DIR
        if isinstance(masters, MasterLibrary):
            masters = OpenedMasters(masters, temp_tolerance_c)
        self.masters: OpenedMasters | None = masters
        self._recorded: dict[int, RecordedMaster] = {}
        self._lock = threading.Lock()

    @property
    def entries(self) -> list[MasterEntry]:
        """The masters available (empty without masters)."""
        return self.masters.entries if self.masters is not None else []

    def select(self, info: FrameInfo, temp_tolerance_c: float | None = None
               ) -> tuple[MasterSet | None, list[RecordedMaster]]:
        """The masters for a light and what the journal records for it.

        Returns
        -------
        masters : MasterSet or None
            None without masters.
        recorded : list of dict
            ``{"kind", "file", "sha256"}`` of each master applied.

        Raises
        ------
        MasterError
            A chosen master cannot be read, or cannot be recorded in the output folder.
        """
        if self.masters is None:
            return None, []
        chosen = self.masters.select(info, temp_tolerance_c)
        entries = self.masters.chosen_entries(info, temp_tolerance_c)
        return chosen, [self.record(e) for e in entries]

    def record(self, entry: MasterEntry) -> RecordedMaster:
        """Keep ``entry`` in the masters folder (once) and return its record.

        Raises
        ------
        MasterError
            The folder or the file cannot be written, or the master cannot be read.
        """
        with self._lock:
            done = self._recorded.get(id(entry))
            if done is not None:
                return done
            target = self._store(entry)
            try:
                sha = sha256_file(target)
            except OSError as exc:
                raise MasterError(f"{target}: cannot read recorded master: "
                                  f"{exc.strerror or exc}") from None
            rec = {"kind": entry.kind, "file": target.name, "sha256": sha}
            self._recorded[id(entry)] = rec
            return rec

    def _store(self, entry: MasterEntry) -> Path:
        """Link, copy or write ``entry`` into the masters folder; return its file there."""
        from livestack.storage.fitsio import write_fits_float32
        from livestack.storage.masters import _master_file_name

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MasterError(f"{self.folder}: cannot create the masters folder: "
                              f"{exc.strerror or exc}") from None
        source = entry.path
        if source is not None and Path(os.path.abspath(source)).parent == \
                Path(os.path.abspath(self.folder)):
            return Path(source)  # already in the session (run builds raw masters here)
        name = source.name if source is not None else f"{_master_file_name(entry)}.fits"
        # Written under a temporary name first: an identical master recorded on an earlier
        # start is then found by content and reused instead of piling up copies.
        staging = self.folder / f".staging-{os.getpid()}-{name}"
        try:
            if source is None:
                write_fits_float32(staging, entry.data(), entry.header)
            else:
                try:
                    os.link(source, staging)
                except OSError:  # another file system, or links not allowed: copy
                    shutil.copy2(source, staging)
            target = self._place(staging, name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                staging.unlink()
            raise MasterError(f"{self.folder / name}: cannot record master: "
                              f"{exc.strerror or exc}") from None
        return target

    def _place(self, staging: Path, name: str) -> Path:
        """Move ``staging`` to ``name`` (or ``<stem>_2...``); reuse an identical file.

        Raises
        ------
        OSError
            From hashing or renaming.
        """
        sha = sha256_file(staging)
        stem, dot, suffix = name.partition(".")
        target = self.folder / name
        n = 2
        while target.exists():
            if _same_file(staging, target) or sha256_file(target) == sha:
                staging.unlink()
                return target
            target = self.folder / f"{stem}_{n}{dot}{suffix}"
            n += 1
        os.replace(staging, target)
        return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class RecordedMasters:
    """The masters a session recorded, re-opened and hash-checked.

    Parameters
    ----------
    output_root : Path
        The session's output root (``<output_root>/masters/``).
    by_frame : dict of str to list of dict
        Recorded masters per frame path (absolute), from the journal. A record may name
        its folder in ``"dir"`` (sessions of several output roots); else
        ``<output_root>/masters/``.

    Raises
    ------
    MasterError
        A recorded master is missing or its content changed (one line naming it).
    """

    def __init__(self, output_root: Path, by_frame: dict[str, list[RecordedMaster]]) -> None:
        self.folder = Path(output_root) / MASTERS_DIR
        self.by_frame = {os.path.abspath(k): list(v) for k, v in by_frame.items()}
        self.recorded = distinct_masters(self.by_frame.values())
        self._entries: dict[str, MasterEntry] = {}
        self._libraries: dict[tuple[str, ...], MasterLibrary] = {}
        self._lock = threading.Lock()
        self.check()

    def check(self) -> None:
        """Every recorded master exists with its recorded hash.

        Raises
        ------
        MasterError
            ``<path>: recorded master is missing`` or ``... has changed since the session
            recorded it``.
        """
        for m in self.recorded:
            path = self.path_of(m)
            try:
                sha = sha256_file(path)
            except FileNotFoundError:
                raise MasterError(f"{path}: recorded {m['kind']} master is missing "
                                  f"(sha256 {m['sha256'][:12]}...; give other masters "
                                  "with --bias/--darks/--flats or --no-calibration)") from None
            except OSError as exc:
                raise MasterError(f"{path}: cannot read recorded master: "
                                  f"{exc.strerror or exc}") from None
            if sha != m["sha256"]:
                raise MasterError(f"{path}: recorded {m['kind']} master has changed since "
                                  f"the session used it (sha256 {sha[:12]}... instead of "
                                  f"{m['sha256'][:12]}...)")

    def path_of(self, m: RecordedMaster) -> Path:
        """The file of a recorded master."""
        return Path(m["dir"]) / m["file"] if m.get("dir") else self.folder / m["file"]

    @property
    def entries(self) -> list[MasterEntry]:
        """Every recorded master (headers read once)."""
        return [self._entry(m) for m in self.recorded]

    def _entry(self, m: RecordedMaster) -> MasterEntry:
        entry = self._entries.get(m["sha256"])
        if entry is None:
            entry = MasterEntry.from_file(self.path_of(m))
            self._entries[m["sha256"]] = entry
        return entry

    def provenance(self) -> list[RecordedMaster]:
        """The recorded masters, each once (without their folder)."""
        return [{k: v for k, v in m.items() if k != "dir"} for m in self.recorded]

    def masters_of(self, path: str) -> list[RecordedMaster]:
        """The masters recorded for one frame (empty when none)."""
        return self.by_frame.get(os.path.abspath(path), [])

    def select(self, info: FrameInfo, temp_tolerance_c: float | None = None) -> MasterSet:
        """The frame's recorded masters as a :class:`MasterSet`.

        Only the masters recorded for this frame are candidates, so the choice (and a dark
        scaled to another exposure) is the live session's; temperature no longer filters.

        Raises
        ------
        MasterError
            A recorded master cannot be read.
        """
        recorded = self.masters_of(info.path)
        if not recorded:
            return MasterSet()
        key = tuple(sorted(m["sha256"] for m in recorded))
        with self._lock:
            library = self._libraries.get(key)
            if library is None:
                library = MasterLibrary([self._entry(m) for m in recorded])
                self._libraries[key] = library
        return library.select(info, temp_tolerance_c=math.inf)


def session_masters(recorded: dict[str, list[RecordedMaster]], root: Path | None, *,
                    given: Any = None, no_calibration: bool = False,
                    note: Any = None) -> Any:
    """The masters a re-stack calibrates with: the recorded ones unless told otherwise.

    Parameters
    ----------
    recorded : dict of str to list of dict
        Recorded masters per frame path (``Session.recorded_masters()``).
    root : Path or None
        The output root holding ``masters/``.
    given : OpenedMasters, optional
        Masters named by a flag (``--bias/--darks/--flats``): they win.
    no_calibration : bool
        ``--no-calibration``: no masters at all.
    note : callable, optional
        ``note(line)`` receives one line saying what was chosen when it is not the
        recorded calibration (the log, or stderr).

    Returns
    -------
    RecordedMasters, OpenedMasters or None
        None when there is nothing to calibrate with (or ``no_calibration``).

    Raises
    ------
    MasterError
        A recorded master is missing or changed (one line naming it).
    """
    def say(line: str) -> None:
        if note is not None:
            note(line)

    if no_calibration:
        if recorded:
            say("calibration off (--no-calibration): the session's recorded masters are "
                "not applied")
        return None
    if given is not None:
        if recorded:
            have = distinct_masters(recorded.values())
            mine = given.provenance() if hasattr(given, "provenance") else []
            if differs(have, mine):
                say("the masters given differ from the session's recorded calibration "
                    f"(recorded: {_names(have)}; given: {_names(mine)}); using the given ones")
        return given
    if recorded:
        return RecordedMasters(root if root is not None else Path("."), recorded)
    return None


def _names(masters: Sequence[RecordedMaster]) -> str:
    return ", ".join(f"{m.get('file', '?')} ({m.get('sha256', '')[:8] or 'in memory'})"
                     for m in masters) or "none"


def differs(recorded: Sequence[RecordedMaster], given: Sequence[RecordedMaster]) -> bool:
    """True when two master lists differ by content (hash), order aside."""
    return sorted(m.get("sha256", "") for m in recorded) != sorted(
        m.get("sha256", "") for m in given)


__all__ = [
    "MASTERS_DIR",
    "CalibrationRecord",
    "OpenedMasters",
    "RecordedMaster",
    "RecordedMasters",
    "differs",
    "distinct_masters",
    "master_cards",
    "open_masters",
    "session_masters",
]

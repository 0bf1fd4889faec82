"""Atomic file replacement: the one way livestack writes files that readers may open.

A temp file is created in the target's folder, written, fsynced and renamed over the
target (``os.replace``, atomic on POSIX); then the folder is fsynced so the rename survives
a power cut. Readers see the old file or the new one, never a torn one. Any ``OSError``
(disk full, permissions, read-only file system) becomes a :class:`StorageError` naming the
path; the temp file is removed and the previous file is left untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from livestack.errors import StorageError


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. EINVAL where directories cannot be fsynced
    finally:
        os.close(fd)


def _storage_error(path: Path, what: str, exc: OSError) -> StorageError:
    """The writers' one error: the path, what was written and the OS reason."""
    # astropy re-raises write errors as a bare OSError(message): keep that message.
    return StorageError(f"{path}: cannot write {what}: {exc.strerror or exc}")


@contextlib.contextmanager
def _temp_file(path: Path, what: str, mode: int, prefix: str | None,
               then: Callable[[Path], None] | None = None) -> Iterator[tuple[int, Path]]:
    """Yield ``(fd, temp_path)`` of a new temp file next to ``path``: both writers' set-up.

    The file is created with ``mkstemp`` in ``path``'s folder (prefix ``prefix`` or
    ``".<name>."``, suffix ``".tmp"``) and given ``mode``; ``fd`` is closed when the block
    ends, then ``then(temp_path)`` runs (the rename; a close error stops it). If the
    set-up, the block or ``then`` raises, the temp file is removed.

    Raises
    ------
    StorageError
        Any ``OSError`` from the set-up, the block, closing or ``then``, naming ``path``.
    """
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=".tmp",
                                        dir=path.parent)
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, mode)
            yield fd, tmp
        finally:
            os.close(fd)
        if then is not None:
            then(tmp)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(exc, OSError):
            raise _storage_error(path, what, exc) from exc
        raise


@contextlib.contextmanager
def atomic_write(path: str | Path, *, what: str = "file", mode: int = 0o644,
                 prefix: str | None = None,
                 before_replace: Callable[[Path], None] | None = None,
                 ) -> Iterator[tuple[int, Path]]:
    """Yield ``(fd, temp_path)`` to write into; on success the temp file replaces ``path``.

    Parameters
    ----------
    path : str or Path
        Final file name.
    what : str
        Words for the error message ("checkpoint", "stack FITS", ...).
    mode : int
        Permission bits of the result (mkstemp's 0600 would hide products from viewers).
    prefix : str, optional
        Temp-name prefix (default ``".<name>."``); the suffix is always ``".tmp"``.
    before_replace : callable, optional
        Called with the complete, fsynced temp file just before the rename (crash tests).

    Yields
    ------
    fd : int
        Open file descriptor of the temp file; closed by this helper (wrap it with
        ``os.fdopen(fd, "wb", closefd=False)`` if a file object is needed).
    temp_path : Path

    Raises
    ------
    StorageError
        Any ``OSError`` while writing, syncing or renaming.
    """
    path = Path(path)

    def publish(tmp: Path) -> None:
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)

    with _temp_file(path, what, mode, prefix, then=publish) as (fd, tmp):
        yield fd, tmp
        os.fsync(fd)
    fsync_dir(path.parent)


class StagedFile:
    """A complete temporary file that will replace ``path`` when :meth:`commit` is called.

    Splits :func:`atomic_write` in two so the cheap half (writing into the page cache)
    can run where the data is consistent and the slow half (fsync, rename, folder fsync)
    elsewhere: the live worker writes a checkpoint straight from the stack's arrays
    without copying them, and the checkpoint thread makes it durable.

    Parameters
    ----------
    path : Path
        Final file name.
    tmp : Path
        The complete temporary file in ``path``'s folder.
    what : str
        Words for error messages.
    """

    def __init__(self, path: Path, tmp: Path, what: str) -> None:
        self.path = path
        self.tmp = tmp
        self.what = what

    def commit(self, before_replace: Callable[[Path], None] | None = None) -> None:
        """fsync the temp file, rename it over :attr:`path` and fsync the folder.

        Raises
        ------
        StorageError
            Any ``OSError``; the temp file is removed and the previous file is untouched.
        """
        try:
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if before_replace is not None:
                before_replace(self.tmp)
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:
            self.discard()
            raise _storage_error(self.path, self.what, exc) from exc

    def discard(self) -> None:
        """Remove the temporary file (it was superseded or the write is abandoned)."""
        with contextlib.suppress(OSError):
            self.tmp.unlink()


def stage_write(path: str | Path, write: Callable[[int], None], *, what: str = "file",
                mode: int = 0o644, prefix: str | None = None) -> StagedFile:
    """Write a temporary file next to ``path`` with ``write(fd)``; return it uncommitted.

    Parameters
    ----------
    path : str or Path
        Final file name.
    write : callable
        Writes the content into the open file descriptor it is given.
    what, mode, prefix
        As for :func:`atomic_write`.

    Returns
    -------
    StagedFile
        Call :meth:`StagedFile.commit` to make it durable and visible.

    Raises
    ------
    StorageError
        Any ``OSError`` while writing (disk full, permissions); the temp file is removed.
    """
    path = Path(path)
    with _temp_file(path, what, mode, prefix) as (fd, tmp):
        write(fd)
    return StagedFile(path, tmp, what)

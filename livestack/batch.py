"""``livestack stack``: existing files through the live engine, in DATE-OBS order."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from astropy.io import fits

from livestack.engine.core import Engine
from livestack.errors import FrameError
from livestack.storage.formats import frame_format, is_fits, read_header
from livestack.storage.headers import parse_frame_info

if TYPE_CHECKING:
    from livestack.config import Config
    from livestack.storage.journal import FrameRow


def stack_files(config: Config, files: Iterable[Path], output_root: Path, *,
                masters: Any = None, progress: Callable[[int, int, FrameRow | None], None]
                | None = None) -> Engine:
    """Put existing files through the same pipeline, in DATE-OBS order.

    Parameters
    ----------
    config : Config
    files : iterable of Path
        Light frames (sorted here by DATE-OBS, then name).
    output_root : Path
        Output root (journal + stack folders), as for the daemon.
    masters : MasterLibrary or None
    progress : callable, optional
        ``progress(done, total, row)`` after each file.

    Returns
    -------
    Engine
        Closed; its counters remain readable.
    """
    ordered = sort_by_date_obs(list(files))
    engine = Engine(config, output_root, masters=masters)
    # Frames come back to back: a stack.fits rewrite every few frames would cost more than
    # the frames (see OutputConfig.batch_fits_every_frames); finalize writes it.
    engine.outputs.fits_every_frames = config.output.batch_fits_every_frames
    try:
        ordered.extend(Path(p) for p in engine.resume())
        total = len(ordered)
        for i, frame in enumerate(ordered, 1):
            row = engine.process_path(frame)
            if progress is not None:
                progress(i, total, row)
        for rt in engine.runtimes.values():
            rt.session.release_scratch()  # the last frame is in: the solve and writes peak less
        engine.ingest.buffers.release()
        engine.solving.drain()  # batch: the stack.fits written next carries the WCS
        while engine.solving.route_moves():  # frames solved elsewhere: their stacks too
            engine.solving.drain()
        engine.finalize()
    finally:
        engine.close()
    return engine


def sort_by_date_obs(files: list[Path]) -> list[Path]:
    """Sort frames by exposure start from their headers (unreadable ones last, by name)."""
    def key(path: Path) -> tuple[int, float, str]:
        try:
            if not is_fits(path) and frame_format(path) != "fits.gz":
                _header, info = read_header(path)  # RAW, TIFF, PNG, XISF: decoded
            else:
                header = fits.getheader(path)
                info = parse_frame_info(header, str(path), (int(header.get("NAXIS2", 0)),
                                                            int(header.get("NAXIS1", 0))))
        except (FrameError, OSError, ValueError, TypeError, KeyError, IndexError):
            return (1, 0.0, str(path))
        if info.date_obs is None:
            return (1, 0.0, str(path))
        return (0, info.date_obs.timestamp(), str(path))

    return sorted(files, key=key)

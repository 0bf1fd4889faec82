"""Simulated nights as stack folders, as if ``livestack run`` had stacked every light.

:func:`write_night` writes the lights of one night with :func:`write_sequence` and a
journal (``<folder>/out/journal.sqlite``) whose stack lists them as accepted frames
with their true transforms onto the night's first light, so that ``livestack
integrate`` can re-stack them (tests of multi-session and distributed integration, and
``bench/bench_multisession.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from livestack.sim.camera import SimConfig, SimFrame, Simulator
from livestack.sim.sequence import write_sequence
from livestack.storage.journal import Journal, sha256_file


@dataclass(frozen=True)
class Night:
    """A simulated night written as a stack folder.

    Attributes
    ----------
    stack_dir : Path
        The stack folder (``livestack integrate STACK_DIR``).
    stack_id : str
    lights : list of Path
        The raw lights, in order; the first is the stack's reference.
    simulator : Simulator
    start_index : int
        Simulator index of the first light (its true transform is ``simulator.transform``).
    """

    stack_dir: Path
    stack_id: str
    lights: list[Path]
    simulator: Simulator
    start_index: int


def write_night(folder: Path, config: SimConfig, seed: int, n_frames: int, *,
                stack_id: str, start_index: int = 0, simulator: Simulator | None = None
                ) -> Night:
    """Write ``n_frames`` lights and a journal that stacks them all.

    Each row records the light's true transform onto the night's first light, its
    background noise (MAD of neighbour differences of the raw frame, in ADU, as the live
    pipeline measures it), a star count and a FWHM that grows with the index (for
    ``--select``).

    Parameters
    ----------
    folder : Path
        Created; lights go to ``folder/lights``, the journal to ``folder/out``.
    config : SimConfig
    seed : int
        The sky and sensor (same seed: same stars and defects).
    n_frames : int
    stack_id : str
        The stack's id and folder below ``folder/out``.
    start_index : int
        Simulator index of the first light: nights of one seed with different start
        indices have independent noise, cosmic rays and trails.
    simulator : Simulator, optional
        Built from ``config`` and ``seed`` when not given.

    Returns
    -------
    Night

    Raises
    ------
    StorageError, JournalError
        When a file cannot be written.
    """

    sim = simulator if simulator is not None else Simulator(config, seed)
    levels: list[tuple[float, float]] = []  # (median, noise) of each raw light, ADU

    def measure(path: Path, frame: SimFrame) -> None:
        raw = frame.data.astype(np.float32)
        diff = np.diff(raw, axis=1)
        levels.append((float(np.median(raw)),
                       float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))))

    lights = write_sequence(folder / "lights", config, seed, n_frames, start_index=start_index,
                            simulator=sim, on_written=measure)
    out = folder / "out"
    journal = Journal(out / "journal.sqlite")
    try:
        journal.ensure_stack(stack_id, {"object": config.object_name,
                                        "filter": config.filter_name}, stack_id)
        (out / stack_id).mkdir(parents=True, exist_ok=True)
        to_first = sim.transform(start_index).inverse()
        for k, path in enumerate(lights):
            index = start_index + k
            transform = ([1.0, 0.0, 0.0, 0.0, 1.0, 0.0] if k == 0
                         else sim.transform(index).then(to_first).to_list())
            st = path.stat()
            row = journal.mark_pending(str(path), st.st_size, st.st_mtime_ns, sha256_file(path))
            metrics = {"star_count": 200, "fwhm_px": config.fwhm_px + 0.05 * k,
                       "fwhm_arcsec": None, "elongation": 1.0, "background_adu": levels[k][0],
                       "noise_adu": levels[k][1], "snr": 50.0}
            journal.finish(row, "accepted", stack_id=stack_id, metrics=metrics,
                           transform=transform, model="similarity", weight=1.0,
                           assign_seq=True)
    finally:
        journal.close()
    return Night(out / stack_id, stack_id, lights, sim, start_index)


__all__ = ["Night", "write_night"]

"""JIT warm-up: tiny synthetic frames through a throwaway session, one step at a time.

The worker runs one step whenever no frame waits, so a frame never waits behind the whole
warm-up. No file, journal or hub is touched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from livestack.pipeline.calibrate import MasterSet, find_defects
from livestack.pipeline.session import StackSession
from livestack.pipeline.types import FrameInfo
from livestack.storage.fitsio import _decode

if TYPE_CHECKING:
    from livestack.config import Config

log = logging.getLogger("livestack.engine")


def warm_up_steps(config: Config, *, with_masters: bool) -> Iterator[str]:
    """JIT warm-up in small steps: what the first frame needs first, the rest afterwards.

    Each ``next()`` runs one step and returns its name. The worker runs a step only when no
    frame is waiting, so a frame never waits behind the whole warm-up, at most behind one
    step (one kernel compile on a fresh install, milliseconds once numba's cache is warm).
    Tiny synthetic frames go through a throwaway session; no file, journal or hub.

    Order (on a fresh install each compile takes seconds; measured in the report of
    ``livestack demo``): FITS decoding, the master defect map and fused calibration (or the
    hot-pixel finder without masters), detection, the identity warp of the reference frame,
    the held warm-up frames and the preview, all of which the first frame needs; then the
    affine warp (rotated frames), the running kappa-sigma stack and, with masters, the
    hot-pixel finder for lights no master dark matches. Kernels a configuration may never
    use (debayering: colour frames only) compile on first use.

    Parameters
    ----------
    config : Config
    with_masters : bool
        Master frames are configured: the first frame is calibrated with them.

    Yields
    ------
    str
        The name of the step just done.
    """
    rng = np.random.default_rng(0)
    ny, nx = 160, 192
    n_frames = config.pipeline.stack.warmup_frames + 2
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    centre = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    stars = rng.uniform(14, min(ny, nx) - 14, size=(40, 2))
    flux = rng.uniform(2e3, 4e4, size=40)
    flat = (1.0 - 0.1 * (((xx - centre[0]) / nx) ** 2 + ((yy - centre[1]) / ny) ** 2)
            ).astype(np.float32)
    offset = np.full((ny, nx), 500.0, dtype=np.float32)

    def raw_frame(i: int) -> np.ndarray:
        # A small rotation and shift per frame: the registrar returns a similarity, so the
        # affine warp is compiled (frame 0, the reference, takes the identity warp).
        angle = np.radians(0.3 * i)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pos = (stars - centre) @ rot.T + centre + 0.7 * i
        image = rng.normal(1000.0, 10.0, size=(ny, nx)).astype(np.float32)
        for (x, y), f in zip(pos, flux, strict=True):
            image += (f / (2 * np.pi * 1.5**2) * np.exp(
                -((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2))).astype(np.float32)
        image = image * flat + offset
        # A saturated 3x3 core, so that the saturation mask's kernels compile here too
        # (detection drops it: flat-topped).
        image[20:23, 30:33] = 65535.0
        return image

    def info(i: int) -> FrameInfo:
        return FrameInfo(path=f"<warm-up {i}>", image_type="light", shape=(ny, nx),
                         exposure_s=1.0, saturation_adu=65535.0, saturation_source="BITPIX")

    t0 = time.perf_counter()
    # FITS decoding as storage.fitsio does it: 16-bit lights, float32 masters.
    buf = np.zeros(ny * nx * 4, dtype=np.uint8)
    _decode(buf[: ny * nx * 2], 16, (ny, nx), 1.0, 32768.0)
    _decode(buf, -32, (ny, nx), 1.0, 0.0)
    yield "read"
    masters: MasterSet | None = None
    if with_masters:
        dark = offset + rng.normal(0.0, 2.0, size=(ny, nx)).astype(np.float32)
        dark[5, 7] += 500.0
        defects = find_defects(dark - offset, 60.0, master_flat=flat)
        masters = MasterSet(subtract=offset, flat=flat, defects=defects)
        yield "masters"
    session = StackSession("warm-up", config.pipeline)
    # overwrite_raw as the worker calls it, so the in-place calibration kernel is compiled.
    session.process(raw_frame(0), info(0), masters, overwrite_raw=True)
    if session.n_accepted:
        session.preview_jpeg()
    yield "first frame"
    for i in range(1, n_frames):
        session.process(raw_frame(i), info(i), masters, overwrite_raw=True)
        yield f"frame {i}"
    if session.n_accepted:
        session.preview_jpeg()
        yield "preview"
    if with_masters and config.pipeline.cosmetic.auto_hot_pixels:
        StackSession("warm-up", config.pipeline).process(raw_frame(0), info(0), None,
                                                         overwrite_raw=True)
        yield "no masters"
    log.debug("pipeline warmed up in %.0f ms of steps (%d synthetic frames stacked)",
              (time.perf_counter() - t0) * 1e3, session.n_accepted)


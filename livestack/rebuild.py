"""Background rebuilds of a live stack with the integration engine, in a child process.

The daemon's ``exclude_frame`` and ``set_reference`` commands re-stack the session from
its journal with :mod:`livestack.integrate` (the engine behind ``livestack integrate``),
then seed a live :class:`~livestack.pipeline.session.StackSession` from the result and
keep stacking onto it. The live stack keeps serving viewers until the rebuilt one
replaces it.

Why a child process (``python -m livestack.rebuild REQUEST.json``):

* the live pipeline keeps its CPU: the child lowers its own priority (``nice``);
* its memory (up to ``rebuild.memory_limit_mb``) is returned when it exits, and a rebuild
  that goes wrong cannot take the daemon with it;
* cancelling is a SIGTERM, which the child turns into a clean exit that removes its
  scratch file (a newer command, or the daemon stopping).

Protocol: the daemon writes a :class:`RebuildRequest` as JSON; the child writes the
result (:func:`write_result`, an atomic ``.npz`` like the checkpoints) and exits 0, or
writes one JSON line describing the error (:func:`read_error`) and exits 1. Its log
lines go to a file the daemon names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from livestack.errors import FrameError, LivestackError, StorageError
from livestack.integrate import IntegrationCancelled, sigterm_interrupts
from livestack.pipeline.product import StackProduct

log = logging.getLogger("livestack.rebuild")

RESULT_NAME = "rebuild.npz"
REQUEST_NAME = "rebuild-request.json"
ERROR_NAME = "rebuild-error.json"
LOG_NAME = "rebuild.log"
#: Exit status of a child stopped by SIGTERM (or its parent's death) after cleaning up.
EXIT_CANCELLED = 130
#: How often the child checks that the daemon that started it is still there.
PARENT_CHECK_S = 1.0
#: Files of a rebuild in the stack folder (removed when it ends or the daemon starts).
FILE_NAMES = (RESULT_NAME, REQUEST_NAME, ERROR_NAME, LOG_NAME)

_PRODUCT_ARRAYS = ("image", "weight", "count", "rejected_low", "rejected_high", "std",
                   "frame_noise_adu")


@dataclass(frozen=True)
class RebuildRequest:
    """What the child integrates and where it writes.

    Attributes
    ----------
    journal : str
        The daemon's ``journal.sqlite``.
    stack_id : str
    reference : str or None
        Path of the new reference frame; None keeps the stack's reference (or, when it
        is no longer active, the first remaining frame).
    config : dict
        The daemon's configuration (:func:`livestack.config.config_to_dict`).
    folder : str
        The stack folder: result, error and log files, and the scratch file's place.
    memory_limit_bytes : int
    row_ids : list of int
        The journal rows to integrate (the stack's active accepted rows when the rebuild
        started; frames the live stack takes meanwhile are added live afterwards).
    nice : int
        Niceness increment the child applies to itself.
    """

    journal: str
    stack_id: str
    reference: str | None
    config: dict[str, Any]
    folder: str
    memory_limit_bytes: int
    row_ids: list[int]
    nice: int = 10

    def save(self, path: Path) -> None:
        """Write the request as JSON.

        Raises
        ------
        StorageError
            The file cannot be written.
        """
        try:
            path.write_text(json.dumps(asdict(self)), encoding="utf-8")
        except OSError as exc:
            raise StorageError(f"{path}: cannot write: {exc.strerror or exc}") from None

    @classmethod
    def load(cls, path: Path) -> RebuildRequest:
        """Read a request written by :meth:`save`.

        Raises
        ------
        StorageError
            Unreadable or malformed.
        """
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise StorageError(f"{path}: not a rebuild request: {exc}") from None


@dataclass(frozen=True)
class RebuildResult:
    """A finished integration, as the daemon reads it back.

    Attributes
    ----------
    product : StackProduct
        With ``std`` and ``frame_noise_adu`` set.
    rows : list of (int, list of float)
        Journal row id and transform onto the (new) reference, in the order of the
        product's accepted records.
    reference : str
        Path of the reference frame.
    reference_row : int
        Its journal row id.
    """

    product: StackProduct
    rows: list[tuple[int, list[float]]]
    reference: str
    reference_row: int


def rebuild_config(pipeline: Any) -> Any:
    """The integration a live rebuild runs for a stack with these pipeline settings.

    ``livestack integrate``'s defaults (weighted mean, winsorized rejection), with the live
    stack's kappas and frame weights, plus the standard-deviation map the live stack needs
    to go on rejecting. A live ``mean`` / ``sum`` stack (no rejection) is rebuilt without
    rejection, ``sum`` also without weights.

    Parameters
    ----------
    pipeline : PipelineConfig

    Returns
    -------
    IntegrateConfig
    """
    from livestack.pipeline.integrate import IntegrateConfig

    method = pipeline.stack.method
    return IntegrateConfig(
        combine="mean", reject="winsorized" if method == "kappa_sigma" else "none",
        low=float(pipeline.stack.kappa_low), high=float(pipeline.stack.kappa_high),
        weights="none" if method == "sum" else pipeline.normalize.weights, std_map=True)


def write_result(path: Path, product: StackProduct, plan: Any) -> None:
    """Write an integration for the daemon (atomic ``.npz``).

    Parameters
    ----------
    path : Path
    product : StackProduct
        From :func:`livestack.integrate.integrate_plan` with ``std_map``.
    plan : IntegrationPlan
        The plan it came from (row ids and transforms).

    Raises
    ------
    StorageError
        The file cannot be written (full disk, permissions).
    """
    from livestack.pipeline.session import record_to_json
    from livestack.storage.checkpoint import save_checkpoint

    arrays = {name: np.asarray(getattr(product, name)) for name in _PRODUCT_ARRAYS
              if getattr(product, name) is not None}
    meta = {
        "header": product.header,
        "records": [record_to_json(r) for r in product.records],
        "rows": [[f.row_id, f.transform.to_list()] for f in plan.frames],
        "reference": plan.reference.path,
        "reference_row": plan.reference.row_id,
    }
    save_checkpoint(path, arrays, meta)


def read_result(path: Path) -> RebuildResult:
    """Read what :func:`write_result` wrote.

    Raises
    ------
    StorageError
        Missing, torn or malformed.
    """
    from livestack.pipeline.session import record_from_json
    from livestack.storage.checkpoint import load_checkpoint

    arrays, meta = load_checkpoint(path)
    try:
        product = StackProduct(
            image=arrays["image"], weight=arrays["weight"], count=arrays["count"],
            rejected_low=arrays["rejected_low"], rejected_high=arrays["rejected_high"],
            records=[record_from_json(r) for r in meta["records"]], header=meta["header"],
            std=arrays.get("std"), frame_noise_adu=arrays["frame_noise_adu"])
        rows = [(int(r[0]), [float(v) for v in r[1]]) for r in meta["rows"]]
        return RebuildResult(product, rows, str(meta["reference"]), int(meta["reference_row"]))
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise StorageError(f"{path}: not a rebuild result: {exc}") from None


def write_error(path: Path, exc: LivestackError) -> None:
    """Describe a failed rebuild in one JSON line: reason code and message.

    A frame's problem has its reason code (``missing``, ``changed_on_disk``, ...) and a
    message that starts with the frame's path, as every :class:`FrameError` does.
    """
    payload = {"reason": exc.reason if isinstance(exc, FrameError) else type(exc).__name__,
               "message": str(exc)}
    with contextlib.suppress(OSError):
        path.write_text(json.dumps(payload), encoding="utf-8")


def read_error(path: Path) -> dict[str, Any] | None:
    """The error a failed child described, or None when it wrote none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_request(request: RebuildRequest) -> None:
    """Integrate the stack a request names and write the result next to it.

    Raises
    ------
    LivestackError
        From the journal, the plan, a frame, the masters or the result file.
    """
    from livestack.config import config_from_dict
    from livestack.integrate import integrate_plan, load_session, plan_integration
    from livestack.storage.calibration import open_masters, session_masters
    from livestack.storage.journal import Journal

    config = config_from_dict(request.config)
    folder = Path(request.folder)
    journal = Journal(request.journal)
    try:
        session = load_session(journal=journal, stack_id=request.stack_id)
    finally:
        journal.close()
    # The frames' recorded calibration (hash-checked); the configured masters only for
    # frames stacked before masters were recorded.
    recorded = session.recorded_masters()
    masters = session_masters(recorded, session.root, given=None if recorded else open_masters(
        paths=config.masters.paths, temp_tolerance_c=config.masters.temp_tolerance_c))
    wanted = set(request.row_ids)
    # Rows taken out of the stack since the request (rerouted, excluded) are left out.
    frames = tuple(f for f in session.frames if f.row_id in wanted)
    if len(frames) != len(wanted):
        log.info("%s: %d of the requested rows left the stack; integrating %d",
                 request.stack_id, len(wanted) - len(frames), len(frames))
    plan = plan_integration(replace(session, frames=frames), reference=request.reference)
    orphaned = threading.Event()
    parent = os.getppid()

    def watch_parent() -> None:
        # A daemon killed outright cannot stop us: notice it and stop (scratch removed).
        while not orphaned.wait(PARENT_CHECK_S):
            if os.getppid() != parent:
                log.warning("%s: the daemon is gone; rebuild cancelled", request.stack_id)
                orphaned.set()

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    try:
        product = integrate_plan(plan, rebuild_config(config.pipeline),
                                 pipeline=config.pipeline, masters=masters,
                                 memory_limit_bytes=request.memory_limit_bytes,
                                 scratch_dir=folder, cancel=orphaned, frame_noise=True,
                                 formats=config.formats)
    finally:
        orphaned.set()  # ends the watcher
    write_result(folder / RESULT_NAME, product, plan)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m livestack.rebuild REQUEST.json``: exit 0 with a result, 1 with an error."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m livestack.rebuild REQUEST.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    request_path = Path(args[0])
    try:
        request = RebuildRequest.load(request_path)
    except StorageError as exc:
        print(f"livestack rebuild: {exc}", file=sys.stderr)
        return 1
    error_path = Path(request.folder) / ERROR_NAME
    if request.nice:
        with contextlib.suppress(OSError):
            os.nice(request.nice)
    try:
        with sigterm_interrupts():
            run_request(request)
    except (KeyboardInterrupt, IntegrationCancelled):
        log.info("%s: rebuild cancelled", request.stack_id)
        return EXIT_CANCELLED
    except LivestackError as exc:
        log.error("%s: rebuild failed: %s", request.stack_id, exc)
        write_error(error_path, exc)
        return 1
    log.info("%s: rebuild integrated", request.stack_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Helpers behind ``livestack run``'s newcomer flags: folders, calibration, the LAN.

* :func:`with_run_masters`: ``--bias/--darks/--flats`` (masters or raw frames) as
  ``masters.paths``, so that live frames and background rebuilds use the same masters;
* :func:`ensure_folder`: create the watch/output folder or say in one line why not;
* :func:`calibration_gap`: what a light's calibration lacks (no dark, no flat), for the
  daemon's one-time warning;
* :func:`lan_addresses` and :func:`lan_banner`: the URLs a phone on the local network
  opens with ``--lan``, and how the operator token works.

No numeric code; nothing here runs per pixel.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livestack.errors import MasterError, UsageError

if TYPE_CHECKING:
    from livestack.config import Config

#: Host bound by ``--lan`` (every IPv4 interface).
LAN_HOST = "0.0.0.0"

#: The one-time warning when lights are stacked without a dark or a flat.
UNCALIBRATED_HINT = ("give master frames with `livestack run --bias DIR --darks DIR "
                     "--flats DIR` or masters.paths in the configuration")


def ensure_folder(path: Path, what: str) -> None:
    """Create folder ``path`` (and parents) if missing.

    Parameters
    ----------
    path : Path
    what : str
        What the folder is for, as the message names it (``"watch folder"``).

    Raises
    ------
    UsageError
        One line naming the folder: it is a file, or it cannot be created (no such
        parent, permission denied, read-only file system, ...).
    """
    if path.is_dir():
        return
    if path.exists():
        raise UsageError(f"{path}: the {what} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{path}: the {what} path runs through a file") from None
    except NotADirectoryError:
        raise UsageError(f"{path}: the {what} path runs through a file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot create the {what}: "
                         f"{exc.strerror or exc}") from None


#: Sub-folder of the output root where ``run`` writes masters built from raw frames.
RUN_MASTERS_DIR = "masters"


def with_run_masters(config: Config, *, bias: Path | None = None, darks: Path | None = None,
                     flats: Path | None = None) -> Config:
    """The configuration with ``masters.paths`` taken from ``run``'s flags.

    Each argument is a master file, a folder of master files (used as they are), or a
    folder of raw frames: their masters are built (as ``livestack masters build``) into
    ``<output.dir>/masters/`` at each start; the user's files are only read.

    Parameters
    ----------
    config : Config
    bias, darks, flats : Path or None

    Returns
    -------
    Config
        ``masters.paths`` replaced by the given masters (the configured ones are dropped).

    Raises
    ------
    MasterError
        A missing path, a folder without FITS files, or a build error (one line).
    UsageError
        The output folder cannot be created.
    """
    # Lazy: the CLI imports this module at start (see cli.py); masters pull in the pipeline.
    from livestack.storage.masters import _is_master_file, build_masters_from_dirs, list_fits

    paths: list[str] = []
    raw: dict[str, Path] = {}
    for kind, arg in (("bias", bias), ("dark", darks), ("flat", flats)):
        if arg is None:
            continue
        path = Path(arg).absolute()
        if path.is_file():
            paths.append(str(path))
        elif path.is_dir():
            files = list_fits(path)
            if not files:
                raise MasterError(f"{path}: no FITS files (.fit/.fits/.fts/.fz)")
            if all(_is_master_file(f) for f in files):
                paths.append(str(path))
            else:
                raw[kind] = path
        else:
            raise MasterError(f"{path}: no such {kind} file or folder")
    if raw:
        output = Path(config.output.dir).absolute()
        ensure_folder(output, "output folder")
        written = build_masters_from_dirs(output / RUN_MASTERS_DIR, bias_dir=raw.get("bias"),
                                          dark_dir=raw.get("dark"), flat_dir=raw.get("flat"))
        paths.extend(str(p) for p in written)
    masters = dataclasses.replace(config.masters, paths=tuple(paths))
    return dataclasses.replace(config, masters=masters)


def calibration_gap(chosen: Any) -> str | None:
    """Describe what a light's calibration lacks, or None when it has a dark and a flat.

    Parameters
    ----------
    chosen : MasterSet or None
        The masters selected for the frame (None: no master library at all).

    Returns
    -------
    str or None
        ``"no master frames"``, ``"no dark"``, ``"no flat"`` or ``"no dark and no flat"``.
    """
    if chosen is None:
        return "no master frames"
    has_dark = any(item.startswith("dark") for item in chosen.description)
    has_flat = chosen.flat is not None
    if has_dark and has_flat:
        return None
    if not has_dark and not has_flat:
        return "no dark and no flat"
    return "no dark" if not has_dark else "no flat"


def lan_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (the default route's first).

    Found without sending anything: a UDP socket "connected" to a documentation address
    reveals the outgoing interface, and the host name's addresses add the others.

    Returns
    -------
    list of str
        Possibly empty (no network).
    """
    found: list[str] = []
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent by a UDP connect
        found.append(probe.getsockname()[0])
    except OSError:
        pass
    finally:
        probe.close()
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        infos = []
    for info in infos:
        found.append(str(info[4][0]))
    out: list[str] = []
    for addr in found:
        if not addr.startswith("127.") and addr != "0.0.0.0" and addr not in out:
            out.append(addr)
    return out


def lan_banner(port: int, token_from_config: bool, addresses: list[str] | None = None
               ) -> list[str]:
    """Lines printed by ``livestack run --lan`` once the server listens.

    Parameters
    ----------
    port : int
        The bound port.
    token_from_config : bool
        ``server.token`` is set in the configuration (else a random one per start).
    addresses : list of str, optional
        Default: :func:`lan_addresses`.

    Returns
    -------
    list of str
    """
    addrs = lan_addresses() if addresses is None else addresses
    lines = ["  on the local network (--lan): open on a phone or tablet"]
    if addrs:
        lines += [f"    http://{addr}:{port}/" for addr in addrs]
    else:
        lines.append(f"    http://<this computer's address>:{port}/ (no network address found)")
    where = ("server.token in the configuration" if token_from_config
             else "the operator token above (a new one at each start)")
    lines.append("  anyone on the network can watch; commands (pause, reset, exclude a frame)"
                 f" need {where}: the viewer asks for it once")
    return lines

"""A node's run directory: where its sockets and roster live, and who owns it.

``$TMPDIR/smss-XXXX`` (Unix socket paths are limited to ~107 bytes, so it is short)
holds an ``owner`` file with the pid of the agent serving it, or of one of its
zygotes while they wait to be adopted (:mod:`smss.node.roster`). A directory whose
owner is gone is what a killed node left: the next node to start removes it, with
the weight segments named after it in ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from smss.node.roster import live_zygotes, read_pointer, write_pointer
from smss.node.worker import process_alive

log = logging.getLogger(__name__)


def claim_run_dir(state_file: Path | None) -> Path:
    """The run directory of this agent: the one its state file names when its owner is
    gone (a killed agent whose processes may be adopted), else a new one. Unix socket
    paths are limited to ~107 bytes, so it lives in a short tmp dir."""
    reap_orphans()
    previous = read_pointer(state_file) if state_file is not None else None
    if previous is not None and previous.is_dir() and not _held_by_agent(previous):
        (previous / "owner").write_text(str(os.getpid()))
        # The killed agent's weight store: nothing maps it but that agent (templates
        # hold their own copy), and the new store starts empty.
        for segment in Path("/dev/shm").glob(f"{previous.name}-*"):
            with contextlib.suppress(OSError):
                segment.unlink()
        log.info("taking over the run directory %s of a stopped node", previous)
        return previous
    run_dir = Path(tempfile.mkdtemp(prefix="smss-"))
    (run_dir / "owner").write_text(str(os.getpid()))
    if state_file is not None:
        write_pointer(state_file, run_dir)
    return run_dir


def _held_by_agent(run_dir: Path) -> bool:
    """Its owner runs and is not one of its zygotes (which own it while they wait to
    be adopted): another agent serves it."""
    try:
        owner = int((run_dir / "owner").read_text())
    except (OSError, ValueError):
        return False
    return process_alive(owner) and owner not in {z.pid for z in live_zygotes(run_dir)}


def reap_orphans(tmp: Path | None = None, shm: Path = Path("/dev/shm")) -> list[str]:
    """Remove what a killed node left: run directories whose owner process is gone
    and whose zygotes (waiting to be adopted) are gone too, and the weight segments
    named after them. (kill -9 runs no cleanup; the next start does it.) Returns the
    run directories removed."""
    removed = []
    for run_dir in (tmp or Path(tempfile.gettempdir())).glob("smss-*"):
        try:
            owner = int((run_dir / "owner").read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being set up
        if process_alive(owner) or live_zygotes(run_dir):
            continue
        for segment in shm.glob(f"{run_dir.name}-*"):
            with contextlib.suppress(OSError):
                segment.unlink()
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(run_dir.name)
    if removed:
        log.info("removed %d run directories left by killed nodes", len(removed))
    return removed

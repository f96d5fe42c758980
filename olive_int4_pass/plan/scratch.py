"""Temporary folders of one run (kept calibration inputs, searched scales), named after the process that made them.

Each folder is removed when its store is closed or collected, or at interpreter exit. A run killed before then
(SIGKILL, or a SIGTERM with no handler, as when a library caller's process is stopped) cannot clean up, and a 7B
run's calibration inputs take 7 GB of the temporary disk. So every folder carries its process id, and making a new
one first removes the folders of the same kind whose process is gone.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from pathlib import Path

from olive_int4_pass.genai.files import process_alive

logger = logging.getLogger(__name__)


def make_folder(prefix: str, directory: str | os.PathLike | None = None) -> Path:
    """A new folder ``<prefix><pid>-<random>`` in ``directory`` (default: ``TMPDIR``), after removing stale ones."""
    remove_stale(prefix, directory)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=directory))


def remove_stale(prefix: str, directory: str | os.PathLike | None = None) -> list[Path]:
    """Remove the ``<prefix><pid>-*`` folders in ``directory`` whose process is gone; return them."""
    where = Path(directory or tempfile.gettempdir())
    removed = []
    for path in where.glob(f"{glob.escape(prefix)}*-*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and path.is_dir() and not path.is_symlink() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.info("removed %d temporary folder(s) left by runs that were killed: %s", len(removed), removed)
    return removed

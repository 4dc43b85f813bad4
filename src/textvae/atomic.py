"""Atomic writes: the one helper every writer of a run or sweep folder uses.

A file is written to ``<name>.tmp`` beside it and renamed into place (``os.replace``, atomic on
POSIX), so a reader never sees half a file and an interrupted write leaves the old one intact.
A folder (a checkpoint, a report) is written whole into ``<name>.tmp/`` and committed by
:func:`commit_dir`, which keeps the previous folder as ``<name>.old/`` until the new one is in
place (:func:`textvae.rundir.checkpoint_dir` falls back to it after an interruption).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Within ``with``: the temporary path to write ``path``'s new content to (``path`` with
    ``suffix`` appended); on a normal exit it is renamed over ``path``, on an exception it is
    removed and ``path`` is left as it was.

    For writers that take a file name (``OmegaConf.save``, ``safetensors``, a download)."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically. Returns the path. Raises OSError as ``open`` does."""
    path = Path(path)
    with replacing(path) as tmp:
        tmp.write_text(text)
    return path


def write_json(path: str | Path, record: dict) -> Path:
    """Write ``record`` as indented JSON (newline-terminated) to ``path`` atomically."""
    return write_text(path, json.dumps(record, indent=2) + "\n")


def temp_dir(final: str | Path) -> Path:
    """The temporary twin ``<final>.tmp`` of folder ``final``, not yet created (a partial write
    left by an interrupted earlier attempt is removed)."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def usual_modes(folder: str | Path) -> None:
    """Give the files of ``folder`` the mode a new file gets (0666 less the umask): safetensors
    writes through a private temporary file and leaves its weights at 0600, unreadable to the
    group that can read everything else in the run folder."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def commit_dir(tmp: str | Path, final: str | Path) -> None:
    """Rename the fully written folder ``tmp`` over ``final``; its files get :func:`usual_modes`.

    The previous ``final`` is renamed to ``<final>.old`` first and removed once the new one is in
    place, so at every instant one complete folder exists under one of the two names. A stale
    ``.old`` beside an existing ``final`` (an earlier commit interrupted before its clean-up) is
    removed first; without ``final``, ``.old`` is the only complete copy and is kept until the
    new folder is in place.
    """
    tmp, final = Path(tmp), Path(final)
    usual_modes(tmp)
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)

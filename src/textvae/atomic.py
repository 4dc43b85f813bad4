"""Atomic file writes: the one helper every writer of a run or sweep folder uses.

A file is written to ``<name>.tmp`` beside it and renamed into place (``os.replace``, atomic on
POSIX), so a reader never sees half a file and an interrupted write leaves the old one intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically. Returns the path. Raises OSError as ``open`` does."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, record: dict) -> Path:
    """Write ``record`` as indented JSON (newline-terminated) to ``path`` atomically."""
    return write_text(path, json.dumps(record, indent=2) + "\n")

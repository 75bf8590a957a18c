"""Atomic folder writes.

A folder is filled under a temporary sibling name and renamed into place, so after a crash
(even `kill -9`) it is either complete or absent.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_dir"]


def atomic_dir(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create `target` by filling a temp sibling folder and renaming it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

"""Names that become paths, and writes that must stay inside a folder.

Task names, the config `name`, strategy and encoder labels and cell ids all end up as folder or
file names. They are validated here, in one place, so that no configured name can reach outside
the run folder (`../../x`, `/etc`, `a/b`) or hide a file (`.x`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["NAME_PATTERN", "UnsafePathError", "check_cell_id", "check_name", "inside"]

#: A name that may become one path component: letters, digits, `_` and `-` (no dots, no slash).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")
# A cell id joins names with "." (task.strategy.ct.ehr.head.sSEED): dots only between names.
_CELL_ID = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


class UnsafePathError(ValueError):
    """A name or path that would be written outside the folder it belongs to."""


def check_name(value: str, what: str) -> str:
    """Return `value` when it is a safe path component, else raise UnsafePathError naming `what`.

    >>> check_name("pe_mortality", "task name")
    'pe_mortality'
    """
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise UnsafePathError(
            f"{what} {value!r} may only contain letters, digits, '_' and '-' "
            "(it becomes a file or folder name)"
        )
    return value


def check_cell_id(cell_id: str) -> str:
    """Check a cell id: safe names joined by single dots (never `..`, `/` or a leading dot)."""
    if not isinstance(cell_id, str) or not _CELL_ID.match(cell_id):
        raise UnsafePathError(
            f"cell id {cell_id!r} is not names of letters, digits, '_' and '-' joined by '.'"
        )
    return cell_id


def inside(root: str | os.PathLike[str], path: str | os.PathLike[str], what: str = "path") -> Path:
    """`path` resolved (symlinks followed), after checking it lies inside `root`.

    Raises UnsafePathError naming `what` when it does not, e.g. a relative path with `..`.
    """
    base = Path(root).resolve()
    target = (base / path).resolve()
    if target != base and not target.is_relative_to(base):
        raise UnsafePathError(f"{what} {str(path)!r} resolves outside {base} (to {target})")
    return target

"""The standard rich progress bar of long steps (encoding, pretraining, grid cells)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = ["progress_bar"]


def progress_bar(
    title: str,
    *,
    stats: Sequence[str] = (),
    note: str | None = None,
    enabled: bool = True,
    console: Any = None,
) -> Progress:
    """Build a rich `Progress` with a bar, counts, statistics, times and a note.

    Columns: `title`, the bar, done / total, the `stats` text columns, time elapsed and
    remaining, then the `note` text column (text in rich markup, with `{task...}` fields).
    `enabled=False` shows nothing; `console`: where it draws (None: rich's console).
    """
    import rich.progress as rp

    after = [] if note is None else [rp.TextColumn(note)]
    return rp.Progress(
        rp.TextColumn(title),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        *(rp.TextColumn(s) for s in stats),
        rp.TimeElapsedColumn(),
        rp.TimeRemainingColumn(),
        *after,
        disable=not enabled,
        console=console,
    )

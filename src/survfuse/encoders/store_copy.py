"""The `FeatureStore`'s copy of chunk rows into a result in cohort order (see `store`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from survfuse.encoders.store_segments import load_chunk

__all__ = ["copy_rows", "is_range"]


def is_range(a: NDArray[np.int64], start: int) -> bool:
    """Whether `a` is start, start + 1, ..., start + len(a) - 1."""
    return (
        a.size > 0
        and int(a[0]) == start
        and int(a[-1]) == start + a.size - 1
        and (a.size < 2 or bool(np.all(np.diff(a) == 1)))
    )


def copy_rows(
    tmp: Path,
    chunk_dirs: list[Path],
    chunks: list[tuple[int, int]],
    inverse: NDArray[np.int64],
    sid: NDArray[np.int64],
    pt: NDArray[np.datetime64],
) -> list[dict[str, Any]]:
    """Scatter the chunks' rows into memory-mapped arrays of `tmp`; return the chunks' meta."""
    n = len(sid)
    parts = [load_chunk(d) for d in chunk_dirs]
    head = parts[0]
    t_max = max(p.num_tokens for p in parts)
    k_max = max((p.token_codes.shape[2] for p in parts if p.token_codes is not None), default=0)
    shapes: dict[str, tuple[tuple[int, ...], Any, Any]] = {
        "subject_id": ((n,), np.int64, 0),
        "prediction_time": ((n,), np.int64, 0),
        "pooled": ((n, head.pooled_dim), np.float32, 0),
        "present": ((n,), np.bool_, False),
    }
    if head.mask is not None:
        shapes["mask"] = ((n, t_max), np.bool_, False)
    if head.tokens is not None:
        shapes["tokens"] = ((n, t_max, head.token_dim), np.float32, 0)
    if head.token_codes is not None:
        shapes["token_codes"] = ((n, t_max, k_max), np.int32, -1)
    out = {}
    for key, (shape, dtype, fill) in shapes.items():
        arr = np.lib.format.open_memmap(tmp / f"{key}.npy", "w+", dtype, shape)
        if fill:  # a new file reads as zeros: filling it with 0 would write it twice
            arr[...] = fill
        out[key] = arr
    out["subject_id"][:] = sid
    out["prediction_time"][:] = pt.astype(np.int64)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], [a for a, _ in chunks] + [chunks[-1][1]])
    for c, part in enumerate(parts):
        a = chunks[c][0]
        rows: Any = order[starts[c] : starts[c + 1]]
        src: Any = inverse[rows] - a
        if is_range(rows, int(rows[0]) if rows.size else 0) and is_range(src, 0):
            # cohort rows in chunk order (the usual case): plain slices, no gathers
            rows, src = slice(int(rows[0]), int(rows[-1]) + 1), slice(None)
        out["pooled"][rows] = part.pooled[src]
        out["present"][rows] = part.present[src]
        t = part.num_tokens
        if part.mask is not None:
            out["mask"][rows, :t] = part.mask[src]
        if part.tokens is not None:
            out["tokens"][rows, :t] = part.tokens[src]
        if part.token_codes is not None:
            k = part.token_codes.shape[2]
            out["token_codes"][rows, :t, :k] = part.token_codes[src]
    # no msync (memmap.flush): like the chunks' np.save, the data is in the page cache,
    # which survives a killed process; the store's rename is what makes the result whole
    del out
    return [p.meta for p in parts]

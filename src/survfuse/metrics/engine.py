"""The bootstrap engine: many models scored on the same subject-level resamples.

Each model has one scorer per seed and metric; the resamples come one weight block at a time.

A resample is a weight vector over rows (`Resampler.weights` yields blocks [<=128, n]); every
model sees the same blocks, so differences between models are paired. A model's statistic on a
resample is the mean of its seeds' statistics over the seeds where it is defined (NaN when it is
defined for none): theta*_b = mean_{s : theta*_{s,b} finite} theta*_{s,b}. A single model with
one seed is the plain bootstrap (`metrics.bootstrap.run_boot`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

__all__ = ["nanmean_rows", "score_on_blocks"]

K = TypeVar("K", bound=Hashable)


def nanmean_rows(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Column means of x [S, B] over its finite entries (NaN where a column has none)."""
    ok = np.isfinite(x)
    cnt = ok.sum(axis=0)
    tot = np.where(ok, x, 0.0).sum(axis=0)
    return np.divide(tot, cnt, out=np.full(tot.shape, np.nan), where=cnt > 0)


def score_on_blocks(
    scorers: Mapping[str, Sequence[Mapping[K, Any]]],
    blocks: Iterable[NDArray[np.float64]],
    *,
    on_block: Callable[[NDArray[np.float64]], None] | None = None,
) -> dict[str, dict[K, NDArray[np.float64]]]:
    """Seed-averaged replicates [B] of every (model, metric key) on the weight `blocks`.

    `scorers[model][seed][key]` follows `metrics.bootstrap.Scorer` (`boot(w [b, n]) -> [b]`);
    every seed of a model has the same keys. `on_block(w)` runs after each block (progress,
    or collecting other per-resample quantities on the same weights).
    """
    parts: dict[str, dict[K, list[NDArray[np.float64]]]] = {
        model: {k: [] for k in per_seed[0]} for model, per_seed in scorers.items()
    }
    for w in blocks:
        for model, per_seed in scorers.items():
            for k in per_seed[0]:
                vals = np.stack([sc[k].boot(w) for sc in per_seed])
                parts[model][k].append(nanmean_rows(vals))
        if on_block is not None:
            on_block(w)
    return {
        model: {k: np.concatenate(v) if v else np.full(0, np.nan) for k, v in keys.items()}
        for model, keys in parts.items()
    }

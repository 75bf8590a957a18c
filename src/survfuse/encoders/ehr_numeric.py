"""Last observed value of the most-measured numeric codes, the `numeric_last` columns of `ehr_onehot`.

Why: `ehr_onehot` pools a lab as counts of its quantile-bin tokens divided by the number of
events, so the most recent troponin of a patient with a long history is a small fraction of a
fraction; a clinician reads the last value. On held-out simulated cohorts the elastic-net Cox on
`ehr_counts` (which has last values) beat the same model on `ehr_onehot` by 0.014-0.021 C
(docs/benchmarks.md, issue 17, session 6).

`NumericStats.fit` picks the `max_numeric` vocabulary codes with the most finite training values
and their training mean / sd; `LastValues` accumulates, per key, each code's value at its latest
event (ties: the later event in batch order) and returns it z-scored, clipped to +-`CLIP`, and 0
where never measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl
from numpy.typing import NDArray

from survfuse.encoders.ehr_vocab import CodeVocab, EventBatch

__all__ = ["CLIP", "LastValues", "NumericStats"]

CLIP = 10.0  # z-scores beyond this are unit errors or outliers, not information


@dataclass
class NumericStats:
    """Numeric codes (indices into `CodeVocab.codes`) with their training mean and sd."""

    codes: NDArray[np.int64]
    mean: NDArray[np.float64]
    sd: NDArray[np.float64]

    @classmethod
    def empty(cls) -> NumericStats:
        """No numeric code (`numeric_last: 0`)."""
        return cls(np.zeros(0, np.int64), np.zeros(0), np.ones(0))

    @classmethod
    def fit(cls, events: EventBatch, vocab: CodeVocab, max_numeric: int) -> NumericStats:
        """Return the `max_numeric` vocabulary codes with the most finite values in `events`.

        Ties in the number of values go to the smaller code index (the more frequent code).
        """
        if max_numeric <= 0 or len(events) == 0:
            return cls.empty()
        idx = vocab.code_index(events.code)
        # in the token vocabulary with or without a value bin (top `max_codes`)
        in_vocab = (idx >= 0) & (vocab.lut[np.maximum(idx, 0)] > 0).any(axis=1)
        fin = in_vocab & np.isfinite(events.value)
        stats = (
            pl.DataFrame({"c": idx[fin], "v": events.value[fin]})
            .group_by("c")
            .agg(
                pl.len().alias("n"),
                pl.col("v").mean().alias("mean"),
                pl.col("v").std(ddof=0).alias("sd"),
            )
            .sort(["n", "c"], descending=[True, False])
            .head(max_numeric)
            .sort("c")
        )
        sd = stats["sd"].fill_null(0.0).to_numpy().astype(np.float64)
        return cls(
            stats["c"].to_numpy().astype(np.int64),
            stats["mean"].to_numpy().astype(np.float64),
            np.where(sd > 0, sd, 1.0),
        )

    def state(self, prefix: str = "numeric_") -> dict[str, NDArray[np.generic]]:
        """Arrays for `Encoder.state` (keys `numeric_codes`, `numeric_mean`, `numeric_sd`)."""
        return {f"{prefix}codes": self.codes, f"{prefix}mean": self.mean, f"{prefix}sd": self.sd}

    @classmethod
    def from_state(
        cls, state: Mapping[str, NDArray[np.generic]], prefix: str = "numeric_"
    ) -> NumericStats:
        """Inverse of `state`; a state saved before these columns existed gives `empty()`."""
        if f"{prefix}codes" not in state:
            return cls.empty()
        return cls(
            np.asarray(state[f"{prefix}codes"], np.int64),
            np.asarray(state[f"{prefix}mean"], np.float64),
            np.asarray(state[f"{prefix}sd"], np.float64),
        )

    def names(self, vocab: CodeVocab) -> list[str]:
        """Column names `last/<code>`."""
        return [f"last/{vocab.codes[c]}" for c in self.codes]

    def last_values(self, vocab: CodeVocab, n_keys: int) -> LastValues:
        """Return an accumulator of each code's latest value per key (`add`, then `result`)."""
        return LastValues(self, vocab, n_keys)


class LastValues:
    """Latest value of each numeric code per key, accumulated over `EventBatch`es."""

    def __init__(self, stats: NumericStats, vocab: CodeVocab, n_keys: int) -> None:
        self.stats, self.vocab = stats, vocab
        m = len(stats.codes)
        self.value = np.zeros((n_keys, m))
        self.when = np.full((n_keys, m), np.iinfo(np.int64).min, np.int64)
        self.seen = np.zeros((n_keys, m), bool)
        self.lookup = np.full(len(vocab.codes) + 1, -1, np.int64)
        self.lookup[stats.codes] = np.arange(m)

    def add(self, batch: EventBatch) -> None:
        """Update with the events of `batch` (any key order; later times win)."""
        m = len(self.stats.codes)
        if m == 0 or len(batch) == 0:
            return
        code_idx = self.vocab.code_index(batch.code)
        num = self.lookup[np.where(code_idx >= 0, code_idx, len(self.vocab.codes))]
        sel = np.flatnonzero((num >= 0) & np.isfinite(batch.value))
        if sel.size == 0:
            return
        key, col, t = batch.key[sel], num[sel], batch.time_us[sel]
        # latest event of each (key, code): the last one in (time, batch position) order
        order = np.lexsort((sel, t))
        flat = key[order] * m + col[order]
        _, first_rev = np.unique(flat[::-1], return_index=True)
        pick = order[::-1][first_rev]
        k, c = key[pick], col[pick]
        newer = ~self.seen[k, c] | (t[pick] >= self.when[k, c])
        k, c, pick = k[newer], c[newer], pick[newer]
        self.value[k, c] = batch.value[sel[pick]]
        self.when[k, c] = t[pick]
        self.seen[k, c] = True

    def result(self) -> NDArray[np.float32]:
        """Return [n_keys, len(codes)] float32: z-scored latest values, 0 where never measured."""
        z = np.clip((self.value - self.stats.mean) / self.stats.sd, -CLIP, CLIP)
        return np.where(self.seen, z, 0.0).astype(np.float32)

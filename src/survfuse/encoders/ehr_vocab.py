"""Shared pieces of the EHR encoders: cohort keys, windowed event batches, the code vocabulary.

Events are read only through `MEDSDataset.iter_windowed` (so the leakage rule lives in one
place: only events with `time <= prediction_time`, plus static events). Each yielded batch is
turned into numpy arrays indexed by a *key* = one distinct `(subject_id, prediction_time)` of
the cohort; encoders compute per-key features and expand them to the cohort's rows at the end
(a cohort may repeat a key).

`CodeVocab` is fitted on training events only:
- per code with enough numeric values, quantile cut points of its training values
  (`n_bins` bins; a binned value becomes its own token, e.g. `"LAB//CREAT//q3"`);
- the top `max_codes` tokens by the number of training subjects having them
  (ties broken by the token string, so fitting is deterministic); id 0 is out-of-vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from numpy.typing import NDArray

__all__ = [
    "OOV_TOKEN",
    "CodeVocab",
    "EventBatch",
    "KeyIndex",
    "fit_vocab",
    "iter_event_batches",
    "key_runs",
    "windowed_events",
]

OOV_TOKEN = "<OOV>"
_US_PER_DAY = 86_400_000_000


@dataclass
class KeyIndex:
    """Distinct keys of a cohort: `keys` [n_keys] frame and `row_key` [N] (cohort row -> key)."""

    keys: pl.DataFrame  # subject_id Int64, prediction_time Datetime(us), _key UInt32
    row_key: NDArray[np.int64]

    @classmethod
    def from_cohort(cls, cohort: pl.DataFrame) -> KeyIndex:
        for col in ("subject_id", "prediction_time"):
            if col not in cohort.columns:
                raise ValueError(f"cohort is missing column {col!r} (has {cohort.columns})")
        rows = cohort.select(
            pl.col("subject_id").cast(pl.Int64),
            pl.col("prediction_time").cast(pl.Datetime("us")),
        )
        if rows.null_count().sum_horizontal().item() > 0:
            bad = rows.with_row_index("row").filter(
                pl.col("subject_id").is_null() | pl.col("prediction_time").is_null()
            )
            raise ValueError(
                f"cohort rows {bad['row'].head(5).to_list()} have a null subject_id or "
                "prediction_time"
            )
        keys = rows.unique(maintain_order=True).with_row_index("_key")
        row_key = rows.join(
            keys, on=["subject_id", "prediction_time"], how="left", maintain_order="left"
        )["_key"]
        return cls(keys=keys, row_key=row_key.to_numpy().astype(np.int64))

    @property
    def n_keys(self) -> int:
        return self.keys.height


@dataclass
class EventBatch:
    """Events of some keys as arrays (one entry per event, in (key, time) order).

    `key` [n] global key index; `subject_id` [n]; `days_before` [n] float64 days from the
    event to its prediction_time (NaN for static events); `day_index` [n] int64 calendar days
    between the event's date and the prediction date (-1 for static); `code` polars Series;
    `value` [n] float64 (NaN when absent); `time_us` [n] int64 event time (min int for static).
    """

    key: NDArray[np.int64]
    subject_id: NDArray[np.int64]
    days_before: NDArray[np.float64]
    day_index: NDArray[np.int64]
    code: pl.Series
    value: NDArray[np.float64]
    time_us: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.key.shape[0])

    def take(self, keep: NDArray[np.bool_]) -> EventBatch:
        """Return the events where `keep` [n] is True (order kept)."""
        return EventBatch(
            key=self.key[keep],
            subject_id=self.subject_id[keep],
            days_before=self.days_before[keep],
            day_index=self.day_index[keep],
            code=self.code.filter(pl.Series(keep)),
            value=self.value[keep],
            time_us=self.time_us[keep],
        )


def _to_batch(frame: pl.DataFrame, keys: pl.DataFrame) -> EventBatch:
    """Arrays of one windowed frame; the key of each event comes from its (subject, time) run."""
    frame = frame.with_columns(pl.struct("subject_id", "prediction_time").rle_id().alias("_run"))
    runs = (
        frame.select("_run", "subject_id", "prediction_time")
        .unique("_run", keep="first")
        .join(keys, on=["subject_id", "prediction_time"], how="left")
        .sort("_run")
    )
    if runs["_key"].null_count():
        extra = runs.filter(pl.col("_key").is_null()).head(3).rows()
        raise ValueError(f"MEDS windowed events returned keys not in the cohort: {extra}")
    run_key = runs["_key"].to_numpy().astype(np.int64)
    key = run_key[frame["_run"].to_numpy()]
    pt = frame["prediction_time"].cast(pl.Int64).to_numpy()
    t = frame["time"].cast(pl.Datetime("us")).cast(pl.Int64)
    static = t.is_null().to_numpy()
    t_np = t.fill_null(np.iinfo(np.int64).min).to_numpy()
    diff = (pt - np.where(static, pt, t_np)).astype(np.float64)
    days_before = np.where(static, np.nan, diff / _US_PER_DAY)
    day_index = np.where(
        static, -1, np.floor_divide(pt, _US_PER_DAY) - np.floor_divide(t_np, _US_PER_DAY)
    ).astype(np.int64)
    value = frame["numeric_value"].cast(pl.Float64).fill_nan(None).to_numpy()
    return EventBatch(
        key=key,
        subject_id=frame["subject_id"].to_numpy().astype(np.int64),
        days_before=days_before,
        day_index=day_index,
        code=frame["code"].cast(pl.Utf8),
        value=np.asarray(value, dtype=np.float64),
        time_us=t_np,
    )


def iter_event_batches(
    source: Any, index: KeyIndex, *, lookback_days: float | None, batch_size: int = 4096
) -> Iterator[EventBatch]:
    """Windowed events of every key in `index`, batch by batch (see `EventBatch`)."""
    if not hasattr(source, "iter_windowed"):
        raise TypeError(
            f"EHR encoders read a survfuse.data.meds.MEDSDataset, got {type(source).__name__}"
        )
    keys = index.keys.select("subject_id", "prediction_time")
    for frame in source.iter_windowed(keys, lookback_days=lookback_days, batch_size=batch_size):
        if frame.height:
            yield _to_batch(frame, index.keys)


def windowed_events(
    source: Any, index: KeyIndex, *, lookback_days: float | None, batch_size: int = 4096
) -> EventBatch:
    """All windowed events of `index` in one `EventBatch`."""
    parts = list(
        iter_event_batches(source, index, lookback_days=lookback_days, batch_size=batch_size)
    )
    if not parts:
        empty_i = np.zeros(0, np.int64)
        return EventBatch(
            empty_i,
            empty_i,
            np.zeros(0),
            empty_i,
            pl.Series("code", [], pl.Utf8),
            np.zeros(0),
            empty_i,
        )
    return EventBatch(
        key=np.concatenate([p.key for p in parts]),
        subject_id=np.concatenate([p.subject_id for p in parts]),
        days_before=np.concatenate([p.days_before for p in parts]),
        day_index=np.concatenate([p.day_index for p in parts]),
        code=pl.concat([p.code for p in parts]),
        value=np.concatenate([p.value for p in parts]),
        time_us=np.concatenate([p.time_us for p in parts]),
    )


# ---------------------------------------------------------------------- vocabulary
@dataclass
class CodeVocab:
    """Codes seen in training, their quantile cut points and the token vocabulary.

    `codes` [C] str (every training code, sorted); `cuts` [C, n_bins - 1] float64 cut points
    (+inf padding; all +inf = code not binned); `lut` [C, n_bins + 1] int32 maps (code, column)
    to a token id, column 0 = the code without a (binned) value, column b + 1 = bin b;
    `tokens` [V + 1] str with `tokens[0] = "<OOV>"`; `subject_counts` [V + 1] int64.
    """

    codes: NDArray[np.str_]
    cuts: NDArray[np.float64]
    lut: NDArray[np.int32]
    tokens: NDArray[np.str_]
    subject_counts: NDArray[np.int64]

    @property
    def size(self) -> int:
        """Number of token ids including the out-of-vocabulary id 0."""
        return int(self.tokens.shape[0])

    @property
    def n_bins(self) -> int:
        return int(self.lut.shape[1] - 1)

    def code_index(self, code: pl.Series) -> NDArray[np.int64]:
        """Index of each code in `codes` (-1 for codes never seen in training)."""
        if len(self.codes) == 0:
            return np.full(len(code), -1, np.int64)
        cache = self.__dict__.get("_code_series")
        if cache is None or cache[0] is not self.codes:  # built once per vocabulary
            cache = (
                self.codes,
                pl.Series(self.codes.tolist(), dtype=pl.Utf8),
                pl.Series(np.arange(len(self.codes), dtype=np.int64)),
            )
            self.__dict__["_code_series"] = cache
        mapped = code.replace_strict(cache[1], cache[2], default=-1, return_dtype=pl.Int64)
        return mapped.to_numpy()

    def columns(self, code_idx: NDArray[np.int64], value: NDArray[np.float64]) -> NDArray[np.int64]:
        """LUT column per event: 0 when unbinned or valueless, else 1 + quantile bin."""
        col = np.zeros(code_idx.shape[0], np.int64)
        if self.n_bins == 0:
            return col
        has = (code_idx >= 0) & np.isfinite(value)
        if has.any():
            cuts = self.cuts[code_idx[has]]
            binned = np.isfinite(cuts[:, 0])
            b = (value[has][:, None] >= cuts).sum(axis=1)
            col[np.flatnonzero(has)[binned]] = 1 + b[binned]
        return col

    def transform(
        self,
        code: pl.Series,
        value: NDArray[np.float64],
        code_idx: NDArray[np.int64] | None = None,
    ) -> NDArray[np.int32]:
        """Token id per event [n] int32 (0 = out of vocabulary); pass `code_idx` if known."""
        idx = self.code_index(code) if code_idx is None else code_idx
        col = self.columns(idx, value)
        ids = self.lut[np.maximum(idx, 0), col]
        return np.where(idx >= 0, ids, 0).astype(np.int32)

    def state(self, prefix: str = "vocab_") -> dict[str, NDArray[Any]]:
        return {
            f"{prefix}codes": self.codes,
            f"{prefix}cuts": self.cuts,
            f"{prefix}lut": self.lut,
            f"{prefix}tokens": self.tokens,
            f"{prefix}subject_counts": self.subject_counts,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, NDArray[Any]], prefix: str = "vocab_") -> CodeVocab:
        try:
            return cls(
                codes=np.asarray(state[f"{prefix}codes"]).astype(str),
                cuts=np.asarray(state[f"{prefix}cuts"], np.float64),
                lut=np.asarray(state[f"{prefix}lut"], np.int32),
                tokens=np.asarray(state[f"{prefix}tokens"]).astype(str),
                subject_counts=np.asarray(state[f"{prefix}subject_counts"], np.int64),
            )
        except KeyError as err:
            raise ValueError(f"saved encoder state lacks {err.args[0]!r}") from None


def fit_vocab(
    events: EventBatch,
    *,
    max_codes: int,
    n_bins: int = 0,
    min_values: int = 20,
    min_subjects: int = 1,
) -> CodeVocab:
    """Fit a `CodeVocab` on (training) events.

    Codes with >= `min_values` finite numeric values get `n_bins` quantile bins (cut points at
    the k / n_bins quantiles of their training values, duplicates removed). The vocabulary is
    the `max_codes` tokens held by the most training subjects (at least `min_subjects`).
    """
    if max_codes < 1:
        raise ValueError(f"max_codes must be >= 1, got {max_codes}")
    if n_bins == 1 or n_bins < 0:
        raise ValueError(f"n_bins must be 0 (no binning) or >= 2, got {n_bins}")
    codes = np.sort(events.code.unique().drop_nulls().to_numpy().astype(str))
    n_codes = len(codes)
    cuts = np.full((n_codes, max(n_bins - 1, 0)), np.inf)
    vocab0 = CodeVocab(
        codes=codes,
        cuts=cuts,
        lut=np.zeros((n_codes, n_bins + 1), np.int32),
        tokens=np.array([OOV_TOKEN]),
        subject_counts=np.zeros(1, np.int64),
    )
    code_idx = vocab0.code_index(events.code)
    if n_bins >= 2 and n_codes:
        fin = np.isfinite(events.value) & (code_idx >= 0)
        vals = pl.DataFrame({"c": code_idx[fin], "v": events.value[fin]})
        qs = [k / n_bins for k in range(1, n_bins)]
        agg = (
            vals.group_by("c")
            .agg(
                pl.len().alias("n"),
                *[pl.col("v").quantile(q, "linear").alias(f"q{k}") for k, q in enumerate(qs)],
            )
            .filter(pl.col("n") >= min_values)
        )
        qmat = agg.select([f"q{k}" for k in range(len(qs))]).to_numpy()
        for c, row in zip(agg["c"].to_numpy(), qmat, strict=True):
            u = np.unique(row)
            cuts[c, : len(u)] = u
    vocab0.cuts = cuts
    col = vocab0.columns(code_idx, events.value)
    known = code_idx >= 0
    pairs = pl.DataFrame(
        {"s": events.subject_id[known], "c": code_idx[known], "col": col[known]}
    ).unique()
    freq = pairs.group_by("c", "col").agg(pl.len().alias("n"))
    freq = freq.filter(pl.col("n") >= min_subjects)
    c_arr = freq["c"].to_numpy()
    col_arr = freq["col"].to_numpy()
    names = np.array(
        [
            codes[c] if k == 0 else f"{codes[c]}//q{k}"
            for c, k in zip(c_arr.tolist(), col_arr.tolist(), strict=True)
        ],
        dtype=str,
    )
    n_arr = freq["n"].to_numpy().astype(np.int64)
    order = np.lexsort((names, -n_arr))[:max_codes] if len(names) else np.zeros(0, np.int64)
    lut = np.zeros((n_codes, n_bins + 1), np.int32)
    lut[c_arr[order], col_arr[order]] = np.arange(1, len(order) + 1, dtype=np.int32)
    return CodeVocab(
        codes=codes,
        cuts=cuts,
        lut=lut,
        tokens=np.concatenate([[OOV_TOKEN], names[order]]).astype(str),
        subject_counts=np.concatenate([[0], n_arr[order]]).astype(np.int64),
    )


# numpy's switch for madvise(MADV_HUGEPAGE) on new arrays (a private name; None if it moves)
_set_madvise_hugepage: Any = getattr(
    getattr(np, "_core", np).multiarray, "_set_madvise_hugepage", None
)


#: Where `output_array` asks for memory first: a FeatureStore lends a buffer it reuses from call
#: to call and writes to its segment file after the call (None: not lent, allocate as usual).
OUTPUT_LENDER: ContextVar[Callable[[tuple[int, ...], Any, Any], NDArray[Any] | None] | None] = (
    ContextVar("survfuse_output_lender", default=None)
)


def output_array(shape: tuple[int, ...], dtype: Any, fill: Any = 0) -> NDArray[Any]:
    """Return a new output array filled with `fill`, without transparent-huge-page advice.

    Where a `FeatureStore` lends memory (`OUTPUT_LENDER`), the array is one of its reused
    buffers, which its writer thread copies to the segment file while the next call encodes.

    numpy advises huge pages for large arrays. Why not here: the encoders' dense outputs are written
    once, and on a busy machine the first touch of huge pages triggers memory compaction that cost
    ~5x the whole write (1.7 s vs 0.3 s CPU for 770 MB); the setting is restored right after the
    allocation.
    """
    lender = OUTPUT_LENDER.get()
    lent = lender(shape, dtype, fill) if lender is not None else None
    if lent is not None:
        return lent
    prev = _set_madvise_hugepage(False) if _set_madvise_hugepage is not None else None
    try:
        out: NDArray[Any] = np.zeros(shape, dtype) if fill == 0 else np.full(shape, fill, dtype)
    finally:
        if prev is not None:
            _set_madvise_hugepage(prev)
    return out


def expand_rows(per_key: NDArray[Any], row_key: NDArray[np.int64]) -> NDArray[Any]:
    """Per-key array -> per-cohort-row array (identity when keys are the rows)."""
    if row_key.shape[0] == per_key.shape[0] and np.array_equal(
        row_key, np.arange(row_key.shape[0])
    ):
        return per_key
    return per_key[row_key]


def key_runs(
    key: NDArray[np.int64], time_us: NDArray[np.int64]
) -> tuple[NDArray[np.int64] | None, NDArray[np.int64], NDArray[np.int64]]:
    """Return the runs of events by key: (order, run starts [n_runs + 1], key of each run).

    The order is stable, groups the events by key with `time_us` non-decreasing within a key,
    and is None when they already are; the run starts are in that order. `time_us` is any int64
    sort key.
    """
    order = None
    n = key.shape[0]
    same = key[1:] == key[:-1]
    run_keys = key[np.concatenate([[0], np.flatnonzero(~same) + 1])]
    if np.unique(run_keys).size != run_keys.size or np.any(same & (time_us[1:] < time_us[:-1])):
        order = np.lexsort((time_us, key))
        key = key[order]
        same = key[1:] == key[:-1]
        run_keys = key[np.concatenate([[0], np.flatnonzero(~same) + 1])]
    starts = np.concatenate([[0], np.flatnonzero(~same) + 1, [n]]).astype(np.int64)
    return order, starts, run_keys

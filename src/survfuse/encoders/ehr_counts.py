"""`ehr_counts`: bag-of-codes counts and last/mean numeric values over look-back windows.

The representation INSPECT's gradient-boosting baseline used. For each window w in `windows`
(days before `prediction_time`; None = all history; static events count in every window) and a
training-split vocabulary (top `max_codes` codes by subject frequency + out-of-vocabulary id 0,
no value binning), the row of a prediction holds

    [ count(code j in w) for j in 0..V | last value of numeric code m | mean value of m in w ]

where the numeric codes are the `max_numeric` vocabulary codes with the most training values,
plus one last column `age_years`: years since the subject's `birth_code` event (MEDS_BIRTH; 0 when
absent; read whatever the windows, as birth lies decades back), which counts cannot express and
which most risks depend on.
`count_matrix` returns these raw values as a `scipy.sparse.csr_matrix` [N, F] (for GBMs);
`encode` gives `ModalityFeatures` with pooled only: dense float32 [N, F] with `log1p` counts and
numeric values z-scored by training mean / sd and clipped to +-10 (absent values stay 0). `meta["feature_names"]`
names the F columns, e.g. `"30d/count/LAB//CREAT"`, `"all/mean/LAB//CREAT"`. One compiled (numba)
pass per batch of keys fills every window's CSR rows (means summed in (time, value) order with
Kahan compensation).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numba
import numpy as np
import polars as pl
import scipy.sparse as sp
from numpy.typing import NDArray

from survfuse.encoders.base import register_encoder
from survfuse.encoders.ehr_common import EHREncoder, cohort_features
from survfuse.encoders.ehr_vocab import (
    CodeVocab,
    EventBatch,
    KeyIndex,
    fit_vocab,
    iter_event_batches,
    key_runs,
    output_array,
    windowed_events,
)
from survfuse.features import ModalityFeatures

__all__ = ["EHRCountsEncoder", "window_counts"]


def _window_name(w: float | None) -> str:
    return "all" if w is None else f"{w:g}d"


@numba.njit(cache=True)
def _count_rows(
    starts: NDArray[np.int64],
    days_before: NDArray[np.float64],
    ids: NDArray[np.int32],
    num_idx: NDArray[np.int64],
    value: NDArray[np.float64],
    time_us: NDArray[np.int64],
    age: NDArray[np.float64],
    windows: NDArray[np.float64],
    vocab_size: int,
    n_numeric: int,
    indptr: NDArray[np.int64],
    cols: NDArray[np.int64],
    vals: NDArray[np.float64],
) -> int:
    """CSR rows (ascending columns) of the keys starts[j]:starts[j + 1]; returns nnz.

    Events of a key are in time order. Per window (days_before <= w, NaN = static = always):
    counts per id, then per numeric code the last value (latest time, ties -> largest value)
    and the mean, summed in (time, value) order with Kahan compensation (polars' mean, so the
    features match the group-by this replaces bit for bit); then `age[j]` when > 0.
    """
    width = vocab_size + 2 * n_numeric
    cnt = np.zeros(vocab_size, np.int64)
    touched = np.empty(vocab_size, np.int64)
    m_sum = np.zeros(max(n_numeric, 1))
    m_comp = np.zeros(max(n_numeric, 1))
    m_cnt = np.zeros(max(n_numeric, 1), np.int64)
    m_last = np.zeros(max(n_numeric, 1))
    m_touched = np.empty(max(n_numeric, 1), np.int64)
    nbuf = np.empty(ids.shape[0], np.int64)
    nnz = 0
    indptr[0] = 0
    for j in range(starts.shape[0] - 1):
        a = starts[j]
        b = starts[j + 1]
        # numeric events in (time, value) order: time order is given, sort the ties by value
        n_num = 0
        for e in range(a, b):
            if num_idx[e] >= 0 and np.isfinite(value[e]):
                q = n_num
                while q > 0 and (
                    time_us[nbuf[q - 1]] == time_us[e] and value[nbuf[q - 1]] > value[e]
                ):
                    nbuf[q] = nbuf[q - 1]
                    q -= 1
                nbuf[q] = e
                n_num += 1
        for wi in range(windows.shape[0]):
            w = windows[wi]
            off = wi * width
            nu = 0
            for e in range(a, b):
                d = days_before[e]
                if np.isnan(d) or d <= w:
                    c = ids[e]
                    if cnt[c] == 0:
                        touched[nu] = c
                        nu += 1
                    cnt[c] += 1
            tk = np.sort(touched[:nu])
            for u in range(nu):
                c = tk[u]
                cols[nnz] = off + c
                vals[nnz] = cnt[c]
                nnz += 1
                cnt[c] = 0
            nm = 0
            for q in range(n_num):
                e = nbuf[q]
                d = days_before[e]
                if np.isnan(d) or d <= w:
                    m = num_idx[e]
                    if m_cnt[m] == 0:
                        m_touched[nm] = m
                        nm += 1
                    y = value[e] - m_comp[m]
                    t = m_sum[m] + y
                    m_comp[m] = (t - m_sum[m]) - y
                    m_sum[m] = t
                    m_cnt[m] += 1
                    m_last[m] = value[e]
            tm = np.sort(m_touched[:nm])
            for u in range(nm):
                m = tm[u]
                cols[nnz] = off + vocab_size + m
                vals[nnz] = m_last[m]
                nnz += 1
            for u in range(nm):
                m = tm[u]
                cols[nnz] = off + vocab_size + n_numeric + m
                vals[nnz] = m_sum[m] / m_cnt[m]
                nnz += 1
                m_sum[m] = 0.0
                m_comp[m] = 0.0
                m_cnt[m] = 0
        if age[j] > 0:
            cols[nnz] = windows.shape[0] * width
            vals[nnz] = age[j]
            nnz += 1
        indptr[j + 1] = nnz
    return nnz


@numba.njit(cache=True)
def _scatter_pooled(
    indptr: NDArray[np.int64],
    cols: NDArray[np.int64],
    vals: NDArray[np.float64],
    rows: NDArray[np.int64],
    log1p_count: NDArray[np.float64],
    vocab_size: int,
    n_numeric: int,
    mean: NDArray[np.float64],
    sd: NDArray[np.float64],
    age_mean: float,
    age_sd: float,
    out: NDArray[np.float32],
    present: NDArray[np.bool_],
) -> None:
    """Write CSR row r (raw features) to dense row `rows[r]` of `out`, transformed as
    `pooled_from_counts` does (same float64 arithmetic, then float32): counts -> log1p (a
    table), numeric values -> clip((x - mean) / sd, -10, 10), age -> (x - mean) / sd."""
    width = vocab_size + 2 * n_numeric
    age_col = out.shape[1] - 1
    for r in range(rows.shape[0]):
        row = rows[r]
        if indptr[r + 1] > indptr[r]:
            present[row] = True
        for q in range(indptr[r], indptr[r + 1]):
            c = cols[q]
            x = vals[q]
            if c == age_col:
                y = (x - age_mean) / age_sd
            else:
                w = c % width
                if w < vocab_size:
                    y = log1p_count[np.int64(x)]
                else:
                    k = w - vocab_size
                    if k >= n_numeric:
                        k -= n_numeric
                    y = min(max((x - mean[k]) / sd[k], -10.0), 10.0)
            out[row, c] = np.float32(y)


def _window_rows(
    key: NDArray[np.int64],
    days_before: NDArray[np.float64],
    ids: NDArray[np.int32],
    num_idx: NDArray[np.int64],
    value: NDArray[np.float64],
    time_us: NDArray[np.int64],
    n_keys: int,
    *,
    vocab_size: int,
    n_numeric: int,
    windows: Sequence[float | None],
    age: NDArray[np.float64] | None,
) -> tuple[sp.csr_matrix, NDArray[np.int64]]:
    """(CSR features of the keys that have events, in run order; the key of each row)."""
    width = len(windows) * (vocab_size + 2 * n_numeric) + (age is not None)
    n = key.shape[0]
    order, starts, run_keys = key_runs(np.asarray(key, np.int64), np.asarray(time_us, np.int64))
    arrays: list[NDArray[Any]] = [days_before, ids, num_idx, value, time_us]
    if order is not None:
        arrays = [x[order] for x in arrays]
    d, i, m, v, t = arrays
    n_runs = run_keys.shape[0]
    run_age = np.zeros(n_runs) if age is None else np.asarray(age, np.float64)[run_keys]
    wins = np.array([np.inf if w is None else float(w) for w in windows])
    per_key = min(vocab_size, n) + 2 * min(max(n_numeric, 0), n)
    cap = min(len(windows) * (n + 2 * n), n_runs * len(windows) * per_key) + n_runs
    indptr = np.empty(n_runs + 1, np.int64)
    cols = np.empty(cap, np.int64)
    vals = np.empty(cap, np.float64)
    nnz = _count_rows(
        starts,
        np.asarray(d, np.float64),
        np.asarray(i, np.int32),
        np.asarray(m, np.int64),
        np.asarray(v, np.float64),
        # writable like the others (polars may hand out read-only views): one compiled variant
        np.require(t, np.int64, ["C", "W"]),
        run_age,
        wins,
        vocab_size,
        n_numeric,
        indptr,
        cols,
        vals,
    )
    runs = sp.csr_matrix((vals[:nnz], cols[:nnz], indptr), shape=(n_runs, width))
    return runs, run_keys


def window_counts(
    key: NDArray[np.int64],
    days_before: NDArray[np.float64],
    ids: NDArray[np.int32],
    num_idx: NDArray[np.int64],
    value: NDArray[np.float64],
    time_us: NDArray[np.int64],
    n_keys: int,
    *,
    vocab_size: int,
    n_numeric: int,
    windows: Sequence[float | None],
    age: NDArray[np.float64] | None = None,
) -> sp.csr_matrix:
    """Raw count / last / mean features [n_keys, len(windows) * (V + 2 M)] as CSR float64
    (one more last column with `age` [n_keys] when given; stored where > 0).

    key: [n] key per event (events in time order within a key); days_before: [n] (NaN =
    static, in every window); ids: [n] token ids; num_idx: [n] numeric-code index or -1;
    value: [n] (NaN = none); time_us: [n] event times (orders ties for "last").
    """
    width = len(windows) * (vocab_size + 2 * n_numeric) + (age is not None)
    if key.shape[0] == 0:
        return sp.csr_matrix((n_keys, width), dtype=np.float64)
    runs, run_keys = _window_rows(
        key,
        days_before,
        ids,
        num_idx,
        value,
        time_us,
        n_keys,
        vocab_size=vocab_size,
        n_numeric=n_numeric,
        windows=windows,
        age=age,
    )
    return _gather_rows([runs], [run_keys], np.arange(n_keys, dtype=np.int64), width)


def _gather_rows(
    parts: list[sp.csr_matrix], keys: list[NDArray[np.int64]], rows: NDArray[np.int64], width: int
) -> sp.csr_matrix:
    """Rows `rows` (key indices) of the stacked per-key matrices `parts` (rows `keys`); keys
    without a row are all zero."""
    if not parts:
        return sp.csr_matrix((rows.shape[0], width), dtype=np.float64)
    stacked = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
    k = np.concatenate(keys)
    n_keys = max(int(rows.max(initial=-1)), int(k.max(initial=-1))) + 1
    if k.shape[0] == rows.shape[0] and np.array_equal(k, rows):
        return stacked
    where = np.full(n_keys, stacked.shape[0], np.int64)
    where[k] = np.arange(k.shape[0])
    stacked = sp.vstack([stacked, sp.csr_matrix((1, width))], format="csr")
    return stacked[where[rows]]


@register_encoder("ehr_counts")
class EHRCountsEncoder(EHREncoder):
    """Windowed bag-of-codes counts plus last/mean numeric values (see module docstring).

    Config: `windows` (look-back days, None = all; default (30, 365, None)), `max_codes` (V,
    512), `max_numeric` (M, 64), `min_subjects` (1), `batch_size` (keys per windowed batch).
    """

    def __init__(
        self,
        *,
        windows: Sequence[float | None] = (30.0, 365.0, None),
        max_codes: int = 512,
        max_numeric: int = 64,
        min_subjects: int = 1,
        birth_code: str | None = "MEDS_BIRTH",
        batch_size: int = 4096,
    ) -> None:
        wins = [None if w is None else float(w) for w in windows]
        if not wins or any(w is not None and w < 0 for w in wins):
            raise ValueError(f"windows must be non-empty, >= 0 days or None, got {windows}")
        super().__init__(
            windows=wins,
            max_codes=max_codes,
            max_numeric=max_numeric,
            min_subjects=min_subjects,
            birth_code=birth_code,
            batch_size=batch_size,
        )
        self.vocab: CodeVocab | None = None
        self.numeric_codes = np.zeros(0, np.int64)  # index into vocab.codes
        self.numeric_mean = np.zeros(0)
        self.numeric_sd = np.zeros(0)
        self.age_stats = np.array([0.0, 1.0])  # training mean, sd of age_years

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, NDArray[Any]]:
        if self.vocab is None:
            return {}
        return {
            **self.vocab.state(),
            "numeric_codes": self.numeric_codes,
            "numeric_mean": self.numeric_mean,
            "numeric_sd": self.numeric_sd,
            "age_stats": self.age_stats,
        }

    def set_state(self, state: Mapping[str, NDArray[Any]]) -> None:
        self.vocab = CodeVocab.from_state(state)
        self.numeric_codes = np.asarray(state["numeric_codes"], np.int64)
        self.numeric_mean = np.asarray(state["numeric_mean"], np.float64)
        self.numeric_sd = np.asarray(state["numeric_sd"], np.float64)
        self.age_stats = np.asarray(state["age_stats"], np.float64)

    @property
    def _lookback(self) -> float | None:
        """Longest look-back of the windows (None = all history)."""
        wins = self._config["windows"]
        return None if any(w is None for w in wins) else max(wins)

    @property
    def _read_lookback(self) -> float | None:
        """Look-back of the event read: all history when ages are computed, because the birth
        event lies decades before any finite window (the windows are applied per feature)."""
        return None if self._config["birth_code"] is not None else self._lookback

    def _in_lookback(self, batch: EventBatch) -> EventBatch:
        """The events within the longest window (static events always), i.e. what the count
        features can see; the read may hold older events for the age."""
        lb = self._lookback
        if lb is None or self._read_lookback is not None:
            return batch
        return batch.take(~(batch.days_before > lb))

    def fit(self, cohort: pl.DataFrame, source: Any) -> EHRCountsEncoder:
        """Vocabulary, numeric codes and their mean / sd from the training rows `cohort`."""
        cfg = self._config
        index = KeyIndex.from_cohort(cohort)
        read = windowed_events(
            source, index, lookback_days=self._read_lookback, batch_size=cfg["batch_size"]
        )
        age = self._age(read, index.n_keys)
        events = self._in_lookback(read)
        del read
        vocab = fit_vocab(events, max_codes=cfg["max_codes"], min_subjects=cfg["min_subjects"])
        idx = vocab.code_index(events.code)
        in_vocab = (idx >= 0) & (vocab.lut[np.maximum(idx, 0), 0] > 0)
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
            .head(cfg["max_numeric"])
            .sort("c")
        )
        self.vocab = vocab
        self.numeric_codes = stats["c"].to_numpy().astype(np.int64)
        self.numeric_mean = stats["mean"].to_numpy().astype(np.float64)
        sd = stats["sd"].fill_null(0.0).to_numpy().astype(np.float64)
        self.numeric_sd = np.where(sd > 0, sd, 1.0)
        age = age[age > 0]
        sd_age = float(age.std()) if age.size > 1 else 1.0
        self.age_stats = np.array([float(age.mean()) if age.size else 0.0, sd_age or 1.0])
        self.fitted = True
        return self

    # ------------------------------------------------------------------ features
    @property
    def feature_names(self) -> list[str]:
        assert self.vocab is not None
        num = [str(self.vocab.codes[c]) for c in self.numeric_codes]
        names: list[str] = []
        for w in self._config["windows"]:
            p = _window_name(w)
            names += [f"{p}/count/{t}" for t in self.vocab.tokens]
            names += [f"{p}/last/{c}" for c in num] + [f"{p}/mean/{c}" for c in num]
        return [*names, "age_years"]

    def _age(self, batch: EventBatch, n_keys: int) -> NDArray[np.float64]:
        """[n_keys] years since the latest birth_code event of each key (0 when none)."""
        age = np.zeros(n_keys)
        self._add_age(age, batch)
        return age

    def _add_age(self, age: NDArray[np.float64], batch: EventBatch) -> None:
        """age[key] = max(age[key], years since each birth_code event of the batch)."""
        code = self._config["birth_code"]
        if code is None or len(batch) == 0:
            return
        hit = (batch.code == code).to_numpy() & np.isfinite(batch.days_before)
        np.maximum.at(age, batch.key[hit], batch.days_before[hit] / 365.25)

    def _iter_rows(
        self, index: KeyIndex, source: Any
    ) -> Iterator[tuple[sp.csr_matrix, NDArray[np.int64]]]:
        """Per windowed batch: raw features of its keys (CSR, run order) and their keys."""
        assert self.vocab is not None
        lookup = np.full(len(self.vocab.codes) + 1, -1, np.int64)
        lookup[self.numeric_codes] = np.arange(len(self.numeric_codes))
        age = np.zeros(index.n_keys)
        for batch in iter_event_batches(
            source,
            index,
            lookback_days=self._read_lookback,
            batch_size=self._config["batch_size"],
        ):
            code_idx = self.vocab.code_index(batch.code)
            ids = self.vocab.transform(batch.code, batch.value, code_idx)
            num_idx = lookup[np.where(code_idx >= 0, code_idx, len(self.vocab.codes))]
            self._add_age(age, batch)
            yield _window_rows(
                batch.key,
                batch.days_before,
                ids,
                num_idx,
                batch.value,
                batch.time_us,
                index.n_keys,
                vocab_size=self.vocab.size,
                n_numeric=len(self.numeric_codes),
                windows=self._config["windows"],
                age=age,
            )

    def count_matrix(self, cohort: pl.DataFrame, source: Any) -> sp.csr_matrix:
        """Raw features [N, F] (CSR float64) in `cohort`'s row order; columns `feature_names`."""
        self.check_fitted()
        index = KeyIndex.from_cohort(cohort)
        parts: list[sp.csr_matrix] = []
        keys: list[NDArray[np.int64]] = []
        for runs, run_keys in self._iter_rows(index, source):
            parts.append(runs)
            keys.append(run_keys)
        return _gather_rows(parts, keys, index.row_key, len(self.feature_names))

    def pooled_from_counts(self, mat: sp.csr_matrix) -> NDArray[np.float32]:
        """Dense pooled features: log1p(counts), numeric values z-scored by training stats."""
        assert self.vocab is not None
        v, m = self.vocab.size, len(self.numeric_codes)
        width = v + 2 * m
        # transform the stored (non-zero) entries only, then densify once as float32
        mat = sp.csr_matrix(mat, copy=True)
        col = mat.indices
        data = mat.data
        within = col % width
        is_age = col == mat.shape[1] - 1
        is_count = (within < v) & ~is_age
        num = np.where(within >= v + m, within - v - m, within - v)
        is_num = ~is_count & ~is_age
        data[is_count] = np.log1p(data[is_count])
        # clipped: lab sentinels (e.g. 999999) must not dominate a downstream model
        z = (data[is_num] - self.numeric_mean[num[is_num]]) / self.numeric_sd[num[is_num]]
        data[is_num] = np.clip(z, -10.0, 10.0)
        data[is_age] = (data[is_age] - self.age_stats[0]) / self.age_stats[1]
        mat.data = data.astype(np.float32)
        return np.asarray(mat.toarray(), dtype=np.float32)

    def encode(self, cohort: pl.DataFrame, source: Any) -> ModalityFeatures:
        self.check_fitted()
        assert self.vocab is not None
        index = KeyIndex.from_cohort(cohort)
        # each batch's raw rows go straight into the dense pooled matrix, transformed as
        # pooled_from_counts(count_matrix(...)) would (no stacked sparse matrix, no copies)
        pooled = output_array((index.n_keys, len(self.feature_names)), np.float32)
        present = np.zeros(index.n_keys, bool)
        for runs, run_keys in self._iter_rows(index, source):
            is_count = runs.indices % (self.vocab.size + 2 * len(self.numeric_codes)) < (
                self.vocab.size
            )
            top = int(runs.data[is_count].max(initial=0))
            _scatter_pooled(
                runs.indptr.astype(np.int64),
                runs.indices.astype(np.int64),
                runs.data,
                run_keys,
                np.log1p(np.arange(top + 1, dtype=np.float64)),
                self.vocab.size,
                len(self.numeric_codes),
                self.numeric_mean,
                self.numeric_sd,
                float(self.age_stats[0]),
                float(self.age_stats[1]),
                pooled,
                present,
            )
        return cohort_features(
            cohort,
            index,
            pooled=pooled,
            present=present,
            meta={"encoder": self.name, "feature_names": self.feature_names},
        )

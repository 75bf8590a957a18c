"""`ehr_counts`: bag-of-codes counts and last/mean numeric values over look-back windows.

The representation INSPECT's gradient-boosting baseline used. For each window w in `windows`
(days before `prediction_time`; None = all history; static events count in every window) and a
training-split vocabulary (top `max_codes` codes by subject frequency + out-of-vocabulary id 0,
no value binning), the row of a prediction holds

    [ count(code j in w) for j in 0..V | last value of numeric code m | mean value of m in w ]

where the numeric codes are the `max_numeric` vocabulary codes with the most training values, plus
one last column `age_years`: years since the subject's `birth_code` event (MEDS_BIRTH; 0 when
absent; read whatever the windows, as birth lies decades back), which counts cannot express and
which most risks depend on. `count_matrix` returns these raw values as a `scipy.sparse.csr_matrix`
[N, F] (for GBMs); `encode` gives `ModalityFeatures` with pooled only: dense float32 [N, F] with
`log1p` counts and numeric values z-scored by training mean / sd and clipped to +-10 (absent values
stay 0). `meta["feature_names"]` names the F columns, e.g. `"30d/count/LAB//CREAT"`,
`"all/mean/LAB//CREAT"`. One compiled (numba) pass per batch of keys fills every window's CSR rows
(means summed in (time, value) order with Kahan compensation).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
from numpy.typing import NDArray

from survfuse.encoders.base import register_encoder
from survfuse.encoders.ehr_common import EHREncoder, add_age, cohort_features
from survfuse.encoders.ehr_count_kernels import gather_rows, scatter_pooled, window_rows
from survfuse.encoders.ehr_numeric import NumericStats
from survfuse.encoders.ehr_vocab import (
    CodeVocab,
    EventBatch,
    KeyIndex,
    fit_vocab,
    iter_event_batches,
    output_array,
    windowed_events,
)
from survfuse.features import ModalityFeatures

__all__ = ["EHRCountsEncoder"]


def _window_name(w: float | None) -> str:
    return "all" if w is None else f"{w:g}d"


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
        """Return the look-back of the event read.

        All history when ages are computed, because the birth event lies decades before any
        finite window (the windows are applied per feature).
        """
        return None if self._config["birth_code"] is not None else self._lookback

    def _in_lookback(self, batch: EventBatch) -> EventBatch:
        """Return the events within the longest window (static events always).

        That is what the count features can see; the read may hold older events for the age.
        """
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
        stats = NumericStats.fit(events, vocab, cfg["max_numeric"])
        self.vocab = vocab
        self.numeric_codes, self.numeric_mean, self.numeric_sd = stats.codes, stats.mean, stats.sd
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
        """Update age[key] with the birth events of `batch` (`ehr_common.add_age`)."""
        if self._config["birth_code"] is not None:
            add_age(age, batch, self._config["birth_code"])

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
            yield window_rows(
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
        return gather_rows(parts, keys, index.row_key, len(self.feature_names))

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
            scatter_pooled(
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

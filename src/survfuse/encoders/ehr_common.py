"""What the MEDS encoders (`ehr_counts`, `ehr_onehot`, `ehr_clmbr`) share beyond the vocabulary.

- `EHREncoder`: their base class (modality "ehr", learns, large FeatureStore chunks);
- `fit_cohort_vocab`: a `CodeVocab` fitted on the windowed events of the training rows;
- `cohort_features`: per-key arrays expanded to the cohort's rows as `ModalityFeatures`;
- `add_age`: years since the birth event, the `age_years` column of `ehr_counts` / `ehr_onehot`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import polars as pl
from numpy.typing import NDArray

from survfuse.encoders.base import Encoder
from survfuse.encoders.ehr_vocab import (
    CodeVocab,
    EventBatch,
    KeyIndex,
    expand_rows,
    fit_vocab,
    windowed_events,
)
from survfuse.features import ModalityFeatures

__all__ = ["EHREncoder", "add_age", "cohort_features", "fit_cohort_vocab"]


class EHREncoder(Encoder):
    """Base of the encoders that read a `survfuse.data.meds.MEDSDataset`.

    They fit a vocabulary on the training split.
    """

    modality: ClassVar[Any] = "ehr"
    learns: ClassVar[bool] = True
    # FeatureStore: encode this many rows per call (each call re-reads the MEDS shards of
    # its subjects, so 256-row chunks one by one would read the data many times over)
    store_batch_rows: ClassVar[int] = 32_768


def fit_cohort_vocab(
    cohort: pl.DataFrame,
    source: Any,
    *,
    lookback_days: float | None,
    max_codes: int,
    n_bins: int = 0,
    min_values: int = 20,
    min_subjects: int = 1,
    batch_size: int = 4096,
) -> CodeVocab:
    """`fit_vocab` on all windowed events of the (training) rows `cohort`."""
    events = windowed_events(
        source, KeyIndex.from_cohort(cohort), lookback_days=lookback_days, batch_size=batch_size
    )
    return fit_vocab(
        events,
        max_codes=max_codes,
        n_bins=n_bins,
        min_values=min_values,
        min_subjects=min_subjects,
    )


def cohort_features(
    cohort: pl.DataFrame,
    index: KeyIndex,
    *,
    meta: dict[str, Any],
    **per_key: NDArray[Any],
) -> ModalityFeatures:
    """Build the `ModalityFeatures` of `cohort`'s rows from per-key arrays.

    The arrays (`pooled`, `present`, `tokens`, `mask`, `token_codes`: first axis =
    `index.n_keys`) are expanded by `index.row_key`.
    """
    return ModalityFeatures(
        subject_id=cohort["subject_id"].cast(pl.Int64).to_numpy(),
        prediction_time=cohort["prediction_time"].cast(pl.Datetime("us")).to_numpy(),
        **{k: expand_rows(v, index.row_key) for k, v in per_key.items()},
        meta=meta,
    )


def add_age(age: NDArray[np.float64], batch: EventBatch, birth_code: str) -> None:
    """Set age[key] = max(age[key], years since each `birth_code` event of `batch`) in place.

    Years are days before the prediction time / 365.25; a key without a birth event keeps 0.
    """
    if len(batch) == 0:
        return
    hit = (batch.code == birth_code).to_numpy() & np.isfinite(batch.days_before)
    np.maximum.at(age, batch.key[hit], batch.days_before[hit] / 365.25)

"""`ehr_onehot`: one multi-hot token per event day before `prediction_time`.

For each prediction, the events in the look-back window (`lookback_days`, None = all history)
are grouped by calendar day; the most recent `max_tokens` days are kept (static, null-time
events form one extra token, placed last and counted in `max_tokens`). A token is the set of
token ids of its day (a training-split `CodeVocab`: top `max_codes` codes by subject frequency,
numeric values binned by training quantiles, id 0 = out of vocabulary), stored sparse:

- `token_codes` [N, T, K] int32: ids of the day, ascending, -1 padding (K = `max_codes_per_token`;
  a day with more distinct ids keeps the K smallest = most frequent in training);
- `tokens` [N, T, 8] float32 time-before-index features of each day d (days between the event
  date and the prediction date): `log1p(d)`, `sin/cos(2 pi d / P)` for P in 7, 30.4375, 365.25
  days, and a static flag;
- `mask` [N, T] bool; tokens are chronological (oldest first), padding at the end;
- `pooled` [N, V + 1] float32: normalised code counts, count of id j / number of events
  (the vocabulary is capped by `max_codes`, so this dense matrix stays small);
- `meta["vocab_size"] = V + 1`, `meta["vocab"]` the token strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import polars as pl
from numpy.typing import NDArray

from survfuse.encoders.base import Encoder, register_encoder
from survfuse.encoders.ehr_vocab import (
    CodeVocab,
    EventBatch,
    KeyIndex,
    expand_rows,
    fit_vocab,
    iter_event_batches,
    windowed_events,
)
from survfuse.encoders.features import ModalityFeatures

__all__ = ["EHROneHotEncoder", "onehot_tokens", "time_features"]

_PERIODS = (7.0, 30.4375, 365.25)
TIME_DIM = 2 + 2 * len(_PERIODS)


def time_features(days: NDArray[np.float64], static: NDArray[np.bool_]) -> NDArray[np.float32]:
    """[n] days before index -> [n, 8]: log1p(d), sin/cos(2 pi d / P) per period, static flag."""
    d = np.where(static, 0.0, np.maximum(days, 0.0))
    cols = [np.log1p(d)]
    for p in _PERIODS:
        ang = 2.0 * np.pi * d / p
        cols += [np.sin(ang), np.cos(ang)]
    out = np.stack(cols, axis=1)
    out[static] = 0.0
    return np.concatenate([out, static[:, None].astype(np.float64)], axis=1).astype(np.float32)


def onehot_tokens(
    local_key: NDArray[np.int64],
    day_index: NDArray[np.int64],
    ids: NDArray[np.int32],
    n_keys: int,
    *,
    max_tokens: int,
    max_codes_per_token: int,
    out: tuple[NDArray[np.int32], NDArray[np.float32], NDArray[np.bool_]] | None = None,
    rows: NDArray[np.int64] | None = None,
) -> tuple[NDArray[np.int32], NDArray[np.float32], NDArray[np.bool_]]:
    """Multi-hot day tokens of `n_keys` keys from events (key, day_index, id).

    day_index: calendar days before the prediction date (-1 = static). Returns `token_codes`
    [n_keys, T, K] int32 (-1 padding), `tokens` [n_keys, T, 8] float32, `mask` [n_keys, T];
    with `out` (pre-filled arrays) and `rows` [n_keys], key j is written to row `rows[j]` of
    `out` instead (no per-batch copies).
    """
    t_max, k_max = max_tokens, max_codes_per_token
    if out is None:
        codes = np.full((n_keys, t_max, k_max), -1, np.int32)
        feats = np.zeros((n_keys, t_max, TIME_DIM), np.float32)
        mask = np.zeros((n_keys, t_max), bool)
    else:
        codes, feats, mask = out
    if local_key.size == 0:
        return codes, feats, mask
    # slot 0 = static, slot d + 1 = d days before; one int64 sort key dedupes (key, slot, id)
    slot = day_index + 1
    if slot.max() >= (1 << 18) - 1 or ids.max() >= 1 << 22 or n_keys >= 1 << 23:
        raise ValueError("ehr_onehot: more than 2^18 days, 2^22 codes or 2^23 keys per batch")
    # the static slot sorts after every day: slot 0 -> 2^18 - 1 (the largest)
    slot = np.where(slot == 0, (1 << 18) - 1, slot).astype(np.int64)
    packed = (local_key << 40) | (slot << 22) | ids.astype(np.int64)
    u = np.asarray(pl.Series(packed).unique().sort().to_numpy())
    k = u >> 40
    s = (u >> 22) & ((1 << 18) - 1)
    c = (u & ((1 << 22) - 1)).astype(np.int32)
    n = u.shape[0]
    idx = np.arange(n)
    new_key = np.ones(n, bool)
    new_key[1:] = k[1:] != k[:-1]
    new_slot = new_key.copy()
    new_slot[1:] |= s[1:] != s[:-1]
    # rank of the slot within its key: 0 = most recent day (static counts last, largest slot)
    slot_no = np.cumsum(new_slot) - 1
    key_first_slot = np.maximum.accumulate(np.where(new_key, slot_no, 0))
    rank = slot_no - key_first_slot
    # position of the code within its slot
    slot_start = np.maximum.accumulate(np.where(new_slot, idx, 0))
    pos_in_slot = idx - slot_start
    is_static = s == (1 << 18) - 1
    # static token last; days most recent first in rank, chronological in position
    has_static = np.zeros(n_keys, bool)
    has_static[k[is_static]] = True
    n_days = np.bincount(k[new_slot & ~is_static], minlength=n_keys)
    kept_days = np.minimum(n_days, t_max - has_static.astype(np.int64))
    keep_day = ~is_static & (rank < kept_days[k])
    keep = (keep_day | is_static) & (pos_in_slot < k_max)
    position = np.where(is_static, kept_days[k], kept_days[k] - 1 - rank)
    row = k if rows is None else rows[k]
    codes[row[keep], position[keep], pos_in_slot[keep]] = c[keep]
    first = keep & new_slot
    # days are whole numbers: compute the features once per distinct day and gather
    days = np.where(is_static[first], -1, s[first] - 1)
    uniq, inv = np.unique(days, return_inverse=True)
    table = time_features(uniq.astype(np.float64), uniq < 0)
    feats[row[first], position[first]] = table[inv]
    mask[row[first], position[first]] = True
    return codes, feats, mask


@register_encoder("ehr_onehot")
class EHROneHotEncoder(Encoder):
    """Multi-hot event-day tokens over a training-split vocabulary (see module docstring).

    Config: `max_codes` (V, default 2048), `n_bins` (quantile bins per numeric code, default 5),
    `min_values` (values needed to bin a code, 20), `min_subjects` (1), `lookback_days`
    (None = all history), `max_tokens` (64), `max_codes_per_token` (64), `batch_size` (keys per
    windowed batch, 4096).
    """

    modality: ClassVar[Any] = "ehr"
    learns: ClassVar[bool] = True

    def __init__(
        self,
        *,
        max_codes: int = 2048,
        n_bins: int = 5,
        min_values: int = 20,
        min_subjects: int = 1,
        lookback_days: float | None = None,
        max_tokens: int = 64,
        max_codes_per_token: int = 64,
        batch_size: int = 4096,
    ) -> None:
        if max_tokens < 1 or max_codes_per_token < 1:
            raise ValueError("max_tokens and max_codes_per_token must be >= 1")
        super().__init__(
            max_codes=max_codes,
            n_bins=n_bins,
            min_values=min_values,
            min_subjects=min_subjects,
            lookback_days=lookback_days,
            max_tokens=max_tokens,
            max_codes_per_token=max_codes_per_token,
            batch_size=batch_size,
        )
        self.vocab: CodeVocab | None = None

    def state(self) -> dict[str, NDArray[Any]]:
        return {} if self.vocab is None else self.vocab.state()

    def set_state(self, state: Mapping[str, NDArray[Any]]) -> None:
        self.vocab = CodeVocab.from_state(state)

    def fit(self, cohort: pl.DataFrame, source: Any) -> EHROneHotEncoder:
        """Fit the vocabulary and quantile bins on the training rows `cohort`."""
        cfg = self._config
        events = windowed_events(
            source,
            KeyIndex.from_cohort(cohort),
            lookback_days=cfg["lookback_days"],
            batch_size=cfg["batch_size"],
        )
        self.vocab = fit_vocab(
            events,
            max_codes=cfg["max_codes"],
            n_bins=cfg["n_bins"],
            min_values=cfg["min_values"],
            min_subjects=cfg["min_subjects"],
        )
        self.fitted = True
        return self

    def _encode_batch(self, batch: EventBatch, out: dict[str, NDArray[Any]]) -> None:
        """Write the features of the batch's keys into the per-key arrays `out`."""
        assert self.vocab is not None
        cfg = self._config
        rows, local = np.unique(batch.key, return_inverse=True)
        ids = self.vocab.transform(batch.code, batch.value)
        onehot_tokens(
            local,
            batch.day_index,
            ids,
            len(rows),
            max_tokens=cfg["max_tokens"],
            max_codes_per_token=cfg["max_codes_per_token"],
            out=(out["token_codes"], out["tokens"], out["mask"]),
            rows=rows,
        )
        # pooled: count of each id / number of events, written only where non-zero
        v = self.vocab.size
        u, cnt = np.unique(local * v + ids, return_counts=True)
        total = np.bincount(local, minlength=len(rows))
        k = u // v
        out["pooled"][rows[k], u % v] = cnt / total[k]
        out["present"][rows] = total > 0

    def encode(self, cohort: pl.DataFrame, source: Any) -> ModalityFeatures:
        self.check_fitted()
        assert self.vocab is not None
        cfg = self._config
        index = KeyIndex.from_cohort(cohort)
        n, t, kc, v = index.n_keys, cfg["max_tokens"], cfg["max_codes_per_token"], self.vocab.size
        out = {
            "token_codes": np.full((n, t, kc), -1, np.int32),
            "tokens": np.zeros((n, t, TIME_DIM), np.float32),
            "mask": np.zeros((n, t), bool),
            "pooled": np.zeros((n, v), np.float32),
            "present": np.zeros(n, bool),
        }
        for batch in iter_event_batches(
            source, index, lookback_days=cfg["lookback_days"], batch_size=cfg["batch_size"]
        ):
            self._encode_batch(batch, out)
        codes, feats, mask = out["token_codes"], out["tokens"], out["mask"]
        pooled, present = out["pooled"], out["present"]
        rk = index.row_key
        return ModalityFeatures(
            subject_id=cohort["subject_id"].cast(pl.Int64).to_numpy(),
            prediction_time=cohort["prediction_time"].cast(pl.Datetime("us")).to_numpy(),
            pooled=expand_rows(pooled, rk),
            present=expand_rows(present, rk),
            tokens=expand_rows(feats, rk),
            mask=expand_rows(mask, rk),
            token_codes=expand_rows(codes, rk),
            meta={
                "encoder": self.name,
                "vocab_size": v,
                "vocab": self.vocab.tokens.tolist(),
                "time_features": ["log1p_days"]
                + [f"{f}_{p:g}d" for p in _PERIODS for f in ("sin", "cos")]
                + ["static"],
            },
        )

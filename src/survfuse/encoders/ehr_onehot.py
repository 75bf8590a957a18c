"""`ehr_onehot`: one multi-hot token per event day before `prediction_time`.

For each prediction, the events in the look-back window (`lookback_days`, None = all history)
are grouped by calendar day; the most recent `max_tokens` days are kept (static, null-time
events form one extra token, placed last and counted in `max_tokens`). A token is the set of
token ids of its day (a training-split `CodeVocab`: top `max_codes` codes by subject frequency,
numeric values binned by training quantiles, id 0 = out of vocabulary), stored sparse:

- `token_codes` [N, T, K] int32: ids of the day, ascending, -1 padding (a day with more than
  `max_codes_per_token` distinct ids keeps the smallest = most frequent in training; K = the most
  ids any token of the encoded rows has, at most `max_codes_per_token`, so days with one or two
  codes cost no [T, 64] block of padding; the fusion embedding-bag sums over any K);
- `tokens` [N, T, 8] float32 time-before-index features of each day d (days between the event
  date and the prediction date): `log1p(d)`, `sin/cos(2 pi d / P)` for P in 7, 30.4375, 365.25
  days, and a static flag;
- `mask` [N, T] bool; tokens are chronological (oldest first), padding at the end;
- `pooled` [N, V + 1 (+ 1)] float32: normalised code counts, count of id j / number of events
  (the vocabulary is capped by `max_codes`, so this dense matrix stays small), and with
  `birth_code` (default `MEDS_BIRTH`) a last column `age_years`: years from the latest birth
  event to `prediction_time` (0 when none). Why: counts cannot express age, a major risk
  factor that every MEDS timeline carries in its birth event (`ehr_counts` has the same column);
  `meta["pooled_columns"]` names the columns;
- `meta["vocab_size"] = V + 1`, `meta["vocab"]` the token strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numba
import numpy as np
import polars as pl
from numpy.typing import NDArray

from survfuse.encoders.base import register_encoder
from survfuse.encoders.ehr_common import EHREncoder, add_age, cohort_features
from survfuse.encoders.ehr_numeric import NumericStats
from survfuse.encoders.ehr_vocab import (
    CodeVocab,
    KeyIndex,
    fit_vocab,
    iter_event_batches,
    key_runs,
    output_array,
    windowed_events,
)
from survfuse.features import ModalityFeatures

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


_MAX_DAYS = 1 << 22  # ~11,000 years: a larger day index is a broken time column


@numba.njit(cache=True)
def _plan_tokens(
    starts: NDArray[np.int64],
    rows: NDArray[np.int64],
    day: NDArray[np.int64],
    ids: NDArray[np.int32],
    t_max: int,
    k_max: int,
    pooled: NDArray[np.float32],
    tok_row: NDArray[np.int64],
    tok_pos: NDArray[np.int32],
    tok_day: NDArray[np.int64],
    tok_len: NDArray[np.int32],
    flat: NDArray[np.int32],
) -> tuple[int, int]:
    """Plan the tokens of every key in one pass over events grouped by key.

    Key j = events starts[j]:starts[j + 1], static events first, then time order, so `day` is
    non-increasing after them. Per key: the most recent `t_max` days (minus one slot for the static
    token) become tokens; a token's ids are sorted, de-duplicated and cut to `k_max` and appended to
    `flat`; token t goes to output row `tok_row[t]`, position `tok_pos[t]` (chronological, static
    last), has day index `tok_day[t]` (-1 = static) and `tok_len[t]` ids. With a non-empty `pooled`,
    `pooled[rows[j], id] = count of id / number of events` is written on the way (ids < V). Returns
    (number of tokens, ids written to flat).
    """
    n_keys = starts.shape[0] - 1
    do_pooled = pooled.shape[0] > 0
    counts = np.zeros(pooled.shape[1] if do_pooled else 1, np.int64)
    touched = np.empty(ids.shape[0], np.int64)
    buf = np.empty(ids.shape[0], np.int32)
    nt = 0
    nf = 0
    for j in range(n_keys):
        a = starts[j]
        b = starts[j + 1]
        row = rows[j]
        if do_pooled:
            nu = 0
            for e in range(a, b):
                c = ids[e]
                if counts[c] == 0:
                    touched[nu] = c
                    nu += 1
                counts[c] += 1
            total = b - a
            for u in range(nu):
                c = touched[u]
                pooled[row, c] = np.float32(counts[c] / total)
                counts[c] = 0
        s = a
        while s < b and day[s] == -1:
            s += 1
        has_static = 1 if s > a else 0
        n_days = 0
        for e in range(s, b):
            if e == s or day[e] != day[e - 1]:
                n_days += 1
        kept = min(n_days, t_max - has_static)
        skip = n_days - kept
        # timed days oldest first; the static token (events a:s) last
        run = 0
        e = s
        while e < b or (has_static and run <= n_days):
            if e < b:
                lo = e
                while e < b and day[e] == day[lo]:
                    e += 1
                hi = e
                run += 1
                if run <= skip:
                    continue
                pos = run - skip - 1
                dval = day[lo]
            else:
                lo, hi = a, s
                pos = kept
                dval = -1
                run += 1
            m = hi - lo
            for q in range(m):
                buf[q] = ids[lo + q]
            part = buf[:m]
            part.sort()
            n_u = 0
            for q in range(m):
                if n_u < k_max and (q == 0 or part[q] != part[q - 1]):
                    flat[nf + n_u] = part[q]
                    n_u += 1
            tok_row[nt] = row
            tok_pos[nt] = pos
            tok_day[nt] = dval
            tok_len[nt] = n_u
            nf += n_u
            nt += 1
    return nt, nf


@numba.njit(cache=True)
def _fill_tokens(
    tok_row: NDArray[np.int64],
    tok_pos: NDArray[np.int32],
    tok_day: NDArray[np.int64],
    tok_len: NDArray[np.int32],
    flat: NDArray[np.int32],
    table: NDArray[np.float32],
    codes: NDArray[np.int32],
    feats: NDArray[np.float32],
    mask: NDArray[np.bool_],
) -> None:
    """Scatter planned tokens into `codes` [N, T, K], `feats` [N, T, 8] and `mask` [N, T].

    `feats` of a token of day d is row d + 1 of `table`.
    """
    off = 0
    k_out = codes.shape[2]
    for t in range(tok_row.shape[0]):
        r = tok_row[t]
        p = tok_pos[t]
        n = tok_len[t]
        for q in range(min(n, k_out)):
            codes[r, p, q] = flat[off + q]
        off += n
        f = table[tok_day[t] + 1]
        for q in range(f.shape[0]):
            feats[r, p, q] = f[q]
        mask[r, p] = True


class _TokenPlan:
    """Planned tokens of several batches, scattered into dense arrays once K is known."""

    def __init__(self) -> None:
        self.parts: list[tuple[NDArray[Any], ...]] = []
        self.max_day = -1

    def add(
        self,
        key: NDArray[np.int64],
        day_index: NDArray[np.int64],
        ids: NDArray[np.int32],
        rows: NDArray[np.int64] | None,
        *,
        max_tokens: int,
        max_codes_per_token: int,
        pooled: NDArray[np.float32] | None = None,
    ) -> NDArray[np.int64]:
        """Plan the tokens of events (key, day_index, id) and return the distinct keys seen.

        Key k goes to row `rows[k]` (key itself when None).
        """
        n = key.shape[0]
        if n == 0:
            return np.zeros(0, np.int64)
        if day_index.max() >= _MAX_DAYS or day_index.min() < -1:
            raise ValueError(
                f"ehr_onehot: day index out of range [-1, {_MAX_DAYS}) "
                f"(got {day_index.min()}..{day_index.max()}); check the event times"
            )
        # events must come grouped by key, static first, then in time order (days
        # non-increasing); the data layer yields them so; anything else is sorted here
        slot = np.where(day_index < 0, _MAX_DAYS, day_index)
        # stable: same-day events keep their order
        order, starts, run_keys = key_runs(key, -slot)
        if order is not None:
            day_index, ids = day_index[order], ids[order]
        out_rows = run_keys if rows is None else rows[run_keys]
        n_tok_max = min(n, run_keys.size * max_tokens)
        tok_row = np.empty(n_tok_max, np.int64)
        tok_pos = np.empty(n_tok_max, np.int32)
        tok_day = np.empty(n_tok_max, np.int64)
        tok_len = np.empty(n_tok_max, np.int32)
        flat = np.empty(n, np.int32)
        nt, nf = _plan_tokens(
            starts,
            out_rows.astype(np.int64),
            day_index.astype(np.int64),
            ids.astype(np.int32),
            max_tokens,
            max_codes_per_token,
            np.zeros((0, 1), np.float32) if pooled is None else pooled,
            tok_row,
            tok_pos,
            tok_day,
            tok_len,
            flat,
        )
        self.parts.append((tok_row[:nt], tok_pos[:nt], tok_day[:nt], tok_len[:nt], flat[:nf]))
        self.max_day = max(self.max_day, int(day_index.max()))
        return run_keys

    @property
    def width(self) -> int:
        """Most ids in one token (the K that loses nothing)."""
        return max((int(p[3].max()) for p in self.parts if p[3].size), default=0)

    def fill(
        self, codes: NDArray[np.int32], feats: NDArray[np.float32], mask: NDArray[np.bool_]
    ) -> None:
        """Write the planned tokens into pre-filled arrays (-1 / 0 / False)."""
        days = np.arange(-1, self.max_day + 1, dtype=np.float64)
        table = time_features(days, days < 0)
        for row, pos, day, n_ids, flat in self.parts:
            _fill_tokens(row, pos, day, n_ids, flat, table, codes, feats, mask)


def onehot_tokens(
    local_key: NDArray[np.int64],
    day_index: NDArray[np.int64],
    ids: NDArray[np.int32],
    n_keys: int,
    *,
    max_tokens: int,
    max_codes_per_token: int,
) -> tuple[NDArray[np.int32], NDArray[np.float32], NDArray[np.bool_]]:
    """Multi-hot day tokens of `n_keys` keys from events (key, day_index, id).

    day_index: calendar days before the prediction date (-1 = static). Returns `token_codes`
    [n_keys, T, K] int32 (-1 padding, K = `max_codes_per_token`), `tokens` [n_keys, T, 8]
    float32, `mask` [n_keys, T].
    """
    codes = np.full((n_keys, max_tokens, max_codes_per_token), -1, np.int32)
    feats = np.zeros((n_keys, max_tokens, TIME_DIM), np.float32)
    mask = np.zeros((n_keys, max_tokens), bool)
    plan = _TokenPlan()
    plan.add(
        np.asarray(local_key, np.int64),
        np.asarray(day_index, np.int64),
        np.asarray(ids, np.int32),
        None,
        max_tokens=max_tokens,
        max_codes_per_token=max_codes_per_token,
    )
    plan.fill(codes, feats, mask)
    return codes, feats, mask


@register_encoder("ehr_onehot")
class EHROneHotEncoder(EHREncoder):
    """Multi-hot event-day tokens over a training-split vocabulary (see module docstring).

    Config: `max_codes` (V, default 2048), `n_bins` (quantile bins per numeric code, default 5),
    `min_values` (values needed to bin a code, 20), `min_subjects` (1), `lookback_days`
    (None = all history), `max_tokens` (64), `max_codes_per_token` (64), `batch_size` (keys per
    windowed batch, 4096), `birth_code` (the code whose event gives the `age_years` column,
    "MEDS_BIRTH"; None: no age column), `numeric_last` (pooled gains the z-scored latest value
    of this many most-measured numeric codes, `survfuse.encoders.ehr_numeric`; 0: none).
    """

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
        birth_code: str | None = "MEDS_BIRTH",
        numeric_last: int = 32,
    ) -> None:
        if max_tokens < 1 or max_codes_per_token < 1:
            raise ValueError("max_tokens and max_codes_per_token must be >= 1")
        if numeric_last < 0:
            raise ValueError(f"numeric_last must be >= 0, got {numeric_last}")
        super().__init__(
            max_codes=max_codes,
            n_bins=n_bins,
            min_values=min_values,
            min_subjects=min_subjects,
            lookback_days=lookback_days,
            max_tokens=max_tokens,
            max_codes_per_token=max_codes_per_token,
            batch_size=batch_size,
            birth_code=birth_code,
            numeric_last=numeric_last,
        )
        self.vocab: CodeVocab | None = None
        self.numeric = NumericStats.empty()

    def state(self) -> dict[str, NDArray[Any]]:
        if self.vocab is None:
            return {}
        return {**self.vocab.state(), **self.numeric.state()}

    def set_state(self, state: Mapping[str, NDArray[Any]]) -> None:
        self.vocab = CodeVocab.from_state(state)
        self.numeric = NumericStats.from_state(state)

    def fit(self, cohort: pl.DataFrame, source: Any) -> EHROneHotEncoder:
        """Fit the vocabulary, quantile bins and numeric-code statistics on the training rows."""
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
        self.numeric = NumericStats.fit(events, self.vocab, cfg["numeric_last"])
        self.fitted = True
        return self

    def encode(self, cohort: pl.DataFrame, source: Any) -> ModalityFeatures:
        self.check_fitted()
        assert self.vocab is not None
        cfg = self._config
        index = KeyIndex.from_cohort(cohort)
        n, t, v = index.n_keys, cfg["max_tokens"], self.vocab.size
        # pooled is written by the planning pass; tokens are planned batch by batch and
        # scattered once, with K = the most ids any token has (<= max_codes_per_token)
        birth = cfg["birth_code"]
        n_last = len(self.numeric.codes)
        pooled = output_array((n, v + n_last + (birth is not None)), np.float32)
        counts = pooled[:, :v]
        last = self.numeric.last_values(self.vocab, n)
        present = np.zeros(n, bool)
        plan = _TokenPlan()
        # the birth event lies decades back: with a look-back window, age needs its own read
        age_here = birth is not None and cfg["lookback_days"] is None
        age = np.zeros(n)
        for batch in iter_event_batches(
            source, index, lookback_days=cfg["lookback_days"], batch_size=cfg["batch_size"]
        ):
            if age_here:
                add_age(age, batch, birth)
            last.add(batch)
            ids = self.vocab.transform(batch.code, batch.value)
            seen = plan.add(
                batch.key,
                batch.day_index,
                ids,
                None,
                max_tokens=t,
                max_codes_per_token=cfg["max_codes_per_token"],
                pooled=counts,
            )
            present[seen] = True
        if birth is not None:
            if not age_here:
                for batch in iter_event_batches(
                    source, index, lookback_days=None, batch_size=cfg["batch_size"]
                ):
                    add_age(age, batch, birth)
            pooled[:, v + n_last] = age.astype(np.float32)
        if n_last:
            pooled[:, v : v + n_last] = last.result()
        codes = output_array((n, t, max(plan.width, 1)), np.int32, -1)
        feats = output_array((n, t, TIME_DIM), np.float32)
        mask = output_array((n, t), bool)
        plan.fill(codes, feats, mask)
        return cohort_features(
            cohort,
            index,
            pooled=pooled,
            present=present,
            tokens=feats,
            mask=mask,
            token_codes=codes,
            meta={
                "encoder": self.name,
                "vocab_size": v,
                "vocab": self.vocab.tokens.tolist(),
                "pooled_columns": [
                    *self.vocab.tokens.tolist(),
                    *self.numeric.names(self.vocab),
                    *(["age_years"] if birth else []),
                ],
                "time_features": ["log1p_days"]
                + [f"{f}_{p:g}d" for p in _PERIODS for f in ("sin", "cos")]
                + ["static"],
            },
        )

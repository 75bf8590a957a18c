"""Compiled (numba) kernels of `ehr_counts`.

Per-window counts, last and mean numeric values of each prediction's events, filled straight
into CSR rows in one pass per batch of keys (means summed in (time, value) order with Kahan
compensation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

from survfuse.encoders.ehr_vocab import key_runs

__all__ = ["gather_rows", "scatter_pooled", "window_counts", "window_rows"]


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
def scatter_pooled(
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
    """Write CSR row r (raw features) to dense row `rows[r]` of `out`, transformed.

    Transformed as `pooled_from_counts` does (same float64 arithmetic, then float32): counts ->
    log1p (a table), numeric values -> clip((x - mean) / sd, -10, 10), age -> (x - mean) / sd.
    """
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


def window_rows(
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
    """Return raw count / last / mean features [n_keys, len(windows) * (V + 2 M)], CSR float64.

    One more last column with `age` [n_keys] when given; stored where > 0.

    key: [n] key per event (events in time order within a key); days_before: [n] (NaN =
    static, in every window); ids: [n] token ids; num_idx: [n] numeric-code index or -1;
    value: [n] (NaN = none); time_us: [n] event times (orders ties for "last").
    """
    width = len(windows) * (vocab_size + 2 * n_numeric) + (age is not None)
    if key.shape[0] == 0:
        return sp.csr_matrix((n_keys, width), dtype=np.float64)
    runs, run_keys = window_rows(
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
    return gather_rows([runs], [run_keys], np.arange(n_keys, dtype=np.int64), width)


def gather_rows(
    parts: list[sp.csr_matrix], keys: list[NDArray[np.int64]], rows: NDArray[np.int64], width: int
) -> sp.csr_matrix:
    """Return rows `rows` (key indices) of the stacked per-key matrices `parts` (rows `keys`).

    Keys without a row are all zero.
    """
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

"""MEDS event data, read lazily and windowed to each prediction without leakage.

A MEDS dataset (https://github.com/Medical-Event-Data-Standard/meds, schema 0.4) is a folder with
`data/**/*.parquet` shards holding one event per row (`subject_id` int64, `time` timestamp[us] —
null for static events —, `code` string, `numeric_value` float32) and an optional `metadata/`
folder (`codes.parquet`, `subject_splits.parquet`, `dataset.json`).

`MEDSDataset.iter_windowed(keys)` returns, for each prediction `(subject_id, prediction_time)`,
the events with `time <= prediction_time` (and within an optional look-back) plus the static
events. Events after `prediction_time` are never returned: the window filter is applied before
anything leaves this module. Work is streamed shard by shard, so peak memory is bounded by one
shard's windowed events, not by the dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from numpy.typing import NDArray

__all__ = [
    "MEDS_COLUMNS",
    "WINDOW_SCHEMA",
    "MEDSDataset",
    "MEDSSchemaError",
    "validate_keys",
]

#: Column name -> polars dtype of the core MEDS data schema (0.4).
MEDS_COLUMNS: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "time": pl.Datetime("us"),
    "code": pl.String(),
    "numeric_value": pl.Float32(),
}

#: Schema of every frame yielded by `MEDSDataset.iter_windowed`.
WINDOW_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "prediction_time": pl.Datetime("us"),
    "time": pl.Datetime("us"),
    "code": pl.String(),
    "numeric_value": pl.Float32(),
}


class MEDSSchemaError(ValueError):
    """A MEDS shard or key table does not follow the schema; the message names the file/column."""


def _is_integer(dtype: Any) -> bool:
    return bool(dtype.is_integer())


def _shard_columns(path: Path) -> dict[str, pl.DataType]:
    """Read one shard's parquet schema (footer only) and check it against MEDS.

    Returns the casts needed to reach the canonical dtypes. Integer ids, any timestamp unit,
    large/categorical strings and any float precision are accepted and cast; anything else is an
    error naming the shard and the column.
    """
    try:
        arrow_schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise MEDSSchemaError(f"MEDS shard {path} is not a readable parquet file: {exc}") from exc
    schema = pl.Schema(pl.from_arrow(arrow_schema.empty_table()).schema)  # type: ignore[union-attr]
    for required in ("subject_id", "time", "code"):
        if required not in schema:
            raise MEDSSchemaError(
                f"MEDS shard {path} lacks required column {required!r} "
                f"(columns: {list(schema.names())})"
            )
    sid, tim, code = schema["subject_id"], schema["time"], schema["code"]
    if not _is_integer(sid):
        raise MEDSSchemaError(f"MEDS shard {path}: column 'subject_id' must be int64, got {sid}")
    if not isinstance(tim, pl.Datetime):
        raise MEDSSchemaError(f"MEDS shard {path}: column 'time' must be timestamp[us], got {tim}")
    if tim.time_zone is not None:
        raise MEDSSchemaError(
            f"MEDS shard {path}: column 'time' must be timezone-naive, got {tim.time_zone}"
        )
    if not (code == pl.String or isinstance(code, pl.Categorical | pl.Enum)):
        raise MEDSSchemaError(f"MEDS shard {path}: column 'code' must be string, got {code}")
    if "numeric_value" in schema:
        nv = schema["numeric_value"]
        if not (nv.is_float() or nv.is_integer() or nv == pl.Null):
            raise MEDSSchemaError(
                f"MEDS shard {path}: column 'numeric_value' must be float32, got {nv}"
            )
    return dict(schema)


@dataclass(frozen=True)
class _Shard:
    path: Path
    has_numeric: bool

    def scan(self) -> pl.LazyFrame:
        """Scan the shard as a lazy frame with exactly the canonical MEDS columns and dtypes."""
        lf = pl.scan_parquet(self.path)
        nv = (
            pl.col("numeric_value").cast(pl.Float32)
            if self.has_numeric
            else pl.lit(None, dtype=pl.Float32).alias("numeric_value")
        )
        return lf.select(
            pl.col("subject_id").cast(pl.Int64),
            pl.col("time").cast(pl.Datetime("us")),
            pl.col("code").cast(pl.String),
            nv,
        )


def validate_keys(keys: pl.DataFrame, *, source: str = "keys") -> pl.DataFrame:
    """Check and normalise a `(subject_id, prediction_time)` key table.

    Returns a de-duplicated frame with `subject_id` Int64 and `prediction_time` Datetime(us).
    Raises `MEDSSchemaError` naming the column and the first offending row.
    """
    for col in ("subject_id", "prediction_time"):
        if col not in keys.columns:
            raise MEDSSchemaError(f"{source}: missing column {col!r} (columns: {keys.columns})")
    sid, pt = keys.schema["subject_id"], keys.schema["prediction_time"]
    if not _is_integer(sid):
        raise MEDSSchemaError(f"{source}: column 'subject_id' must be an integer, got {sid}")
    if not isinstance(pt, pl.Datetime | pl.Date):
        raise MEDSSchemaError(f"{source}: column 'prediction_time' must be a datetime, got {pt}")
    if isinstance(pt, pl.Datetime) and pt.time_zone is not None:
        raise MEDSSchemaError(f"{source}: column 'prediction_time' must be timezone-naive")
    out = keys.select(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us"))
    )
    for col in ("subject_id", "prediction_time"):
        nulls = out[col].is_null()
        if nulls.any():
            i = int(nulls.arg_true()[0])
            raise MEDSSchemaError(f"{source}: column {col!r} is null in row {i} ({out.row(i)})")
    return out.unique(maintain_order=True)


class MEDSDataset:
    """A MEDS dataset on disk, read lazily.

    `root` holds `data/**/*.parquet` and optionally `metadata/`. The schema of every shard is
    checked on construction (parquet footers only, cheap); `validate(deep=True)` also scans the
    values. `chunk_rows` bounds how many event rows of a (subject-sorted) shard are in memory at
    once while windowing.
    """

    def __init__(self, root: str | Path, *, chunk_rows: int = 8_000_000) -> None:
        self.root = Path(root)
        self.chunk_rows = int(chunk_rows)
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        data_dir = self.root / "data"
        if not data_dir.is_dir():
            raise FileNotFoundError(f"MEDS root {self.root} has no data/ folder")
        files = sorted(p for p in data_dir.rglob("*.parquet") if p.is_file())
        if not files:
            raise FileNotFoundError(f"MEDS root {self.root}: no parquet shards under {data_dir}")
        self._shards = [_Shard(p, "numeric_value" in _shard_columns(p)) for p in files]
        self._subject_shards: pl.DataFrame | None = None

    # ------------------------------------------------------------------ files & metadata
    def __repr__(self) -> str:
        return f"MEDSDataset({str(self.root)!r}, shards={len(self._shards)})"

    @property
    def shards(self) -> list[Path]:
        """The data shards, sorted by path."""
        return [s.path for s in self._shards]

    def input_files(self) -> list[Path]:
        """Every file whose content defines this dataset (shards + metadata), for fingerprints."""
        meta = self.root / "metadata"
        extra = sorted(p for p in meta.rglob("*") if p.is_file()) if meta.is_dir() else []
        return [*self.shards, *extra]

    def codes(self) -> pl.DataFrame | None:
        """`metadata/codes.parquet` if present (code, description, parent_codes ...)."""
        path = self.root / "metadata" / "codes.parquet"
        return pl.read_parquet(path) if path.is_file() else None

    def subject_splits(self) -> pl.DataFrame | None:
        """`metadata/subject_splits.parquet` if present (subject_id, split)."""
        path = self.root / "metadata" / "subject_splits.parquet"
        return pl.read_parquet(path) if path.is_file() else None

    def scan(self) -> pl.LazyFrame:
        """All shards as one lazy frame in the canonical schema (nothing is read yet)."""
        return pl.concat([s.scan() for s in self._shards], how="vertical")

    # ------------------------------------------------------------------ validation
    def validate(self, *, deep: bool = False) -> dict[str, Any]:
        """Check every shard against the MEDS schema; return a summary.

        The parquet schemas are checked with the `meds` package's `DataSchema` when it is
        installed (in addition to the dtype checks done on construction). With `deep=True`, the
        values are scanned shard by shard: `subject_id` and `code` must be non-null and
        `numeric_value` null or finite (NaN/inf raise, naming the shard and subject). Returns
        `{"n_shards", "n_events", "n_subjects", "n_static", "strict_meds"}` (`n_subjects` and
        `n_static` only when `deep`). `strict_meds` says whether every shard is exactly the
        `meds` package's schema (else it is readable after casting).
        """
        strict = True
        try:
            import meds

            for s in self._shards:
                try:
                    meds.DataSchema.validate(pq.read_schema(s.path))
                except Exception:
                    strict = False
        except ImportError:
            strict = False
        n_events = sum(pq.ParquetFile(s.path).metadata.num_rows for s in self._shards)
        out: dict[str, Any] = {
            "n_shards": len(self._shards),
            "n_events": int(n_events),
            "strict_meds": strict,
        }
        if deep:
            n_static = 0
            subjects = []
            for s in self._shards:
                stats = (
                    s.scan()
                    .select(
                        pl.col("subject_id").null_count().alias("sid_null"),
                        pl.col("code").null_count().alias("code_null"),
                        pl.col("time").null_count().alias("static"),
                    )
                    .collect()
                    .row(0, named=True)
                )
                for col, key in (("subject_id", "sid_null"), ("code", "code_null")):
                    if stats[key]:
                        first = s.scan().filter(pl.col(col).is_null()).head(1).collect().row(0)
                        raise MEDSSchemaError(
                            f"MEDS shard {s.path}: column {col!r} has {stats[key]} null values "
                            f"(first: {first})"
                        )
                bad = (
                    s.scan()
                    .filter(pl.col("numeric_value").is_not_null())
                    .filter(~pl.col("numeric_value").cast(pl.Float64).is_finite())
                )
                n_bad = int(bad.select(pl.len()).collect().item())
                if n_bad:
                    row = bad.head(1).collect().row(0, named=True)
                    raise MEDSSchemaError(
                        f"MEDS shard {s.path}: column 'numeric_value' has {n_bad} NaN or infinite "
                        f"values (first: subject {row['subject_id']}, code {row['code']!r}, "
                        f"time {row['time']}); use null for 'no value'"
                    )
                n_static += int(stats["static"])
                subjects.append(s.scan().select(pl.col("subject_id").unique()).collect())
            out["n_static"] = n_static
            out["n_subjects"] = int(pl.concat(subjects)["subject_id"].n_unique())
        return out

    # ------------------------------------------------------------------ windowing
    def subject_shards(self) -> pl.DataFrame:
        """`(subject_id, shard)` pairs: which shard index holds events of which subject."""
        if self._subject_shards is None:
            parts = [
                s.scan()
                .select(pl.col("subject_id").unique())
                .with_columns(pl.lit(i, dtype=pl.Int32).alias("shard"))
                .collect()
                for i, s in enumerate(self._shards)
            ]
            self._subject_shards = pl.concat(parts).sort("subject_id", "shard")
        return self._subject_shards

    def iter_windowed(
        self,
        keys: pl.DataFrame,
        *,
        lookback_days: float | None = None,
        batch_size: int = 4096,
    ) -> Iterator[pl.DataFrame]:
        """Yield each prediction's events up to and including its `prediction_time`.

        keys: DataFrame with `subject_id` and `prediction_time` (one row per prediction;
        duplicates are dropped). lookback_days: keep only timed events with
        `prediction_time - lookback_days <= time`; static (null-time) events are always kept.
        batch_size: at most this many keys per yielded frame.

        Each yielded frame has columns `WINDOW_SCHEMA` (subject_id, prediction_time, time, code,
        numeric_value), is sorted by (subject_id, prediction_time, time) with static events first
        (ties keep their file order), and holds all rows of each of its keys. Keys without events
        yield no rows. Shards are processed one at a time (in chunks of about `chunk_rows` rows cut
        at subject boundaries when a shard is sorted by subject), subjects whose events span several
        shards last; frames come in that order, not globally sorted.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if lookback_days is not None and not lookback_days >= 0:
            raise ValueError(f"lookback_days must be >= 0 or None, got {lookback_days}")
        lookback_us = None if lookback_days is None else round(float(lookback_days) * _US_PER_DAY)
        keys = validate_keys(keys)
        if keys.height == 0:
            return
        located = keys.join(self.subject_shards(), on="subject_id", how="inner")
        n_shards_per_subject = located.group_by("subject_id").agg(
            pl.col("shard").n_unique().alias("n")
        )
        multi = n_shards_per_subject.filter(pl.col("n") > 1)["subject_id"]
        single = located.filter(~pl.col("subject_id").is_in(multi.implode()))
        for (shard_idx,), shard_keys in sorted(
            single.partition_by("shard", as_dict=True).items(), key=lambda kv: kv[0]
        ):
            shard = self._shards[int(shard_idx)]  # type: ignore[call-overload]
            sk = shard_keys.drop("shard").unique()
            for events in self._read_chunks(shard, sk["subject_id"]):
                yield from _window_events(events, sk, lookback_us, batch_size)
        if multi.len():
            multi_keys = located.filter(pl.col("subject_id").is_in(multi.implode()))
            shard_ids = sorted(set(multi_keys["shard"].to_list()))
            wanted = multi.implode()
            events = pl.concat(
                [
                    self._shards[i].scan().filter(pl.col("subject_id").is_in(wanted)).collect()
                    for i in shard_ids
                ]
            )
            yield from _window_events(
                events, multi_keys.drop("shard").unique(), lookback_us, batch_size
            )

    def _read_chunks(self, shard: _Shard, subjects: pl.Series) -> Iterator[pl.DataFrame]:
        """Yield the shard's events for `subjects`, in chunks that never split a subject.

        Few wanted subjects: one filtered read (parquet statistics can skip row groups). A shard
        sorted by subject_id and larger than `chunk_rows`: contiguous row slices cut at subject
        boundaries, so memory stays bounded by the chunk. Otherwise: the whole shard.
        """
        shard_idx = self._shards.index(shard)
        n_subjects_in_shard = self.subject_shards().filter(pl.col("shard") == shard_idx).height
        if subjects.n_unique() * 20 < n_subjects_in_shard:
            wanted = subjects.unique().implode()
            yield shard.scan().filter(pl.col("subject_id").is_in(wanted)).collect()
            return
        if pq.ParquetFile(shard.path).metadata.num_rows <= self.chunk_rows:
            yield shard.scan().collect()
            return
        sid_np = (
            pl.scan_parquet(shard.path)
            .select(pl.col("subject_id").cast(pl.Int64))
            .collect()["subject_id"]
            .to_numpy()
        )
        n = sid_np.size
        if not bool(np.all(sid_np[1:] >= sid_np[:-1])):
            yield shard.scan().collect()
            return
        cuts = [0]
        while n - cuts[-1] > self.chunk_rows:
            target = cuts[-1] + self.chunk_rows
            # next subject boundary at or before the target (or after it for a huge subject)
            cut = int(np.searchsorted(sid_np, sid_np[target], side="left"))
            if cut <= cuts[-1]:
                cut = int(np.searchsorted(sid_np, sid_np[target], side="right"))
            cuts.append(cut)
        cuts.append(n)
        for lo, hi in pairwise(cuts):
            if hi > lo:
                yield shard.scan().slice(lo, hi - lo).collect()

    def windowed(
        self,
        keys: pl.DataFrame,
        *,
        lookback_days: float | None = None,
        batch_size: int = 4096,
    ) -> pl.DataFrame:
        """All of `iter_windowed` in one frame, sorted by (subject_id, prediction_time, time)."""
        parts = list(self.iter_windowed(keys, lookback_days=lookback_days, batch_size=batch_size))
        if not parts:
            return pl.DataFrame(schema=WINDOW_SCHEMA)
        return pl.concat(parts).sort(
            ["subject_id", "prediction_time", "time"], nulls_last=False, maintain_order=True
        )


_US_PER_DAY = 86_400 * 1_000_000
_STATIC = np.iinfo(np.int64).min  # null (static) times sort first


def _first_index(
    a: NDArray[np.int64],
    lo: NDArray[np.int64],
    hi: NDArray[np.int64],
    x: NDArray[np.int64],
    *,
    strict: bool,
) -> NDArray[np.int64]:
    """Binary-search each query's range [lo, hi) of `a` (sorted there), vectorised.

    Returns the first i with a[i] > x (strict) or a[i] >= x (not strict); hi when there is none.
    """
    lo, hi = lo.copy(), hi.copy()
    if a.size == 0:
        return lo
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        v = a[np.minimum(mid, a.size - 1)]
        right = active & ((v <= x) if strict else (v < x))
        lo = np.where(right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)


def _concat_ranges(starts: NDArray[np.int64], lengths: NDArray[np.int64]) -> NDArray[np.int64]:
    """Concatenation of the integer ranges [start, start + length)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total, dtype=np.int64)


def _window_events(
    events: pl.DataFrame, keys: pl.DataFrame, lookback_us: int | None, batch_size: int
) -> Iterator[pl.DataFrame]:
    """Window `events` for `keys`, yielding frames of at most `batch_size` keys.

    `events` has the canonical MEDS columns, in any order; `keys` are (subject_id, prediction_time).
    Events are put in (subject_id, time) order with static events first (a stable sort, skipped when
    the shard is already in that order, as MEDS shards usually are). A key's window is then two
    contiguous ranges of its subject's block: the static events, and the timed events in
    [prediction_time - lookback, prediction_time], found by binary search.
    """
    if events.height == 0:
        return
    sid = events["subject_id"].to_numpy()
    t = events["time"].cast(pl.Int64).fill_null(_STATIC).to_numpy()
    if sid.size > 1:
        # compare, do not subtract: static times are int64 min and a difference would overflow
        same = sid[1:] == sid[:-1]
        in_order = bool(np.all(sid[1:] >= sid[:-1]) and np.all(~same | (t[1:] >= t[:-1])))
    else:
        in_order = True
    if not in_order:
        order = np.lexsort((t, sid))  # stable: ties keep their file order
        events = events[order]
        sid, t = sid[order], t[order]
    keys = keys.sort("subject_id", "prediction_time")
    ksid = keys["subject_id"].to_numpy()
    kpt = keys["prediction_time"].cast(pl.Int64).to_numpy()
    block_lo = np.searchsorted(sid, ksid, side="left").astype(np.int64)
    block_hi = np.searchsorted(sid, ksid, side="right").astype(np.int64)
    timed_lo = _first_index(t, block_lo, block_hi, np.full_like(kpt, _STATIC), strict=True)
    end = _first_index(t, timed_lo, block_hi, kpt, strict=True)
    if lookback_us is None:
        start = timed_lo
    else:
        start = _first_index(t, timed_lo, end, kpt - lookback_us, strict=False)
    n_static = timed_lo - block_lo
    n_timed = end - start
    per_key = n_static + n_timed
    for b0 in range(0, ksid.size, batch_size):
        b1 = min(b0 + batch_size, ksid.size)
        n_rows = int(per_key[b0:b1].sum())
        if n_rows == 0:
            continue
        starts = np.stack([block_lo[b0:b1], start[b0:b1]], axis=1).reshape(-1)
        lengths = np.stack([n_static[b0:b1], n_timed[b0:b1]], axis=1).reshape(-1)
        idx = _concat_ranges(starts, lengths)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        block = events.slice(lo, hi - lo)
        if np.unique(ksid[b0:b1]).size == b1 - b0:
            # one key per subject: rows are ascending and distinct -> a mask filter (cheaper
            # than a gather for string columns)
            mask = np.zeros(hi - lo, dtype=bool)
            mask[idx - lo] = True
            rows = block.filter(pl.Series(mask))
        else:
            rows = block[idx - lo]
        yield pl.DataFrame(
            {
                "subject_id": np.repeat(ksid[b0:b1], per_key[b0:b1]),
                "prediction_time": pl.Series(
                    np.repeat(kpt[b0:b1], per_key[b0:b1]), dtype=pl.Int64
                ).cast(pl.Datetime("us")),
                "time": rows["time"],
                "code": rows["code"],
                "numeric_value": rows["numeric_value"],
            }
        )

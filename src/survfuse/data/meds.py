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
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

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
        """The shard as a lazy frame with exactly the canonical MEDS columns and dtypes."""
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
    values.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
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
        values are scanned shard by shard: `subject_id` and `code` must be non-null. Returns
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
                        raise MEDSSchemaError(
                            f"MEDS shard {s.path}: column {col!r} has {stats[key]} null values"
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
        numeric_value), is sorted by (subject_id, prediction_time, time) with static events first,
        and holds all rows of each of its keys. Keys without events yield no rows. Shards are
        processed one at a time, subjects whose events span several shards last.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if lookback_days is not None and not lookback_days >= 0:
            raise ValueError(f"lookback_days must be >= 0 or None, got {lookback_days}")
        keys = validate_keys(keys)
        if keys.height == 0:
            return
        located = keys.join(self.subject_shards(), on="subject_id", how="inner")
        n_shards_per_subject = located.group_by("subject_id").agg(
            pl.col("shard").n_unique().alias("n")
        )
        multi = n_shards_per_subject.filter(pl.col("n") > 1)["subject_id"]
        single = located.filter(~pl.col("subject_id").is_in(multi.implode()))
        for shard_idx, shard_keys in single.partition_by("shard", as_dict=True).items():
            shard = self._shards[int(shard_idx[0])]  # type: ignore[call-overload]
            yield from self._window(
                [shard], shard_keys.drop("shard").unique(), lookback_days, batch_size
            )
        if multi.len():
            multi_keys = located.filter(pl.col("subject_id").is_in(multi.implode()))
            shard_ids = sorted(set(multi_keys["shard"].to_list()))
            yield from self._window(
                [self._shards[i] for i in shard_ids],
                multi_keys.drop("shard").unique(),
                lookback_days,
                batch_size,
            )

    def _window(
        self,
        shards: list[_Shard],
        keys: pl.DataFrame,
        lookback_days: float | None,
        batch_size: int,
    ) -> Iterator[pl.DataFrame]:
        keys = keys.sort("subject_id", "prediction_time").with_columns(
            (pl.int_range(pl.len(), dtype=pl.Int64) // batch_size).alias("_batch")
        )
        events = pl.concat([s.scan() for s in shards], how="vertical")
        # Semi-join first so the many-to-many join below only sees subjects we need.
        # The joins keep the shard's row order so that ties in `time` keep their file order
        # (deterministic output); the semi-join first drops subjects we do not need.
        events = events.join(
            keys.lazy().select("subject_id").unique(),
            on="subject_id",
            how="semi",
            maintain_order="left",
        )
        joined = events.join(keys.lazy(), on="subject_id", how="inner", maintain_order="left")
        in_window = pl.col("time") <= pl.col("prediction_time")
        if lookback_days is not None:
            start = pl.col("prediction_time") - pl.lit(timedelta(days=float(lookback_days)))
            in_window = in_window & (pl.col("time") >= start)
        out = (
            joined.filter(pl.col("time").is_null() | in_window)
            .select("_batch", *WINDOW_SCHEMA)
            .sort(["subject_id", "prediction_time", "time"], nulls_last=False, maintain_order=True)
            .collect()
        )
        if out.height == 0:
            return
        yield from out.partition_by("_batch", maintain_order=True, include_key=False)

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

"""The cohort table: one row per prediction, with its outcomes.

Columns (after `validate_cohort`): `subject_id` Int64, `prediction_time` Datetime(us) (the index CT
time), `time` Float64 (days from prediction_time to event or censoring, >= 0), `event` Boolean
(True = observed), `site` Utf8, plus optional task columns `<task>_time` / `<task>_event` with the
same rules (several tasks share one cohort). The default task is named `"default"` and maps to
`time` / `event`. Any other columns are kept unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from numpy.typing import NDArray

from survfuse.data.dates import parse_dates
from survfuse.registry import look_up_option

__all__ = [
    "DEFAULT_SITE",
    "DEFAULT_TASK",
    "Cohort",
    "load_cohort",
    "outcome_columns",
    "read_table",
    "task_columns",
    "validate_cohort",
]

DEFAULT_TASK = "default"
#: Site assigned when a cohort file has no `site` column (a single-site cohort).
DEFAULT_SITE = "default"
_REQUIRED = ("subject_id", "prediction_time", "time", "event")
_TRUE = {"1", "true", "t", "yes", "y"}
_FALSE = {"0", "false", "f", "no", "n"}


class CohortError(ValueError):
    """A cohort that breaks the rules; the message names the column and the offending subject."""


def outcome_columns(task: str) -> tuple[str, str]:
    """Cohort columns of a task's outcome: `default` -> (time, event), else `<task>_time/_event`."""
    return ("time", "event") if task == DEFAULT_TASK else (f"{task}_time", f"{task}_event")


def task_columns(columns: list[str]) -> dict[str, tuple[str, str]]:
    """Map task name -> (time column, event column) for the tasks a cohort's `columns` hold.

    "default" -> (time, event), plus every `<task>_time` that has a matching `<task>_event`
    (the names `outcome_columns` gives).
    """
    out = {DEFAULT_TASK: outcome_columns(DEFAULT_TASK)}
    for col in columns:
        if col.endswith("_time") and col != "prediction_time":
            task = col[: -len("_time")]
            if f"{task}_event" in columns and task:
                out[task] = outcome_columns(task)
    return out


def _where(df: pl.DataFrame, i: int) -> str:
    sid = df["subject_id"][i] if "subject_id" in df.columns else None
    pt = df["prediction_time"][i] if "prediction_time" in df.columns else None
    return f"subject {sid!r} (row {i}, prediction_time {pt})"


def _fail(source: str, col: str, what: str, df: pl.DataFrame, mask: pl.Series) -> None:
    idx = mask.fill_null(True).arg_true()
    if idx.len():
        i = int(idx[0])
        more = f"; {idx.len() - 1} more rows" if idx.len() > 1 else ""
        raise CohortError(f"{source}: column {col!r} {what} for {_where(df, i)}{more}")


def _check_time_col(df: pl.DataFrame, col: str, source: str) -> pl.Series:
    raw = df[col]
    if not raw.dtype.is_numeric():
        raise CohortError(f"{source}: column {col!r} must be numeric days, got {raw.dtype}")
    t = raw.cast(pl.Float64)
    _fail(source, col, "is missing (null)", df, t.is_null())
    _fail(source, col, "is NaN or infinite", df, ~t.is_finite())
    neg = t < 0
    if neg.any():
        i = int(neg.arg_true()[0])
        raise CohortError(
            f"{source}: column {col!r} is negative ({t[i]}) for {_where(df, i)}; "
            "time is days from prediction_time to event or censoring and must be >= 0"
        )
    return t


def _check_event_col(df: pl.DataFrame, col: str, source: str) -> pl.Series:
    raw = df[col]
    _fail(source, col, "is missing (null)", df, raw.is_null())
    if raw.dtype == pl.Boolean:
        return raw
    if raw.dtype.is_numeric():
        v = raw.cast(pl.Float64)
        bad = ~v.is_in([0.0, 1.0])
        if bad.any():
            i = int(bad.arg_true()[0])
            raise CohortError(
                f"{source}: column {col!r} must be 0/1 (1 = event observed), got {raw[i]!r} "
                f"for {_where(df, i)}"
            )
        return v == 1.0
    if raw.dtype == pl.String:
        low = raw.str.strip_chars().str.to_lowercase()
        bad = ~low.is_in(sorted(_TRUE | _FALSE))
        if bad.any():
            i = int(bad.arg_true()[0])
            raise CohortError(
                f"{source}: column {col!r} must be 0/1 (1 = event observed), got {raw[i]!r} "
                f"for {_where(df, i)}"
            )
        return low.is_in(sorted(_TRUE))
    raise CohortError(f"{source}: column {col!r} must be bool or 0/1, got {raw.dtype}")


def _parse_text_times(df: pl.DataFrame, source: str, date_format: str | None) -> pl.Series:
    try:
        return parse_dates(
            df["prediction_time"],
            source=source,
            column="prediction_time",
            date_format=date_format,
            where=lambda i: _where(df, i),
        )
    except ValueError as exc:
        raise CohortError(str(exc)) from None


def validate_cohort(
    df: Any, source: str = "cohort", *, date_format: str | None = None
) -> pl.DataFrame:
    """Validate and normalise a cohort table (polars or pandas DataFrame).

    A text `prediction_time` must be ISO 8601 unless `date_format` (a strftime pattern) declares
    its format (`survfuse.data.dates`).
    Raises CohortError (a ValueError) naming the column and the offending subject for: a missing
    column, a null/unparsable subject_id or prediction_time, NaN/infinite/negative time, an event
    that is not 0/1, a `<task>_time` without `<task>_event` (or vice versa) and duplicate
    `(subject_id, prediction_time)` rows. A missing `site` column becomes `site = "default"`.
    """
    if not isinstance(df, pl.DataFrame):
        df = pl.from_pandas(df) if hasattr(df, "to_numpy") else pl.DataFrame(df)
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise CohortError(
            f"{source}: missing column {missing[0]!r} (required: {', '.join(_REQUIRED)}; "
            f"columns: {df.columns})"
        )
    if df.height == 0:
        raise CohortError(f"{source}: the cohort has no rows")
    for col in df.columns:
        # an outcome without its time is a mistake; a `*_time` alone may be any timestamp column
        if col.endswith("_event") and col != "event":
            task = col[: -len("_event")]
            if f"{task}_time" not in df.columns:
                raise CohortError(
                    f"{source}: task column {col!r} has no matching column {task + '_time'!r} "
                    "(a task needs both <task>_time and <task>_event)"
                )

    sid_raw = df["subject_id"]
    if sid_raw.dtype.is_integer():
        sid = sid_raw.cast(pl.Int64)
    elif sid_raw.dtype == pl.String or sid_raw.dtype.is_float():
        sid = sid_raw.cast(pl.Int64, strict=False)
        bad = sid.is_null() & sid_raw.is_not_null()
        if sid_raw.dtype.is_float():
            bad = bad | (sid_raw.fill_nan(0.5) % 1 != 0).fill_null(False)
        if bad.any():
            i = int(bad.arg_true()[0])
            raise CohortError(
                f"{source}: column 'subject_id' must be an integer, got {sid_raw[i]!r} in row {i}"
            )
    else:
        raise CohortError(f"{source}: column 'subject_id' must be an integer, got {sid_raw.dtype}")
    nulls = sid.is_null()
    if nulls.any():
        raise CohortError(
            f"{source}: column 'subject_id' is null in row {int(nulls.arg_true()[0])}"
        )
    df = df.with_columns(sid.alias("subject_id"))

    pt_raw = df["prediction_time"]
    if isinstance(pt_raw.dtype, pl.Datetime) and pt_raw.dtype.time_zone is not None:
        raise CohortError(f"{source}: column 'prediction_time' must be timezone-naive")
    if pt_raw.dtype == pl.String:
        pt = _parse_text_times(df, source, date_format)
    elif isinstance(pt_raw.dtype, pl.Datetime | pl.Date):
        pt = pt_raw.cast(pl.Datetime("us"))
    else:
        raise CohortError(
            f"{source}: column 'prediction_time' must be a datetime, got {pt_raw.dtype}"
        )
    df = df.with_columns(pt.alias("prediction_time"))
    _fail(source, "prediction_time", "is missing or unparsable", df, pt.is_null())

    tasks = task_columns(df.columns)
    new_cols = []
    for tcol, ecol in tasks.values():
        new_cols.append(_check_time_col(df, tcol, source).alias(tcol))
        new_cols.append(_check_event_col(df, ecol, source).alias(ecol))
    df = df.with_columns(new_cols)

    if "site" in df.columns:
        site = df["site"].cast(pl.String)
        _fail(source, "site", "is missing (null)", df, site.is_null())
        df = df.with_columns(site.alias("site"))
    else:
        df = df.with_columns(pl.lit(DEFAULT_SITE, dtype=pl.String).alias("site"))

    dup = df.select(pl.struct("subject_id", "prediction_time").is_duplicated()).to_series()
    if dup.any():
        i = int(dup.arg_true()[0])
        n = int(dup.sum())
        raise CohortError(
            f"{source}: duplicate (subject_id, prediction_time) for {_where(df, i)} "
            f"({n} rows share a key); each prediction must appear once"
        )
    first = ["subject_id", "prediction_time", "time", "event", "site"]
    return df.select(*first, *[c for c in df.columns if c not in first])


@dataclass(frozen=True)
class Cohort:
    """A validated cohort (`df`, see module docs) and where it came from."""

    df: pl.DataFrame
    source: str = "cohort"

    def __post_init__(self) -> None:
        object.__setattr__(self, "df", validate_cohort(self.df, source=self.source))

    def __len__(self) -> int:
        return self.df.height

    @property
    def tasks(self) -> list[str]:
        """Task names: "default" (time/event) first, then `<task>` for each task column pair."""
        return list(task_columns(self.df.columns))

    def outcome(self, task: str = DEFAULT_TASK) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
        """`(time [N] float64 days, event [N] bool)` of `task`, in row order."""
        cols = task_columns(self.df.columns)
        tcol, ecol = cols[look_up_option(task, cols, kind="task")]
        return (
            self.df[tcol].to_numpy().astype(np.float64),
            self.df[ecol].to_numpy().astype(bool),
        )

    def keys(self) -> pl.DataFrame:
        """`(subject_id, prediction_time)` of every row, in row order."""
        return self.df.select("subject_id", "prediction_time")

    @property
    def sites(self) -> list[str]:
        return sorted(self.df["site"].unique().to_list())

    def filter(self, predicate: Any) -> Cohort:
        """Return a sub-cohort (polars predicate expression or boolean Series)."""
        return Cohort(self.df.filter(predicate), source=self.source)


def read_table(path: str | Path) -> pl.DataFrame:
    """Read a parquet, CSV or TSV table as written.

    Text columns stay text (dates are parsed by `validate_cohort`, ISO 8601 only unless a format is
    declared, never guessed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cohort file {path} not found")
    if path.suffix.lower() in (".csv", ".tsv"):
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        return pl.read_csv(path, try_parse_dates=False, separator=sep)
    return pl.read_parquet(path)


def load_cohort(path: str | Path, *, date_format: str | None = None) -> Cohort:
    """Read and validate a cohort from parquet, CSV or TSV.

    `date_format`: strftime pattern of the text dates (default: ISO 8601 only; `10/09/2016`
    raises a CohortError naming the file, column and row).
    """
    source = f"cohort {path}"
    df = read_table(path)
    if df.schema.get("prediction_time") == pl.String:  # parsed here: Cohort takes no format
        df = df.with_columns(_parse_text_times(df, source, date_format))
    return Cohort(df, source=source)

"""Reading source tables for conversion: every cell as text, parsed by explicit rules.

Source files (CSV / TSV exports of a cohort) are read with every column as a string, so that
nothing is guessed: integer ids, date-times and label values are parsed here by declared rules,
and the first value that breaks a rule is a `ConversionError` naming the file, the data row
(1-based; line = row + 1 with the header) and the column.

Date-times are ISO 8601 (`YYYY-MM-DD`, optionally `[ T]HH:MM[:SS[.ffffff]]`, no time zone) unless
a `strftime` format is declared; a day-first or month-first date is never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import polars as pl

__all__ = [
    "ISO_PATTERN",
    "ConversionError",
    "parse_datetime",
    "parse_int_ids",
    "read_table",
    "require_columns",
    "try_parse_datetime",
    "where",
]

#: Accepted ISO 8601 date-time spellings (naive; `T` or space between date and time).
ISO_PATTERN = r"^\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?$"
_ISO_RE = re.compile(ISO_PATTERN)


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file, row and column."""


def where(source: str | Path, row: int, column: str) -> str:
    """`"<file>: row R (line L), column 'C'"` for a 0-based data row index."""
    return f"{source}: row {row + 1} (line {row + 2}), column {column!r}"


def read_table(path: str | Path) -> pl.DataFrame:
    """Read a CSV (`,`) or TSV (`.tsv`, `.txt`: tab) file with every column as a string.

    Empty fields are null. Column names are stripped of surrounding blanks.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    try:
        df = pl.read_csv(path, separator=sep, infer_schema=False, quote_char='"')
    except pl.exceptions.PolarsError as exc:
        kind = "TSV" if sep == "\t" else "CSV"
        raise ConversionError(f"{path}: not a readable {kind} file: {exc}") from exc
    return df.rename({c: c.strip() for c in df.columns})


def require_columns(df: pl.DataFrame, columns: Iterable[str], source: str | Path) -> None:
    """Raise naming the first missing column (and the columns the file has)."""
    for col in columns:
        if col not in df.columns:
            raise ConversionError(
                f"{source}: missing column {col!r} (columns: {', '.join(df.columns)})"
            )


def _first_bad(mask: pl.Series) -> int | None:
    idx = mask.fill_null(False).arg_true()
    return int(idx[0]) if idx.len() else None


def parse_int_ids(
    values: pl.Series, source: str | Path, column: str, *, rows: pl.Series | None = None
) -> pl.Series:
    """Parse integer ids written as text (`"123"`, `"123.0"` is refused). Nulls are errors.

    `rows` (optional) maps positions to source rows when `values` is a subset of the file.
    """
    text = values.cast(pl.String).str.strip_chars()
    ok = text.str.contains(r"^[+-]?\d+$")
    bad = _first_bad(~ok | text.is_null())
    if bad is not None:
        row = int(rows[bad]) if rows is not None else bad
        raise ConversionError(f"{where(source, row, column)}: {values[bad]!r} is not an integer id")
    return text.cast(pl.Int64).alias(values.name)


def try_parse_datetime(
    values: pl.Series, fmt: str | None = None
) -> tuple[pl.Series, int | None, str]:
    """Parse text date-times to Datetime(us) (nulls stay null).

    Returns (parsed, index of the first value that does not parse or None, the rule it broke).
    fmt: None = ISO 8601 only (see module docs), else a `strftime` format declared by the user.
    """
    text = values.cast(pl.String).str.strip_chars()
    text = pl.select(pl.when(text.str.len_chars() > 0).then(text)).to_series()
    if fmt is not None:
        parsed = text.str.to_datetime(fmt, strict=False, time_unit="us")
        bad = _first_bad(text.is_not_null() & parsed.is_null())
        return parsed.alias(values.name), bad, f"does not match the declared format {fmt!r}"
    bad = _first_bad(text.is_not_null() & ~text.str.contains(ISO_PATTERN))
    if bad is not None:
        rule = (
            "is not an ISO 8601 date-time (YYYY-MM-DD[ HH:MM[:SS[.ffffff]]], no time zone); "
            "declare another format with --time-format (day-first dates are never guessed)"
        )
        return pl.Series(values.name, [], dtype=pl.Datetime("us")), bad, rule
    spaced = text.str.replace("T", " ", literal=True)
    norm = (
        pl.when(spaced.str.len_chars() == 10)
        .then(spaced + " 00:00:00")
        .when(spaced.str.len_chars() == 16)
        .then(spaced + ":00")
        .otherwise(spaced)
    )
    parsed = pl.select(
        norm.str.to_datetime("%Y-%m-%d %H:%M:%S%.f", strict=False, time_unit="us")
    ).to_series()
    bad = _first_bad(text.is_not_null() & parsed.is_null())
    return parsed.alias(values.name), bad, "is not a valid calendar date-time"


def parse_datetime(
    values: pl.Series,
    source: str | Path,
    column: str,
    *,
    fmt: str | None = None,
    rows: pl.Series | None = None,
) -> pl.Series:
    """Parse datetimes like `try_parse_datetime`, raising `ConversionError` where one fails.

    The error names file, row and column of the first value that does not parse. `rows` maps
    positions to source rows (a subset).
    """
    parsed, bad, rule = try_parse_datetime(values, fmt)
    if bad is not None:
        row = int(rows[bad]) if rows is not None else bad
        raise ConversionError(f"{where(source, row, column)}: {values[bad]!r} {rule}")
    return parsed

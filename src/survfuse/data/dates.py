"""Dates read from text (CSV cohorts): ISO 8601 only, unless the file's format is declared.

A text date such as `10/09/2016` is 10 September in most of the world and 9 October in the
US; guessing the order silently shifts every prediction time, so a non-ISO date is an error
naming the file, column and row, and the user declares the format (a strftime pattern such as
`%d/%m/%Y`: `data.date_format` in the experiment config, `--date-format` on the command line).
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

__all__ = ["ISO_PATTERN", "parse_dates"]

#: ISO 8601 without a time zone: `YYYY-MM-DD`, optionally `T` or a space and `HH:MM[:SS[.f]]`.
ISO_PATTERN = r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?$"
# Tried in order on the ISO strings (`T` normalised to a space); the first that parses wins.
_ISO_FORMATS = ("%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d")
_HINT = "; declare the format with data.date_format in the config or --date-format, e.g. '%d/%m/%Y'"


def parse_dates(
    values: pl.Series,
    *,
    source: str,
    column: str,
    date_format: str | None = None,
    where: Callable[[int], str] = "row {}".format,
) -> pl.Series:
    """Text dates [N] -> Datetime(us) [N]; nulls and empty strings become null.

    Without `date_format` only ISO 8601 (`ISO_PATTERN`) is accepted; with it, every non-null
    value must match that strftime pattern. Raises ValueError naming `source`, `column`, the
    value and `where(i)` of the first offending row `i` (0-based; default `row i`).
    """

    def fail(bad: pl.Series, what: str, hint: str = "") -> None:
        idx = bad.fill_null(False).arg_true()
        i = int(idx[0])
        more = f"; {idx.len() - 1} more rows" if idx.len() > 1 else ""
        raise ValueError(
            f"{source}: column {column!r}: {text[i]!r} {what} for {where(i)}{more}{hint}"
        )

    text = values.cast(pl.String).str.strip_chars()
    present = text.is_not_null() & (text != "")
    if date_format is None:
        iso = text.str.contains(ISO_PATTERN)
        if (present & ~iso).any():
            fail(present & ~iso, "is not an ISO 8601 date (YYYY-MM-DD[ HH:MM[:SS]])", _HINT)
        norm = text.str.replace("T", " ", literal=True)
        parsed = pl.select(
            pl.coalesce(
                [norm.str.strptime(pl.Datetime("us"), f, strict=False) for f in _ISO_FORMATS]
            )
        ).to_series()
        what = "is not a valid calendar date"
    else:
        parsed = text.str.strptime(pl.Datetime("us"), date_format, strict=False)
        what = f"does not match the declared date format {date_format!r}"
    if (present & parsed.is_null()).any():
        fail(present & parsed.is_null(), what)
    return parsed.alias(values.name)

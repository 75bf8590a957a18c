"""Time-to-event outcomes derived from MEDS death events, and a cross-check of released labels.

No time-to-event label is released with INSPECT. As som-shahlab/tte-pretraining does
(`src/labeling/generate_tte_labels.py`, `TimeHorizonEventLabeler_TTE.label`), the event time of
a prediction is its subject's first death event strictly after `prediction_time`; without one,
the prediction is censored at the subject's last timed event. A death at or before
`prediction_time` is ignored (counted), and a prediction whose subject has no event after it has
`time = 0` (counted: no follow-up).

Released horizon labels are recomputed from the same facts the way femr's
`TimeHorizonEventLabeler` does (INSPECT_public `ehr/2_generate_labels_and_features.py`): `True`
when a death falls in (prediction_time + 1 minute, prediction_time + N days], else `Censored`
when the timeline ends before prediction_time + N days, else `False`.
"""

from __future__ import annotations

from typing import Any

import polars as pl

__all__ = ["US_PER_DAY", "crosscheck_labels", "derive_outcomes"]

US_PER_DAY = 86_400 * 1_000_000
_MINUTE_US = 60 * 1_000_000


def derive_outcomes(
    keys: pl.DataFrame, deaths: pl.DataFrame, last_event: pl.DataFrame
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Event time and indicator for each `(subject_id, prediction_time)` row of `keys`.

    deaths: `subject_id`, `time` (every death event); last_event: `subject_id`, `last_time`.
    Returns `keys` (row order kept) with `death_time` (first death after prediction_time),
    `last_time`, `time` (Float64 days, >= 0) and `event` (Boolean), and the counts.
    """
    k = keys.with_row_index("_i").sort("prediction_time")
    d = deaths.select("subject_id", pl.col("time").alias("death_time")).sort("death_time")
    after = k.join_asof(
        d, left_on="prediction_time", right_on="death_time", by="subject_id",
        strategy="forward", allow_exact_matches=False, check_sortedness=False,
    )  # fmt: skip
    before = k.join_asof(
        d.rename({"death_time": "death_before"}), left_on="prediction_time",
        right_on="death_before", by="subject_id", strategy="backward", check_sortedness=False,
    )  # fmt: skip
    out = (
        after.join(before.select("_i", "death_before"), on="_i")
        .join(last_event.select("subject_id", "last_time"), on="subject_id", how="left")
        .sort("_i")
    )
    end = pl.coalesce("death_time", "last_time")
    days = (end - pl.col("prediction_time")).dt.total_microseconds() / US_PER_DAY
    out = out.with_columns(
        pl.col("death_time").is_not_null().alias("event"),
        days.alias("_days"),
    )
    no_follow = out["_days"].is_null() | (out["_days"] < 0)
    out = out.with_columns(
        pl.when(no_follow).then(0.0).otherwise(pl.col("_days")).cast(pl.Float64).alias("time")
    )
    counts = {
        "rows": out.height,
        "rows_event": int(out["event"].sum()),
        "rows_censored": int((~out["event"]).sum()),
        "rows_death_at_or_before_prediction": int(out["death_before"].is_not_null().sum()),
        "rows_no_followup_time_0": int(no_follow.sum()),
        "rows_subject_without_ehr": int(out["last_time"].is_null().sum()),
        "median_time_days": float(out["time"].median() or 0.0),  # type: ignore[arg-type]
    }
    return out.select(*keys.columns, "death_time", "last_time", "time", "event"), counts


def _derived(horizon_days: int) -> pl.Expr:
    pt = pl.col("prediction_time")
    h = pl.duration(days=horizon_days)
    death_in = (
        pl.col("death_time").is_not_null()
        & (pl.col("death_time") >= pt + pl.duration(microseconds=_MINUTE_US))
        & (pl.col("death_time") <= pt + h)
    )
    ended = pl.col("last_time").is_null() | (pl.col("last_time") < pt + h)
    return (
        pl.when(death_in)
        .then(pl.lit("True"))
        .when(ended)
        .then(pl.lit("Censored"))
        .otherwise(pl.lit("False"))
    )


def crosscheck_labels(
    df: pl.DataFrame, horizons: dict[str, int]
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Compare released horizon labels with the ones the MEDS death events imply.

    df: rows with `subject_id`, `prediction_time`, `death_time`, `last_time`, `impression_id`
    and the label columns of `horizons` (label column -> days). Returns the mismatching rows
    (one per row x label) and, per label, the released x derived table and mismatch counts.
    """
    parts = []
    summary: dict[str, Any] = {}
    for col, days in horizons.items():
        if col not in df.columns:
            continue
        x = df.select(
            "impression_id",
            "subject_id",
            "prediction_time",
            pl.lit(col).alias("label"),
            pl.col(col).alias("released"),
            _derived(days).alias("derived"),
            ((pl.col("death_time") - pl.col("prediction_time")).dt.total_microseconds()
             / US_PER_DAY).alias("death_days"),
            ((pl.col("last_time") - pl.col("prediction_time")).dt.total_microseconds()
             / US_PER_DAY).alias("followup_days"),
        )  # fmt: skip
        table = x.group_by("released", "derived").len().sort("released", "derived")
        grid: dict[str, dict[str, int]] = {}
        for r in table.iter_rows(named=True):
            grid.setdefault(str(r["released"]), {})[str(r["derived"])] = int(r["len"])
        bad = x.filter(pl.col("released").is_not_null() & (pl.col("released") != pl.col("derived")))
        summary[col] = {
            "horizon_days": days,
            "table": grid,
            "compared": int(x["released"].is_not_null().sum()),
            "mismatches": bad.height,
            "true_without_death": int(((x["released"] == "True") & (x["derived"] != "True")).sum()),
            "false_with_death": int(((x["released"] == "False") & (x["derived"] == "True")).sum()),
        }
        parts.append(bad)
    schema = pl.Schema(
        [
            ("impression_id", pl.String()),
            ("subject_id", pl.Int64()),
            ("prediction_time", pl.Datetime("us")),
            ("label", pl.String()),
            ("released", pl.String()),
            ("derived", pl.String()),
            ("death_days", pl.Float64()),
            ("followup_days", pl.Float64()),
        ]
    )
    mism = pl.concat([p.cast(schema) for p in parts]) if parts else pl.DataFrame(schema=schema)
    return mism, summary

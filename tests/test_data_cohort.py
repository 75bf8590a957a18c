"""Cohort validation: every rule gives an error naming the column and the offending subject."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from survfuse.data.cohort import Cohort, CohortError, load_cohort, validate_cohort
from survfuse.registry import UnknownNameError


def _cohort(**overrides: list) -> pl.DataFrame:
    cols: dict[str, list] = {
        "subject_id": [1, 2, 2, 3],
        "prediction_time": [
            datetime(2020, 1, 1),
            datetime(2020, 1, 1),
            datetime(2021, 6, 1, 12, 30),
            datetime(2019, 3, 4),
        ],
        "time": [10.0, 5.5, 0.0, 100.0],
        "event": [1, 0, 1, 0],
        "site": ["A", "A", "A", "B"],
        "mace_time": [3.0, 4.0, 5.0, 6.0],
        "mace_event": [True, False, False, True],
    }
    cols.update(overrides)
    return pl.DataFrame(cols, strict=False)


def test_valid_cohort_is_normalised() -> None:
    c = Cohort(_cohort())
    assert c.df.schema["subject_id"] == pl.Int64
    assert c.df.schema["prediction_time"] == pl.Datetime("us")
    assert c.df.schema["time"] == pl.Float64
    assert c.df.schema["event"] == pl.Boolean
    assert c.df.schema["site"] == pl.String
    assert c.df.columns[:5] == ["subject_id", "prediction_time", "time", "event", "site"]
    assert c.tasks == ["default", "mace"]
    t, e = c.outcome()
    np.testing.assert_array_equal(t, [10.0, 5.5, 0.0, 100.0])
    np.testing.assert_array_equal(e, [True, False, True, False])
    t, e = c.outcome("mace")
    assert t.dtype == np.float64 and e.dtype == bool
    np.testing.assert_array_equal(e, [True, False, False, True])
    with pytest.raises(UnknownNameError, match="did you mean 'mace'"):
        c.outcome("macee")
    assert c.sites == ["A", "B"]
    assert c.keys().columns == ["subject_id", "prediction_time"]


def test_missing_column_is_named() -> None:
    with pytest.raises(CohortError, match="missing column 'event'"):
        validate_cohort(_cohort().drop("event"))


def test_missing_site_defaults() -> None:
    df = validate_cohort(_cohort().drop("site"))
    assert df["site"].to_list() == ["default"] * 4


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"time": [10.0, float("nan"), 0.0, 1.0]}, r"column 'time' is NaN .* subject 2 \(row 1"),
        ({"time": [10.0, 5.0, None, 1.0]}, r"column 'time' is missing .* subject 2 \(row 2"),
        ({"time": [10.0, 5.0, 1.0, -2.0]}, r"column 'time' is negative \(-2.0\) for subject 3"),
        ({"event": [1, 0, 2, 0]}, r"column 'event' must be 0/1.* got 2 for subject 2 \(row 2"),
        ({"event": ["yes", "no", "maybe", "no"]}, r"'event' must be 0/1.*'maybe' for subject 2"),
        ({"mace_time": [1.0, -1.0, 1.0, 1.0]}, r"column 'mace_time' is negative.* subject 2"),
        ({"mace_event": [0, 0, 0, 3]}, r"column 'mace_event' must be 0/1.* subject 3"),
        ({"subject_id": [1, 2, None, 3]}, r"column 'subject_id' is null in row 2"),
        ({"subject_id": ["1", "2", "x", "3"]}, r"'subject_id' must be an integer, got 'x'"),
    ],
)
def test_bad_values_name_column_and_subject(override: dict, pattern: str) -> None:
    with pytest.raises(CohortError, match=pattern):
        validate_cohort(_cohort(**override), source="my cohort")


def test_duplicate_key_is_named() -> None:
    df = _cohort(prediction_time=[datetime(2020, 1, 1)] * 3 + [datetime(2019, 1, 1)])
    with pytest.raises(
        CohortError, match=r"duplicate \(subject_id, prediction_time\) for subject 2"
    ):
        validate_cohort(df)


def test_unparsable_prediction_time_is_named() -> None:
    df = _cohort(prediction_time=["2020-01-01", "2020-01-02", "not a date", "2020-01-04"])
    with pytest.raises(
        CohortError, match=r"'prediction_time': 'not a date' is not an ISO 8601 date.* subject 2"
    ):
        validate_cohort(df)


def test_event_without_time_column() -> None:
    with pytest.raises(CohortError, match="'mace_event' has no matching column 'mace_time'"):
        validate_cohort(_cohort().drop("mace_time"))


def test_event_spellings() -> None:
    df = validate_cohort(_cohort(event=["1", "false", "True", "0"]))
    assert df["event"].to_list() == [True, False, True, False]
    df = validate_cohort(_cohort(event=[1.0, 0.0, 1.0, 0.0]))
    assert df["event"].to_list() == [True, False, True, False]


def test_parquet_and_csv_round_trip(tmp_path: Path) -> None:
    ref = Cohort(_cohort())
    ref.df.write_parquet(tmp_path / "c.parquet")
    ref.df.with_columns(
        pl.col("event").cast(pl.Int8), pl.col("mace_event").cast(pl.Int8)
    ).write_csv(tmp_path / "c.csv")
    for name in ("c.parquet", "c.csv"):
        got = load_cohort(tmp_path / name)
        assert got.df.equals(ref.df), name
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet"):
        load_cohort(tmp_path / "nope.parquet")


def test_real_mimic_labels_as_cohort(shared_path: Callable[..., Path]) -> None:
    # The MIMIC-IV demo death labels (100 subjects, 31 deaths, per the data README) as a cohort.
    labels = pl.read_parquet(
        shared_path("meds", "mimic_iv_demo", "labels_death_from_first_admission.parquet")
    )
    c = Cohort(labels.rename({"index_time": "prediction_time", "days": "time"}))
    assert len(c) == 100
    t, e = c.outcome()
    assert int(e.sum()) == 31
    assert (t >= 0).all()

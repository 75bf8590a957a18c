"""CSV dates: ISO 8601 only unless a format is declared (config `data.date_format`, or
`--date-format`); `10/09/2016` is never silently read day-first or month-first."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
import yaml

from survfuse.data.cohort import CohortError, load_cohort
from survfuse.experiment.config_load import load_config
from survfuse.experiment.predict import load_keys
from survfuse.experiment.rundir import RunDir
from survfuse.experiment.runner import prepare_cohort

CSV = (
    "subject_id,prediction_time,time,event,site\n"
    "1,2016-09-01,100,1,A\n"
    "2,2016-09-02T10:30:00,200,0,A\n"
    "3,10/09/2016,300,1,A\n"
)


def _write(tmp_path: Path, text: str = CSV) -> Path:
    path = tmp_path / "cohort.csv"
    path.write_text(text)
    return path


def test_non_iso_csv_date_is_an_error_naming_file_column_and_row(tmp_path: Path) -> None:
    path = _write(tmp_path)
    with pytest.raises(CohortError) as exc:
        load_cohort(path)
    msg = str(exc.value)
    assert str(path) in msg and "'prediction_time'" in msg and "'10/09/2016'" in msg
    assert "subject 3 (row 2" in msg
    assert "date_format" in msg and "\n" not in msg
    with pytest.raises(ValueError, match=r"cohort\.csv: column 'prediction_time': '10/09/2016'"):
        load_keys(path)


def test_iso_dates_parse_with_and_without_time(tmp_path: Path) -> None:
    path = _write(tmp_path, CSV.replace("10/09/2016", "2016-09-10 08:00"))
    got = load_cohort(path).df.sort("subject_id")["prediction_time"].to_list()
    assert got == [datetime(2016, 9, 1), datetime(2016, 9, 2, 10, 30), datetime(2016, 9, 10, 8)]


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("%d/%m/%Y", datetime(2016, 9, 10)), ("%m/%d/%Y", datetime(2016, 10, 9))],
)
def test_declared_format_decides_day_or_month_first(
    tmp_path: Path, fmt: str, expected: datetime
) -> None:
    path = _write(
        tmp_path,
        CSV.replace("2016-09-01", "01/09/2016").replace("2016-09-02T10:30:00", "02/09/2016"),
    )
    df = load_cohort(path, date_format=fmt).df.sort("subject_id")
    assert df["prediction_time"][2] == expected
    assert load_keys(path, date_format=fmt)["prediction_time"][2] == expected
    # a value that does not match the declared format is named, not turned into a null
    bad = _write(
        tmp_path,
        CSV.replace("2016-09-01", "01/09/2016").replace("2016-09-02T10:30:00", "2016-09-02"),
    )
    with pytest.raises(CohortError, match=r"'2016-09-02' does not match the declared date format"):
        load_cohort(bad, date_format=fmt)


def test_impossible_iso_date_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, CSV.replace("10/09/2016", "2016-02-30"))
    with pytest.raises(CohortError, match=r"'2016-02-30' is not a valid calendar date"):
        load_cohort(path)


def _config(tmp_path: Path, cohort: Path, **data: str) -> Path:
    raw = {
        "name": "dates",
        "data": {"cohort": str(cohort), "meds_root": str(tmp_path), **data},
        "encoders": {"ehr": [{"name": "ehr_counts"}]},
        "strategies": [{"name": "unimodal", "modality": "ehr"}],
        "splits": {"val_frac": 0.3, "test_frac": 0.3},
    }
    path = tmp_path / "dates.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_config_declares_the_cohort_date_format(tmp_path: Path) -> None:
    rows = "".join(f"{i},{i:02d}/09/2016,{10 * i},{i % 2},A\n" for i in range(1, 13))
    cohort = _write(tmp_path, "subject_id,prediction_time,time,event,site\n" + rows)
    with pytest.raises(CohortError, match="not an ISO 8601 date"):
        prepare_cohort(load_config(_config(tmp_path, cohort)), RunDir(tmp_path / "run_iso"))
    cfg = load_config(_config(tmp_path, cohort, date_format="%d/%m/%Y"))
    assert cfg.data.date_format == "%d/%m/%Y"
    df = prepare_cohort(cfg, RunDir(tmp_path / "run_dmy")).sort("subject_id")
    assert df["prediction_time"].to_list() == [datetime(2016, 9, d) for d in range(1, 13)]
    assert df.schema["prediction_time"] == pl.Datetime("us")

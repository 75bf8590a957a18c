"""Nested MEDS (0.1 / 0.2) and older flat MEDS -> current flat MEDS (`flatten_meds`)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from survfuse.convert import ConversionError, flatten_meds
from survfuse.convert.meds_nested import detect_layout
from survfuse.data.meds import MEDSDataset
from test_convert_miniature import MEDS01

T = dt.datetime(2015, 3, 1, 8, 30)


def _day(d: int) -> dt.datetime:
    return T + dt.timedelta(days=d)


def _patients() -> list[dict[str, Any]]:
    return [
        {"patient_id": 3, "static_measurements": [{"code": "Gender/F"}, {"code": "Race/5"}],
         "events": [
             {"time": _day(0), "measurements": [{"code": "ICD10CM/I26.99"},
                                                {"code": "LOINC/2160-0", "numeric_value": 1.1}]},
             {"time": _day(9), "measurements": [{"code": "Death Type/OMOP generated"}]},
         ]},
        {"patient_id": 1, "static_measurements": [], "events": [
            {"time": _day(-5), "measurements": [{"code": "LOINC/2160-0", "numeric_value": float("nan")}]},
            {"time": _day(40), "measurements": [{"code": "RxNorm/1"}, {"code": "MEDS_DEATH"}]},
        ]},
        {"patient_id": 2, "static_measurements": [{"code": "MEDS_DEATH"}], "events": []},
    ]  # fmt: skip


def _write(root: Path, rows: list[dict[str, Any]], schema: pa.Schema = MEDS01, **kw: Any) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    path = root / "data" / "0.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, **kw)
    return path


def test_meds01_is_flattened_with_static_rows_first(tmp_path: Path) -> None:
    _write(tmp_path / "in", _patients())
    res = flatten_meds(
        tmp_path / "in", tmp_path / "out" / "data", death_codes=["MEDS_DEATH", "Death Type/"]
    )
    df = pl.read_parquet(tmp_path / "out" / "data" / "0.parquet")
    assert df.columns == ["subject_id", "time", "code", "numeric_value"]
    assert df["subject_id"].to_list() == [3, 3, 3, 3, 3, 1, 1, 1, 2]  # input patient order
    assert df["time"].to_list()[:2] == [None, None]  # static first within the patient
    assert df["code"].to_list()[:2] == ["Gender/F", "Race/5"]
    assert df["numeric_value"].to_list()[5] is None  # NaN -> null
    assert res.counts["nan"] == 1 and res.counts["static"] == 3 and res.counts["static_deaths"] == 1
    # a trailing "/" matches a prefix; static deaths carry no time and are not events
    assert res.deaths.rows() == [(1, _day(40)), (3, _day(9))]
    assert res.last_event.rows() == [(1, _day(40)), (3, _day(9))]
    assert res.codes == sorted({"Gender/F", "Race/5", "ICD10CM/I26.99", "LOINC/2160-0",
                                "Death Type/OMOP generated", "RxNorm/1", "MEDS_DEATH"})  # fmt: skip
    assert MEDSDataset(tmp_path / "out").validate(deep=True)["strict_meds"]


def test_batches_and_row_groups_do_not_change_the_output(tmp_path: Path) -> None:
    rows = _patients() * 5
    for i, r in enumerate(rows):
        r["patient_id"] = i
    _write(tmp_path / "in", rows, row_group_size=4)
    assert pq.ParquetFile(tmp_path / "in" / "data" / "0.parquet").num_row_groups == 4
    a = flatten_meds(tmp_path / "in", tmp_path / "a" / "data", batch_rows=1)
    b = flatten_meds(tmp_path / "in", tmp_path / "b" / "data", batch_rows=10_000_000)
    da = pl.read_parquet(tmp_path / "a" / "data" / "0.parquet")
    assert da.equals(pl.read_parquet(tmp_path / "b" / "data" / "0.parquet"))
    assert da.height == 9 * 5
    assert a.deaths.equals(b.deaths) and a.last_event.equals(b.last_event)


def test_meds02_nested_and_old_flat_layouts(tmp_path: Path) -> None:
    ev = pa.struct(
        [("time", pa.timestamp("ms")), ("code", pa.string()), ("numeric_value", pa.float64())]
    )
    schema02 = pa.schema([("patient_id", pa.int64()), ("events", pa.list_(ev))])
    rows = [{"patient_id": 7, "events": [
        {"time": None, "code": "Gender/M"},
        {"time": _day(1), "code": "LOINC/1", "numeric_value": 2.5},
        {"time": _day(3), "code": "MEDS_DEATH"},
    ]}]  # fmt: skip
    _write(tmp_path / "v02", rows, schema02)
    assert detect_layout(tmp_path / "v02" / "data" / "0.parquet").kind == "nested-0.2"
    res = flatten_meds(tmp_path / "v02", tmp_path / "o2" / "data")
    df = pl.read_parquet(tmp_path / "o2" / "data" / "0.parquet")
    assert df.rows() == [
        (7, None, "Gender/M", None),
        (7, _day(1), "LOINC/1", 2.5),
        (7, _day(3), "MEDS_DEATH", None),
    ]
    assert res.deaths.rows() == [(7, _day(3))]
    flat = pl.DataFrame(
        {"patient_id": [4, 4], "time": [None, _day(2)], "code": ["A", "MEDS_DEATH"]}
    )
    (tmp_path / "v03").mkdir()
    flat.write_parquet(tmp_path / "v03" / "s.parquet")  # no data/ folder, no numeric_value
    res = flatten_meds(tmp_path / "v03", tmp_path / "o3" / "data")
    df = pl.read_parquet(tmp_path / "o3" / "data" / "s.parquet")
    assert df.columns == ["subject_id", "time", "code", "numeric_value"]
    assert df["subject_id"].to_list() == [4, 4] and res.last_event.rows() == [(4, _day(2))]


def _bad_time(tmp_path: Path, value: Any, typ: pa.DataType) -> str:
    meas = pa.struct([("code", pa.string()), ("numeric_value", pa.float32())])
    ev = pa.struct([("time", typ), ("measurements", pa.list_(meas))])
    schema = pa.schema([("patient_id", pa.int64()), ("events", pa.list_(ev))])
    good = _day(0) if typ != pa.string() else "2015-03-01 08:30:00"
    rows = [
        {"patient_id": 11, "events": [{"time": good, "measurements": [{"code": "A"}]}]},
        {"patient_id": 12, "events": [{"time": good, "measurements": [{"code": "A"}]},
                                      {"time": value, "measurements": [{"code": "B"}]}]},
    ]  # fmt: skip
    _write(tmp_path / "in", rows, schema)
    with pytest.raises(ConversionError) as info:
        flatten_meds(tmp_path / "in", tmp_path / "out" / "data")
    msg = str(info.value)
    assert "0.parquet" in msg and "row 2 (patient 12)" in msg and "'events.time'" in msg, msg
    return msg


def test_bad_nested_timestamps_name_shard_row_and_column(tmp_path: Path) -> None:
    assert "null" in _bad_time(tmp_path / "a", None, pa.timestamp("us"))
    assert "'2015-13-45 00:00:00'" in _bad_time(tmp_path / "b", "2015-13-45 00:00:00", pa.string())
    assert "31/12/2015" in _bad_time(tmp_path / "c", "31/12/2015", pa.string())
    assert "outside" in _bad_time(tmp_path / "d", dt.datetime(1700, 1, 1), pa.timestamp("us"))


def test_null_code_and_unknown_layout_are_errors(tmp_path: Path) -> None:
    rows = _patients()
    rows[1]["events"][1]["measurements"][0]["code"] = None
    _write(tmp_path / "a", rows)
    with pytest.raises(
        ConversionError, match=r"row 2 \(patient 1\), column 'events.measurements.code'"
    ):
        flatten_meds(tmp_path / "a", tmp_path / "oa" / "data")
    (tmp_path / "b").mkdir()
    pl.DataFrame({"person": [1]}).write_parquet(tmp_path / "b" / "x.parquet")
    with pytest.raises(ConversionError, match="no 'patient_id' or 'subject_id'"):
        flatten_meds(tmp_path / "b", tmp_path / "ob" / "data")

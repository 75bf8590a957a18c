"""MEDS reading and windowing: schema checks, hand-checked real subjects, no leakage."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from survfuse.data.meds import WINDOW_SCHEMA, MEDSDataset, MEDSSchemaError

SORT = ["subject_id", "prediction_time", "time"]


def _reference_window(
    events: pl.DataFrame, keys: pl.DataFrame, lookback_days: float | None = None
) -> pl.DataFrame:
    """Brute force: one plain filter per key (the definition, independent of the joins)."""
    parts = []
    for sid, pt in keys.unique().iter_rows():
        ev = events.filter(pl.col("subject_id") == sid)
        keep = pl.col("time").is_null() | (pl.col("time") <= pt)
        if lookback_days is not None:
            keep = pl.col("time").is_null() | (
                (pl.col("time") <= pt) & (pl.col("time") >= pt - timedelta(days=lookback_days))
            )
        parts.append(ev.filter(keep).with_columns(pl.lit(pt).alias("prediction_time")))
    if not parts:
        return pl.DataFrame(schema=WINDOW_SCHEMA)
    return (
        pl.concat(parts)
        .select(list(WINDOW_SCHEMA))
        .cast(WINDOW_SCHEMA)  # type: ignore[arg-type]
        .sort(SORT, nulls_last=False, maintain_order=True)
    )


def _write(root: Path, shards: dict[str, pl.DataFrame]) -> MEDSDataset:
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name, df in shards.items():
        path = root / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        df.write_parquet(path)
    return MEDSDataset(root)


# ----------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def mimic(shared_path: Callable[..., Path]) -> Path:
    """../shared/data/meds/mimic_iv_demo (skips when missing; fails under CI)."""
    return shared_path("meds", "mimic_iv_demo")


@pytest.fixture(scope="module")
def pbc2(shared_path: Callable[..., Path]) -> Path:
    """../shared/data/meds/pbc2 (skips when missing; fails under CI)."""
    return shared_path("meds", "pbc2")


def test_mimic_demo_validates(mimic: Path) -> None:
    ds = MEDSDataset(mimic)
    info = ds.validate(deep=True)
    # counts from the data README: 100 subjects, 916,166 events; one static row (gender) each
    assert info == {
        "n_shards": 1,
        "n_events": 916_166,
        "strict_meds": True,
        "n_static": 100,
        "n_subjects": 100,
    }
    assert ds.input_files() == [mimic / "data" / "0.parquet", mimic / "metadata" / "dataset.json"]


def _mimic_keys(mimic: Path) -> pl.DataFrame:
    labels = pl.read_parquet(mimic / "labels_death_from_first_admission.parquet")
    return labels.select("subject_id", pl.col("index_time").alias("prediction_time"))


def test_mimic_hand_checked_subjects(mimic: Path) -> None:
    # Numbers checked by hand with plain polars on data/0.parquet:
    #   ev = df.filter(subject_id == S); w = ev.filter(time.is_null() | (time <= index_time))
    # subject 10000032 (index_time 2180-05-06 22:23:00, its first admission): 1,523 events in
    # total, 82 in the window (1 static GENDER//F, MEDS_BIRTH, labs from 2180-03-23 on, and the
    # admission itself at exactly index_time); 6 within a 30-day look-back (incl. the static row).
    # subject 10001217 (index_time 2157-11-18 22:56:00): 3,337 events, 63 in the window, 62 with
    # a 30-day look-back.
    ds = MEDSDataset(mimic)
    keys = _mimic_keys(mimic).filter(pl.col("subject_id").is_in([10000032, 10001217]))
    w = ds.windowed(keys)
    assert w.schema == pl.Schema(WINDOW_SCHEMA)
    counts = dict(w.group_by("subject_id").len().iter_rows())
    assert counts == {10000032: 82, 10001217: 63}
    s1 = w.filter(pl.col("subject_id") == 10000032)
    assert s1["code"][0] == "GENDER//F" and s1["time"][0] is None  # static first
    assert s1["code"][1] == "MEDS_BIRTH"
    assert s1["time"][-1] == datetime(2180, 5, 6, 22, 23)  # inclusive: time == prediction_time
    assert s1["code"][-1].startswith("HOSPITAL_ADMISSION//URGENT")
    lb = ds.windowed(keys, lookback_days=30)
    assert dict(lb.group_by("subject_id").len().iter_rows()) == {10000032: 6, 10001217: 62}


def test_mimic_all_subjects_match_brute_force(mimic: Path) -> None:
    ds = MEDSDataset(mimic)
    keys = _mimic_keys(mimic)
    events = pl.read_parquet(mimic / "data" / "0.parquet")
    got = ds.windowed(keys, batch_size=16)
    ref = _reference_window(events, keys)
    assert got.equals(ref)
    assert got.height == 6163  # = sum of the per-subject window sizes of the brute force
    timed = got.filter(pl.col("time").is_not_null())
    assert (timed["time"] <= timed["prediction_time"]).all()


def test_pbc2_hand_checked_subjects(pbc2: Path) -> None:
    # Checked by hand with plain polars on pbc2/data/0.parquet (visits anchored at 2000-01-01):
    # subject 1 at its 2nd visit (2000-07-11 00:07:34): 27 events in total, 26 in the window
    # (everything but MEDS_DEATH on 2001-02-04), serum bilirubin [14.5, 21.3]; with a 365-day
    # look-back 25 (MEDS_BIRTH 1941 drops out, the static GENDER row stays).
    # subject 2 at 2003-01-01: 107 events, 48 in the window, bilirubin [1.1, 0.8, 1.0, 1.9]
    # (visits 2000-01-01, 2000-07-01, 2000-12-31, 2002-02-07); 12 with a 365-day look-back.
    ds = MEDSDataset(pbc2)
    assert ds.validate() == {"n_shards": 1, "n_events": 23_455, "strict_meds": True}
    keys = pl.DataFrame(
        {
            "subject_id": [1, 2],
            "prediction_time": [datetime(2000, 7, 11, 0, 7, 34), datetime(2003, 1, 1)],
        }
    )
    w = ds.windowed(keys)
    assert dict(w.group_by("subject_id").len().iter_rows()) == {1: 26, 2: 48}
    bili = w.filter(pl.col("code") == "LAB//serBilir").group_by("subject_id").agg("numeric_value")
    got = {k: np.round(v, 3).tolist() for k, v in bili.iter_rows()}
    assert got == {1: [14.5, 21.3], 2: [1.1, 0.8, 1.0, 1.9]}
    assert "MEDS_DEATH" not in w["code"].to_list()
    lb = ds.windowed(keys, lookback_days=365)
    assert dict(lb.group_by("subject_id").len().iter_rows()) == {1: 25, 2: 12}


def test_appending_future_events_changes_nothing(tmp_path: Path, pbc2: Path) -> None:
    """Leakage guard: events after prediction_time, in existing or new shards, never appear."""
    events = pl.read_parquet(pbc2 / "data" / "0.parquet")
    first_visit = datetime(2000, 1, 1)
    rng = np.random.default_rng(0)
    subjects = events["subject_id"].unique().sort()
    keys = pl.DataFrame(
        {
            "subject_id": subjects,
            "prediction_time": [
                first_visit + timedelta(days=float(d)) for d in rng.uniform(0, 2000, len(subjects))
            ],
        }
    ).with_columns(pl.col("prediction_time").cast(pl.Datetime("us")))
    before = _write(tmp_path / "before", {"0.parquet": events})
    ref = before.windowed(keys)
    assert ref.height > 0

    future = keys.select(
        "subject_id",
        # 1 microsecond after prediction_time (the tightest leak) and much later
        pl.concat_list(
            pl.col("prediction_time") + pl.duration(microseconds=1),
            pl.col("prediction_time") + pl.duration(days=400),
        ).alias("time"),
    ).explode("time")
    future = future.with_columns(
        pl.lit("FUTURE//LEAK").alias("code"), pl.lit(99.0, dtype=pl.Float32).alias("numeric_value")
    )
    mixed = pl.concat([events, future.head(future.height // 2)]).sample(
        fraction=1.0, shuffle=True, seed=0
    )
    after = _write(
        tmp_path / "after",
        {"0.parquet": mixed, "more/1.parquet": future.tail(future.height - future.height // 2)},
    )
    got = after.windowed(keys)
    assert "FUTURE//LEAK" not in got["code"].to_list()
    # same rows; ties in time may come in another file order after the shuffle
    tie_order = ["subject_id", "prediction_time", "time", "code", "numeric_value"]
    assert got.sort(tie_order, nulls_last=False).equals(ref.sort(tie_order, nulls_last=False))
    for lookback in (30.0, 365.0):
        assert (
            after.windowed(keys, lookback_days=lookback)
            .sort(tie_order)
            .equals(before.windowed(keys, lookback_days=lookback).sort(tie_order))
        )


# ----------------------------------------------------------------------------- synthetic
def _synthetic(n_subjects: int, n_events: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    base = datetime(2010, 1, 1)
    sid = rng.integers(0, n_subjects, n_events)
    offs = rng.integers(0, 3650 * 24, n_events)
    static = rng.random(n_events) < 0.05
    return pl.DataFrame(
        {
            "subject_id": sid.astype(np.int64),
            "time": [
                None if s else base + timedelta(hours=int(o))
                for s, o in zip(static, offs, strict=True)
            ],
            "code": [f"C{c}" for c in rng.integers(0, 20, n_events)],
            "numeric_value": np.where(
                rng.random(n_events) < 0.5, np.nan, rng.normal(size=n_events)
            ),
        },
        schema={
            "subject_id": pl.Int64,
            "time": pl.Datetime("us"),
            "code": pl.String,
            "numeric_value": pl.Float32,
        },
    ).with_columns(pl.col("numeric_value").fill_nan(None))


def test_subjects_across_shards_and_batches(tmp_path: Path) -> None:
    events = _synthetic(40, 3000, seed=1)
    # shard 0 holds subjects < 20 only; the rest is spread over two shards (subjects span them)
    low = events.filter(pl.col("subject_id") < 20)
    high = events.filter(pl.col("subject_id") >= 20)
    ds = _write(
        tmp_path,
        {"a.parquet": low, "b/0.parquet": high[::2], "b/1.parquet": high[1::2]},
    )
    rng = np.random.default_rng(2)
    keys = pl.DataFrame(
        {
            "subject_id": np.repeat(np.arange(45), 2),  # 40..44 have no events at all
            "prediction_time": [
                datetime(2010, 1, 1) + timedelta(days=float(d)) for d in rng.uniform(0, 4000, 90)
            ],
        }
    )
    frames = list(ds.iter_windowed(keys, batch_size=7))
    seen: set[tuple] = set()
    for f in frames:
        assert f.schema == pl.Schema(WINDOW_SCHEMA)
        fkeys = set(f.select("subject_id", "prediction_time").unique().iter_rows())
        assert len(fkeys) <= 7
        assert not (fkeys & seen), "a key's rows were split over two frames"
        seen |= fkeys
        assert f.equals(f.sort(SORT, nulls_last=False, maintain_order=True))
    ref = _reference_window(events, keys)
    assert (
        ds.windowed(keys, batch_size=7)
        .sort([*SORT, "code", "numeric_value"], nulls_last=False)
        .equals(ref.sort([*SORT, "code", "numeric_value"], nulls_last=False))
    )
    assert ds.subject_shards().filter(pl.col("subject_id") >= 20)["shard"].n_unique() == 2


def test_chunked_reading_of_sorted_shards(tmp_path: Path) -> None:
    # a shard in MEDS order (subject, time, static first) larger than chunk_rows is read in
    # row slices cut at subject boundaries; the result must not change
    events = _synthetic(30, 4000, seed=5).sort(
        "subject_id", "time", nulls_last=False, maintain_order=True
    )
    _write(tmp_path, {"0.parquet": events})
    keys = pl.DataFrame(
        {
            "subject_id": np.repeat(np.arange(30), 3),
            "prediction_time": [
                datetime(2010, 1, 1) + timedelta(days=float(d))
                for d in np.random.default_rng(6).uniform(0, 4000, 90)
            ],
        }
    )
    ref = _reference_window(events, keys, 500.0)
    for chunk_rows in (1, 97, 1000, 10**9):
        ds = MEDSDataset(tmp_path, chunk_rows=chunk_rows)
        chunks = list(ds._read_chunks(ds._shards[0], keys["subject_id"]))
        assert sum(c.height for c in chunks) == events.height
        if chunk_rows < events.height:
            assert len(chunks) > 1
            firsts = [c["subject_id"][0] for c in chunks]
            lasts = [c["subject_id"][-1] for c in chunks]
            assert all(a < b for a, b in zip(lasts[:-1], firsts[1:], strict=True))
        got = ds.windowed(keys, lookback_days=500.0, batch_size=4)
        assert got.equals(ref), chunk_rows


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 10_000),
    lookback=st.one_of(st.none(), st.floats(0, 2000)),
    batch_size=st.integers(1, 9),
)
def test_window_property(
    tmp_path: Path, seed: int, lookback: float | None, batch_size: int
) -> None:
    events = _synthetic(8, 300, seed)
    root = tmp_path / f"p{seed}_{batch_size}"
    if root.exists():
        shutil.rmtree(root)
    ds = _write(root, {"0.parquet": events[:150], "1.parquet": events[150:]})
    rng = np.random.default_rng(seed)
    keys = pl.DataFrame(
        {
            "subject_id": rng.integers(0, 10, 12),
            "prediction_time": [
                datetime(2010, 1, 1) + timedelta(hours=int(h))
                for h in rng.integers(0, 3650 * 24, 12)
            ],
        }
    )
    got = ds.windowed(keys, lookback_days=lookback, batch_size=batch_size)
    ref = _reference_window(events, keys, lookback)
    order = [*SORT, "code", "numeric_value"]
    assert got.sort(order, nulls_last=False).equals(ref.sort(order, nulls_last=False))


# ----------------------------------------------------------------------------- errors
def test_schema_errors_name_file_and_column(tmp_path: Path) -> None:
    good = _synthetic(3, 20, seed=0)
    with pytest.raises(MEDSSchemaError, match=r"bad\.parquet lacks required column 'code'"):
        _write(tmp_path / "a", {"bad.parquet": good.drop("code")})
    with pytest.raises(MEDSSchemaError, match=r"column 'subject_id' must be int64, got String"):
        _write(
            tmp_path / "b", {"0.parquet": good.with_columns(pl.col("subject_id").cast(pl.String))}
        )
    with pytest.raises(MEDSSchemaError, match=r"column 'time' must be timestamp"):
        _write(tmp_path / "c", {"0.parquet": good.with_columns(pl.col("time").cast(pl.String))})
    (tmp_path / "d" / "data").mkdir(parents=True)
    (tmp_path / "d" / "data" / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(MEDSSchemaError, match=r"x\.parquet is not a readable parquet file"):
        MEDSDataset(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="no data/ folder"):
        MEDSDataset(tmp_path / "nowhere")


def test_castable_shards_are_accepted(tmp_path: Path) -> None:
    # int32 ids, ns timestamps, float64 values, no numeric_value column: readable, not strict MEDS
    ev = _synthetic(3, 50, seed=0)
    loose = ev.with_columns(
        pl.col("subject_id").cast(pl.Int32),
        pl.col("time").cast(pl.Datetime("ns")),
    ).drop("numeric_value")
    ds = _write(tmp_path, {"0.parquet": loose})
    assert ds.validate()["strict_meds"] is False
    keys = pl.DataFrame({"subject_id": [0, 1], "prediction_time": [datetime(2015, 1, 1)] * 2})
    w = ds.windowed(keys)
    assert w.schema == pl.Schema(WINDOW_SCHEMA)
    assert w["numeric_value"].null_count() == w.height
    ref = _reference_window(
        ev.with_columns(pl.lit(None, dtype=pl.Float32).alias("numeric_value")), keys
    )
    assert w.sort([*SORT, "code"], nulls_last=False).equals(
        ref.sort([*SORT, "code"], nulls_last=False)
    )


def test_key_errors(tmp_path: Path) -> None:
    ds = _write(tmp_path, {"0.parquet": _synthetic(5, 200, seed=0)})
    with pytest.raises(MEDSSchemaError, match="missing column 'prediction_time'"):
        ds.windowed(pl.DataFrame({"subject_id": [1]}))
    with pytest.raises(MEDSSchemaError, match=r"'prediction_time' is null in row 1"):
        ds.windowed(
            pl.DataFrame({"subject_id": [1, 2], "prediction_time": [datetime(2001, 1, 1), None]})
        )
    with pytest.raises(ValueError, match="lookback_days must be >= 0"):
        ds.windowed(
            pl.DataFrame({"subject_id": [1], "prediction_time": [datetime(2001, 1, 1)]}),
            lookback_days=-1,
        )
    empty = ds.windowed(
        pl.DataFrame({"subject_id": [999_999], "prediction_time": [datetime(2001, 1, 1)]})
    )
    assert empty.height == 0 and empty.schema == pl.Schema(WINDOW_SCHEMA)

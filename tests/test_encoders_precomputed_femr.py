"""`precomputed` reads femr's `compute_features` output as femr writes it (CLMBR / MOTOR).

`femr.models.transformer.compute_features` returns {"subject_ids" int64 [M], "feature_times"
datetime64[s] [M] (the last event at or before each prediction), "features" float32 [M, D]};
users save it with `np.savez(path, **features)`. The reference for the join is femr's own
`femr.featurizers.join_labels` (femr/featurizers/core.py), transcribed below with its assertion
turned into "no match" so that rows with no EHR before the prediction can be compared.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from survfuse.data.quality import manifest_rows
from survfuse.encoders import build_encoder

T0 = np.datetime64("2020-01-01T00:00:00", "s")
DAY = np.timedelta64(86400, "s")


def femr_join_labels(features: dict[str, np.ndarray], labels: list[tuple[int, Any]]) -> list[Any]:
    """femr.featurizers.join_labels, index per label (None where femr would assert)."""
    order = np.lexsort((features["feature_times"], features["subject_ids"]))
    out: list[Any] = []
    for subject_id, prediction_time in sorted(labels):  # femr iterates labels sorted
        if len(order) == 0:
            out.append(((subject_id, prediction_time), None))
            continue
        feature_index = 0  # femr keeps it across labels; restarting gives the same index
        while (feature_index + 1) < len(order):
            nxt = order[feature_index + 1]
            next_key = (features["subject_ids"][nxt], features["feature_times"][nxt])
            if next_key <= (subject_id, prediction_time):
                feature_index += 1
            else:
                break
        i = order[feature_index]
        ok = (
            features["subject_ids"][i] == subject_id
            and features["feature_times"][i] <= prediction_time
        )
        out.append(((subject_id, prediction_time), int(i) if ok else None))
    by_label = dict(out)
    return [by_label[lab] for lab in labels]


def femr_output(rng: np.random.Generator, n_subjects: int = 6, d: int = 5) -> dict[str, Any]:
    """A compute_features-shaped dict: some subjects with several feature times, in any order."""
    sids, times = [], []
    for s in range(1, n_subjects + 1):
        for k in sorted(rng.choice(30, size=int(rng.integers(0, 4)), replace=False)):
            sids.append(s)
            times.append(T0 + int(k) * DAY + int(rng.integers(0, 3600)) * np.timedelta64(1, "s"))
    perm = rng.permutation(len(sids))
    return {
        "subject_ids": np.asarray(sids, np.int64)[perm],
        "feature_times": np.asarray(times, "datetime64[s]")[perm],
        "features": rng.normal(size=(len(sids), d)).astype(np.float32),
    }


def cohort_of(labels: list[tuple[int, Any]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "subject_id": [s for s, _ in labels],
            "prediction_time": [t.astype("datetime64[us]").item() for _, t in labels],
        }
    )


def test_femr_npz_as_of_join_matches_femr_join_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for rep in range(5):
        feats = femr_output(rng)
        path = tmp_path / f"clmbr_{rep}.npz"
        np.savez(path, **feats)  # what a user does with compute_features' dict
        labels = [
            (int(s), T0 + int(rng.integers(-3, 35)) * DAY) for s in rng.integers(1, 8, size=25)
        ]
        labels += [(int(s), t) for s, t in zip(feats["subject_ids"][:3], feats["feature_times"][:3], strict=True)]  # fmt: skip
        ref = femr_join_labels(feats, labels)
        f = build_encoder("precomputed", path=path, modality="ehr").encode(cohort_of(labels), None)
        want_present = np.array([i is not None for i in ref])
        np.testing.assert_array_equal(f.present, want_present)
        for row, i in enumerate(ref):
            want = feats["features"][i] if i is not None else np.zeros(5, np.float32)
            np.testing.assert_array_equal(f.pooled[row], want)
        # a prediction exactly at a feature time uses it (feature_time <= prediction_time)
        assert f.present[-3:].all()
        records = f.meta["manifest"]
        assert len(records) == int((~want_present).sum())
        assert {r["status"] for r in records} <= {"no_study"}
        assert all(r["reason"] == "no EHR features at or before prediction_time" for r in records)


def test_femr_parquet_equals_npz_and_feeds_the_data_manifest(tmp_path: Path) -> None:
    feats = {
        "subject_ids": np.array([1, 1, 2, 1], np.int64),
        "feature_times": (T0 + np.array([0, 10, 5, 20]) * DAY).astype("datetime64[s]"),
        "features": np.arange(12, dtype=np.float32).reshape(4, 3),
    }
    npz, pq = tmp_path / "motor.npz", tmp_path / "motor.parquet"
    np.savez(npz, **feats)
    pa = pytest.importorskip("pyarrow")
    pq_table = pa.table(  # timestamp[s] and a list column, as pandas / pyarrow write them
        {
            "subject_ids": feats["subject_ids"],
            "feature_times": feats["feature_times"],
            "features": list(feats["features"]),
        }
    )
    pytest.importorskip("pyarrow.parquet").write_table(pq_table, pq)
    t = dt.datetime(2020, 1, 1)
    cohort = pl.DataFrame(
        {
            "subject_id": [1, 1, 1, 2, 2, 3],
            "prediction_time": [
                t + dt.timedelta(days=12),  # -> feature time day 10 (row 1), not day 20
                t + dt.timedelta(days=25),  # -> day 20 (row 3)
                t - dt.timedelta(days=1),  # before any EHR: absent
                t + dt.timedelta(days=5),  # exactly at day 5 (row 2)
                t + dt.timedelta(days=4, hours=23),  # before it: absent
                t + dt.timedelta(days=40),  # subject not in the file: absent
            ],
        }
    )
    a = build_encoder("precomputed", path=npz, modality="ehr").encode(cohort, None)
    b = build_encoder("precomputed", path=pq, modality="ehr").encode(cohort, None)
    np.testing.assert_array_equal(a.present, [True, True, False, True, False, False])
    np.testing.assert_array_equal(a.pooled[[0, 1, 3]], feats["features"][[1, 3, 2]])
    np.testing.assert_array_equal(a.pooled[[2, 4, 5]], 0)
    np.testing.assert_array_equal(a.pooled, b.pooled)
    np.testing.assert_array_equal(a.present, b.present)
    manifest = manifest_rows(
        cohort, a.present, modality="ehr", encoder="motor", loader_manifest=a.meta["manifest"]
    )
    rows = manifest.filter(pl.col("status") != "present")
    assert rows["status"].to_list() == ["missing"] * 3
    assert set(rows["reason"].to_list()) == {"no EHR features at or before prediction_time"}
    assert rows["subject_id"].to_list() == [1, 2, 3]
    # explicit on_missing="error" still names the rows
    with pytest.raises(ValueError, match="3 of 6 cohort rows have no embedding"):
        build_encoder("precomputed", path=npz, modality="ehr", on_missing="error").encode(
            cohort, None
        )


def test_femr_duplicate_times_last_row_wins_and_modality_warning(tmp_path: Path) -> None:
    """femr's join_labels takes, of equal (subject, time) keys, the last in file order."""
    feats = {
        "subject_ids": np.array([7, 7], np.int64),
        "feature_times": np.array([T0, T0], "datetime64[s]"),
        "features": np.array([[1.0], [2.0]], np.float32),
    }
    path = tmp_path / "dup.npz"
    np.savez(path, **feats)
    labels = [(7, T0 + DAY)]
    assert femr_join_labels(feats, labels) == [1]
    with pytest.warns(UserWarning, match="set modality='ehr'"):
        f = build_encoder("precomputed", path=path).encode(cohort_of(labels), None)
    np.testing.assert_array_equal(f.pooled, [[2.0]])


def test_femr_bad_times_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(
        path,
        subject_ids=np.array([1]),
        feature_times=np.array([1577836800]),  # seconds as integers: not what femr writes
        features=np.zeros((1, 2), np.float32),
    )
    with pytest.raises(ValueError, match="'feature_times' must be datetime64"):
        build_encoder("precomputed", path=path, modality="ehr").encode(
            cohort_of([(1, T0 + DAY)]), None
        )

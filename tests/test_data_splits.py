"""Subject-level splits: disjoint, seeded, stratified, external sites, saved and reloaded."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from survfuse.data.cohort import Cohort
from survfuse.data.splits import (
    SPLITS,
    SplitError,
    attach_splits,
    check_splits,
    load_splits,
    make_splits,
    save_splits,
)
from survfuse.registry import UnknownNameError


def _cohort(n_subjects: int = 400, seed: int = 0) -> Cohort:
    """Subjects at sites A/B (development) and C; every 3rd subject has 2 prediction times."""
    rng = np.random.default_rng(seed)
    rows = []
    for sid in range(n_subjects):
        site = "ABC"[sid % 3] if sid % 5 else "C"
        for k in range(2 if sid % 3 == 0 else 1):
            rows.append(
                {
                    "subject_id": 1000 + sid,
                    "prediction_time": datetime(2020, 1, 1) + timedelta(days=30 * k + sid),
                    "time": float(rng.exponential(300)),
                    "event": bool(rng.random() < 0.3),
                    "site": site,
                }
            )
    return Cohort(pl.DataFrame(rows))


def test_split_names_and_coverage() -> None:
    c = _cohort()
    s = make_splits(c, external_sites=["C"], seed=0)
    assert s.columns == ["subject_id", "split"]
    assert set(s["split"].unique().to_list()) == set(SPLITS)
    assert s.height == c.df["subject_id"].n_unique() == s["subject_id"].n_unique()
    # all subjects of the external site, and only them, are external_test
    ext_subjects = set(c.df.filter(pl.col("site") == "C")["subject_id"].to_list())
    assert set(s.filter(pl.col("split") == "external_test")["subject_id"].to_list()) == ext_subjects


def test_multi_prediction_subject_stays_in_one_split() -> None:
    c = _cohort()
    s = make_splits(c, external_sites=["C"], seed=3)
    rows = attach_splits(c.df, s)
    per_subject = rows.group_by("subject_id").agg(pl.col("split").n_unique().alias("n"))
    assert per_subject["n"].max() == 1
    two = c.df.group_by("subject_id").len().filter(pl.col("len") == 2)["subject_id"]
    assert two.len() > 100
    assert rows.height == c.df.height
    assert rows.select("subject_id", "prediction_time").equals(c.keys())  # order kept


def test_seed_reproduces_and_changes() -> None:
    c = _cohort()
    a = make_splits(c, external_sites=["C"], seed=7)
    b = make_splits(c, external_sites=["C"], seed=7)
    d = make_splits(c, external_sites=["C"], seed=8)
    assert a.equals(b)
    assert not a.equals(d)
    # the external split does not depend on the seed
    ext = pl.col("split") == "external_test"
    assert a.filter(ext).equals(d.filter(ext))
    # row order of the cohort does not matter, only its content
    shuffled = Cohort(c.df.sample(fraction=1.0, shuffle=True, seed=1))
    assert make_splits(shuffled, external_sites=["C"], seed=7).equals(a)


def test_fractions_and_stratification() -> None:
    c = _cohort(n_subjects=3000)
    s = make_splits(c, external_sites=["C"], seed=0, val_frac=0.2, test_frac=0.1)
    dev = s.filter(pl.col("split") != "external_test")
    frac = dev.group_by("split").len().with_columns(pl.col("len") / dev.height)
    got = dict(zip(frac["split"].to_list(), frac["len"].to_list(), strict=True))
    assert got["validation"] == pytest.approx(0.2, abs=0.005)
    assert got["internal_test"] == pytest.approx(0.1, abs=0.005)
    # per-subject "any event" rate is the same in every development split (stratified)
    subj_event = c.df.group_by("subject_id").agg(pl.col("event").any())
    rates = (dev.join(subj_event, on="subject_id").group_by("split").agg(pl.col("event").mean()))[
        "event"
    ].to_numpy()
    assert rates.max() - rates.min() < 0.01


def test_no_external_sites() -> None:
    s = make_splits(_cohort(), seed=0, stratify=None)
    assert "external_test" not in s["split"].to_list()


def test_unknown_external_site_suggests() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'C'"):
        make_splits(_cohort(), external_sites=["CC"], seed=0)


def test_subject_at_external_and_development_site_is_refused() -> None:
    df = _cohort().df
    first = df["subject_id"][0]
    extra = df.filter(pl.col("subject_id") == first).with_columns(
        pl.lit("A").alias("site"), pl.col("prediction_time") + timedelta(days=999)
    )
    with pytest.raises(SplitError, match=f"subject {first} has rows at an external site"):
        make_splits(pl.concat([df, extra]), external_sites=["C"], seed=0)


def test_save_load_round_trip(tmp_path: Path) -> None:
    s = make_splits(_cohort(), external_sites=["C"], seed=0)
    for name in ("splits.parquet", "splits.csv"):
        path = save_splits(s, tmp_path / "run" / name)
        assert load_splits(path).equals(s)


def test_overlapping_splits_are_refused(tmp_path: Path) -> None:
    s = pl.DataFrame({"subject_id": [1, 2, 2], "split": ["train", "train", "internal_test"]})
    with pytest.raises(SplitError, match=r"subject 2 appears in several splits"):
        check_splits(s)
    s.write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(SplitError, match="subject 2"):
        load_splits(tmp_path / "bad.parquet")
    with pytest.raises(UnknownNameError, match="did you mean 'validation'"):
        check_splits(pl.DataFrame({"subject_id": [1], "split": ["valdation"]}))


def test_attach_needs_every_subject() -> None:
    c = _cohort()
    s = make_splits(c, external_sites=["C"], seed=0)
    with pytest.raises(SplitError, match="has no split"):
        attach_splits(c.df, s.filter(pl.col("subject_id") != 1000))


# ----------------------------------------------------------------------------- predefined
def test_predefined_splits_from_a_column_external_sites_override() -> None:
    from survfuse.data.splits import predefined_splits

    df = pl.DataFrame(
        {
            "subject_id": [1, 1, 2, 3, 4],
            "site": ["A", "A", "A", "B", "C"],
            "rel": ["train", "train", "validation", "internal_test", "train"],
        }
    )
    out = predefined_splits(df, "rel", ["C"])
    assert dict(zip(out["subject_id"], out["split"], strict=True)) == {
        1: "train",
        2: "validation",
        3: "internal_test",
        4: "external_test",
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["train", "validation", None], "is null for subject 3"),
        (["train", "valid", "train"], "has 'valid' for subject 2"),
        (["train", "train", "validation"], "appears in several splits"),
    ],
)
def test_predefined_splits_errors_name_column_and_subject(values, message) -> None:  # type: ignore[no-untyped-def]
    from survfuse.data.splits import SplitError, predefined_splits

    sid = [1, 2, 2] if "several" in message else [1, 2, 3]
    df = pl.DataFrame({"subject_id": sid, "site": ["A"] * 3, "rel": values})
    with pytest.raises(SplitError, match=message):
        predefined_splits(df, "rel", source="cohort x.parquet")
    with pytest.raises(SplitError, match=r"splits\.column 'nope' is not a cohort column"):
        predefined_splits(df, "nope")

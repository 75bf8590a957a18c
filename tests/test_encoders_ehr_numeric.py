"""`ehr_onehot`'s `numeric_last` columns (`survfuse.encoders.ehr_numeric`) against polars."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from survfuse.data.meds import MEDSDataset
from survfuse.encoders.ehr_counts import EHRCountsEncoder
from survfuse.encoders.ehr_numeric import CLIP, NumericStats
from survfuse.encoders.ehr_onehot import EHROneHotEncoder
from survfuse.encoders.ehr_vocab import EventBatch, fit_vocab


@pytest.fixture(scope="module")
def mimic_root(shared_path: Callable[..., Path]) -> Path:
    """../shared/data/meds/mimic_iv_demo (skip, or fail in CI, when missing)."""
    return shared_path("meds", "mimic_iv_demo")


@pytest.fixture(scope="module")
def cohort(mimic_root: Path) -> pl.DataFrame:
    labels = pl.read_parquet(mimic_root / "labels_death_from_first_admission.parquet")
    rng = np.random.default_rng(0)
    test = rng.random(labels.height) < 0.3
    return labels.select("subject_id", pl.col("index_time").alias("prediction_time")).with_columns(
        pl.Series("split", np.where(test, "internal_test", "train"))
    )


def test_last_values_match_polars_on_mimic(cohort: pl.DataFrame, mimic_root: Path) -> None:
    src = MEDSDataset(mimic_root)
    train = cohort.filter(pl.col("split") == "train")
    enc = EHROneHotEncoder(max_codes=300, max_tokens=8, numeric_last=12).fit(train, src)
    f = enc.encode(cohort, src)
    assert enc.vocab is not None
    names = enc.numeric.names(enc.vocab)
    cols = f.meta["pooled_columns"]
    assert len(names) == 12 and cols[-13:-1] == names and cols[-1] == "age_years"
    got = f.pooled[:, -13:-1]

    # independent: the raw MEDS rows at or before prediction time, latest finite value per code
    codes = [n.removeprefix("last/") for n in names]
    events = pl.read_parquet(mimic_root / "data" / "*.parquet")
    last = (
        events.with_row_index("pos")
        .join(cohort.select("subject_id", "prediction_time"), on="subject_id")
        .filter(
            (pl.col("time") <= pl.col("prediction_time"))
            & pl.col("code").is_in(codes)
            & pl.col("numeric_value").is_not_null()
            & pl.col("numeric_value").is_not_nan()
        )
        .sort("time", "pos")
        .group_by("subject_id", "code")
        .agg(pl.col("numeric_value").last().cast(pl.Float64))
    )
    # training mean / sd of every value (not only the last) of the training rows
    train_vals = (
        events.join(train.select("subject_id", "prediction_time"), on="subject_id")
        .filter((pl.col("time") <= pl.col("prediction_time")) & pl.col("code").is_in(codes))
        .drop_nulls("numeric_value")
        .group_by("code")
        .agg(
            pl.col("numeric_value").cast(pl.Float64).mean().alias("m"),
            pl.col("numeric_value").cast(pl.Float64).std(ddof=0).alias("s"),
        )
    )
    stats = dict(
        zip(train_vals["code"], zip(train_vals["m"], train_vals["s"], strict=True), strict=True)
    )
    want = np.zeros_like(got)
    row = {s: i for i, s in enumerate(cohort["subject_id"].to_list())}
    for sid, code, v in last.iter_rows():
        m, s = stats[code]
        want[row[sid], codes.index(code)] = np.clip((v - m) / s, -CLIP, CLIP)
    assert (want != 0).sum() > 200  # labs measured before the first admission exist
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # the same columns as ehr_counts' all-history last values (another implementation)
    counts = EHRCountsEncoder(windows=[None], max_codes=300, max_numeric=12).fit(train, src)
    g = counts.encode(cohort, src)
    num = [c for c in g.meta["feature_names"] if c.startswith("all/last/")]
    assert num == [f"all/{n}" for n in names]  # the same 12 most-measured codes
    idx = [g.meta["feature_names"].index(c) for c in num]
    np.testing.assert_allclose(g.pooled[:, idx], got, rtol=1e-5, atol=1e-5)


def test_numeric_last_zero_and_old_state(cohort: pl.DataFrame, mimic_root: Path) -> None:
    src = MEDSDataset(mimic_root)
    train = cohort.filter(pl.col("split") == "train")
    with_last = EHROneHotEncoder(max_codes=300, max_tokens=8, numeric_last=4).fit(train, src)
    plain = EHROneHotEncoder(max_codes=300, max_tokens=8, numeric_last=0).fit(train, src)
    f, g = with_last.encode(cohort, src), plain.encode(cohort, src)
    v = g.pooled.shape[1] - 1
    np.testing.assert_array_equal(f.pooled[:, :v], g.pooled[:, :v])
    np.testing.assert_array_equal(f.pooled[:, -1], g.pooled[:, -1])
    assert f.pooled.shape[1] == g.pooled.shape[1] + 4
    np.testing.assert_array_equal(f.token_codes, g.token_codes)
    # a state saved before `numeric_last` existed loads as no numeric column
    state = {k: a for k, a in with_last.state().items() if not k.startswith("numeric_")}
    assert len(NumericStats.from_state(state).codes) == 0
    with pytest.raises(ValueError, match="numeric_last"):
        EHROneHotEncoder(numeric_last=-1)


def test_latest_event_wins_across_batches_and_ties() -> None:
    # two keys; code 'LAB' measured at t = 1, 3, 3 (tie: the later row wins) and 2 in a later batch
    codes = pl.Series(["LAB", "LAB", "LAB", "DX", "LAB"])
    batch = EventBatch(
        key=np.array([0, 0, 0, 1, 1]),
        subject_id=np.array([1, 1, 1, 2, 2]),
        days_before=np.zeros(5),
        day_index=np.zeros(5, np.int64),
        code=codes,
        value=np.array([1.0, 5.0, 7.0, np.nan, 2.0]),
        time_us=np.array([1, 3, 3, 1, 2]),
    )
    vocab = fit_vocab(batch, max_codes=10)
    stats = NumericStats.fit(batch, vocab, 4)
    assert [vocab.codes[c] for c in stats.codes] == ["LAB"]
    acc = stats.last_values(vocab, 3)
    acc.add(batch)
    late = EventBatch(
        key=np.array([1, 0]),
        subject_id=np.array([2, 1]),
        days_before=np.zeros(2),
        day_index=np.zeros(2, np.int64),
        code=pl.Series(["LAB", "LAB"]),
        value=np.array([9.0, 0.0]),
        time_us=np.array([1, 2]),  # older than what each key has: ignored
    )
    acc.add(late)
    z = acc.result()[:, 0] * stats.sd[0] + stats.mean[0]
    np.testing.assert_allclose(z[:2], [7.0, 2.0])
    assert acc.result()[2, 0] == 0.0  # never measured

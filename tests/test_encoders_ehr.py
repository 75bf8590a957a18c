"""EHR encoders (ehr_onehot, ehr_counts, ehr_clmbr): featurisation, leakage, fitted state, store.

Real events come from the MIMIC-IV demo MEDS in ../shared/data (prediction_time = each subject's
first admission, from labels_death_from_first_admission.parquet); small MEDS copies are written
to tmp_path where a test needs to alter events.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from survfuse.data.meds import MEDSDataset
from survfuse.encoders import FeatureStore, build_encoder
from survfuse.encoders.base import Encoder
from survfuse.encoders.ehr_count_kernels import window_counts
from survfuse.encoders.ehr_counts import EHRCountsEncoder
from survfuse.encoders.ehr_onehot import EHROneHotEncoder, onehot_tokens, time_features
from survfuse.encoders.ehr_vocab import OOV_TOKEN, KeyIndex, fit_vocab, windowed_events
from survfuse.encoders.store_segments import load_chunk
from survfuse.features import ModalityFeatures

SMALL_CLMBR = dict(
    max_codes=128,
    d_model=16,
    n_layers=1,
    n_heads=2,
    max_len=64,
    epochs=1,
    batch_size=16,
    max_tokens=8,
    progress=False,
    num_threads=1,
    device="cpu",
)


def encoders() -> list[Encoder]:
    return [
        EHROneHotEncoder(max_codes=200, max_tokens=16, max_codes_per_token=32),
        EHRCountsEncoder(max_codes=200, max_numeric=16),
        build_encoder("ehr_clmbr", **SMALL_CLMBR),
    ]


def arrays(f: ModalityFeatures) -> dict[str, np.ndarray]:
    out = {"pooled": f.pooled, "present": f.present}
    for name in ("tokens", "mask", "token_codes"):
        if getattr(f, name) is not None:
            out[name] = getattr(f, name)
    return out


@pytest.fixture(scope="module")
def mimic_root(shared_path: Callable[..., Path]) -> Path:
    """../shared/data/meds/mimic_iv_demo (skip, or fail in CI, when missing)."""
    return shared_path("meds", "mimic_iv_demo")


@pytest.fixture(scope="module")
def mimic(mimic_root: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(events of the demo, cohort with prediction_time = first admission and a split)."""
    events = pl.read_parquet(mimic_root / "data" / "*.parquet")
    labels = pl.read_parquet(mimic_root / "labels_death_from_first_admission.parquet")
    rng = np.random.default_rng(0)
    test = rng.random(labels.height) < 0.3
    cohort = labels.select(
        "subject_id", pl.col("index_time").alias("prediction_time")
    ).with_columns(pl.Series("split", np.where(test, "internal_test", "train")))
    return events, cohort


def write_meds(root: Path, events: pl.DataFrame) -> MEDSDataset:
    (root / "data").mkdir(parents=True)
    events.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("time").cast(pl.Datetime("us")),
        pl.col("code").cast(pl.Utf8),
        pl.col("numeric_value").cast(pl.Float32),
    ).sort("subject_id", "time", nulls_last=False).write_parquet(root / "data" / "0.parquet")
    return MEDSDataset(root)


def before_index(events: pl.DataFrame, cohort: pl.DataFrame) -> pl.DataFrame:
    """Events at or before each subject's prediction_time, plus static events."""
    return (
        events.join(cohort.select("subject_id", "prediction_time"), on="subject_id")
        .filter(pl.col("time").is_null() | (pl.col("time") <= pl.col("prediction_time")))
        .drop("prediction_time")
    )


# ---------------------------------------------------------------------- pure featurisation
def test_onehot_tokens_by_hand() -> None:
    # key 0: static code 5; 3 days before: codes 2, 2, 7; on the index day: code 1
    key = np.array([0, 0, 0, 0, 0])
    day = np.array([-1, 3, 3, 3, 0])
    ids = np.array([5, 2, 2, 7, 1], np.int32)
    codes, feats, mask = onehot_tokens(key, day, ids, 2, max_tokens=3, max_codes_per_token=4)
    assert mask.tolist() == [[True, True, True], [False, False, False]]
    assert codes[0, 0].tolist() == [2, 7, -1, -1]  # oldest day first, duplicates removed
    assert codes[0, 1].tolist() == [1, -1, -1, -1]
    assert codes[0, 2].tolist() == [5, -1, -1, -1]  # the static token comes last
    assert (codes[1] == -1).all()
    assert feats[0, 0, 0] == pytest.approx(np.log1p(3.0))
    assert feats[0, 0, 1] == pytest.approx(np.sin(2 * np.pi * 3 / 7))
    assert feats[0, 2].tolist() == [0.0] * 7 + [1.0]
    # only 2 tokens: the static token and the most recent day survive
    codes, _, mask = onehot_tokens(key, day, ids, 1, max_tokens=2, max_codes_per_token=1)
    assert codes[0, :, 0].tolist() == [1, 5] and mask.all()


def test_time_features_static_flag() -> None:
    f = time_features(np.array([0.0, 365.25, np.nan]), np.array([False, False, True]))
    assert f.shape == (3, 8)
    assert f[1, 6] == pytest.approx(1.0)  # cos(2 pi) for the yearly period
    assert f[2].tolist() == [0.0] * 7 + [1.0]


def test_window_counts_match_pandas() -> None:
    rng = np.random.default_rng(3)
    n = 400
    key = np.sort(rng.integers(0, 7, n))
    days = rng.uniform(0, 800, n)
    days[rng.random(n) < 0.1] = np.nan  # static
    ids = rng.integers(0, 5, n).astype(np.int32)
    num = np.where(ids == 3, 0, np.where(ids == 4, 1, -1))
    val = np.where(num >= 0, rng.normal(size=n), np.nan)
    windows = [30.0, None]
    mat = window_counts(
        key, days, ids, num, val, np.arange(n), 7, vocab_size=5, n_numeric=2, windows=windows
    )
    dense = mat.toarray()
    df = pd.DataFrame({"k": key, "d": days, "id": ids, "m": num, "v": val})
    for wi, w in enumerate(windows):
        sub = df if w is None else df[df.d.isna() | (df.d <= w)]
        off = wi * 9
        counts = sub.groupby(["k", "id"]).size()
        for (k, i), c in counts.items():
            assert dense[k, off + i] == c
        assert dense[:, off : off + 5].sum() == len(sub)
        numeric = sub[sub.m >= 0]
        for (k, m), g in numeric.groupby(["k", "m"]):
            assert dense[k, off + 5 + m] == pytest.approx(g.v.iloc[-1])  # last in time order
            assert dense[k, off + 7 + m] == pytest.approx(g.v.mean())


def test_quantile_bins_match_numpy(
    mimic: tuple[pl.DataFrame, pl.DataFrame], mimic_root: Path
) -> None:
    _, cohort = mimic
    train = cohort.filter(pl.col("split") == "train")
    ev = windowed_events(MEDSDataset(mimic_root), KeyIndex.from_cohort(train), lookback_days=None)
    vocab = fit_vocab(ev, max_codes=300, n_bins=4, min_values=20)
    binned = np.flatnonzero(np.isfinite(vocab.cuts[:, 0]))
    assert binned.size > 0
    codes = ev.code.to_numpy()
    for c in binned[:5]:
        vals = ev.value[(codes == vocab.codes[c]) & np.isfinite(ev.value)]
        want = np.unique(np.quantile(vals, [0.25, 0.5, 0.75]))
        got = vocab.cuts[c][np.isfinite(vocab.cuts[c])]
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert vocab.tokens[0] == OOV_TOKEN
    # ordered by number of training subjects holding the token
    assert (np.diff(vocab.subject_counts[1:]) <= 0).all()
    assert any("//q" in t for t in vocab.tokens)


# ---------------------------------------------------------------------- leakage
def test_events_after_prediction_time_change_no_feature(
    mimic: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    events, cohort = mimic
    cohort = cohort.head(40)
    sub = events.filter(pl.col("subject_id").is_in(cohort["subject_id"].implode()))
    clean = write_meds(tmp_path / "clean", before_index(sub, cohort))
    # the real future (all later admissions, the death itself) plus the outcome code and a new
    # code with a huge value 1 microsecond after prediction_time
    leak = cohort.select(
        "subject_id", (pl.col("prediction_time") + timedelta(microseconds=1)).alias("time")
    )
    extra = pl.concat(
        [
            leak.with_columns(
                pl.lit("MEDS_DEATH").alias("code"), pl.lit(None, pl.Float32).alias("numeric_value")
            ),
            leak.with_columns(
                pl.lit("LAB//LEAK").alias("code"), pl.lit(1e6, pl.Float32).alias("numeric_value")
            ),
        ]
    ).select("subject_id", "time", "code", "numeric_value")
    leaky = write_meds(tmp_path / "leaky", pl.concat([sub, extra.cast(sub.schema)]))
    assert len(pl.read_parquet(tmp_path / "leaky" / "data")) > 5 * len(
        pl.read_parquet(tmp_path / "clean" / "data")
    )
    train = cohort.filter(pl.col("split") == "train")
    for a, b in zip(encoders(), encoders(), strict=True):
        fa = a.fit(train, clean).encode(cohort, clean)
        fb = b.fit(train, leaky).encode(cohort, leaky)
        assert a.fingerprint() == b.fingerprint(), a.name
        assert fa.present.all()
        for name, arr in arrays(fa).items():
            np.testing.assert_array_equal(arr, arrays(fb)[name], err_msg=f"{a.name}.{name}")


def test_test_only_code_not_in_vocab_and_bins_ignore_test_values(
    mimic: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    events, cohort = mimic
    cohort = cohort.head(50)
    sub = before_index(
        events.filter(pl.col("subject_id").is_in(cohort["subject_id"].implode())), cohort
    )
    base = write_meds(tmp_path / "base", sub)
    test_ids = cohort.filter(pl.col("split") != "train")["subject_id"].implode()
    # test subjects: values x1000 and a code nobody in training has, a day before the index
    changed = sub.with_columns(
        pl.when(pl.col("subject_id").is_in(test_ids))
        .then(pl.col("numeric_value") * 1000)
        .otherwise(pl.col("numeric_value"))
        .alias("numeric_value")
    )
    only_test = (
        cohort.filter(pl.col("subject_id").is_in(test_ids))
        .select("subject_id", (pl.col("prediction_time") - timedelta(days=1)).alias("time"))
        .with_columns(
            pl.lit("ONLY//TEST").alias("code"), pl.lit(5.0, pl.Float32).alias("numeric_value")
        )
    )
    moved = write_meds(tmp_path / "moved", pl.concat([changed, only_test.cast(sub.schema)]))
    train = cohort.filter(pl.col("split") == "train")
    test = cohort.filter(pl.col("split") != "train")
    for a, b in zip(encoders(), encoders(), strict=True):
        a.fit(train, base)
        b.fit(train, moved)
        sa, sb = a.state(), b.state()
        for k in ("vocab_codes", "vocab_cuts", "vocab_lut", "vocab_tokens"):
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=f"{a.name}.{k}")
        assert "ONLY//TEST" not in sb["vocab_codes"] and "ONLY//TEST" not in sb["vocab_tokens"]
        assert a.fingerprint() == b.fingerprint()
        # train rows' features are unchanged
        fa, fb = a.encode(train, base), b.encode(train, moved)
        for name, arr in arrays(fa).items():
            np.testing.assert_array_equal(arr, arrays(fb)[name], err_msg=f"{a.name}.{name}")
    # the test-only code is out of vocabulary: id 0 in the one-hot tokens of the day before index
    enc = EHROneHotEncoder(max_codes=200).fit(train, moved)
    f = enc.encode(test, moved)
    assert enc.vocab is not None and "ONLY//TEST" not in enc.vocab.codes
    assert (f.token_codes[f.mask] == 0).any(axis=-1).sum() >= test.height


# ---------------------------------------------------------------------- state, store
def test_save_load_fingerprint_and_store(
    mimic: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path, mimic_root: Path
) -> None:
    _, cohort = mimic
    src = MEDSDataset(mimic_root)
    train = cohort.filter(pl.col("split") == "train")
    test = cohort.filter(pl.col("split") != "train")
    store = FeatureStore(tmp_path / "store")
    for enc in encoders():
        direct = enc.fit(train, src).encode(test, src)
        enc.save(tmp_path / enc.name)
        back = Encoder.load(tmp_path / enc.name)
        assert type(back) is type(enc) and back.fingerprint() == enc.fingerprint()
        again = back.encode(test, src)
        for name, arr in arrays(direct).items():
            np.testing.assert_array_equal(arr, arrays(again)[name], err_msg=f"{enc.name}.{name}")
        runtime = {"progress": False, "num_threads": 1} if enc.name == "ehr_clmbr" else {}
        fresh = build_encoder(enc.name, **enc.config(), **runtime)
        with pytest.raises(RuntimeError, match="fit"):
            fresh.encode(test, src)
        stored = store.encode(fresh, test, src, fit_cohort=train, chunk_size=16, progress=False)
        assert store.last_run is not None and store.last_run.fitted == "fit"
        for name, arr in arrays(direct).items():
            np.testing.assert_array_equal(arr, arrays(stored)[name], err_msg=f"{enc.name}.{name}")
        build = build_encoder(enc.name, **enc.config(), **runtime)
        store.encode(build, test, src, fit_cohort=train, chunk_size=16, progress=False)
        assert store.last_run.fitted == "cached" and store.last_run.result_cached
    # a different fit cohort gives a different fitted state, hence fingerprint
    a = EHRCountsEncoder(max_codes=50).fit(train, src)
    b = EHRCountsEncoder(max_codes=50).fit(test, src)
    assert a.fingerprint() != b.fingerprint()


def test_shapes_order_and_duplicates(
    mimic: tuple[pl.DataFrame, pl.DataFrame], mimic_root: Path
) -> None:
    _, cohort = mimic
    src = MEDSDataset(mimic_root)
    train = cohort.filter(pl.col("split") == "train")
    rows = pl.concat([cohort.head(5)[::-1], cohort.head(2)])  # reversed + repeated keys
    for enc in encoders()[:2]:
        enc.fit(train, src)
        f = enc.encode(rows, src)
        ref = enc.encode(cohort.head(5), src)
        assert f.subject_id.tolist() == rows["subject_id"].to_list()
        np.testing.assert_array_equal(f.pooled[:5], ref.pooled[::-1])
        np.testing.assert_array_equal(f.pooled[5:], ref.pooled[:2])
    one = EHROneHotEncoder(max_codes=100, max_tokens=4, max_codes_per_token=3).fit(train, src)
    f = one.encode(cohort, src)
    assert f.token_codes.shape == (cohort.height, 4, 3) and f.tokens.shape == (cohort.height, 4, 8)
    assert f.vocab_size == 101 and f.token_codes.max() < 101 and f.token_codes.min() == -1
    assert ((f.token_codes >= 0).any(-1) == f.mask).all()
    # code frequencies, the latest values of the 32 most-measured numeric codes
    # (tests/test_encoders_ehr_numeric.py), then age_years (test_onehot_age_matches_the_raw_birth_events)
    assert f.pooled.shape[1] == 101 + 32 + 1 and f.meta["pooled_columns"][-1] == "age_years"
    np.testing.assert_allclose(f.pooled[:, :101].sum(1)[f.present], 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="position"):
        build_encoder("ehr_clmbr", position="rotery")


def _age_years(events: pl.DataFrame, cohort: pl.DataFrame) -> np.ndarray:
    """Reference: years from each row's latest MEDS_BIRTH event to prediction_time (0: none)."""
    birth = (
        events.filter(pl.col("code") == "MEDS_BIRTH")
        .group_by("subject_id")
        .agg(pl.col("time").max())
    )
    days = (
        cohort.join(birth, on="subject_id", how="left", maintain_order="left")
        .select(
            ((pl.col("prediction_time") - pl.col("time")).dt.total_microseconds() / 86_400e6)
            .fill_null(0.0)
            .alias("d")
        )["d"]
        .to_numpy()
    )
    return np.asarray(days / 365.25)


@pytest.mark.parametrize("lookback", [None, 30.0])
def test_onehot_age_matches_the_raw_birth_events(
    mimic: tuple[pl.DataFrame, pl.DataFrame], mimic_root: Path, lookback: float | None
) -> None:
    """The last pooled column is the age at prediction, also when a look-back window keeps
    the (decades old) birth event out of the tokens and counts; birth_code=None drops it."""
    events, cohort = mimic
    src = MEDSDataset(mimic_root)
    train = cohort.filter(pl.col("split") == "train")
    enc = EHROneHotEncoder(max_codes=100, max_tokens=4, lookback_days=lookback).fit(train, src)
    f = enc.encode(cohort, src)
    want = _age_years(events, cohort)
    assert (want > 18).sum() > 90
    np.testing.assert_allclose(f.pooled[:, -1], want, rtol=1e-6)
    plain = EHROneHotEncoder(max_codes=100, max_tokens=4, lookback_days=lookback, birth_code=None)
    g = plain.fit(train, src).encode(cohort, src)
    np.testing.assert_array_equal(g.pooled, f.pooled[:, :-1])
    np.testing.assert_array_equal(g.token_codes, f.token_codes)


def test_counts_age_with_finite_windows(
    mimic: tuple[pl.DataFrame, pl.DataFrame], mimic_root: Path
) -> None:
    # every window finite: the birth event (decades back) is outside all of them, yet age_years
    # must still be the years from MEDS_BIRTH to prediction_time (reference: the raw events)
    events, cohort = mimic
    src = MEDSDataset(mimic_root)
    train = cohort.filter(pl.col("split") == "train")
    enc = EHRCountsEncoder(windows=(30, 365), max_codes=100, max_numeric=8).fit(train, src)
    want = _age_years(events, cohort)
    assert (want > 18).sum() > 90  # the demo's subjects have a birth event
    mat = enc.count_matrix(cohort, src)
    assert enc.feature_names[-1] == "age_years"
    np.testing.assert_allclose(mat[:, -1].toarray().ravel(), want, rtol=1e-9)
    train_age = want[cohort["split"].to_numpy() == "train"]
    train_age = train_age[train_age > 0]
    np.testing.assert_allclose(enc.age_stats, [train_age.mean(), train_age.std()], rtol=1e-9)
    # the windows still bound the counts: nothing older than 365 days is counted
    assert enc.vocab is not None
    ref = windowed_events(src, KeyIndex.from_cohort(cohort), lookback_days=365)
    width = enc.vocab.size + 2 * len(enc.numeric_codes)
    assert int(mat[:, width : width + enc.vocab.size].sum()) == len(ref)


def _reference_onehot(
    key: np.ndarray, day_index: np.ndarray, ids: np.ndarray, n_keys: int, t_max: int, k_max: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The previous, sort-based ehr_onehot featurisation (kept as the reference for the
    compiled one): one global sort of packed (key, slot, id), ranks by cumulative sums."""
    codes = np.full((n_keys, t_max, k_max), -1, np.int32)
    feats = np.zeros((n_keys, t_max, 8), np.float32)
    mask = np.zeros((n_keys, t_max), bool)
    slot = day_index + 1
    slot = np.where(slot == 0, (1 << 18) - 1, slot).astype(np.int64)
    u = np.unique((key.astype(np.int64) << 40) | (slot << 22) | ids.astype(np.int64))
    k, s, c = u >> 40, (u >> 22) & ((1 << 18) - 1), (u & ((1 << 22) - 1)).astype(np.int32)
    idx = np.arange(u.shape[0])
    new_key = np.ones(u.shape[0], bool)
    new_key[1:] = k[1:] != k[:-1]
    new_slot = new_key.copy()
    new_slot[1:] |= s[1:] != s[:-1]
    slot_no = np.cumsum(new_slot) - 1
    rank = slot_no - np.maximum.accumulate(np.where(new_key, slot_no, 0))
    pos_in_slot = idx - np.maximum.accumulate(np.where(new_slot, idx, 0))
    is_static = s == (1 << 18) - 1
    has_static = np.zeros(n_keys, bool)
    has_static[k[is_static]] = True
    n_days = np.bincount(k[new_slot & ~is_static], minlength=n_keys)
    kept = np.minimum(n_days, t_max - has_static.astype(np.int64))
    keep = ((~is_static & (rank < kept[k])) | is_static) & (pos_in_slot < k_max)
    position = np.where(is_static, kept[k], kept[k] - 1 - rank)
    codes[k[keep], position[keep], pos_in_slot[keep]] = c[keep]
    first = keep & new_slot
    days = np.where(is_static[first], -1, s[first] - 1)
    feats[k[first], position[first]] = time_features(days.astype(np.float64), days < 0)
    mask[k[first], position[first]] = True
    return codes, feats, mask


def test_onehot_compiled_equals_reference(
    mimic: tuple[pl.DataFrame, pl.DataFrame], mimic_root: Path
) -> None:
    # random events, also out of order (the kernel then sorts them itself)
    rng = np.random.default_rng(5)
    n, n_keys = 5000, 60
    key = np.sort(rng.integers(0, n_keys, n))
    day = rng.integers(0, 400, n) * (rng.random(n) < 0.9) + rng.integers(0, 3, n)
    day[rng.random(n) < 0.05] = -1
    ids = rng.integers(0, 40, n).astype(np.int32)
    for t_max, k_max in ((8, 3), (3, 64), (1, 2)):
        want = _reference_onehot(key, day, ids, n_keys, t_max, k_max)
        perm = rng.permutation(n)
        got = onehot_tokens(
            key[perm], day[perm], ids[perm], n_keys, max_tokens=t_max, max_codes_per_token=k_max
        )
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    # the encoder on real data: tokens (padded to max_codes_per_token) and pooled
    _, cohort = mimic
    src = MEDSDataset(mimic_root)
    enc = EHROneHotEncoder(max_codes=200, max_tokens=16, max_codes_per_token=32)
    enc.fit(cohort.filter(pl.col("split") == "train"), src)
    assert enc.vocab is not None
    f = enc.encode(cohort, src)
    index = KeyIndex.from_cohort(cohort)
    ev = windowed_events(src, index, lookback_days=None)
    ev_ids = enc.vocab.transform(ev.code, ev.value)
    codes, feats, mask = _reference_onehot(ev.key, ev.day_index, ev_ids, index.n_keys, 16, 32)
    k = f.token_codes.shape[2]
    assert 1 < k <= 32 and (codes[..., k:] == -1).all()
    np.testing.assert_array_equal(f.token_codes, codes[..., :k])
    np.testing.assert_array_equal(f.tokens, feats)
    np.testing.assert_array_equal(f.mask, mask)
    pooled = np.zeros((index.n_keys, enc.vocab.size), np.float32)
    u, cnt = np.unique(ev.key * enc.vocab.size + ev_ids, return_counts=True)
    total = np.bincount(ev.key, minlength=index.n_keys)
    pooled[u // enc.vocab.size, u % enc.vocab.size] = cnt / total[u // enc.vocab.size]
    # then the numeric_last columns and age_years
    np.testing.assert_array_equal(f.pooled[:, : enc.vocab.size], pooled)


def _reference_window_counts(
    key: np.ndarray,
    days_before: np.ndarray,
    ids: np.ndarray,
    num_idx: np.ndarray,
    value: np.ndarray,
    time_us: np.ndarray,
    n_keys: int,
    vocab_size: int,
    n_numeric: int,
    windows: list[float | None],
) -> np.ndarray:
    """The previous numpy / polars ehr_counts featurisation (reference for the compiled one):
    np.unique counts, a polars group-by for last / mean after a (key, time, value) sort."""
    width = vocab_size + 2 * n_numeric
    out = np.zeros((n_keys, len(windows) * width))
    static = np.isnan(days_before)
    has_num = (num_idx >= 0) & np.isfinite(value)
    for wi, w in enumerate(windows):
        inw = static | (days_before <= w) if w is not None else np.ones(key.shape[0], bool)
        off = wi * width
        u, c = np.unique(key[inw] * vocab_size + ids[inw], return_counts=True)
        out[u // vocab_size, off + u % vocab_size] = c
        sel = np.flatnonzero(inw & has_num)
        sel = sel[np.lexsort((value[sel], time_us[sel], key[sel]))]
        frame = (
            pl.DataFrame({"k": key[sel], "m": num_idx[sel], "v": value[sel]})
            .group_by("k", "m")
            .agg(pl.col("v").last().alias("last"), pl.col("v").mean())
        )
        k, m = frame["k"].to_numpy(), frame["m"].to_numpy()
        out[k, off + vocab_size + m] = frame["last"].to_numpy()
        out[k, off + vocab_size + n_numeric + m] = frame["v"].to_numpy()
    return out


def _assert_counts_equal(got: np.ndarray, want: np.ndarray, v: int, m: int) -> None:
    """Counts, last values and age bit for bit; means to rounding (the kernel sums with Kahan
    compensation in (time, value) order, polars' group-by mean sometimes sums differently)."""
    assert got.shape == want.shape
    col = np.arange(got.shape[1])
    width = v + 2 * m
    is_mean = (col % width >= v + m) & (col < (got.shape[1] // width) * width)
    assert is_mean.sum() == m * (got.shape[1] // width)
    np.testing.assert_array_equal(got[:, ~is_mean], want[:, ~is_mean])
    np.testing.assert_allclose(got[:, is_mean], want[:, is_mean], rtol=1e-13, atol=0)


def test_counts_compiled_equals_reference(
    mimic: tuple[pl.DataFrame, pl.DataFrame], mimic_root: Path
) -> None:
    # random events with static events and tied times (the "last" tie rule, the mean's order)
    rng = np.random.default_rng(11)
    n, n_keys = 6000, 50
    key = np.sort(rng.integers(0, n_keys, n))
    t = rng.integers(0, 300, n) * 86_400_000_000
    static = rng.random(n) < 0.05
    t[static] = np.iinfo(np.int64).min
    order = np.lexsort((t, key))
    key, t, static = key[order], t[order], static[order]
    days = np.where(static, np.nan, (300 * 86_400_000_000 - t) / 86_400e6)
    ids = rng.integers(0, 30, n).astype(np.int32)
    num = np.where(ids < 6, ids, -1)
    val = np.where(num >= 0, rng.normal(0, 1, n) * rng.choice([1e-3, 1, 1e4], n), np.nan)
    val[rng.random(n) < 0.05] = np.nan
    wins: list[float | None] = [7.0, 90.0, None]
    want = _reference_window_counts(key, days, ids, num, val, t, n_keys + 3, 30, 6, wins)
    got = window_counts(
        key, days, ids, num, val, t, n_keys + 3, vocab_size=30, n_numeric=6, windows=wins
    )
    _assert_counts_equal(got.toarray(), want, 30, 6)
    # the encoder on real data, windows (30, 365, all)
    _, cohort = mimic
    src = MEDSDataset(mimic_root)
    enc = EHRCountsEncoder(max_codes=300, max_numeric=32)
    enc.fit(cohort.filter(pl.col("split") == "train"), src)
    assert enc.vocab is not None
    index = KeyIndex.from_cohort(cohort)
    ev = windowed_events(src, index, lookback_days=None)
    code_idx = enc.vocab.code_index(ev.code)
    lookup = np.full(len(enc.vocab.codes) + 1, -1, np.int64)
    lookup[enc.numeric_codes] = np.arange(len(enc.numeric_codes))
    ref = _reference_window_counts(
        ev.key,
        ev.days_before,
        enc.vocab.transform(ev.code, ev.value, code_idx),
        lookup[np.where(code_idx >= 0, code_idx, len(enc.vocab.codes))],
        ev.value,
        ev.time_us,
        index.n_keys,
        enc.vocab.size,
        len(enc.numeric_codes),
        [30.0, 365.0, None],
    )
    ref = np.concatenate([ref, enc._age(ev, index.n_keys)[:, None]], axis=1)
    mat = enc.count_matrix(cohort, src)
    _assert_counts_equal(mat.toarray(), ref[index.row_key], enc.vocab.size, len(enc.numeric_codes))
    # encode writes the pooled rows directly: the same as transforming the raw matrix
    f = enc.encode(cohort, src)
    np.testing.assert_array_equal(f.pooled, enc.pooled_from_counts(mat))
    np.testing.assert_array_equal(f.present, np.diff(mat.indptr) > 0)


class _CountingSource:
    """A MEDSDataset that counts `iter_windowed` calls (each one re-reads MEDS shards)."""

    def __init__(self, src: MEDSDataset) -> None:
        self.src, self.calls = src, 0

    def input_files(self) -> list[Path]:
        return self.src.input_files()

    def iter_windowed(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        return self.src.iter_windowed(*args, **kwargs)  # type: ignore[arg-type]


def test_store_encodes_chunk_runs_in_one_call_and_resumes(
    mimic: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path, mimic_root: Path
) -> None:
    _, cohort = mimic
    src = _CountingSource(MEDSDataset(mimic_root))
    train = cohort.filter(pl.col("split") == "train")
    enc = EHROneHotEncoder(max_codes=200, max_tokens=16, max_codes_per_token=32).fit(train, src)
    direct = enc.encode(cohort, src)
    store = FeatureStore(tmp_path / "store")
    src.calls = 0
    stored = store.encode(enc, cohort, src, chunk_size=16, progress=False)
    assert store.last_run is not None and store.last_run.n_chunks == 7
    assert src.calls == 1  # 7 chunks of 16 rows, one windowed read
    for name, arr in arrays(direct).items():
        np.testing.assert_array_equal(arr, arrays(stored)[name], err_msg=name)
    # each chunk as if encoded alone (its own token width), so caches do not depend on grouping
    chunk_root = store.last_run.directory / "chunks"
    chunk_dirs = [chunk_root / f.stem for f in chunk_root.glob("*.json")]  # format-2 refs
    assert len(chunk_dirs) == 7
    # in chunk order (chunks hold the keys sorted by subject_id)
    chunk_dirs.sort(key=lambda d: int(load_chunk(d).subject_id.min()))
    for d in chunk_dirs:
        part = load_chunk(d)
        rows = pl.DataFrame(
            {"subject_id": part.subject_id, "prediction_time": part.prediction_time}
        )
        alone = enc.encode(rows, src)
        for name, arr in arrays(alone).items():
            np.testing.assert_array_equal(arr, arrays(part)[name], err_msg=f"{d.name}.{name}")
    # resume: lost consecutive chunks (and the result) are encoded again, in one call
    for d in chunk_dirs[2:5]:
        d.with_name(f"{d.name}.json").unlink()
    shutil.rmtree(store.last_run.directory / "results")
    src.calls = 0
    again = store.encode(enc, cohort, src, chunk_size=16, progress=False)
    assert store.last_run.encoded_chunks == 3 and src.calls == 1
    for name, arr in arrays(direct).items():
        np.testing.assert_array_equal(arr, arrays(again)[name], err_msg=name)


def test_output_array_fills_and_restores_numpy_hugepage_setting() -> None:
    from survfuse.encoders import ehr_vocab

    a = ehr_vocab.output_array((4, 3, 2), np.int32, -1)
    assert a.dtype == np.int32 and a.shape == (4, 3, 2) and (a == -1).all()
    assert (ehr_vocab.output_array((5,), np.float32) == 0).all()
    switch = ehr_vocab._set_madvise_hugepage
    assert switch is not None  # numpy's private switch is where this numpy has it
    before = switch(True)
    switch(before)
    ehr_vocab.output_array((2,), bool)
    assert switch(before) == before  # the allocation left numpy's setting as it was

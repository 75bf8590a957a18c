"""ct_radiomics on real TotalSegmentator CT + references; precomputed embeddings."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
from scipy import stats

from survfuse.encoders import CTSource, FeatureStore, build_encoder
from survfuse.encoders.ct_radiomics import TISSUES, feature_names, radiomics_features
from survfuse.registry import ENCODERS

# TotalSegmentator v2 "total" task label ids of the five lung lobes (class_map["total"]:
# 10 lung_upper_lobe_left, 11 lung_lower_lobe_left, 12 lung_upper_lobe_right,
# 13 lung_middle_lobe_right, 14 lung_lower_lobe_right)
LUNG_LABELS = [10, 11, 12, 13, 14]
T0 = dt.datetime(2020, 1, 1)


def feat(vec: np.ndarray, name: str, n_bins: int = 16) -> float:
    return float(vec[feature_names(n_bins).index(name)])


def test_registered() -> None:
    assert {"ct_radiomics", "ct_monai", "precomputed"} <= set(ENCODERS.list())


def test_radiomics_matches_direct_numpy_scipy_computation() -> None:
    rng = np.random.default_rng(0)
    hu = rng.normal(-200, 400, size=(20, 18, 12)).astype(np.float32)
    cells, valid, vol = radiomics_features(hu, grid=(2, 3, 2), spacing=(1.0, 2.0, 3.0))
    assert cells.shape == (12, len(feature_names())) and valid.all()
    x = np.clip(hu, -1024, 3071).astype(np.float64)
    z = x / 1000
    assert feat(vol, "mean") == pytest.approx(z.mean(), rel=1e-5)
    assert feat(vol, "std") == pytest.approx(z.std(), rel=1e-5)
    assert feat(vol, "skewness") == pytest.approx(stats.skew(z.ravel()), abs=1e-4)
    assert feat(vol, "kurtosis") == pytest.approx(stats.kurtosis(z.ravel()), abs=1e-4)
    for name, (lo, hi) in TISSUES.items():
        assert feat(vol, f"frac_{name}") == pytest.approx(((x >= lo) & (x < hi)).mean(), abs=1e-6)
    for q in (10, 50, 90):  # histogram percentiles: within one fine bin (4095/128 HU)
        assert feat(vol, f"p{q}") == pytest.approx(np.percentile(z, q), abs=0.033)
    assert feat(vol, "absdiff_y") == pytest.approx(np.abs(np.diff(z, axis=1)).mean() / 2, rel=1e-5)
    gm = np.sqrt(
        (np.diff(z, axis=0)[:, :-1, :-1] / 1) ** 2
        + (np.diff(z, axis=1)[:-1, :, :-1] / 2) ** 2
        + (np.diff(z, axis=2)[:-1, :-1, :] / 3) ** 2
    )
    assert feat(vol, "gradmag_mean") == pytest.approx(gm.mean(), rel=1e-5)
    assert feat(vol, "gradmag_std") == pytest.approx(gm.std(), rel=1e-4)
    hist = np.histogram(x, bins=16, range=(-1024, 3071))[0] / x.size
    np.testing.assert_allclose(vol[:16], hist, atol=1e-6)
    # a cell equals the same statistic computed on its sub-volume: cell (1, 2, 0) of (2, 3, 2)
    sub = z[10:20, 12:18, 0:6]
    c = cells[(1 * 3 + 2) * 2 + 0]
    assert feat(c, "mean") == pytest.approx(sub.mean(), rel=1e-5)
    assert feat(c, "std") == pytest.approx(sub.std(), rel=1e-5)


@pytest.fixture(scope="module")
def ts(shared_path: Callable[..., Path]) -> Path:
    """../shared/data/ct/totalsegmentator with the files these tests read (skip/fail if missing)."""
    for name in (*REAL.values(), "example_seg.nii.gz"):
        shared_path("ct", "totalsegmentator", name)
    return shared_path("ct", "totalsegmentator")


def test_lung_field_on_real_ct_inside_totalsegmentator_lung_labels(ts: Path) -> None:
    ct = nib.load(ts / "example_ct_sm.nii.gz")
    hu = np.asarray(ct.dataobj, dtype=np.float32)
    seg = np.asarray(nib.load(ts / "example_seg.nii.gz").dataobj)
    lung = np.isin(seg, LUNG_LABELS)
    assert lung.sum() > 1000
    _, _, vol = radiomics_features(hu, grid=(1, 1, 1), spacing=(3.0, 3.0, 3.0), roi=lung)
    assert feat(vol, "mean") * 1000 < -600  # aerated lung
    assert feat(vol, "mean") * 1000 == pytest.approx(hu[lung].mean(), abs=0.5)
    aerated = feat(vol, "frac_lung") + feat(vol, "frac_emphysema")
    assert aerated > 0.8 and feat(vol, "frac_bone") < 0.01
    _, _, body = radiomics_features(hu, grid=(1, 1, 1), spacing=(3.0, 3.0, 3.0))
    assert feat(body, "frac_lung") < aerated  # the whole torso is much less lung than the lungs


def ct_index(ts: Path, files: dict[int, str]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "subject_id": list(files),
            "study_time": [T0] * len(files),
            "path": [str(ts / f) for f in files.values()],
        }
    )


REAL = {
    1: "example_ct_sm.nii.gz",
    2: "example_ct.nii.gz",
    3: "pulmonary_report__models__ct_cropped.nii.gz",
    4: "example_mr_sm.nii.gz",
    5: "example_ct.nii.gz",
}


def real_cohort(ids: list[int], split: list[str] | None = None) -> pl.DataFrame:
    df = pl.DataFrame(
        {"subject_id": ids, "prediction_time": [T0 + dt.timedelta(days=30)] * len(ids)}
    )
    return df.with_columns(pl.Series("split", split)) if split else df


def test_radiomics_encodes_real_volumes_with_failures_reported(tmp_path: Path, ts: Path) -> None:
    src = CTSource(ct_index(ts, REAL))
    coh = real_cohort([1, 2, 3, 4, 6])  # 4 is an MR (refused by the CT layer), 6 has no study
    enc = build_encoder("ct_radiomics", grid=[2, 2, 2])
    store = FeatureStore(tmp_path)
    f = store.encode(enc, coh, src, fit_cohort=coh[:3], chunk_size=2, progress=False)
    np.testing.assert_array_equal(f.present, [True, True, True, False, False])
    assert f.tokens is not None and f.tokens.shape == (5, 8, len(feature_names()) + 3)
    assert f.mask is not None and f.mask[:3].all() and not f.mask[3:].any()
    assert np.isfinite(np.asarray(f.tokens)).all()
    # standardised with the (three) training volumes: their pooled features have mean ~0
    np.testing.assert_allclose(np.asarray(f.pooled)[:3].mean(0), 0, atol=1e-4)
    reasons = {m["subject_id"]: (m["status"], m["reason"]) for m in f.meta["manifest"]}
    assert reasons[4][0] == "failed" and "HU" in reasons[4][1]
    assert reasons[6][0] == "no_study"
    assert store.last_run is not None
    man = pl.read_parquet(next(store.last_run.directory.glob("results/*/manifest.parquet")))
    assert sorted(man["subject_id"].to_list()) == [4, 6]
    # the grid positions ride along as the last three token features, in [0, 1]
    pos = np.asarray(f.tokens)[0, :, -3:]
    np.testing.assert_allclose(sorted(set(pos[:, 0].tolist())), [0.25, 0.75])


def test_fit_uses_the_training_split_only(tmp_path: Path, ts: Path) -> None:
    coh = real_cohort([1, 2, 3, 5], ["train", "train", "internal_test", "internal_test"])
    train = coh.filter(pl.col("split") == "train")
    src_a = CTSource(ct_index(ts, REAL))
    # alter the test subjects: different CTs for 3 and 5
    src_b = CTSource(ct_index(ts, {**REAL, 3: "example_ct_sm.nii.gz", 5: "example_mr_sm.nii.gz"}))
    fa = FeatureStore(tmp_path / "a").encode(
        build_encoder("ct_radiomics"), coh, src_a, fit_cohort=train, progress=False
    )
    enc_b = build_encoder("ct_radiomics")
    fb = FeatureStore(tmp_path / "b").encode(enc_b, coh, src_b, fit_cohort=train, progress=False)
    enc_a = build_encoder("ct_radiomics").fit(train, src_a)
    for k, v in enc_a.state().items():
        np.testing.assert_array_equal(v, enc_b.state()[k])
    np.testing.assert_array_equal(np.asarray(fa.pooled)[:2], np.asarray(fb.pooled)[:2])
    assert not np.allclose(np.asarray(fa.pooled)[2], np.asarray(fb.pooled)[2])
    # and a changed training subject does change the statistics
    src_c = CTSource(ct_index(ts, {**REAL, 2: "pulmonary_report__models__ct_cropped.nii.gz"}))
    enc_c = build_encoder("ct_radiomics").fit(train, src_c)
    assert not np.allclose(enc_c.state()["pooled_mean"], enc_a.state()["pooled_mean"])


def test_preprocessing_parameter_changes_fingerprint(ts: Path) -> None:
    coh = real_cohort([1])
    src = CTSource(ct_index(ts, REAL))
    a = build_encoder("ct_radiomics").fit(coh, src)
    b = build_encoder("ct_radiomics").fit(coh, src)
    c = build_encoder("ct_radiomics", preprocessing={"orientation": "LPS"})
    c.set_state(a.state())
    assert a.fingerprint() == b.fingerprint() and c.fingerprint() != a.fingerprint()
    with pytest.raises(ValueError, match="scale_to_unit"):
        build_encoder("ct_radiomics", preprocessing={"scale_to_unit": True})


def test_radiomics_on_simulated_volumes(sim_small: Path, tmp_path: Path) -> None:
    coh = pl.read_parquet(sim_small / "cohort.parquet").head(40)
    src = CTSource.from_index(sim_small / "ct_index.parquet")
    f = FeatureStore(tmp_path).encode(
        build_encoder("ct_radiomics"), coh, src, fit_cohort=coh[:30], chunk_size=16, progress=False
    )
    assert len(f) == 40 and f.pooled.shape[1] == len(feature_names())
    assert np.isfinite(np.asarray(f.pooled)).all()
    studies = src.studies(coh)
    np.testing.assert_array_equal(f.present, studies["path"].is_not_null().to_numpy())


# ----------------------------------------------------------------------------- precomputed
def keys_df() -> pl.DataFrame:
    return pl.DataFrame(
        {"subject_id": [3, 1, 2], "prediction_time": [T0, T0, T0 + dt.timedelta(days=1)]}
    )


def test_precomputed_parquet_npz_and_study_matching(tmp_path: Path) -> None:
    emb = np.arange(9, dtype=np.float32).reshape(3, 3)
    keys = keys_df()
    pq = tmp_path / "emb.parquet"
    keys.with_columns(pl.Series("embedding", emb.tolist())).write_parquet(pq)
    coh = keys[[1, 0, 2]]
    f = build_encoder("precomputed", path=pq).encode(coh, None)
    np.testing.assert_array_equal(f.pooled, emb[[1, 0, 2]])
    assert f.present.all()

    npz = tmp_path / "emb.npz"
    tokens = np.random.default_rng(0).normal(size=(3, 4, 2)).astype(np.float32)
    np.savez(
        npz,
        subject_id=np.array([3, 1, 2]),
        study_time=np.array(["2019-06-01", "2019-12-31", "2020-01-02"], "datetime64[us]"),
        pooled=emb,
        tokens=tokens,
    )
    g = build_encoder("precomputed", path=npz, on_missing="absent").encode(coh, None)
    # latest study at or before prediction_time; subject 2's study is at its prediction_time
    np.testing.assert_array_equal(g.present, [True, True, True])
    np.testing.assert_array_equal(g.tokens, tokens[[1, 0, 2]])  # type: ignore[index]
    early = coh.with_columns(pl.lit(T0 - dt.timedelta(days=300)).alias("prediction_time"))
    h = build_encoder("precomputed", path=npz, on_missing="absent").encode(early, None)
    # predictions on 2019-03-07 precede every study: nothing may be used (no leakage)
    np.testing.assert_array_equal(h.present, [False, False, False])
    np.testing.assert_array_equal(h.pooled, 0)


def test_precomputed_mismatched_keys_give_clear_error(tmp_path: Path) -> None:
    pq = tmp_path / "emb.parquet"
    keys_df().with_columns(pl.Series("f0", [1.0, 2.0, 3.0])).write_parquet(pq)
    coh = pl.DataFrame({"subject_id": [1, 99], "prediction_time": [T0, T0]})
    with pytest.raises(ValueError, match=r"1 of 2 cohort rows have no embedding.*'subject_id': 99"):
        build_encoder("precomputed", path=pq).encode(coh, None)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_encoder("precomputed", path=tmp_path / "none.parquet").encode(coh, None)


def test_radiomics_save_load_keeps_fitted_state(tmp_path: Path, ts: Path) -> None:
    from survfuse.encoders import Encoder

    src = CTSource(ct_index(ts, REAL))
    enc = build_encoder("ct_radiomics", grid=[2, 2, 1]).fit(real_cohort([1]), src)
    enc.save(tmp_path / "enc")
    back = Encoder.load(tmp_path / "enc")  # rebuilt from the registry by name
    assert type(back) is type(enc) and back.fingerprint() == enc.fingerprint()
    a, b = enc.encode(real_cohort([1]), src), back.encode(real_cohort([1]), src)
    np.testing.assert_array_equal(a.tokens, b.tokens)  # type: ignore[arg-type]


def test_precomputed_subject_only_keys_warn_for_repeated_subjects(tmp_path: Path) -> None:
    pq = tmp_path / "emb.parquet"
    pl.DataFrame({"subject_id": [1, 2], "f0": [1.0, 2.0]}).write_parquet(pq)
    coh = pl.DataFrame(
        {"subject_id": [1, 1, 2], "prediction_time": [T0, T0 + dt.timedelta(days=30), T0]}
    )
    with pytest.warns(UserWarning, match="keyed by subject_id only"):
        f = build_encoder("precomputed", path=pq).encode(coh, None)
    np.testing.assert_array_equal(f.pooled[:, 0], [1.0, 1.0, 2.0])


def test_radiomics_pooled_volume_plus_cells(tmp_path: Path, ts: Path) -> None:
    src = CTSource(ct_index(ts, REAL))
    coh = real_cohort([1])
    base = build_encoder("ct_radiomics", grid=[2, 2, 1]).fit(coh, src).encode(coh, src)
    wide = build_encoder("ct_radiomics", grid=[2, 2, 1], pooled="volume+cells").fit(coh, src)
    f = wide.encode(coh, src)
    n_feat = base.pooled.shape[1]
    assert f.pooled.shape == (1, n_feat * 5)
    np.testing.assert_array_equal(f.pooled[:, :n_feat], base.pooled)
    # each cell's block is that token's standardised features (position columns excluded)
    tokens = np.asarray(base.tokens)[:, :, :n_feat]
    np.testing.assert_array_equal(f.pooled[:, n_feat:], tokens.reshape(1, -1))
    with pytest.raises(ValueError, match="did you mean 'volume"):
        build_encoder("ct_radiomics", pooled="volume+cell")

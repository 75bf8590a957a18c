"""Per-site harmonisation of encoder outputs (`survfuse.features_harmonise`) and the run's
harmonisation step: ComBat against neuroCombat, per-site standardisation against scikit-learn,
and no outcome of any site reaching the adjusted features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from sklearn.preprocessing import StandardScaler

from ct_only_study import ct_only_config
from survfuse.experiment.config import ConfigError, ExperimentConfig
from survfuse.experiment.config_load import parse_config
from survfuse.experiment.executors import get_executor
from survfuse.experiment.predict import predict_cohort
from survfuse.experiment.rundir import RunDir
from survfuse.experiment.runner import encode_features, prepare_cohort, run_experiment
from survfuse.features import ModalityFeatures
from survfuse.features_harmonise import combat, harmonise_features, site_standardise

REF = Path(__file__).parent / "reference" / "combat_neurocombat.json"
TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"


@pytest.fixture(scope="module")
def neuro() -> dict[str, np.ndarray]:
    raw = json.loads(REF.read_text())
    return {k: np.asarray(v) for k, v in raw.items()}


@pytest.mark.parametrize("eb", [True, False])
def test_combat_matches_neurocombat(neuro: dict[str, np.ndarray], eb: bool) -> None:
    got = combat(neuro["x"], neuro["site"], eb=eb)
    want = neuro["eb" if eb else "no_eb"]
    # neuroCombat stops its EB iteration at 1e-4 relative change, as we do
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert not np.allclose(got, neuro["x"], atol=0.1)  # it did adjust


def test_combat_removes_site_location_and_scale(neuro: dict[str, np.ndarray]) -> None:
    x, site = neuro["x"], neuro["site"]
    out = combat(x, site, eb=False)
    means = np.stack([out[site == s].mean(axis=0) for s in ("A", "B", "C")])
    sds = np.stack([out[site == s].std(axis=0, ddof=1) for s in ("A", "B", "C")])
    np.testing.assert_allclose(means, np.broadcast_to(means[0], means.shape), atol=1e-10)
    np.testing.assert_allclose(sds, np.broadcast_to(sds[0], sds.shape), rtol=1e-10)
    raw_means = np.stack([x[site == s].mean(axis=0) for s in ("A", "B", "C")])
    assert np.ptp(raw_means, axis=0).min() > 1.0  # the input really had site offsets


def test_site_standardise_matches_sklearn_per_site(neuro: dict[str, np.ndarray]) -> None:
    x, site = neuro["x"], neuro["site"]
    use = np.ones(len(x), bool)
    use[::7] = False  # rows not used are neither estimated from nor changed
    got = site_standardise(x, site, use)
    for s in ("A", "B", "C"):
        rows = (site == s) & use
        want = StandardScaler().fit_transform(x[rows])
        np.testing.assert_allclose(got[rows], want, atol=1e-12)
    np.testing.assert_array_equal(got[~use], x[~use])


def test_constant_columns_and_missing_rows_are_left_alone() -> None:
    rng = np.random.default_rng(3)
    n = 60
    site = np.repeat(["A", "B"], n // 2)
    x = rng.normal(size=(n, 4)) + (site == "B")[:, None] * 3.0
    x[:, 2] = 0.25  # e.g. a token's position feature
    present = rng.random(n) > 0.2
    for fn in (combat, site_standardise):
        out = fn(x, site, present)
        np.testing.assert_array_equal(out[~present], x[~present])
        if fn is combat:
            np.testing.assert_array_equal(out[:, 2], x[:, 2])


def test_site_with_one_row_is_a_clear_error() -> None:
    x = np.arange(12.0).reshape(6, 2)
    with pytest.raises(ValueError, match="site 'C' has 1 usable row"):
        combat(x, ["A", "A", "B", "B", "B", "C"])


def test_harmonise_features_adjusts_pooled_and_real_tokens_only() -> None:
    rng = np.random.default_rng(5)
    n, t, d = 40, 3, 5
    site = np.where(np.arange(n) < 20, "A", "C")
    shift = (site == "C")[:, None] * 2.0
    tokens = rng.normal(size=(n, t, d)).astype(np.float32) + shift[:, :, None]
    mask = np.ones((n, t), bool)
    mask[::4, 2] = False
    tokens[~mask] = 0.0
    present = np.ones(n, bool)
    present[[1, 30]] = False
    feats = ModalityFeatures(
        subject_id=np.arange(n),
        prediction_time=np.zeros(n, "datetime64[us]"),
        pooled=rng.normal(size=(n, d)) + shift,
        present=present,
        tokens=tokens,
        mask=mask,
        meta={"encoder": "x"},
    )
    out = harmonise_features(feats, site, "site_standardise")
    rows = present & (site == "C")
    assert abs(out.pooled[rows].mean()) < 1e-5 and abs(feats.pooled[rows].mean() - 2) < 0.5
    np.testing.assert_array_equal(out.tokens[~mask], 0.0)
    np.testing.assert_array_equal(out.pooled[~present], feats.pooled[~present])
    real = present & mask[:, 2] & (site == "C")
    np.testing.assert_allclose(out.tokens[real, 2].mean(axis=0), 0.0, atol=1e-5)
    assert out.meta["harmonise"] == {
        "method": "site_standardise",
        "reference_sites": None,
        "rows_per_site": {"A": 19, "C": 19},
    }


@pytest.mark.parametrize("eb", [True, False])
def test_reference_sites_stay_as_encoded_and_others_move_onto_them(
    neuro: dict[str, np.ndarray], eb: bool
) -> None:
    x, site = neuro["x"], neuro["site"]
    ref = np.isin(site, ["A", "B"])
    c = site == "C"
    standard = site_standardise(x, site, reference_sites=["A", "B"])
    harmonised = combat(x, site, eb=eb, reference_sites=["A", "B"])
    for out in (standard, harmonised):
        np.testing.assert_array_equal(out[ref], x[ref])
    m_ref, sd_ref = x[ref].mean(axis=0), x[ref].std(axis=0)
    np.testing.assert_allclose(
        standard[c], (x[c] - x[c].mean(axis=0)) / x[c].std(axis=0) * sd_ref + m_ref, atol=1e-12
    )
    if not eb:  # ComBat without shrinkage: the site's ddof-1 scale onto the reference's
        want = (x[c] - x[c].mean(axis=0)) / x[c].std(axis=0, ddof=1) * sd_ref + m_ref
        np.testing.assert_allclose(harmonised[c], want, atol=1e-12)
    else:  # shrinkage moves it part of the way, towards the same target
        np.testing.assert_allclose(harmonised[c].mean(axis=0), m_ref, atol=0.1)


def test_unknown_method_suggests_the_spelling(sim_small: Path) -> None:
    raw = yaml.safe_load(TINY.read_text())
    raw["data"] = {"cohort": str(sim_small / "cohort.parquet")}
    raw["encoders"] = {"ct": [], "ehr": []}
    raw["harmonise"] = {"method": "combatt"}
    with pytest.raises(ConfigError, match="combat"):
        parse_config(raw)


def _tiny(sim: Path, tmp: Path, method: str, reference: str = "all") -> ExperimentConfig:
    return ct_only_config(
        sim,
        {"name": "unimodal", "modality": "ct"},
        feature_store=str(tmp / "store"),
        harmonise={"method": method, "reference": reference},
    )


@pytest.mark.parametrize(("method", "reference"), [("combat", "all"), ("combat", "development")])
def test_outcome_permutation_leaves_harmonised_features_identical(
    sim_small: Path, tmp_path: Path, method: str, reference: str
) -> None:
    cfg = _tiny(sim_small, tmp_path, method, reference)
    ex = get_executor("local", workers=1)
    folders = []
    for k, permute in enumerate((False, True)):
        rd = RunDir(tmp_path / f"run{k}")
        cohort = prepare_cohort(cfg, rd)
        if permute:  # every site's outcomes shuffled (rows, splits and sites kept)
            perm = np.random.default_rng(1).permutation(cohort.height)
            outcome = [c for c in cohort.columns if c.endswith(("_time", "_event"))]
            outcome = [c for c in outcome if c != "prediction_time"] + ["time", "event"]
            cohort = cohort.with_columns(cohort.select(outcome)[perm])
        index = encode_features(cfg, rd, cohort, ex, progress=False)
        folders.append(rd.root / index["ct"]["ct_radiomics"])
        record = json.loads((rd.root / "features" / "harmonise.json").read_text())
        assert record["method"] == method and record["transductive"] is True
        assert record["external_sites"] == ["C"] and record["reference"] == reference
    ex.close()
    assert "harmonised" in folders[0].parts
    for name in ("pooled.npy", "tokens.npy"):
        a, b = (f / name for f in folders)
        assert a.read_bytes() == b.read_bytes(), name
    cohort = pl.read_parquet(RunDir(tmp_path / "run0").cohort)
    ext = (cohort["site"] == "C").to_numpy()
    dev = (cohort["site"] == "A").to_numpy()

    def site_gap(feats: ModalityFeatures) -> float:
        return float(np.abs(feats.pooled[ext].mean(axis=0) - feats.pooled[dev].mean(axis=0)).max())

    plain = _tiny(sim_small, tmp_path, "none")
    rd = RunDir(tmp_path / "plain")
    ex = get_executor("local", workers=1)
    index = encode_features(plain, rd, prepare_cohort(plain, rd), ex, progress=False)
    ex.close()
    assert (
        json.loads((rd.root / "features" / "harmonise.json").read_text())["transductive"] is False
    )
    raw = ModalityFeatures.load(rd.root / index["ct"]["ct_radiomics"])
    harmonised = ModalityFeatures.load(folders[0])
    before, after = site_gap(raw), site_gap(harmonised)
    assert before > 1.0 and after < 0.3 * before  # the external scanner's offsets are removed
    if reference == "development":  # training and internal-test features stay as encoded
        np.testing.assert_array_equal(harmonised.pooled[~ext], raw.pooled[~ext])
        np.testing.assert_array_equal(harmonised.tokens[~ext], raw.tokens[~ext])


@pytest.mark.parametrize("method", ["site_standardise", "combat"])
def test_predict_maps_new_patients_as_the_run_did(
    sim_small: Path, tmp_path: Path, method: str
) -> None:
    """Predict re-encodes the cohort and applies the run's saved site maps: every patient gets
    the risk the run gave it (development sites unchanged, site C by the run's map); a site the
    run never saw gets a map fitted on its own rows (here site C renamed: the same map)."""
    cfg = _tiny(sim_small, tmp_path, method, "development")
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"bootstrap": 0})})
    res = run_experiment(cfg, tmp_path / "run", progress=False)
    cell = next(p.name for p in (res.run_dir / "cells").iterdir() if p.is_dir())
    ran = pl.read_parquet(res.run_dir / "cells" / cell / "predictions.parquet")
    cohort = pl.read_parquet(sim_small / "cohort.parquet")
    got, _ = predict_cohort(res.run_dir, cell, sim_small / "cohort.parquet", out=tmp_path / "p")
    both = got.join(ran, on=["subject_id", "prediction_time"], suffix="_run")
    assert both.height == ran.height
    np.testing.assert_allclose(both["risk"], both["risk_run"], rtol=1e-5, atol=1e-6)
    sites = dict(zip(cohort["subject_id"], cohort["site"], strict=True))
    how = {sites[s]: h for s, h in zip(got["subject_id"], got["harmonise_map"], strict=True)}
    assert how == {"A": "reference", "B": "reference", "C": "run"}
    # without the run's map: fitted on the cohort's own rows of the site, the same rows here
    renamed = tmp_path / "renamed.parquet"
    cohort.with_columns(pl.col("site").replace({"C": "D"})).write_parquet(renamed)
    again, _ = predict_cohort(res.run_dir, cell, renamed, out=tmp_path / "q")
    np.testing.assert_allclose(again["risk"], got["risk"], rtol=1e-5, atol=1e-6)
    how = {sites[s]: h for s, h in zip(again["subject_id"], again["harmonise_map"], strict=True)}
    assert how == {"A": "reference", "B": "reference", "C": "cohort"}
    # a site column is needed, and a new site needs enough rows of its own
    keys = tmp_path / "keys.parquet"
    cohort.select("subject_id", "prediction_time").write_parquet(keys)
    with pytest.raises(ValueError, match="needs a `site` column"):
        predict_cohort(res.run_dir, cell, keys)
    few = tmp_path / "few.parquet"
    c_rows = cohort.filter(pl.col("site") == "C").head(5).with_columns(pl.lit("D").alias("site"))
    c_rows.write_parquet(few)
    with pytest.raises(ValueError, match="site 'D' has no map of its own"):
        predict_cohort(res.run_dir, cell, few)


def test_site_maps_round_trip_and_reproduce_the_harmonised_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n, d = 90, 4
    site = np.array(["A"] * 30 + ["B"] * 30 + ["C"] * 30)
    x = rng.normal(size=(n, d)) + (site == "C")[:, None] * 2.0
    tokens = rng.normal(size=(n, 2, 3)).astype(np.float32)
    mask = np.ones((n, 2), bool)
    mask[::7, 1] = False
    feats = ModalityFeatures(
        subject_id=np.arange(n),
        prediction_time=np.zeros(n, "datetime64[us]"),
        present=np.ones(n, bool),
        pooled=x.astype(np.float32),
        tokens=tokens,
        mask=mask,
        meta={},
    )
    from survfuse.features_harmonise import FeatureMaps, fit_feature_maps

    for method in ("site_standardise", "combat"):
        maps = fit_feature_maps(feats, site, method, reference_sites=["A", "B"])
        maps.save(tmp_path / "m.npz")
        loaded = FeatureMaps.load(tmp_path / "m.npz")
        want = harmonise_features(feats, site, method, reference_sites=["A", "B"])
        got = loaded.apply(feats, site)
        np.testing.assert_array_equal(got.pooled, want.pooled)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        ref = site_standardise if method == "site_standardise" else combat
        direct = ref(x, site, reference_sites=["A", "B"])
        np.testing.assert_allclose(got.pooled, direct, rtol=1e-5, atol=1e-5)

"""Tests of the multi-site CT + EHR cohort simulator (survfuse.simulate).

References are independent of survfuse: C-indices from scikit-survival's
`concordance_index_censored`, NIfTI reading with nibabel, KS tests from scipy, and the data layer's
validators for the formats. The unimodal Cox models are a small ridge Cox (Breslow partial
likelihood, L-BFGS) on simple pixel/region statistics and on code counts + last lab values.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
from scipy.optimize import minimize
from scipy.stats import ks_2samp
from sksurv.metrics import concordance_index_censored

from survfuse.data.cohort import load_cohort
from survfuse.data.ct_index import load_ct_index, select_studies
from survfuse.data.imaging import load_ct
from survfuse.data.meds import MEDSDataset
from survfuse.simulate import simulate, simulate_tables
from survfuse.simulate.ct import Scanner, nifti_bytes, render_ct
from survfuse.simulate.ehr import CREATININE_SI, DEATH_CODE, MACE_CODES

# ----------------------------------------------------------------------------- helpers


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _c_index(time, event, risk) -> float:
    return float(concordance_index_censored(np.asarray(event, bool), time, risk)[0])


def _ridge_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, alpha: float) -> np.ndarray:
    """Coefficients minimising -Breslow log partial likelihood + alpha/2 |b|^2 (no ties here)."""
    order = np.argsort(-time, kind="stable")
    z, ev = x[order], event[order].astype(bool)

    def objective(b: np.ndarray) -> tuple[float, np.ndarray]:
        eta = z @ b
        m = eta.max()
        w = np.exp(eta - m)
        s0 = np.cumsum(w)  # risk-set sums (times sorted descending)
        s1 = np.cumsum(w[:, None] * z, axis=0)
        ll = float((eta[ev] - m - np.log(s0[ev])).sum())
        grad = (z[ev] - s1[ev] / s0[ev][:, None]).sum(0)
        return (-ll + 0.5 * alpha * b @ b) / len(z), (-grad + alpha * b) / len(z)

    return minimize(objective, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B").x


def _cox_test_c(features: np.ndarray, time, event, train, test, alpha: float) -> float:
    """Fit a ridge Cox on the train rows (standardised features), return C on the test rows."""
    mu, sd = features[train].mean(0), features[train].std(0)
    keep = sd > 1e-8
    z = (features[:, keep] - mu[keep]) / sd[keep]
    beta = _ridge_cox(z[train], time[train], event[train], alpha)
    return _c_index(time[test], event[test], z[test] @ beta)


def _ct_region_features(path: str) -> dict[str, float]:
    """Simple intensity/region statistics of one CT (pixels + affine only, no metadata).

    Regions are fixed boxes/ellipsoids in scanner mm scaled by the body width: lungs (< -600 HU
    inside the body), a hilar box (pulmonary arteries), a heart ellipsoid split in a right and a
    left half (RV, LV), contrast excess above 100 HU, calcium excess above 500 HU.
    """
    img = nib.load(path)
    a = np.asarray(img.dataobj, dtype=np.float32)
    sp = np.abs(np.diag(img.affine)[:3])
    vv = float(np.prod(sp))
    x = (img.affine[0, 3] + sp[0] * np.arange(a.shape[0]))[:, None, None]
    y = (img.affine[1, 3] + sp[1] * np.arange(a.shape[1]))[None, :, None]
    z = (img.affine[2, 3] + sp[2] * np.arange(a.shape[2]))[None, None, :]

    def full(m: np.ndarray) -> np.ndarray:
        return np.broadcast_to(m, a.shape)

    body = a > -1024
    xs = full(x)[body]
    s = float(xs.max() - xs.min() + sp[0]) / 330.0  # body scale from the body width
    lung = body & (a < -600)
    pa_box = full((z > 15) & (z < 70) & (np.abs(x) < 100 * s) & (y > -30 * s) & (y < 35 * s))
    pa_excess = np.clip(a - 100, 0, 500)[pa_box].sum() * vv
    heart = full(
        ((x + 22 * s) / (68 * s)) ** 2 + ((y - 30 * s) / (46 * s)) ** 2 + ((z + 45) / 55) ** 2 < 1
    )
    excess = np.clip(a - 100, 0, 400)
    right, low = full(x > -21 * s), full(z < -25)
    rv = excess[heart & right & low].sum() * vv
    lv = excess[heart & ~right & low].sum() * vv
    calcium = np.clip(a - 500, 0, None)[heart].sum() * vv
    return {
        "log_scale": np.log(s),
        "log_body": np.log(body.sum() * vv),
        "lung_mean": float(a[lung].mean()),
        "low_attenuation": float((lung & (a < -930)).sum() / max(lung.sum(), 1)),
        "log_pa": np.log1p(pa_excess),
        "pa_per_volume": pa_excess / s**3 / 1e6,
        "log_rv": np.log1p(rv),
        "log_lv": np.log1p(lv),
        "rv_lv": float(np.exp((np.log1p(rv) - np.log1p(lv)) / 3)),
        "log_calcium": np.log1p(calcium / 1000),
    }


def _ct_matrix(root: Path, cohort: pl.DataFrame) -> np.ndarray:
    chosen = select_studies(cohort, load_ct_index(root / "ct_index.parquet"))
    rows = [_ct_region_features(p) for p in chosen["path"]]
    return np.array([list(r.values()) for r in rows], dtype=np.float64)


def _ehr_matrix(root: Path, cohort: pl.DataFrame) -> np.ndarray:
    """log(1 + count) of every code seen in >= 5% of subjects + last log lab value + age."""
    w = MEDSDataset(root / "meds").windowed(cohort.select("subject_id", "prediction_time"))
    counts = w.filter(pl.col("numeric_value").is_null()).group_by("subject_id", "code").len()
    common = counts.group_by("code").len().filter(pl.col("len") >= 0.05 * cohort.height)["code"]
    cnt = (
        counts.filter(pl.col("code").is_in(common.implode()))
        .with_columns(pl.col("len").cast(pl.Float64).log1p())
        .pivot(on="code", index="subject_id", values="len")
    )
    labs = (
        w.filter(pl.col("numeric_value").is_not_null())
        .sort("time")
        .with_columns(pl.col("code").str.split("//").list.get(1).alias("lab"))
        .group_by("subject_id", "lab")
        .agg(pl.col("numeric_value").last().cast(pl.Float64).log())
        .pivot(on="lab", index="subject_id", values="numeric_value")
    )
    age = w.filter(pl.col("code") == "MEDS_BIRTH").select(
        "subject_id", (pl.col("prediction_time") - pl.col("time")).dt.total_days().alias("age")
    )
    out = (
        cohort.select("subject_id")
        .join(cnt, on="subject_id", how="left")
        .join(labs, on="subject_id", how="left")
        .join(age, on="subject_id", how="left")
        .drop("subject_id")
    )
    out = out.with_columns(pl.all().cast(pl.Float64).fill_null(pl.all().median())).fill_null(0.0)
    return out.to_numpy()


def _internal_split(cohort: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    from survfuse.data.splits import make_splits

    splits = make_splits(cohort, external_sites=["C"], seed=0, val_frac=0.0, test_frac=0.3)
    split = cohort.join(splits, on="subject_id", how="left", maintain_order="left")["split"]
    return (split == "train").to_numpy(), (split == "internal_test").to_numpy()


# ----------------------------------------------------------------------------- formats


def test_same_arguments_give_byte_identical_files(tmp_path):
    kw = dict(n=40, shape=(16, 16, 10), seed=3, progress=False)
    a = _digests(simulate(tmp_path / "a", **kw))
    b = _digests(simulate(tmp_path / "b", **kw))
    assert a == b
    assert any(k.startswith("ct/") for k in a) and any(k.startswith("meds/data/") for k in a)
    c = _digests(simulate(tmp_path / "c", **{**kw, "seed": 4}))
    assert c["cohort.parquet"] != a["cohort.parquet"]


def test_parallel_chunks_give_the_same_files_as_one_process(tmp_path):
    kw = dict(n=260, shape=(12, 12, 8), seed=1, progress=False)  # 2 chunks of subjects
    one = _digests(simulate(tmp_path / "one", workers=1, **kw))
    two = _digests(simulate(tmp_path / "two", workers=2, **kw))
    assert one == two
    assert sum(k.startswith("meds/data/") for k in one) == 2


def test_nifti_bytes_equal_nibabel_and_hold_int16_hu():
    arr, spacing = render_ct(
        {"body_scale": 1.0, "age": 60, "emphysema": 0.1, "rv_lv": 1.0, "clot": 0.3,
         "calcium_mm3": 300.0},
        (20, 20, 12),
        Scanner(),
        np.random.default_rng(0),
    )  # fmt: skip
    img = nib.Nifti1Image.from_bytes(nifti_bytes(arr, spacing))
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.header.get_zooms(), spacing)
    assert arr.min() == -1024 and 300 < arr.max() < 3072


def test_formats_pass_the_data_layer_validators(sim_small):
    cohort = load_cohort(sim_small / "cohort.parquet")
    assert set(cohort.tasks) >= {"pe_mortality", "mace"}
    assert len(cohort) == 300 and cohort.sites == ["A", "B", "C"]
    t_default, e_default = cohort.outcome("default")
    t_pe, e_pe = cohort.outcome("pe_mortality")
    np.testing.assert_array_equal(t_default, t_pe)
    np.testing.assert_array_equal(e_default, e_pe)
    meds = MEDSDataset(sim_small / "meds")
    summary = meds.validate(deep=True)
    assert summary["strict_meds"] and summary["n_subjects"] == 300
    assert summary["n_static"] == 300  # one sex code per subject
    codes = meds.codes()
    assert codes is not None and codes.height > 400
    index = load_ct_index(sim_small / "ct_index.parquet")
    chosen = select_studies(cohort.df, index)
    assert chosen["path"].null_count() == 0
    vol = load_ct(chosen["path"][0])
    assert vol.array.shape == (32, 32, 20)


def test_dataset_json_records_every_parameter(sim_small):
    meta = json.loads((sim_small / "dataset.json").read_text())
    params = meta["parameters"]
    wanted = set(inspect.signature(simulate).parameters) - {"out_dir", "progress", "workers"}
    assert set(params) == wanted
    assert params["n"] == 300 and params["shape"] == [32, 32, 20] and params["seed"] == 0
    assert params["imbalance"] == 0.5 and params["external"] == ["C"]
    assert set(meta["sites"]) == {"A", "B", "C"} and meta["sites"]["C"]["external"]
    assert meta["hazard"]["weibull_lambda_per_day"]["pe_mortality"] > 0


def test_tables_without_rendering_equal_the_written_tables(sim_small):
    cohort, oracle = simulate_tables(n=300, seed=0)
    assert cohort.equals(pl.read_parquet(sim_small / "cohort.parquet"))
    assert oracle.equals(pl.read_parquet(sim_small / "oracle.parquet"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"imbalance": 1.5}, "imbalance"),
        ({"censoring": 1.0}, "censoring"),
        ({"external": ("D",)}, "external"),
        ({"shape": (32, 32)}, "shape"),
        ({"n": 0}, "n must"),
        ({"site_shift": -1.0}, "site_shift"),
    ],
)
def test_bad_arguments_are_rejected_with_a_clear_message(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        simulate(tmp_path, **{"n": 5, "shape": (8, 8, 8), "progress": False, **kwargs})


# ----------------------------------------------------------------------------- leakage


def test_no_outcome_event_at_or_before_prediction_time(sim_small):
    cohort = pl.read_parquet(sim_small / "cohort.parquet")
    events = pl.read_parquet(sim_small / "meds" / "data" / "*.parquet").join(
        cohort, on="subject_id"
    )
    outcome = events.filter(pl.col("code").is_in([DEATH_CODE, *MACE_CODES]))
    assert outcome.height > 0
    assert outcome.filter(pl.col("time") <= pl.col("prediction_time")).height == 0
    # the MEDS outcome events are exactly the cohort's events, at the cohort's times
    us = (pl.col("time") - pl.col("prediction_time")).dt.total_microseconds() / 86_400_000_000
    deaths = outcome.filter(pl.col("code") == DEATH_CODE).select("subject_id", us.alias("t"))
    pe = cohort.filter("pe_mortality_event").select("subject_id", "pe_mortality_time")
    assert deaths.sort("subject_id")["subject_id"].to_list() == pe["subject_id"].to_list()
    np.testing.assert_allclose(
        deaths.sort("subject_id")["t"].to_numpy(), pe["pe_mortality_time"].to_numpy(), atol=1e-9
    )
    mace = outcome.filter(pl.col("code").is_in(MACE_CODES)).select("subject_id")
    assert sorted(mace["subject_id"].to_list()) == sorted(
        cohort.filter("mace_event")["subject_id"].to_list()
    )
    # nothing is recorded after the end of follow-up (death or censoring)
    after_us = (pl.col("time") - pl.col("prediction_time")).dt.total_microseconds()
    end_us = (pl.col("pe_mortality_time") * 86_400_000_000).round()
    late = events.filter(after_us > end_us)
    assert late.height == 0
    # the windowed view the pipeline uses never contains an outcome
    windowed = MEDSDataset(sim_small / "meds").windowed(
        cohort.select("subject_id", "prediction_time")
    )
    assert not windowed["code"].is_in([DEATH_CODE, *MACE_CODES]).any()


def test_follow_up_ct_after_the_index_exists_but_is_never_selected(sim_small):
    cohort = pl.read_parquet(sim_small / "cohort.parquet")
    index = load_ct_index(sim_small / "ct_index.parquet")
    after = index.join(cohort, on="subject_id").filter(
        pl.col("study_time") > pl.col("prediction_time")
    )
    assert after.height > 0 and after["path"].str.ends_with("_followup.nii.gz").all()
    chosen = select_studies(cohort, index)
    assert chosen["path"].str.ends_with("_index.nii.gz").all()
    assert (chosen["study_time"] == cohort["prediction_time"]).all()


# ----------------------------------------------------------------------------- signal


def test_each_latent_factor_is_visible_in_the_pixels(tmp_path):
    base = {"body_scale": 1.0, "age": 60.0, "emphysema": 0.02, "rv_lv": 0.9, "clot": 0.0,
            "calcium_mm3": 0.0}  # fmt: skip
    shape, scanner = (64, 64, 40), Scanner(noise_sd=12.0)

    def feats(**change: float) -> dict[str, float]:
        arr, spacing = render_ct({**base, **change}, shape, scanner, np.random.default_rng(7))
        path = tmp_path / "ct.nii"
        path.write_bytes(nifti_bytes(arr, spacing))
        return _ct_region_features(str(path))

    ref = feats()
    assert -900 < ref["lung_mean"] < -800  # lungs about -850 HU
    assert feats(emphysema=0.3)["low_attenuation"] > ref["low_attenuation"] + 0.15
    assert feats(clot=0.6)["pa_per_volume"] < 0.5 * ref["pa_per_volume"]
    assert feats(rv_lv=1.4)["rv_lv"] > ref["rv_lv"] * 1.2
    assert ref["log_calcium"] == 0.0 and feats(calcium_mm3=800.0)["log_calcium"] > 1.0
    arr, _ = render_ct(base, shape, scanner, np.random.default_rng(7))
    assert (arr > 400).sum() > 50  # bone
    old, _ = render_ct({**base, "age": 90.0}, shape, scanner, np.random.default_rng(7))
    assert old.astype(float).sum() < arr.astype(float).sum()  # bone density falls with age


def test_oracle_c_index_on_internal_test_lies_in_range_at_defaults():
    cohort, oracle = simulate_tables(n=3000, seed=0)
    from survfuse.data.splits import make_splits

    split = cohort.join(make_splits(cohort, external_sites=["C"], seed=0), on="subject_id")
    test = split["split"].to_numpy() == "internal_test"
    assert test.sum() > 300
    for task in ("pe_mortality", "mace"):
        t, e = cohort[f"{task}_time"].to_numpy(), cohort[f"{task}_event"].to_numpy()
        c = _c_index(t[test], e[test], oracle[f"{task}_log_hazard"].to_numpy()[test])
        assert 0.75 <= c <= 0.90, (task, c)
        assert abs((1 - e.mean()) - 0.6) < 0.05  # censored fraction near the target


@pytest.fixture(scope="module")
def sim_extremes(tmp_path_factory) -> dict[float, Path]:
    """Two cohorts that differ only in the imbalance knob: all-EHR (0) and all-image (1)."""
    root = tmp_path_factory.mktemp("sim_imbalance")
    return {
        w: simulate(root / f"w{w}", n=n, shape=(32, 32, 20), imbalance=w, progress=False)
        for w, n in ((0.0, 600), (1.0, 1000))
    }


def test_imbalance_moves_ct_only_and_ehr_only_c_index_in_opposite_directions(sim_extremes):
    result = {}
    for w, root in sim_extremes.items():
        cohort = pl.read_parquet(root / "cohort.parquet")
        train, test = _internal_split(cohort)
        t, e = cohort["pe_mortality_time"].to_numpy(), cohort["pe_mortality_event"].to_numpy()
        ct = _cox_test_c(_ct_matrix(root, cohort), t, e, train, test, alpha=1.0)
        ehr = _cox_test_c(_ehr_matrix(root, cohort), t, e, train, test, alpha=100.0)
        result[w] = (ct, ehr)
    (ct0, ehr0), (ct1, ehr1) = result[0.0], result[1.0]
    assert ct1 > ct0 + 0.05, result
    assert ehr0 > ehr1 + 0.05, result
    assert ehr0 > ct0 and ct1 > ehr1, result


def test_image_signal_is_recoverable_from_pixels(sim_extremes):
    """Cox on region statistics is within 0.05 C of the true image log-hazard (PE mortality)."""
    root = sim_extremes[1.0]
    cohort = pl.read_parquet(root / "cohort.parquet")
    oracle = pl.read_parquet(root / "oracle.parquet")
    train, test = _internal_split(cohort)
    t, e = cohort["pe_mortality_time"].to_numpy(), cohort["pe_mortality_event"].to_numpy()
    c_pixels = _cox_test_c(_ct_matrix(root, cohort), t, e, train, test, alpha=1.0)
    c_oracle = _c_index(t[test], e[test], oracle["pe_mortality_image"].to_numpy()[test])
    assert c_pixels >= c_oracle - 0.05, (c_pixels, c_oracle)


@pytest.mark.slow
def test_image_signal_is_recoverable_for_both_tasks_at_default_resolution(tmp_path):
    root = simulate(tmp_path / "w1", n=1000, imbalance=1.0, progress=False)
    cohort = pl.read_parquet(root / "cohort.parquet")
    oracle = pl.read_parquet(root / "oracle.parquet")
    train, test = _internal_split(cohort)
    x = _ct_matrix(root, cohort)
    for task in ("pe_mortality", "mace"):
        t, e = cohort[f"{task}_time"].to_numpy(), cohort[f"{task}_event"].to_numpy()
        c_pixels = _cox_test_c(x, t, e, train, test, alpha=1.0)
        c_oracle = _c_index(t[test], e[test], oracle[f"{task}_image"].to_numpy()[test])
        assert c_pixels >= c_oracle - 0.05, (task, c_pixels, c_oracle)


# ----------------------------------------------------------------------------- sites


def test_external_site_differs_measurably_from_development_sites(sim_small):
    cohort = pl.read_parquet(sim_small / "cohort.parquet")
    ext = (cohort["site"] == "C").to_numpy()
    chosen = select_studies(cohort, load_ct_index(sim_small / "ct_index.parquet"))
    soft, spacing = [], []
    for p in chosen["path"]:
        img = nib.load(p)
        a = np.asarray(img.dataobj)
        soft.append(float(np.median(a[(a > -200) & (a < 200)])))  # scanner offset
        spacing.append(float(img.header.get_zooms()[0]))  # field of view / resolution
    soft_a, spacing_a = np.array(soft), np.array(spacing)
    assert ks_2samp(soft_a[ext], soft_a[~ext]).pvalue < 1e-6
    assert spacing_a[ext].min() > spacing_a[~ext].max()
    # coding practice: ICD-9 codes and creatinine in umol/L only at the external site
    meds = pl.read_parquet(sim_small / "meds" / "data" / "*.parquet").join(
        cohort.select("subject_id", "site"), on="subject_id"
    )
    icd9_sites = meds.filter(pl.col("code").str.contains("//ICD//9//"))["site"].unique()
    assert icd9_sites.to_list() == ["C"]
    creat = meds.filter(pl.col("code").str.starts_with("LAB//creatinine"))
    assert creat.filter(pl.col("code") == CREATININE_SI)["site"].unique().to_list() == ["C"]
    values = creat["numeric_value"].to_numpy()
    is_ext = (creat["site"] == "C").to_numpy()
    assert ks_2samp(values[is_ext], values[~is_ext]).pvalue < 1e-6


# ----------------------------------------------------------------------------- command line


def test_command_line_writes_the_same_dataset_as_the_function(tmp_path):
    from typer.testing import CliRunner

    from survfuse.cli import app

    args = ["simulate", "--out", str(tmp_path / "cli"), "--n", "30", "--sites", "A,B,C"]
    args += ["--external", "C", "--seed", "2", "--imbalance", "0.7", "--interaction", "0.2"]
    args += ["--site-shift", "0.5", "--censoring", "0.5", "--shape", "12,12,8", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    direct = simulate(
        tmp_path / "fn", n=30, seed=2, imbalance=0.7, interaction=0.2, site_shift=0.5,
        censoring=0.5, shape=(12, 12, 8), progress=False,
    )  # fmt: skip
    assert _digests(tmp_path / "cli") == _digests(direct)
    bad = CliRunner().invoke(app, [*args[:3], "--imbalance", "2", "--no-progress"])
    assert bad.exit_code == 2 and "imbalance" in bad.output


def test_rerun_into_the_same_folder_replaces_the_old_dataset(tmp_path):
    simulate(tmp_path / "d", n=270, shape=(8, 8, 8), seed=5, progress=False)  # 2 MEDS shards
    again = _digests(simulate(tmp_path / "d", n=20, shape=(8, 8, 8), seed=5, progress=False))
    fresh = _digests(simulate(tmp_path / "fresh", n=20, shape=(8, 8, 8), seed=5, progress=False))
    assert again == fresh
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        simulate(tmp_path / "other", n=5, shape=(8, 8, 8), progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_ehr_timelines_follow_the_latent_factors(sim_small):
    cohort = pl.read_parquet(sim_small / "cohort.parquet")
    oracle = pl.read_parquet(sim_small / "oracle.parquet")
    w = MEDSDataset(sim_small / "meds").windowed(cohort.select("subject_id", "prediction_time"))
    # several years of history before the index CT
    first = (
        w.filter(pl.col("code").str.starts_with("VISIT//"))
        .group_by("subject_id")
        .agg(
            ((pl.col("prediction_time") - pl.col("time")).dt.total_days().max() / 365.25).alias("y")
        )
    )
    assert first["y"].median() > 2.0
    # the last lab before the index tracks its latent factor (development sites: one unit)
    last = (
        w.filter(pl.col("code").is_in(["LAB//creatinine//mg/dL", "LAB//NT-proBNP//pg/mL"]))
        .sort("time")
        .group_by("subject_id", "code")
        .agg(pl.col("numeric_value").last())
        .pivot(on="code", index="subject_id", values="numeric_value")
        .join(oracle, on="subject_id")
    )
    rho_creat = last.select(pl.corr("LAB//creatinine//mg/dL", "latent_z_ckd", method="spearman"))
    rho_bnp = last.select(pl.corr("LAB//NT-proBNP//pg/mL", "latent_z_hf", method="spearman"))
    assert rho_creat.item() > 0.8 and rho_bnp.item() > 0.7
    # hundreds of noise codes with a Zipf-like (power-law) frequency profile
    noise = w.filter(pl.col("code").str.contains(r"^DIAGNOSIS//ICD//10//[DFGHJKLMRZ]"))
    freq = noise["code"].value_counts(sort=True)["count"].to_numpy()
    assert len(freq) >= 200
    slope = np.polyfit(np.log(np.arange(1, 51)), np.log(freq[:50]), 1)[0]
    assert -1.4 < slope < -0.8  # generated with exponent 1.1

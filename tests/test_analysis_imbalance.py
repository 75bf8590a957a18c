"""Modality contributions: Shapley efficiency, ablation on a simulated cohort whose CT carries no
modality-specific signal (imbalance 0), bootstrap CIs on the resamples of survfuse.metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from lifelines.utils import concordance_index as lifelines_c

from survfuse.analysis import (
    ablation_risks,
    analyse_imbalance,
    imbalance_index,
    mask_modality,
    modality_contributions,
    shapley_two_player,
)
from survfuse.fusion import FusionSurvivalModel
from survfuse.fusion.synthetic import synthetic_features
from survfuse.metrics import bootstrap

# ----------------------------------------------------------------------------- formulas


def test_two_player_shapley_matches_permutation_definition() -> None:
    # Shapley value = mean over the 2 orderings of the marginal contribution (by definition).
    rng = np.random.default_rng(0)
    c_full, c_ct, c_ehr = rng.uniform(0.3, 0.9, size=(3, 50))
    v = {(): 0.0}
    phi_ct, phi_ehr = shapley_two_player(c_full, c_ct, c_ehr)
    for i in range(50):
        v = {(): 0.0, ("ct",): c_ct[i] - 0.5, ("ehr",): c_ehr[i] - 0.5}
        v[("ct", "ehr")] = c_full[i] - 0.5
        ct_first = v[("ct",)] - v[()]
        ct_second = v[("ct", "ehr")] - v[("ehr",)]
        assert phi_ct[i] == pytest.approx((ct_first + ct_second) / 2, abs=1e-15)
        ehr_first = v[("ehr",)] - v[()]
        ehr_second = v[("ct", "ehr")] - v[("ct",)]
        assert phi_ehr[i] == pytest.approx((ehr_first + ehr_second) / 2, abs=1e-15)
    np.testing.assert_allclose(phi_ct + phi_ehr, c_full - 0.5, atol=1e-15)


def test_imbalance_index_bounds_and_special_cases() -> None:
    assert imbalance_index(0.1, 0.1) == 0.0
    assert imbalance_index(0.2, 0.0) == 1.0
    assert imbalance_index(0.0, -0.1) == 1.0
    assert np.isnan(imbalance_index(0.0, 0.0))
    assert imbalance_index(0.3, 0.1) == pytest.approx(0.5)
    x = np.random.default_rng(1).normal(size=(2, 1000))
    idx = imbalance_index(x[0], x[1])
    assert np.all((idx >= 0) & (idx <= 1))


# ----------------------------------------------------------------------------- contributions


def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, n))
    t_ev = rng.exponential(1.0, n) * 365 / np.exp(1.0 * a + 0.4 * b)
    t_c = rng.exponential(2.0, n) * 365
    time, event = np.minimum(t_ev, t_c), t_ev <= t_c
    risks = {
        "full": a + 0.4 * b + rng.normal(scale=0.3, size=n),
        "ct": a + rng.normal(scale=0.3, size=n),
        "ehr": 0.4 * b + rng.normal(scale=0.3, size=n),
    }
    return time, event, risks, np.arange(n) // 2  # clusters: two rows per subject


def test_contributions_point_estimates_against_lifelines() -> None:
    time, event, risks, _ = _toy(300, 0)
    uni = {"ct": risks["ct"] * 0.9, "ehr": risks["ehr"] + 1.0}
    res = modality_contributions(time, event, risks, unimodal=uni, n_boot=0)
    c = {k: lifelines_c(time, -r, event) for k, r in risks.items()}
    assert res["harrell_c[full]"].estimate == pytest.approx(c["full"], abs=1e-12)
    assert res["harrell_c[ct]"].estimate == pytest.approx(c["ct"], abs=1e-12)
    assert res["harrell_c[ehr]"].estimate == pytest.approx(c["ehr"], abs=1e-12)
    assert res["ablation_drop[ct]"].estimate == pytest.approx(c["full"] - c["ehr"], abs=1e-12)
    assert res["shapley_sum"].estimate == pytest.approx(c["full"] - 0.5, abs=1e-12)
    phi_ct = 0.5 * (c["ct"] - 0.5) + 0.5 * (c["full"] - c["ehr"])
    assert res["shapley[ct]"].estimate == pytest.approx(phi_ct, abs=1e-12)
    # the CT signal is stronger: the better baseline is CT and the index leans to CT
    assert res.reference == "ct"
    assert res["ct_share"].estimate > 0.5
    assert res["unimodal_gap"].estimate == pytest.approx(
        lifelines_c(time, -uni["ct"], event) - lifelines_c(time, -uni["ehr"], event), abs=1e-12
    )
    assert res["harrell_c[full]"].method == "none"
    assert np.isnan(res["harrell_c[full]"].ci_low)
    table = res.table()
    assert table.height == len(res.results)
    assert set(table.filter(pl.col("quantity") == "shapley")["modality"]) == {"ct", "ehr"}


def test_bootstrap_uses_the_metrics_resamples_and_seed_average() -> None:
    time, event, risks, cluster = _toy(240, 3)
    res = modality_contributions(time, event, risks, cluster=cluster, n_boot=200, seed=7)
    ref = bootstrap(
        "harrell_c", time, event, risks["full"], cluster=cluster, n_boot=200, seed=7
    )  # survfuse.metrics on the same seed draws the same subject resamples
    mine = res["harrell_c[full]"]
    assert (mine.ci_low, mine.ci_high) == pytest.approx((ref.ci_low, ref.ci_high), abs=1e-12)
    assert mine.n_subjects == 120 and mine.n_boot == 200
    # every resample satisfies efficiency, so the replicates of the sum equal C* - 0.5
    np.testing.assert_allclose(
        res.replicates["shapley_sum"], res.replicates["harrell_c[full]"] - 0.5, atol=1e-12
    )
    # a seed axis: each C is the mean over seeds (point and replicates)
    two = {k: np.stack([r, r + 0.01 * np.sin(np.arange(r.size))]) for k, r in risks.items()}
    res2 = modality_contributions(time, event, two, cluster=cluster, n_boot=50, seed=7)
    per_seed = [
        modality_contributions(
            time, event, {k: v[s] for k, v in two.items()}, cluster=cluster, n_boot=50, seed=7
        )
        for s in range(2)
    ]
    np.testing.assert_allclose(
        res2.replicates["harrell_c[full]"],
        (per_seed[0].replicates["harrell_c[full]"] + per_seed[1].replicates["harrell_c[full]"]) / 2,
    )


def test_contributions_input_errors() -> None:
    time, event, risks, _ = _toy(50, 0)
    with pytest.raises(ValueError, match="'ehr'"):
        modality_contributions(time, event, {"full": risks["full"], "ct": risks["ct"]})
    with pytest.raises(ValueError, match="N = 50"):
        modality_contributions(time, event, {**risks, "ct": risks["ct"][:10]})
    bad = risks["ehr"].copy()
    bad[7] = np.nan
    with pytest.raises(ValueError, match="index 7"):
        modality_contributions(time, event, {**risks, "ehr": bad})
    with pytest.raises(ValueError, match="did you mean 'ehr'"):
        modality_contributions(time, event, risks, unimodal={"ehrr": risks["ehr"]})


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize("strategy", ["concat", "late", "cross_attention"])
def test_masked_modality_content_cannot_reach_the_risk(strategy: str) -> None:
    data = synthetic_features(160, seed=0, w_ct=1.0, w_ehr=1.0)
    model = FusionSurvivalModel(strategy, max_epochs=3, seed=0, device="cpu")
    model.fit(data.features, data.time, data.event)
    masked = mask_modality(data.features["ct"])
    assert not masked.present.any() and masked.mask is not None and not masked.mask.any()
    assert masked.tokens is not None and not masked.tokens.any() and not masked.pooled.any()
    risks = ablation_risks(model, data.features)
    # other CT values behind the mask give the same risk: only EHR drives "ehr"
    other = synthetic_features(160, seed=99)
    swapped = {"ct": mask_modality(other.features["ct"]), "ehr": data.features["ehr"]}
    np.testing.assert_allclose(risks["ehr"], model.predict_risk(swapped), atol=1e-6)
    assert not np.allclose(risks["ehr"], risks["full"])
    assert data.features["ct"].present.all()  # the input was not modified


# ----------------------------------------------------------------------------- simulated cohort


@pytest.fixture(scope="module")
def ehr_only_cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Simulator with imbalance 0 (all modality-specific signal in the EHR, none in the CT),
    real encoders, a concat fusion model and both unimodal baselines."""
    from survfuse.data.meds import MEDSDataset
    from survfuse.encoders.base import CTSource
    from survfuse.registry import ENCODERS, all_registries
    from survfuse.simulate import simulate

    all_registries()
    root: Path = simulate(
        tmp_path_factory.mktemp("imb0"),
        n=400,
        shape=(32, 32, 20),
        seed=0,
        imbalance=0.0,
        progress=False,
    )
    cohort = pl.read_parquet(root / "cohort.parquet")
    keys = cohort.select("subject_id", "prediction_time")
    ct_enc = ENCODERS.get("ct_radiomics")(grid=[1, 1, 1], n_bins=8)
    ct_src = CTSource.from_index(root / "ct_index.parquet")
    ehr_enc = ENCODERS.get("ehr_onehot")(max_tokens=8, max_codes_per_token=32, max_codes=256)
    meds = MEDSDataset(root / "meds")
    perm = np.random.default_rng(0).permutation(cohort.height)
    train, val, test = perm[:200], perm[200:280], perm[280:]
    train_keys = keys[train]
    feats = {
        "ct": ct_enc.fit(train_keys, ct_src).encode(keys, ct_src),
        "ehr": ehr_enc.fit(train_keys, meds).encode(keys, meds),
    }
    time = cohort["time"].to_numpy()
    event = cohort["event"].to_numpy()

    def rows(idx: np.ndarray) -> dict[str, Any]:
        return {m: f.select(idx) for m, f in feats.items()}

    def fit(strategy: str, drop: float | None = 0.05, **params: Any) -> FusionSurvivalModel:
        m = FusionSurvivalModel(
            strategy,
            strategy_params=params,
            max_epochs=30,
            patience=5,
            seed=0,
            device="cpu",
            branch_drop_alpha=drop,
        )
        return m.fit(
            rows(train), time[train], event[train], validation=(rows(val), time[val], event[val])
        )

    # without the chance-level drop, so that the fused model does see the noise CT and the
    # ablation has something to measure (the default drops it: test_..._dropped_ct below)
    fused = fit("concat", drop=None)
    default = fit("concat")
    uni = {m: fit("unimodal", modality=m).predict_risk(rows(test)) for m in ("ct", "ehr")}
    res = analyse_imbalance(
        fused,
        rows(test),
        time[test],
        event[test],
        unimodal=uni,
        cluster=cohort["subject_id"].to_numpy()[test],
        n_boot=500,
        seed=0,
    )
    return {
        "res": res,
        "default": default,
        "default_risks": ablation_risks(default, rows(test)),
        "risk": fused.predict_risk(rows(test)),
        "time": time[test],
        "event": event[test],
    }


def test_simulated_shapley_sums_to_c_minus_half(ehr_only_cohort: dict[str, Any]) -> None:
    res = ehr_only_cohort["res"]
    c_full = lifelines_c(
        ehr_only_cohort["time"], -ehr_only_cohort["risk"], ehr_only_cohort["event"]
    )
    assert res["harrell_c[full]"].estimate == pytest.approx(c_full, abs=1e-12)
    total = res["shapley[ct]"].estimate + res["shapley[ehr]"].estimate
    assert total == pytest.approx(c_full - 0.5, abs=1e-12)


def test_simulated_ablating_uninformative_ct_changes_c_less_than_ci(
    ehr_only_cohort: dict[str, Any],
) -> None:
    res = ehr_only_cohort["res"]
    full = res["harrell_c[full]"]
    half_width = (full.ci_high - full.ci_low) / 2
    assert abs(res["ablation_drop[ct]"].estimate) < half_width
    assert res["ablation_drop[ct]"].ci_low < 0 < res["ablation_drop[ct]"].ci_high


def test_simulated_default_model_drops_the_uninformative_ct(
    ehr_only_cohort: dict[str, Any],
) -> None:
    # branch stopping's chance test drops the CT (imbalance 0): masking it changes nothing
    model, risks = ehr_only_cohort["default"], ehr_only_cohort["default_risks"]
    assert model.dropped_modalities_ == ["ct"]
    np.testing.assert_array_equal(risks["ehr"], risks["full"])
    assert not np.allclose(risks["ct"], risks["full"])


def test_simulated_ablating_informative_ehr_drops_c_to_ct_baseline(
    ehr_only_cohort: dict[str, Any],
) -> None:
    res = ehr_only_cohort["res"]
    c_full = res["harrell_c[full]"].estimate
    c_ct_only = res["harrell_c[ct]"].estimate
    c_uni_ct = res["unimodal_c[ct]"].estimate
    assert res["ablation_drop[ehr]"].ci_low > 0  # a significant drop
    # the CT-only model lands near the CT baseline, far below the fused model
    assert abs(c_ct_only - c_uni_ct) < 0.5 * (c_full - c_uni_ct)
    assert res["shapley[ehr]"].estimate > res["shapley[ct]"].estimate
    assert res["imbalance_index"].estimate > 0.8 and res["ct_share"].estimate < 0.1
    assert res.reference == "ehr"

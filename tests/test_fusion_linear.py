"""The `linear` strategy: a ridge Cox on the pooled features, fitted exactly, penalty on validation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from lifelines import CoxPHFitter

from survfuse.experiment.config import ExperimentConfig
from survfuse.experiment.grid import expand_grid
from survfuse.features import ModalityFeatures
from survfuse.fusion import FusionSurvivalModel
from survfuse.metrics import concordance_index
from survfuse.survival import CoxPH


def _features(x: np.ndarray, seed: int = 0, present: np.ndarray | None = None) -> ModalityFeatures:
    n = x.shape[0]
    return ModalityFeatures(
        subject_id=np.arange(n, dtype=np.int64) + 1000 * seed,
        prediction_time=np.full(n, np.datetime64("2020-01-01T00:00:00", "us")),
        pooled=x.astype(np.float32),
        present=np.ones(n, bool) if present is None else present,
        meta={"encoder": "test"},
    )


def _cohort(n: int, p_noise: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """CT: 3 informative columns + noise; EHR: 2 informative + noise; exponential times."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(size=(n, 3 + p_noise))
    ehr = rng.normal(size=(n, 2 + p_noise))
    lp = ct[:, :3] @ np.array([0.8, -0.5, 0.4]) + ehr[:, :2] @ np.array([0.6, 0.3])
    t_event = rng.exponential(np.exp(-lp) * 300.0)
    t_cens = rng.exponential(500.0, n)
    time = np.minimum(t_event, t_cens)
    event = t_event <= t_cens
    feats = {"ct": _features(ct, seed), "ehr": _features(ehr, seed)}
    return feats, time, event, lp


def test_nearly_unpenalised_fit_matches_lifelines() -> None:
    feats, time, event, _ = _cohort(300, 2, seed=1)
    model = FusionSurvivalModel(
        "linear",
        strategy_params={"modality": "ct", "l1_ratio": 0.0, "penalties": [1e-9]},
        device="cpu",
    ).fit(feats, time, event)
    x = np.asarray(feats["ct"].pooled, dtype=np.float64)
    import pandas as pd

    df = pd.DataFrame(x, columns=[f"x{i}" for i in range(x.shape[1])])
    df["T"], df["E"] = time, event
    ref = CoxPHFitter(penalizer=0.0).fit(df, "T", "E")  # Efron ties, Newton-Raphson
    ref_risk = x @ ref.params_.to_numpy()
    risk = model.predict_risk(feats)
    # same linear predictor up to an additive constant (centring)
    np.testing.assert_allclose(risk - risk.mean(), ref_risk - ref_risk.mean(), atol=2e-5)


def test_each_penalty_is_an_exact_ridge_fit_and_validation_picks_the_best() -> None:
    feats, time, event, _ = _cohort(240, 40, seed=2)
    vfeats, vtime, vevent, _ = _cohort(160, 40, seed=3)
    pens = [0.01, 0.3, 10.0]
    model = FusionSurvivalModel(
        "linear", strategy_params={"l1_ratio": 0.0, "penalties": pens}, device="cpu"
    ).fit(feats, time, event, validation=(vfeats, vtime, vevent))
    module = model.module_
    assert module is not None
    hist = model.history_
    assert [h["penalty"] for h in hist] == pens
    best = max(hist, key=lambda h: h["val_c_index"])
    assert float(module.penalty) == best["penalty"]
    # the kept coefficients are CoxPH's ridge fit (alpha = lambda x events) of the same design
    from survfuse.fusion.batch import to_batch

    batch = to_batch(feats, modalities=module.modalities, with_tokens=False)
    x = module.design(module.normalise(batch)).double().numpy()
    ref = CoxPH(alpha=best["penalty"] * int(event.sum())).fit(x, time, event)
    weight = next(p for p in module.head.parameters()).detach().double().numpy().ravel()
    np.testing.assert_allclose(weight, ref.coef_, rtol=1e-6, atol=1e-8)
    # validation C in the history is the C of that model's validation risk
    c = concordance_index(vtime, vevent, model.predict_risk(vfeats)).estimate
    assert c == pytest.approx(best["val_c_index"], abs=1e-9)


def test_ridge_on_validation_holds_up_with_many_noise_features() -> None:
    # 5 informative of 405 features, 300 training patients: an unpenalised fit overfits
    feats, time, event, _ = _cohort(300, 200, seed=4)
    vfeats, vtime, vevent, _ = _cohort(200, 200, seed=5)
    tfeats, ttime, tevent, tlp = _cohort(1000, 200, seed=6)
    oracle = concordance_index(ttime, tevent, tlp).estimate
    model = FusionSurvivalModel("linear", device="cpu").fit(
        feats, time, event, validation=(vfeats, vtime, vevent)
    )
    c = concordance_index(ttime, tevent, model.predict_risk(tfeats)).estimate
    assert c > oracle - 0.06, (c, oracle)
    assert c > 0.65


def test_unimodal_linear_reads_one_modality_and_missing_rows_get_their_flag() -> None:
    feats, time, event, _ = _cohort(200, 3, seed=7)
    ct_only = FusionSurvivalModel("linear", strategy_params={"modality": "ct"}, device="cpu").fit(
        feats, time, event
    )
    rng = np.random.default_rng(0)
    shuffled = {**feats, "ehr": replace(feats["ehr"], pooled=rng.permutation(feats["ehr"].pooled))}
    np.testing.assert_array_equal(ct_only.predict_risk(feats), ct_only.predict_risk(shuffled))
    # both modalities, a third of the EHR missing: finite risks, presence flag in the design
    gone = np.arange(200) % 3 == 0
    ehr = replace(
        feats["ehr"], present=~gone, pooled=np.where(gone[:, None], 0.0, feats["ehr"].pooled)
    )
    both = FusionSurvivalModel("linear", device="cpu").fit({**feats, "ehr": ehr}, time, event)
    assert np.isfinite(both.predict_risk({**feats, "ehr": ehr})).all()
    module = both.module_
    assert module is not None
    width = next(p for p in module.head.parameters()).shape[1]
    assert width == feats["ct"].pooled_dim + feats["ehr"].pooled_dim + 2


def test_linear_only_with_the_cox_head_and_the_grid_skips_other_heads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="head of the linear strategy"):
        FusionSurvivalModel("linear", head="discrete", device="cpu").fit(*_cohort(50, 1, 0)[:3])
    cfg = ExperimentConfig.model_validate(
        {
            "data": {"cohort": str(tmp_path / "c.parquet"), "meds_root": str(tmp_path)},
            "encoders": {"ehr": [{"name": "ehr_counts"}]},
            "strategies": [
                {"name": "linear", "modality": "ehr"},
                {"name": "unimodal", "modality": "ehr"},
            ],
            "heads": ["cox", "discrete"],
        }
    )
    cells = expand_grid(cfg, {"ehr": {"ehr_counts": "features/ehr"}})
    heads = {(c.strategy, c.head) for c in cells}
    assert heads == {("linear_ehr", "cox"), ("unimodal_ehr", "cox"), ("unimodal_ehr", "discrete")}

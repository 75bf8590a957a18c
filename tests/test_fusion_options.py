"""Regression tests of the fusion estimator's options and training edge cases (issue 9 review):
OGM-GE scoring under missingness, the contrastive align stage, option validation, and
order-independent token normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from survfuse.fusion import FusionSurvivalModel
from survfuse.fusion.base import FusionOutput
from survfuse.fusion.batch import ModalitySpec
from survfuse.fusion.layers import FeatureNorm
from survfuse.fusion.rebalance import OGMGE
from survfuse.fusion.synthetic import synthetic_features
from survfuse.metrics import concordance_index
from survfuse.registry import UnknownNameError
from survfuse.survival.losses import cox_partial_nll

# tiny models: one intra-op thread is faster and immune to a busy shared CPU
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- 1. OGM-GE scoring
def test_ogm_ge_uninformative_probes_are_not_rebalanced_by_missingness() -> None:
    # Both probes predict risk 0 (uninformative); EHR is missing for a random half. Scored on
    # each modality's own rows, the Cox NLL of the smaller risk sets is lower and EHR would look
    # "dominant" (coefficient ~0.64 for alpha 0.5); scored on the shared rows both are equal.
    n = 256
    rng = np.random.default_rng(0)
    time = torch.as_tensor(rng.exponential(365.0, n))
    event = torch.as_tensor(rng.random(n) < 0.7)
    present_ehr = torch.as_tensor(rng.random(n) < 0.5)
    # the premise: the null NLL really does depend on the number of rows
    null_all = float(cox_partial_nll(time, event, torch.zeros(n, dtype=torch.float64)))
    half = present_ehr
    null_half = float(cox_partial_nll(time[half], event[half], torch.zeros(int(half.sum()))))
    assert math.exp(-null_half) > 1.3 * math.exp(-null_all)

    batch = {
        "ct": {"present": torch.ones(n, dtype=torch.bool)},
        "ehr": {"present": present_ehr},
    }
    reprs = {m: torch.randn(n, 4, generator=torch.Generator().manual_seed(1)) for m in batch}
    output = FusionOutput(out=torch.zeros(n, 1), risk=torch.zeros(n), modality_repr=reprs)
    ogm = OGMGE({"ct": [], "ehr": []}, alpha=0.5, generator=torch.Generator())
    ogm.probes = nn.ModuleDict({m: nn.Linear(4, 1) for m in batch})
    for p in ogm.probes.parameters():
        nn.init.zeros_(p)
    ogm.opt = torch.optim.Adam(ogm.probes.parameters(), lr=1e-2)
    coef = ogm._modulate(output, batch, time, event)
    assert coef == {"ct": pytest.approx(1.0), "ehr": pytest.approx(1.0)}


# ----------------------------------------------------------------------------- 2. align stage
SMALL = synthetic_features(48, seed=3, ct_tokens=4, ehr_tokens=4)


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_contrastive_align_stage_uses_info_nce_whatever_lambda(lam: float) -> None:
    model = FusionSurvivalModel(
        "contrastive",
        strategy_params={"hidden": 8, "proj_dim": 8, "lam": lam, "align_epochs": 2},
        max_epochs=4,
        seed=0,
        device="cpu",
    ).fit(SMALL.features, SMALL.time, SMALL.event)
    stages = [h["stage"] for h in model.history_]
    assert stages == ["align", "align", "survival", "survival"]
    # the align-stage loss is the (unweighted) InfoNCE: positive, near log(48) at the start
    assert 1.0 < model.history_[0]["train_loss"] < 2 * math.log(48)


def test_contrastive_align_stage_without_paired_patients_gives_zero_loss() -> None:
    # every patient misses one modality: no InfoNCE pair exists, the align epochs train on a zero
    # loss (no crash), then the survival stage runs normally
    data = synthetic_features(40, seed=4, ct_tokens=4, ehr_tokens=4)
    ct, ehr = data.features["ct"], data.features["ehr"]
    from dataclasses import replace

    half = np.arange(40) % 2 == 0
    feats = {"ct": replace(ct, present=half), "ehr": replace(ehr, present=~half)}
    model = FusionSurvivalModel(
        "contrastive",
        strategy_params={"hidden": 8, "proj_dim": 8, "align_epochs": 2},
        max_epochs=3,
        seed=0,
        device="cpu",
    ).fit(feats, data.time, data.event)
    assert [h["train_loss"] for h in model.history_[:2]] == [0.0, 0.0]
    assert model.history_[2]["stage"] == "survival" and model.history_[2]["train_loss"] > 0
    assert np.isfinite(model.predict_risk(feats)).all()


# ----------------------------------------------------------------------------- 3. validation
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rebalance": "ogm_ge", "rebalance_params": {"alpah": 5}}, "did you mean 'alpha'"),
        ({"strategy_params": {"hiden": 8}}, "did you mean 'hidden'"),
        ({"head_params": {"tie": "breslow"}}, "did you mean 'ties'"),
        ({"device": "gpu"}, "unknown device 'gpu'"),
    ],
)
def test_misspelt_options_fail_in_the_constructor(kwargs: dict, message: str) -> None:
    with pytest.raises(UnknownNameError, match=message):
        FusionSurvivalModel("concat", **kwargs)


def test_strategy_params_checked_against_the_strategy_signature() -> None:
    FusionSurvivalModel("cross_attention", strategy_params={"direction": "both", "d_model": 8})
    with pytest.raises(UnknownNameError, match="cross_attention strategy parameter 'guide'"):
        FusionSurvivalModel("cross_attention", strategy_params={"guide": "ct"})


# ----------------------------------------------------------------------------- 4. token statistics
def test_token_statistics_do_not_depend_on_row_order() -> None:
    data = synthetic_features(2600, seed=8, ct_tokens=4, ct_dim=3, ehr_tokens=2)
    ct = data.features["ct"]
    from dataclasses import replace

    perm = np.random.default_rng(0).permutation(len(ct))
    shuffled = replace(
        ct,
        subject_id=ct.subject_id[perm],
        prediction_time=ct.prediction_time[perm],
        pooled=ct.pooled[perm],
        present=ct.present[perm],
        tokens=ct.tokens[perm],  # type: ignore[index]
        mask=ct.mask[perm],  # type: ignore[index]
    )
    spec = ModalitySpec.of(ct)
    a, b, c = FeatureNorm(spec), FeatureNorm(spec), FeatureNorm(spec)
    a.fit(ct, seed=0)
    b.fit(shuffled, seed=0)
    c.fit(ct, seed=1)
    torch.testing.assert_close(a.token_mean, b.token_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.token_std, b.token_std, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a.token_mean, c.token_mean)  # another seed, another subsample
    # the subsample is a subsample (2,000 of 2,600 rows), close to the full-data statistics
    full = ct.tokens[ct.mask].astype(np.float64)  # type: ignore[index]
    np.testing.assert_allclose(a.token_mean.numpy(), full.mean(0), atol=0.05)


# ----------------------------------------------------------------------------- 6. imbalance 1
@pytest.mark.parametrize("strategy", ["concat", "late", "contrastive"])
def test_pure_noise_high_dimensional_modality_does_not_collapse_fusion(strategy: str) -> None:
    # EHR is 521-dimensional pure noise (w_ehr = 0), CT carries the whole log-hazard. Before the
    # input balance (FusionStrategy.pooled_scale) the EHR branch fitted the training risk sets
    # within ~3 full-batch steps and early stopping kept that epoch: test C 0.55 (concat),
    # 0.60 (late), 0.63 (contrastive) vs 0.67 CT-only. With the sqrt(d_min / d_m) balance alone
    # (branch_stopping=False) fusion stays within 0.03 of CT-only: concat 0.643, late 0.650,
    # contrastive 0.648; this test keeps that guarantee for the input balance by itself.
    # Branch stopping (the default) brings them within 0.01: tests/test_fusion_branches.py.
    kw = {"ct_tokens": 8, "ct_dim": 6, "ehr_tokens": 16, "vocab_size": 521, "w_ehr": 0.0}
    tr = synthetic_features(1200, seed=0, **kw)  # type: ignore[arg-type]
    va = synthetic_features(300, seed=100, **kw)  # type: ignore[arg-type]
    te = synthetic_features(1500, seed=200, **kw)  # type: ignore[arg-type]

    def test_c(name: str, params: dict[str, object]) -> float:
        model = FusionSurvivalModel(
            name, strategy_params=params, seed=0, device="cpu", branch_stopping=False
        )
        model.fit(tr.features, tr.time, tr.event, validation=(va.features, va.time, va.event))
        from survfuse.metrics import concordance_index

        return float(concordance_index(te.time, te.event, model.predict_risk(te.features)).estimate)

    ct_only = test_c("unimodal", {"modality": "ct"})
    assert ct_only > 0.64  # CT is informative
    assert test_c(strategy, {}) > ct_only - 0.03


def test_token_unimodal_baseline_separates_token_reading_from_fusion() -> None:
    # CT uninformative (w_ct = 0), EHR signal in the codes of its tokens. An attention strategy
    # reads EHR tokens; the pooled EHR baseline does not. The token baseline (unimodal,
    # tokens=True) reaches the attention strategy's C (measured: pooled 0.651, tokens 0.665,
    # cross-attention 0.668, which also drops the noise CT), so the attention strategy's gain
    # over it is near 0, as it should be when the other modality adds nothing.
    kw = {"w_ct": 0.0, "vocab_size": 60, "ehr_tokens": 16}
    tr, va, te = (
        synthetic_features(n, seed=s, **kw) for n, s in ((1000, 0), (300, 100), (1500, 200))
    )  # type: ignore[arg-type]

    def fit(name: str, params: dict) -> tuple[float, FusionSurvivalModel]:
        m = FusionSurvivalModel(name, strategy_params=params, seed=0, device="cpu")
        m.fit(tr.features, tr.time, tr.event, validation=(va.features, va.time, va.event))
        return float(concordance_index(te.time, te.event, m.predict_risk(te.features)).estimate), m

    pooled, _ = fit("unimodal", {"modality": "ehr"})
    tokens, model = fit("unimodal", {"modality": "ehr", "tokens": True})
    cross, fused = fit("cross_attention", {})
    assert model.module_ is not None and model.module_.uses_tokens
    assert tokens > pooled + 0.005
    assert abs(cross - tokens) < 0.01
    assert fused.dropped_modalities_ == ["ct"]

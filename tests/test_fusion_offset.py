"""`offset: linear`: a deep strategy starts at the elastic-net Cox and learns its residual."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from survfuse.experiment.config import ExperimentConfig
from survfuse.fusion import FusionSurvivalModel
from survfuse.fusion.batch import to_batch
from survfuse.fusion.offset import _linear as _linear_candidate
from survfuse.metrics import concordance_index
from test_fusion_linear import _cohort

STRATEGIES = [
    ("concat", {}),
    ("contrastive", {}),
    ("unimodal", {"modality": "ehr"}),
    ("cross_attention", {"d_model": 8, "hidden": 8}),
    ("co_attention", {"d_model": 8, "hidden": 8}),
]


def _with_tokens(cohort):
    """Each modality's pooled vector split into 2 tokens (attention strategies read tokens)."""
    feats, *rest = cohort
    out = {}
    for m, f in feats.items():
        x = np.asarray(f.pooled)
        half = x.shape[1] // 2
        tok = np.zeros((len(x), 2, x.shape[1] - half), np.float32)
        tok[:, 0, :half], tok[:, 1] = x[:, :half], x[:, half:]
        out[m] = replace(f, tokens=tok, mask=np.ones((len(x), 2), bool))
    return (out, *rest)


def _batch(feats):
    return to_batch(feats, modalities=("ct", "ehr"), with_tokens=False, device="cpu")


def _data(seed: int = 0, p_noise: int = 30):
    return tuple(
        _with_tokens(_cohort(n, p_noise, seed=seed + k))
        for n, k in ((400, 0), (300, 100), (600, 200))
    )


@pytest.mark.parametrize(("strategy", "params"), STRATEGIES)
def test_before_the_residual_learns_the_model_is_the_linear_cox(strategy, params) -> None:
    """Zero learning rate: the fused risk is exactly the `linear` strategy's risk (same
    features, same penalty path, same validation choice)."""
    (f, t, e, _), (vf, vt, ve, _), (tf, *_rest) = _data()
    modality = params.get("modality")
    lin = FusionSurvivalModel(
        "linear", strategy_params={} if modality is None else {"modality": modality}, device="cpu"
    ).fit(f, t, e, validation=(vf, vt, ve))
    deep = FusionSurvivalModel(
        strategy,
        strategy_params={**params, "offset": "linear"},
        device="cpu",
        max_epochs=2,
        lr=1e-12,
        branch_stopping=False,
    ).fit(f, t, e, validation=(vf, vt, ve))
    np.testing.assert_allclose(deep.predict_risk(tf), lin.predict_risk(tf), atol=1e-4)
    kept = [h for h in deep.offset_history_ if h["kept"]]
    assert [h["penalty"] for h in kept] == [h["penalty"] for h in lin.history_]
    # the offset is the linear model on all of the strategy's modalities
    assert {h["candidate"] for h in kept} == {"ct+ehr" if modality is None else modality}
    assert all(h["stage"] == "offset" for h in deep.offset_history_)


@pytest.mark.parametrize("combine", ["weights", "stacking"])
def test_late_fusion_branches_start_at_the_unimodal_linear_models(combine) -> None:
    """Each late branch is the unimodal elastic-net Cox plus a residual: at zero learning rate
    branch m's output is the `linear` strategy on modality m alone."""
    (f, t, e, _), (vf, vt, ve, _), (tf, *_rest) = _data(seed=5)
    late = FusionSurvivalModel(
        "late",
        strategy_params={"offset": "linear", "combine": combine},
        device="cpu",
        max_epochs=2,
        lr=1e-12,
        branch_stopping=False,
    ).fit(f, t, e, validation=(vf, vt, ve))
    module = late.module_
    assert module.offset is None and set(module.branch_offsets) == {"ct", "ehr"}
    import torch

    from survfuse.fusion.batch import to_batch

    batch = to_batch(tf, modalities=module.modalities, with_tokens=False)
    with torch.no_grad():
        outs, _, _ = module.branch_outputs(module.normalise(batch))
    for i, m in enumerate(module.modalities):
        # the branch's own (unscaled) linear part: the reference without the validation slope
        lin = FusionSurvivalModel(
            "linear", strategy_params={"modality": m}, device="cpu", validation_slope=False
        )
        lin.fit(f, t, e, validation=(vf, vt, ve))
        # same model: the input balance scales x_m by a constant, which the elastic net's
        # standardised path nearly absorbs (measured: max |difference| 0.005, C identical)
        risk, ref = outs[i, :, 0].numpy(), lin.predict_risk(tf)
        assert np.corrcoef(risk, ref)[0, 1] > 0.9999
        np.testing.assert_allclose(risk, ref, atol=0.02)
    assert {h["branch"] for h in late.offset_history_} == {"ct", "ehr"}


def test_a_noise_modality_barely_enters_the_offset() -> None:
    """EHR replaced by 400 noise columns: the offset (the concatenation) ranks the test patients
    as the CT-only linear model does (its penalty zeroes the noise), and the untrained model
    predicts exactly the `linear` strategy on the concatenation."""
    (f, t, e, _), (vf, vt, ve, _), (tf, tt, te, _) = _data(seed=7, p_noise=60)
    rng = np.random.default_rng(0)
    for feats in (f, vf, tf):
        x = np.asarray(feats["ehr"].pooled)
        noise = rng.normal(size=(x.shape[0], 400)).astype(np.float32)
        feats["ehr"] = replace(feats["ehr"], pooled=noise)
    model = FusionSurvivalModel(
        "concat", strategy_params={"offset": "linear"}, device="cpu", max_epochs=2, lr=1e-12
    ).fit(f, t, e, validation=(vf, vt, ve))
    assert {h["candidate"] for h in model.offset_history_} == {"ct+ehr"}
    ct = FusionSurvivalModel("linear", strategy_params={"modality": "ct"}, device="cpu")
    ct_risk = ct.fit(f, t, e, validation=(vf, vt, ve)).predict_risk(tf)
    risk = model.predict_risk(tf)
    c_model = concordance_index(tt, te, risk).estimate
    assert abs(c_model - concordance_index(tt, te, ct_risk).estimate) < 0.005
    ref = FusionSurvivalModel("linear", device="cpu").fit(f, t, e, validation=(vf, vt, ve))
    np.testing.assert_allclose(risk, ref.predict_risk(tf), atol=1e-3)


def test_a_model_saved_with_the_former_offset_candidates_loads_with_its_choice(
    tmp_path,
) -> None:
    """Until session 9 the offset held the concatenation and each modality alone and kept the
    best on validation (`pick`); such a saved model loads and predicts with its chosen one."""
    (f, t, e, _), (vf, vt, ve, _), (tf, *_rest) = _data(seed=3)
    model = FusionSurvivalModel(
        "concat", strategy_params={"offset": "linear"}, device="cpu", max_epochs=2, lr=1e-12
    ).fit(f, t, e, validation=(vf, vt, ve))
    offset = model.module_.offset
    # rebuild the former layout: a CT-only candidate fitted and picked
    ct = _linear_candidate(model.module_, ("ct",))
    for m in ct.modalities:
        ct.norms[m].load_state_dict(model.module_.norms[m].state_dict())
    ct.eval()
    ct.fit_exact(_batch(f), t, e, (_batch(vf), vt, ve))
    offset.candidates["ct"] = ct
    offset.candidates["ehr"] = _linear_candidate(model.module_, ("ehr",))
    offset.pick.fill_(1)
    before = model.predict_risk(tf)
    model.save(tmp_path / "m")
    again = FusionSurvivalModel.load(tmp_path / "m")
    assert list(again.module_.offset.candidates) == ["ct+ehr", "ct", "ehr"]
    np.testing.assert_array_equal(again.predict_risk(tf), before)


def test_the_residual_trains_and_saves(tmp_path) -> None:
    (f, t, e, _), (vf, vt, ve, _), (tf, tt, te, _) = _data(seed=3)
    model = FusionSurvivalModel(
        "concat", strategy_params={"offset": "linear"}, device="cpu", max_epochs=30, seed=1
    ).fit(f, t, e, validation=(vf, vt, ve))
    offset = model.module_.offset
    assert offset is not None and not any(p.requires_grad for p in offset.parameters())
    risk = model.predict_risk(tf)
    assert concordance_index(tt, te, risk).estimate > 0.7  # the true model's signal is found
    model.save(tmp_path / "m")
    again = FusionSurvivalModel.load(tmp_path / "m")
    np.testing.assert_array_equal(again.predict_risk(tf), risk)


def test_offset_keeps_the_elastic_nets_advantage_on_sparse_linear_signal() -> None:
    """5 informative of 125 features, 400 training patients, truth linear. Measured (3 seeds):
    oracle C 0.763/0.758/0.776, linear 0.760/0.758/0.770, concat from scratch 0.648/0.648/0.658,
    concat with the offset 0.761/0.758/0.770: the residual model keeps the linear model's C."""
    for seed in range(3):
        (f, t, e, _), (vf, vt, ve, _), (tf, tt, te, _) = _data(seed=10 + seed, p_noise=60)
        c = {}
        for name, params in (("linear", {}), ("none", {}), ("offset", {"offset": "linear"})):
            strategy = "linear" if name == "linear" else "concat"
            m = FusionSurvivalModel(strategy, strategy_params=params, device="cpu", seed=seed)
            m.fit(f, t, e, validation=(vf, vt, ve))
            c[name] = concordance_index(tt, te, m.predict_risk(tf)).estimate
        assert c["offset"] > c["none"] + 0.05
        assert c["offset"] >= c["linear"] - 0.01


@pytest.mark.parametrize(
    ("strategy", "params", "head", "message"),
    [
        ("linear", {}, "cox", "trained end to end"),
        ("concat", {}, "discrete", "Cox log-hazard"),
        ("concat", {"offset": "lineer"}, "cox", "linear"),
    ],
)
def test_offset_refuses_what_it_cannot_shift(strategy, params, head, message) -> None:
    (f, t, e, _), (vf, vt, ve, _), _ = _data()
    p = {"offset": "linear", **params}
    with pytest.raises(ValueError, match=message):
        FusionSurvivalModel(strategy, head=head, strategy_params=p, device="cpu").fit(
            f, t, e, validation=(vf, vt, ve)
        )


def test_the_study_config_accepts_offset_for_every_strategy() -> None:
    cfg = ExperimentConfig.model_validate(
        {
            "data": {"cohort": "c.parquet", "meds_root": "m"},
            "encoders": {"ehr": [{"name": "ehr_counts"}]},
            "strategies": [
                {"name": "unimodal", "modality": "ehr", "params": {"offset": "linear"}},
            ],
        }
    )
    assert cfg.strategies[0].params == {"offset": "linear"}
    bad = {"name": "unimodal", "modality": "ehr", "params": {"ofset": "linear"}}
    with pytest.raises(ValueError, match="offset"):
        ExperimentConfig.model_validate({**cfg.model_dump(), "strategies": [bad]})


def test_with_a_fused_offset_branch_stopping_never_drops_a_modality() -> None:
    """A pure-noise EHR is dropped without the offset (the drop rule) and kept, as a modality,
    with it: the offset's candidate choice is what keeps noise out of the linear part."""
    (f, t, e, _), (vf, vt, ve, _), _ = _data(seed=11, p_noise=20)
    rng = np.random.default_rng(1)
    for feats in (f, vf):
        x = np.asarray(feats["ehr"].pooled)
        feats["ehr"] = replace(feats["ehr"], pooled=rng.normal(size=x.shape).astype(np.float32))
    kw = {"device": "cpu", "max_epochs": 40, "branch_patience": 2, "seed": 0}
    plain = FusionSurvivalModel("concat", **kw).fit(f, t, e, validation=(vf, vt, ve))
    lin = FusionSurvivalModel("concat", strategy_params={"offset": "linear"}, **kw)
    lin.fit(f, t, e, validation=(vf, vt, ve))
    assert plain.dropped_modalities_ == ["ehr"]
    assert lin.dropped_modalities_ == []
    # late fusion's offsets are per branch: its average of branches still drops a noise one
    late = FusionSurvivalModel("late", strategy_params={"offset": "linear"}, **kw)
    late.fit(f, t, e, validation=(vf, vt, ve))
    assert late.dropped_modalities_ == ["ehr"]

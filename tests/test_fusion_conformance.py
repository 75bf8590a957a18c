"""Conformance of every registered fusion strategy x survival head (issue 9)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

import survfuse.fusion
import survfuse.survival  # noqa: F401  (registers the heads)
from survfuse.features import MODALITIES
from survfuse.fusion import FusionSurvivalModel
from survfuse.fusion.batch import to_batch
from survfuse.fusion.synthetic import synthetic_features
from survfuse.registry import FUSIONS, HEADS, UnknownNameError

# every registered strategy, unimodal for both modalities, small and without dropout
VARIANTS: list[tuple[str, dict[str, object]]] = []
for _name in FUSIONS.list():
    if _name == "unimodal":
        VARIANTS += [
            (_name, {"modality": m, "tokens": t}) for t in (False, True) for m in MODALITIES
        ]
    else:
        VARIANTS.append((_name, {}))
CASES = [
    (s, p, h)
    for s, p in VARIANTS
    for h in HEADS.list()
    if FUSIONS.get(s).supported_heads is None or h in FUSIONS.get(s).supported_heads
]
IDS = [
    f"{s}-{p.get('modality', '')}{'-tokens' if p.get('tokens') else ''}-{h}".replace("--", "-")
    for s, p, h in CASES
]

DATA = synthetic_features(
    48, seed=3, ct_tokens=4, ehr_tokens=6, p_missing_ct=0.2, p_missing_ehr=0.2
)
VAL = synthetic_features(32, seed=4, ct_tokens=4, ehr_tokens=6)


# tiny models: one intra-op thread is faster and immune to a busy shared CPU
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(strategy: str, params: dict[str, object], head: str, **kw: object) -> FusionSurvivalModel:
    sp = {"dropout": 0.0, "hidden": 8, **params} if strategy != "linear" else dict(params)
    if strategy in ("cross_attention", "co_attention"):
        sp["d_model"] = 8
    if strategy == "contrastive":
        sp["proj_dim"] = 8
    args: dict[str, object] = {"max_epochs": 3, "patience": 3, "seed": 0, "device": "cpu", **kw}
    return FusionSurvivalModel(strategy, head=head, strategy_params=sp, **args)  # type: ignore[arg-type]


def build(model: FusionSurvivalModel, data=DATA):  # type: ignore[no-untyped-def]
    from survfuse.fusion.batch import ModalitySpec

    torch.manual_seed(0)
    specs = {m: ModalitySpec.of(f) for m, f in data.features.items()}
    module = model._build(specs)
    for m in module.modalities:
        module.norms[m].fit(data.features[m])
    for h in module.survival_heads():
        h.prepare(data.time, data.event)
    batch = to_batch(data.features, modalities=module.modalities, with_tokens=module.uses_tokens)
    return module, batch


def test_all_strategies_registered() -> None:
    assert set(FUSIONS.list()) >= {
        "unimodal",
        "concat",
        "late",
        "contrastive",
        "cross_attention",
        "co_attention",
    }
    with pytest.raises(UnknownNameError, match="did you mean 'co_attention'"):
        FusionSurvivalModel("co_atention")


@pytest.mark.parametrize(("strategy", "params", "head"), CASES, ids=IDS)
def test_forward_backward_and_loss_decreases(
    strategy: str, params: dict[str, object], head: str
) -> None:
    module, batch = build(small(strategy, params, head))
    t = torch.as_tensor(DATA.time)
    e = torch.as_tensor(DATA.event)
    module.train()
    out = module(batch)
    assert out.risk.shape == (48,)
    assert out.out.shape[0] == 48
    loss = module.loss(out, t, e)
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    for ps in module.modality_parameters().values():
        assert ps
    # a few full-batch steps on the same batch lower the loss
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    first = float(module.loss(module(batch), t, e).detach())
    for _ in range(15):
        opt.zero_grad()
        module.loss(module(batch), t, e).backward()
        opt.step()
    assert float(module.loss(module(batch), t, e).detach()) < first


def _absent(data, modality: str):  # type: ignore[no-untyped-def]
    f = data.features[modality]
    gone = replace(
        f,
        present=np.zeros(len(f), bool),
        mask=None if f.mask is None else np.zeros_like(f.mask),
        pooled=np.zeros_like(f.pooled),
    )
    return replace(data, features={**data.features, modality: gone})


@pytest.mark.parametrize(("strategy", "params", "head"), CASES, ids=IDS)
@pytest.mark.parametrize("missing", ["ct", "ehr"])
def test_every_patient_missing_one_modality(
    strategy: str, params: dict[str, object], head: str, missing: str
) -> None:
    tr, va = _absent(DATA, missing), _absent(VAL, missing)
    model = small(strategy, params, head, max_epochs=2)
    model.fit(tr.features, tr.time, tr.event, validation=(va.features, va.time, va.event))
    risk = model.predict_risk(va.features)
    surv = model.predict_survival(va.features, [50.0, 200.0, 800.0])
    assert risk.shape == (32,) and np.isfinite(risk).all()
    assert np.isfinite(surv).all() and (surv >= 0).all() and (surv <= 1).all()
    assert (np.diff(surv, axis=1) <= 1e-12).all()
    assert all(np.isfinite(h["train_loss"]) for h in model.history_)


@pytest.mark.parametrize(("strategy", "params", "head"), CASES, ids=IDS)
def test_save_load_round_trip(
    strategy: str, params: dict[str, object], head: str, tmp_path: Path
) -> None:
    model = small(strategy, params, head)
    model.fit(DATA.features, DATA.time, DATA.event, validation=(VAL.features, VAL.time, VAL.event))
    times = [30.0, 300.0, 3000.0]
    path = model.save(tmp_path / "m")
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()
    loaded = FusionSurvivalModel.load(path)
    np.testing.assert_array_equal(
        loaded.predict_risk(VAL.features), model.predict_risk(VAL.features)
    )
    np.testing.assert_array_equal(
        loaded.predict_survival(VAL.features, times), model.predict_survival(VAL.features, times)
    )
    assert loaded.history_ == model.history_


@pytest.mark.parametrize("strategy", ["late", "cross_attention"])
def test_deterministic_for_a_seed(strategy: str) -> None:
    def run(seed: int) -> np.ndarray:
        m = FusionSurvivalModel(
            strategy,
            max_epochs=4,
            seed=seed,
            modality_dropout=0.3,
            device="cpu",
            strategy_params={"hidden": 8, **({"d_model": 8} if strategy != "late" else {})},
        )
        return m.fit(DATA.features, DATA.time, DATA.event).predict_risk(VAL.features)

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


def test_bad_inputs_raise_clear_errors() -> None:
    m = FusionSurvivalModel("concat", max_epochs=1, device="cpu")
    with pytest.raises(ValueError, match="needs modality 'ehr'"):
        m.fit({"ct": DATA.features["ct"]}, DATA.time, DATA.event)
    with pytest.raises(ValueError, match="48 rows but time has 47"):
        m.fit(DATA.features, DATA.time[:-1], DATA.event[:-1])
    with pytest.raises(UnknownNameError, match="did you mean 'ogm_ge'"):
        FusionSurvivalModel("concat", rebalance="ogm-ge")
    with pytest.raises(UnknownNameError, match="direction"):
        FusionSurvivalModel("cross_attention", strategy_params={"direction": "ct<-ehr"}).fit(
            DATA.features, DATA.time, DATA.event
        )
    with pytest.raises(NotFittedError, match="not fitted"):
        m.predict_risk(DATA.features)

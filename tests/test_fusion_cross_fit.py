"""Late fusion's validation outputs are cross-fitted: each row scored by the combination
(weights or stacking) fitted without its fold, so its validation C is not optimistic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from survfuse.fusion import FusionSurvivalModel
from survfuse.fusion.cross_fit import cross_fit_folds, cross_fitted_validation
from survfuse.fusion.late import (
    CROSS_FIT_FOLDS,
    Late,
    fit_stacking,
    fit_weight_logits,
    stacked,
    weighted,
)
from survfuse.fusion.synthetic import synthetic_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_folds_share_the_events_and_are_reproducible() -> None:
    event = np.random.default_rng(1).random(303) < 0.3
    folds = cross_fit_folds(event, 5)
    assert set(folds.tolist()) == set(range(5))
    per_fold = np.bincount(folds[event], minlength=5)
    assert per_fold.max() - per_fold.min() <= 1  # events dealt evenly
    assert np.bincount(folds, minlength=5).max() - np.bincount(folds, minlength=5).min() <= 2
    np.testing.assert_array_equal(folds, cross_fit_folds(event, 5))


def _fitted(
    combine: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[FusionSurvivalModel, object, torch.Tensor]:
    kw = {"ct_tokens": 8, "ct_dim": 6, "ehr_tokens": 12, "vocab_size": 40, "w_ehr": 1.0}
    tr = synthetic_features(600, seed=0, **kw)  # type: ignore[arg-type]
    va = synthetic_features(250, seed=1, **kw)  # type: ignore[arg-type]
    trained: list[torch.Tensor] = []  # the weights' logits before the refit on validation
    refit = Late._fit_combination

    def spy(self: Late, *args: torch.Tensor) -> None:
        trained.append(self.weight_logits.detach().clone())
        refit(self, *args)

    monkeypatch.setattr(Late, "_fit_combination", spy)
    model = FusionSurvivalModel(
        "late",
        strategy_params={"combine": combine},
        seed=0,
        device="cpu",
        max_epochs=5,
        branch_stopping=False,
    ).fit(tr.features, tr.time, tr.event, validation=(va.features, va.time, va.event))
    return model, va, trained[0]


@pytest.mark.parametrize("combine", ["weights", "stacking"])
def test_each_validation_row_is_scored_by_the_combination_fitted_without_its_fold(
    combine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, va, trained = _fitted(combine, monkeypatch)
    module = model.module_
    oof = module.cross_fitted_out
    assert oof is not None and oof.shape == (len(va.time), 1)
    # the branch outputs the combination sees, recomputed from the saved module
    from survfuse.fusion.batch import to_batch

    batch = to_batch(va.features, modalities=module.modalities, with_tokens=False, device="cpu")
    with torch.no_grad():
        outs, present, _ = module.branch_outputs(module.normalise(batch))
    time = torch.as_tensor(va.time)
    event = torch.as_tensor(va.event)
    folds = cross_fit_folds(va.event, CROSS_FIT_FOLDS)
    # the combination was fitted before the validation slope scaled the head's risk
    scale = float(module.head.risk_scale)
    module.head.risk_scale.fill_(1.0)
    for k in (0, 3):
        held = torch.as_tensor(folds == k)
        fit = ~held
        if combine == "stacking":
            beta, mu, bias = fit_stacking(
                outs[:, fit], present[:, fit], time[fit], event[fit], module.head, 1e-3
            )
            ref = stacked(outs[:, held], present[:, held], beta, mu, bias)
        else:
            logits = fit_weight_logits(
                outs[:, fit], present[:, fit], time[fit], event[fit], module.head, trained
            )
            ref = weighted(outs[:, held], present[:, held], torch.nn.functional.softplus(logits))
        torch.testing.assert_close(oof[held], ref, rtol=1e-4, atol=1e-4)
    module.head.risk_scale.fill_(scale)
    # the full fit's outputs differ (fitted on every row; the weights of this short training
    # put everything on the CT branch in every fold too), the ranks stay close
    full = model.predict_risk(va.features)
    risk, surv = cross_fitted_validation(model, [100.0, 365.0])  # type: ignore[misc]
    assert combine == "weights" or not np.allclose(risk, full)
    assert np.corrcoef(risk, full)[0, 1] > 0.9
    assert surv.shape == (len(va.time), 2) and np.all((surv > 0) & (surv <= 1))


def test_strategies_fitted_only_on_training_have_no_cross_fitted_output() -> None:
    kw = {"ct_tokens": 4, "ct_dim": 4, "ehr_tokens": 6, "vocab_size": 20}
    tr = synthetic_features(300, seed=0, **kw)  # type: ignore[arg-type]
    va = synthetic_features(100, seed=1, **kw)  # type: ignore[arg-type]
    model = FusionSurvivalModel("concat", seed=0, device="cpu", max_epochs=2).fit(
        tr.features, tr.time, tr.event, validation=(va.features, va.time, va.event)
    )
    assert cross_fitted_validation(model, [100.0]) is None

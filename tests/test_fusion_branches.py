"""Per-modality branch supervision and early stopping (survfuse.fusion.branches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from survfuse.fusion import FusionSurvivalModel
from survfuse.fusion.branches import BranchStopper
from survfuse.fusion.synthetic import synthetic_features
from survfuse.metrics import concordance_index


def test_stalled_branch_is_restored_to_its_best_snapshot_and_frozen() -> None:
    ct, ehr = nn.Linear(3, 2), nn.Linear(4, 2)
    stopper = BranchStopper(
        {"ct": list(ct.parameters()), "ehr": list(ehr.parameters())}, patience=2, loss_weight=1.0
    )
    assert stopper.update(0, {"ct": 0.60, "ehr": 0.70}) == []
    best_ehr = [p.detach().clone() for p in ehr.parameters()]
    with torch.no_grad():  # training moves both branches
        for p in [*ct.parameters(), *ehr.parameters()]:
            p.add_(1.0)
    assert stopper.update(1, {"ct": 0.65, "ehr": 0.69}) == []
    assert stopper.update(2, {"ct": 0.66, "ehr": float("nan")}) == ["ehr"]  # NaN = no gain
    assert stopper.frozen == {"ehr": 2} and not stopper.all_frozen
    for p, saved in zip(ehr.parameters(), best_ehr, strict=True):
        assert torch.equal(p, saved) and not p.requires_grad
    assert all(p.requires_grad for p in ct.parameters())
    # a frozen branch keeps its state whatever its later score
    assert stopper.update(3, {"ct": 0.66, "ehr": 0.99}) == []
    assert stopper.summary()["ehr"] == {
        "best_val_c": 0.70,
        "best_epoch": 0,
        "frozen_at": 2,
        "dropped_at": None,
    }
    assert stopper.update(4, {"ct": 0.50}) == ["ct"] and stopper.all_frozen
    stopper.release()
    assert all(p.requires_grad for p in [*ct.parameters(), *ehr.parameters()])


def test_probe_loss_skips_frozen_branches_and_weights_the_rest() -> None:
    torch.manual_seed(0)
    ct, ehr = nn.Linear(3, 2), nn.Linear(4, 2)
    stopper = BranchStopper(
        {"ct": list(ct.parameters()), "ehr": list(ehr.parameters())}, patience=1, loss_weight=0.5
    )
    reprs = {"ct": torch.randn(20, 2), "ehr": torch.randn(20, 2)}
    present = {"ct": torch.ones(20, dtype=torch.bool), "ehr": torch.ones(20, dtype=torch.bool)}
    t, e = torch.rand(20) * 10, torch.rand(20) < 0.6
    stopper.probe_parameters(reprs)
    both = stopper.loss(reprs, present, t, e)
    stopper.update(0, {"ct": 0.6, "ehr": 0.6})
    stopper.update(1, {"ct": 0.7, "ehr": 0.5})  # ehr frozen
    only_ct = stopper.loss(reprs, present, t, e)
    from survfuse.survival.losses import cox_partial_nll

    ref_ct = cox_partial_nll(t, e, stopper.probe_risk("ct", reprs["ct"]))
    ref_ehr = cox_partial_nll(t, e, stopper.probe_risk("ehr", reprs["ehr"]))
    assert both is not None and only_ct is not None
    torch.testing.assert_close(both, 0.5 * (ref_ct + ref_ehr))
    torch.testing.assert_close(only_ct, 0.5 * ref_ct)


def _stopper(patience: int = 3, **kw: object) -> tuple[BranchStopper, nn.Module, nn.Module]:
    ct, ehr = nn.Linear(3, 2), nn.Linear(4, 2)
    params = {"ct": list(ct.parameters()), "ehr": list(ehr.parameters())}
    return BranchStopper(params, patience=patience, loss_weight=1.0, **kw), ct, ehr  # type: ignore[arg-type]


def test_chance_test_uses_the_standard_error_of_the_best_epoch() -> None:
    stopper, _, _ = _stopper(drop_alpha=0.05)
    # z = (0.56 - 0.5) / 0.03 = 2.0 > 1.645: above chance; (0.54 - 0.5) / 0.03 = 1.33: not
    stopper.update(0, {"ct": 0.56, "ehr": 0.54}, std_errors={"ct": 0.03, "ehr": 0.03})
    assert stopper.above_chance("ct") and not stopper.above_chance("ehr")
    # a worse later epoch changes neither the best C nor its standard error
    stopper.update(1, {"ct": 0.50, "ehr": 0.40}, std_errors={"ct": 0.001, "ehr": 0.001})
    assert stopper.best_se == {"ct": 0.03, "ehr": 0.03}
    # at alpha = 0.1 (z = 1.28) the EHR branch passes; without a standard error: C > 0.5
    loose, _, _ = _stopper(drop_alpha=0.1)
    loose.update(0, {"ct": 0.56, "ehr": 0.54}, std_errors={"ct": 0.03, "ehr": 0.03})
    assert loose.above_chance("ehr")
    bare, _, _ = _stopper()
    bare.update(0, {"ct": 0.501, "ehr": 0.499})
    assert bare.above_chance("ct") and not bare.above_chance("ehr")


def test_chance_level_branch_is_dropped_once_it_stops_rising_when_the_other_has_signal() -> None:
    stopper, _, ehr = _stopper(patience=3)
    se = {"ct": 0.02, "ehr": 0.02}
    start = [p.detach().clone() for p in ehr.parameters()]
    # creeping up by < DROP_MIN_DELTA: each step is a new best (no stall, no freeze), but after
    # `patience` epochs without a rise of 0.01 the branch is judged
    for epoch, ehr_c in enumerate([0.49, 0.492, 0.495, 0.498]):
        with torch.no_grad():
            for p in ehr.parameters():
                p.add_(1.0)
        assert stopper.update(epoch, {"ct": 0.6 + epoch / 50, "ehr": ehr_c}, std_errors=se) == []
        assert stopper.drop_candidates() == ([] if epoch < 3 else ["ehr"])
    stopper.drop("ehr", 3)
    assert stopper.dropped == {"ehr": 3} and stopper.frozen == {"ehr": 3}
    # restored to its best-epoch snapshot (epoch 3: the creep's last gain) and frozen
    assert all(not p.requires_grad for p in ehr.parameters())
    for p, p0 in zip(ehr.parameters(), start, strict=True):
        torch.testing.assert_close(p.detach(), p0 + 4.0)
    assert stopper.drop_candidates() == [] and stopper.summary()["ehr"]["dropped_at"] == 3


def test_a_branch_still_rising_is_not_judged_even_at_chance() -> None:
    # an informative but slow branch (measured on the fusion benchmark: CT probe 0.46 -> 0.53
    # in 9 epochs, 0.67 later) must not be dropped while it still learns
    stopper, _, _ = _stopper(patience=3)
    for epoch in range(12):
        ct_c = 0.46 + 0.012 * epoch
        stopper.update(epoch, {"ct": ct_c, "ehr": 0.69}, std_errors={"ct": 0.03, "ehr": 0.02})
        assert stopper.drop_candidates() == []
    # once it stops rising at a level above chance it is not a candidate either
    for epoch in range(12, 20):
        stopper.update(epoch, {"ct": 0.55}, std_errors={"ct": 0.03})
    assert stopper.above_chance("ct") and stopper.drop_candidates() == []


def test_no_branch_is_dropped_when_none_carries_signal_or_when_disabled() -> None:
    both, _, _ = _stopper(patience=1)
    both.update(0, {"ct": 0.51, "ehr": 0.49}, std_errors={"ct": 0.03, "ehr": 0.03})
    assert both.drop_candidates() == []
    off, _, _ = _stopper(patience=1, drop_alpha=None)
    off.update(0, {"ct": 0.9, "ehr": 0.45}, std_errors={"ct": 0.01, "ehr": 0.03})
    assert off.drop_candidates() == []
    with pytest.raises(ValueError, match="drop_alpha"):
        _stopper(drop_alpha=1.5)


def test_mask_modalities_marks_the_modality_missing_for_everyone() -> None:
    from survfuse.fusion.batch import mask_modalities, to_batch

    data = synthetic_features(10, seed=0)
    batch = to_batch(data.features, modalities=("ct", "ehr"), with_tokens=True)
    masked = mask_modalities(batch, ["ehr"])
    assert not masked["ehr"]["present"].any() and not masked["ehr"]["mask"].any()
    assert masked["ct"] is batch["ct"] and batch["ehr"]["present"].all()  # input untouched
    assert mask_modalities(batch, []) is batch


NOISE_EHR = {"ct_tokens": 8, "ct_dim": 6, "ehr_tokens": 16, "vocab_size": 521, "w_ehr": 0.0}


@pytest.fixture(scope="module")
def noise_ehr() -> tuple:
    tr = synthetic_features(1200, seed=0, **NOISE_EHR)  # type: ignore[arg-type]
    va = synthetic_features(300, seed=100, **NOISE_EHR)  # type: ignore[arg-type]
    te = synthetic_features(1500, seed=200, **NOISE_EHR)  # type: ignore[arg-type]
    return tr, va, te


def _fit(
    data: tuple, strategy: str, params: dict, **kw: object
) -> tuple[float, FusionSurvivalModel]:
    tr, va, te = data
    model = FusionSurvivalModel(strategy, strategy_params=params, seed=0, device="cpu", **kw)  # type: ignore[arg-type]
    model.fit(tr.features, tr.time, tr.event, validation=(va.features, va.time, va.event))
    c = float(concordance_index(te.time, te.event, model.predict_risk(te.features)).estimate)
    return c, model


LATE_MARGIN = (
    "since the fused model's early stopping alone ends training (issue 25), late fusion (with its "
    "validation-refitted weights) stops at epoch 37, 10 after its best, while the CT branch is "
    "still improving (its best epoch: 37): test C 0.666 against 0.661 jointly trained, a margin "
    "of 0.005 < 0.01; waiting for every branch to freeze trained on to epoch 60 (best 39, 0.671). "
    "The EHR is still dropped at epoch 10 either way; every other assertion holds"
)


@pytest.mark.parametrize(
    "strategy",
    [
        "concat",
        pytest.param("late", marks=pytest.mark.xfail(strict=True, reason=LATE_MARGIN)),
        "contrastive",
    ],
)
def test_branch_stopping_lets_fusion_match_ct_only_when_ehr_is_noise(
    noise_ehr: tuple, strategy: str
) -> None:
    # The EHR is 521-dimensional pure noise. Trained jointly without branch stopping, early
    # stopping on the fused C-index stops while the CT branch is half-trained (measured: test C
    # 0.643 concat, 0.650 late, 0.648 contrastive vs 0.670 CT-only). With branch stopping the
    # EHR branch is frozen near its initialisation within ~16 epochs and the CT branch trains
    # on (0.662, 0.670, 0.666). Measured again once the fused model's early stopping alone ended
    # training (issue 25; concat and contrastive pass, late: `LATE_MARGIN`).
    ct_only, _ = _fit(noise_ehr, "unimodal", {"modality": "ct"})
    assert ct_only > 0.64
    joint, _ = _fit(noise_ehr, strategy, {}, branch_stopping=False)
    fused, model = _fit(noise_ehr, strategy, {})
    assert fused > ct_only - 0.01
    s = model.branch_summary_
    assert s["ehr"]["frozen_at"] is not None and s["ehr"]["best_val_c"] < 0.56  # type: ignore[operator]
    assert s["ct"]["best_epoch"] > s["ehr"]["best_epoch"]  # type: ignore[operator]
    # per-branch validation C-indices are in the training curve, and a frozen branch is marked
    assert {"val_c_index_ct", "val_c_index_ehr"} <= set(model.history_[0])
    assert any(r.get("frozen_ehr") for r in model.history_)
    # the noise EHR fails the chance test: dropped, so the EHR input no longer moves the risk
    assert model.dropped_modalities_ == ["ehr"] and any(
        r.get("dropped_ehr") for r in model.history_
    )
    # the weights kept were never scored with the EHR present: early stopping restarted there
    assert model.best_epoch_ is not None and model.best_epoch_ >= s["ehr"]["dropped_at"]  # type: ignore[operator]
    te = noise_ehr[2]
    shuffled = dict(te.features)
    shuffled["ehr"] = te.features["ehr"].select(np.random.default_rng(1).permutation(len(te.time)))
    np.testing.assert_array_equal(model.predict_risk(shuffled), model.predict_risk(te.features))
    # after fit every branch is trainable again (a fitted model is a plain module)
    branches = model.module_.modality_parameters().values()  # type: ignore[union-attr]
    assert all(p.requires_grad for ps in branches for p in ps)
    # last, so that the xfail of `late` still checks everything above
    assert fused > joint + 0.01


def test_branch_stopping_is_deterministic_and_saved_in_the_config(
    noise_ehr: tuple, tmp_path
) -> None:
    c1, m1 = _fit(noise_ehr, "late", {}, branch_patience=3, branch_loss=0.5)
    c2, _ = _fit(noise_ehr, "late", {}, branch_patience=3, branch_loss=0.5)
    assert c1 == c2
    m1.save(tmp_path / "m")
    loaded = FusionSurvivalModel.load(tmp_path / "m")
    assert loaded.branch_patience == 3 and loaded.branch_loss == 0.5 and loaded.branch_stopping
    assert loaded.dropped_modalities_ == m1.dropped_modalities_ == ["ehr"]
    te = noise_ehr[2]
    np.testing.assert_array_equal(loaded.predict_risk(te.features), m1.predict_risk(te.features))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"branch_loss": -1.0}, "branch_loss"),
        ({"branch_patience": 0}, "branch_patience"),
        ({"branch_drop_alpha": 0.0}, "branch_drop_alpha"),
    ],
)
def test_branch_options_are_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FusionSurvivalModel("late", **kwargs)


def test_informative_branches_are_kept() -> None:
    # both modalities carry signal (w_ct = w_ehr = 1): neither is dropped, and switching the
    # chance test off (branch_drop_alpha=None) gives the same model
    data = tuple(
        synthetic_features(n, seed=s, vocab_size=40) for n, s in ((800, 0), (300, 100), (800, 200))
    )
    c, model = _fit(data, "late", {})
    c_off, _ = _fit(data, "late", {}, branch_drop_alpha=None)
    assert model.dropped_modalities_ == [] and c == c_off
    assert all(v["dropped_at"] is None for v in model.branch_summary_.values())


def test_a_chance_branch_is_kept_when_masking_it_would_hurt_the_fused_model(
    noise_ehr: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the guard: a probe at chance does not prove the fusion layers ignore a modality, so the
    # drop also needs the fused validation C without it to be at least the C with it
    monkeypatch.setattr(FusionSurvivalModel, "_val_c", lambda self, *a, **k: float("-inf"))
    _, model = _fit(noise_ehr, "late", {})
    assert model.dropped_modalities_ == []
    assert any("val_c_index_without_ehr" in r for r in model.history_)
    assert model.branch_summary_["ehr"]["dropped_at"] is None

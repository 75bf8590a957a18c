"""`validation_slope`: a Cox model's risk rescaled by its calibration slope on validation.

The slope reference is lifelines' `CoxPHFitter` (Efron ties) of the outcome on the predicted
risk, an implementation independent of survfuse's `cox_fit`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter

from survfuse.features import ModalityFeatures
from survfuse.fusion import FusionSurvivalModel
from survfuse.survival.heads import CoxHead
from survfuse.survival.recalibration import SLOPE_BOUNDS, risk_scale

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _features(x: np.ndarray, offset: int) -> ModalityFeatures:
    n = x.shape[0]
    return ModalityFeatures(
        subject_id=np.arange(n, dtype=np.int64) + offset,
        prediction_time=np.full(n, np.datetime64("2020-01-01T00:00:00", "us")),
        pooled=x.astype(np.float32),
        present=np.ones(n, bool),
        meta={"encoder": "test"},
    )


def _split(n: int, seed: int, offset: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """CT: 3 informative + 5 noise columns, EHR: 2 informative + 5 noise; exponential times."""
    rng = np.random.default_rng(seed)
    ct, ehr = rng.normal(size=(n, 8)), rng.normal(size=(n, 7))
    lp = ct[:, :3] @ np.array([0.8, -0.5, 0.4]) + ehr[:, :2] @ np.array([0.6, 0.3])
    t_event = rng.exponential(np.exp(-lp) * 300.0)
    t_cens = rng.exponential(500.0, n)
    feats = {"ct": _features(ct, offset), "ehr": _features(ehr, offset)}
    return feats, np.minimum(t_event, t_cens), t_event <= t_cens


def _lifelines_slope(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    df = pd.DataFrame({"r": risk, "T": time, "E": event})
    return float(CoxPHFitter(penalizer=0.0).fit(df, "T", "E").params_["r"])


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[dict, np.ndarray, np.ndarray]]:
    return {
        "train": _split(500, 1, 0),
        "validation": _split(800, 2, 10_000),
        "test": _split(4000, 3, 20_000),
    }


def _fit(data: dict, strategy: str, on: bool, **kw: object) -> FusionSurvivalModel:
    return FusionSurvivalModel(strategy, device="cpu", validation_slope=on, **kw).fit(
        *data["train"], validation=data["validation"]
    )


# a heavy ridge penalty shrinks the linear predictor: test slope well above 1 without the scale
HEAVY = {"l1_ratio": 0.0, "penalties": [1.0]}  # test slope 2.9 unscaled


def test_linear_model_gets_slope_one_on_validation_and_keeps_ranks(data: dict) -> None:
    off = _fit(data, "linear", False, strategy_params=HEAVY)
    on = _fit(data, "linear", True, strategy_params=HEAVY)
    assert off.validation_slope_ is None
    s = on.validation_slope_
    assert s is not None
    fv, tv, ev = data["validation"]
    # the scale is the validation slope of the unscaled risk (lifelines), and after it the
    # validation slope is 1
    assert s == pytest.approx(_lifelines_slope(tv, ev, off.predict_risk(fv)), rel=2e-3)
    assert _lifelines_slope(tv, ev, on.predict_risk(fv)) == pytest.approx(1.0, abs=2e-3)
    ft, tt, et = data["test"]
    r_off, r_on = off.predict_risk(ft), on.predict_risk(ft)
    np.testing.assert_allclose(r_on, s * r_off, rtol=1e-5, atol=1e-7)  # ranks kept
    # on patients in neither split the rescaled model is calibrated and the shrunk one is not
    slope_off, slope_on = _lifelines_slope(tt, et, r_off), _lifelines_slope(tt, et, r_on)
    assert slope_off > 2.0
    assert abs(slope_on - 1.0) < 0.1
    # the survival curves use the scaled risk (the baseline is refitted on it)
    surv = on.predict_survival(ft, [100.0, 300.0])
    assert surv.shape == (len(tt), 2)
    assert np.corrcoef(surv[:, 1], r_on)[0, 1] < -0.9


def test_deep_model_scale_and_unscaled_training_are_bit_identical(data: dict) -> None:
    kw = {"max_epochs": 6, "strategy_params": {"hidden": 16}}
    off = _fit(data, "concat", False, **kw)
    on = _fit(data, "concat", True, **kw)

    # training itself is untouched by the option (scale 1 until training ends)
    def epochs(m: FusionSurvivalModel) -> list[dict]:
        return [{k: v for k, v in h.items() if k != "seconds"} for h in m.history_]

    assert epochs(off) == epochs(on)
    ft = data["test"][0]
    s = on.validation_slope_
    assert s is not None and SLOPE_BOUNDS[0] <= s <= SLOPE_BOUNDS[1]
    np.testing.assert_allclose(on.predict_risk(ft), s * off.predict_risk(ft), rtol=1e-5)


def test_no_validation_or_discrete_head_leaves_scale_one(data: dict) -> None:
    m = FusionSurvivalModel("linear", device="cpu", strategy_params=HEAVY).fit(*data["train"])
    assert m.validation_slope_ is None
    head = m.module_.output_head
    assert isinstance(head, CoxHead) and float(head.risk_scale) == 1.0
    d = _fit(data, "concat", True, head="discrete", max_epochs=2)
    assert d.validation_slope_ is None


def test_scale_survives_save_and_old_checkpoints_load_with_scale_one(data: dict, tmp_path) -> None:
    on = _fit(data, "linear", True, strategy_params=HEAVY)
    ft = data["test"][0]
    back = FusionSurvivalModel.load(on.save(tmp_path / "m"))
    np.testing.assert_array_equal(back.predict_risk(ft), on.predict_risk(ft))
    assert back.validation_slope_ == on.validation_slope_
    # a state saved before the buffer existed: no risk_scale key -> scale 1
    head = CoxHead(4)
    state = {k: v for k, v in head.state_dict().items() if k != "risk_scale"}
    head.risk_scale.fill_(3.0)
    head.load_state_dict(state)
    assert float(head.risk_scale) == 1.0
    out = torch.randn(5, 1)
    torch.testing.assert_close(head.risk(out), out[:, 0])


def test_risk_scale_edge_cases() -> None:
    t = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert risk_scale(t, np.zeros(5, bool), np.arange(5.0)) is None  # no event
    assert risk_scale(t, np.ones(5, bool), np.ones(5)) is None  # constant risk
    # risk ordered against the outcome: negative slope, floored (ranks kept)
    rng = np.random.default_rng(0)
    r = rng.normal(size=400)
    time = rng.exponential(np.exp(r))  # higher risk lives longer: slope < 0
    assert risk_scale(time, np.ones(400, bool), r) == SLOPE_BOUNDS[0]

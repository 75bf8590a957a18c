"""`CoxPH` and `FusionSurvivalModel` inside scikit-learn's model selection, on real data.

CoxPH: `cross_val_score` and `GridSearchCV` give the numbers scikit-survival's
`CoxPHSurvivalAnalysis` gives on the same folds (DeepSurv METABRIC, 9 covariates); its
`predict_survival_function` / `predict_cumulative_hazard_function` equal scikit-survival's.
FusionSurvivalModel: two-view METABRIC (4 gene-expression indicators as "ct", 5 clinical
covariates as "ehr", as tests/test_fusion_metabric.py); `cross_val_score` equals a hand-written
fold loop scored by lifelines' concordance index, and `GridSearchCV` picks and refits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lifelines.utils import concordance_index as lifelines_c
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv

from survfuse.fusion import FusionSurvivalModel
from survfuse.fusion.multimodal import MultimodalFeatures
from survfuse.interop import to_sksurv
from survfuse.survival import CoxPH
from survfuse.training import TrainingOptions
from test_fusion_metabric import load, two_views

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CV = KFold(n_splits=3, shuffle=True, random_state=0)


@pytest.fixture(scope="module")
def metabric(shared_path: Callable[..., Path]) -> dict[str, Any]:
    data = load(shared_path("tabular", "deepsurv", "metabric_IHC4_clinical_train_test.h5"))
    (x, t, e), (xt, tt, et) = data["train"], data["test"]
    return {
        "x": x.astype(np.float64),
        "y": to_sksurv(t, e),
        "X": MultimodalFeatures(two_views(x)),
        "x_test": xt.astype(np.float64),
        "y_test": to_sksurv(tt, et),
        "X_test": MultimodalFeatures(two_views(xt)),
    }


# ----------------------------------------------------------------------------- CoxPH
def test_coxph_cross_val_score_equals_scikit_survival(metabric: dict[str, Any]) -> None:
    x, y = metabric["x"], metabric["y"]
    ours = cross_val_score(CoxPH(ties="breslow"), x, y, cv=CV)
    theirs = cross_val_score(CoxPHSurvivalAnalysis(ties="breslow"), x, y, cv=CV)
    print("CoxPH 3-fold C", ours.round(4), "sksurv", theirs.round(4))
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert np.all((ours > 0.6) & (ours < 0.7))  # the linear Cox's test C is 0.6324


def test_coxph_grid_search_equals_scikit_survival(metabric: dict[str, Any]) -> None:
    x, y = metabric["x"], metabric["y"]
    grid = {"alpha": [0.0, 10.0, 1000.0]}
    ours = GridSearchCV(CoxPH(ties="breslow"), grid, cv=CV).fit(x, y)
    theirs = GridSearchCV(CoxPHSurvivalAnalysis(ties="breslow"), grid, cv=CV).fit(x, y)
    np.testing.assert_allclose(
        ours.cv_results_["mean_test_score"], theirs.cv_results_["mean_test_score"], atol=1e-6
    )
    assert ours.best_params_ == theirs.best_params_
    np.testing.assert_allclose(ours.best_estimator_.coef_, theirs.best_estimator_.coef_, atol=1e-6)
    assert ours.score(metabric["x_test"], metabric["y_test"]) == pytest.approx(
        theirs.score(metabric["x_test"], metabric["y_test"]), abs=1e-6
    )


def test_coxph_curves_equal_scikit_survival(metabric: dict[str, Any]) -> None:
    x, y = metabric["x"], metabric["y"]
    ours = CoxPH(ties="breslow").fit(x, y)
    theirs = CoxPHSurvivalAnalysis(ties="breslow").fit(x, y)
    xt = metabric["x_test"][:25]
    for mine, ref in (
        (ours.predict_survival_function(xt), theirs.predict_survival_function(xt)),
        (
            ours.predict_cumulative_hazard_function(xt),
            theirs.predict_cumulative_hazard_function(xt),
        ),
    ):
        assert mine.shape == (25,)
        for a, b in zip(mine, ref, strict=True):
            np.testing.assert_array_equal(a.x, b.x)  # knots: the distinct training times
            np.testing.assert_allclose(a.y, b(b.x), atol=1e-8)  # sksurv's .y omits exp(risk)
            inside = np.linspace(b.x[0], b.x[-1], 50)
            np.testing.assert_allclose(a(inside), b(inside), atol=1e-8)
    arr = ours.predict_survival_function(xt, return_array=True)
    np.testing.assert_allclose(
        arr, theirs.predict_survival_function(xt, return_array=True), atol=1e-8
    )
    np.testing.assert_array_equal(ours.unique_times_, theirs.unique_times_)


def test_structured_y_is_read_by_position_as_scikit_survival() -> None:
    g = np.random.default_rng(1)
    x, t, e = g.normal(size=(60, 2)), g.exponential(5.0, 60), g.random(60) < 0.7
    custom = Surv.from_arrays(event=e, time=t, name_event="died", name_time="days")
    a = CoxPH().fit(x, custom)
    np.testing.assert_array_equal(a.coef_, CoxPH().fit(x, t, e).coef_)
    swapped = np.empty(60, dtype=[("time", float), ("event", bool)])
    swapped["time"], swapped["event"] = t, e
    with pytest.raises(ValueError, match="event \\(bool\\) field must come first"):
        CoxPH().fit(x, swapped)
    with pytest.raises(ValueError, match="structured array with two fields"):
        CoxPH().fit(x, t)


# ----------------------------------------------------------------------------- fusion
FUSION = {"max_epochs": 15, "seed": 0, "device": "cpu", "lr": 0.01}


def test_fusion_cross_val_score_equals_a_fold_loop(metabric: dict[str, Any]) -> None:
    X, y = metabric["X"], metabric["y"]
    model = FusionSurvivalModel("late", **FUSION)
    scores = cross_val_score(model, X, y, cv=CV)
    by_hand = []
    for train, test in CV.split(np.zeros(X.shape[0])):
        fold = {m: f.select(train) for m, f in X.items()}
        fitted = FusionSurvivalModel("late", **FUSION).fit(fold, y[train])
        risk = fitted.predict({m: f.select(test) for m, f in X.items()})
        by_hand.append(lifelines_c(y["time"][test], -risk, y["event"][test]))
    print("late fusion 3-fold C", scores.round(4), "by hand", np.round(by_hand, 4))
    np.testing.assert_allclose(scores, by_hand, atol=1e-9)
    assert np.all(scores > 0.58)


def test_fusion_grid_search_picks_and_refits(metabric: dict[str, Any]) -> None:
    X, y = metabric["X"], metabric["y"]
    grid = {"strategy": ["concat", "late"], "max_epochs": [1, 15]}
    search = GridSearchCV(FusionSurvivalModel(**{**FUSION, "max_epochs": 1}), grid, cv=CV)
    search.fit(X, y)
    results = search.cv_results_
    means = {
        str(p): round(float(c), 4)
        for p, c in zip(results["params"], results["mean_test_score"], strict=True)
    }
    print("grid mean C", means)
    assert search.best_params_["max_epochs"] == 15  # one epoch is too few on METABRIC
    best = search.best_estimator_
    assert best.strategy == search.best_params_["strategy"] and len(best.history_) == 15
    test_c = best.score(metabric["X_test"], metabric["y_test"])
    assert test_c > 0.6, test_c


def test_fusion_clone_get_set_params() -> None:
    model = FusionSurvivalModel("cross_attention", strategy_params={"d_model": 8}, lr=0.01)
    params = model.get_params()
    # the training arguments are exactly TrainingOptions' fields, with its defaults
    assert set(TrainingOptions.model_fields) <= set(params)
    assert set(params) - set(TrainingOptions.model_fields) == {
        "strategy",
        "head",
        "strategy_params",
        "head_params",
        "seed",
        "verbose",
    }
    defaults = FusionSurvivalModel().get_params()
    for name, field in TrainingOptions.model_fields.items():
        if name != "rebalance_params":
            assert defaults[name] == field.get_default(call_default_factory=True), name
    twin = clone(model)
    assert twin.get_params() == params and twin.strategy_params is not model.strategy_params
    twin.set_params(max_epochs=3, strategy_params={"d_model": 4})
    assert twin.options.max_epochs == 3 and model.max_epochs == 100
    made = FusionSurvivalModel.from_options("late", TrainingOptions(lr=0.02), seed=3)
    assert made.options == FusionSurvivalModel("late", lr=0.02, seed=3).options
    assert (made.strategy, made.seed, made.lr) == ("late", 3, 0.02)


def test_fusion_fitted_attributes_end_in_underscore(metabric: dict[str, Any]) -> None:
    X, y = metabric["X"][np.arange(300)], metabric["y"][:300]
    model = FusionSurvivalModel("late", max_epochs=2, device="cpu")
    before = set(vars(model))
    model.fit(X, y)
    added = {a for a in set(vars(model)) - before if not a.startswith("_")}
    assert added and all(a.endswith("_") for a in added), added
    assert {"module_", "history_", "best_epoch_", "dropped_modalities_"} <= added
    assert model.get_params()["max_epochs"] == 2  # fitting changed no parameter


@pytest.mark.parametrize("head", ["cox", "discrete"])
def test_fusion_survival_functions_follow_the_head(head: str, metabric: dict[str, Any]) -> None:
    rows = np.arange(400)
    X, y = metabric["X"][rows], metabric["y"][rows]
    model = FusionSurvivalModel("concat", head=head, max_epochs=3, device="cpu").fit(X, y)
    Xt = metabric["X_test"][np.arange(10)]
    fns = model.predict_survival_function(Xt)
    knots = fns[0].x
    if head == "cox":  # the Cox head's curves step at every distinct training time
        np.testing.assert_array_equal(knots, np.unique(y["time"]))
    else:  # the discrete head's at its bin cut points
        assert knots.shape == (3,)
    grid = np.linspace(0.0, 1.2 * y["time"].max(), 200)
    direct = model.predict_survival(Xt, grid)
    stepped = np.stack([f(grid) for f in fns])
    np.testing.assert_allclose(stepped, direct, atol=1e-12)
    assert np.all(np.diff(stepped, axis=1) <= 0) and np.all(stepped[:, 0] == 1.0)
    hazard = np.stack([f(grid) for f in model.predict_cumulative_hazard_function(Xt)])
    np.testing.assert_allclose(np.exp(-hazard), direct, atol=1e-12)
    arr = model.predict_survival_function(Xt, return_array=True)
    np.testing.assert_allclose(arr, model.predict_survival(Xt, knots), atol=0)


def test_multimodal_features_select_rows(metabric: dict[str, Any]) -> None:
    X = metabric["X"]
    n = X.shape[0]
    assert len(X) == 2 and X.shape == (n,) and X["ct"].pooled_dim == 4
    rows = np.array([5, 0, 7])
    for key in (rows, (rows, Ellipsis), list(rows)):
        part = X[key]
        assert part.shape == (3,)
        np.testing.assert_array_equal(part["ehr"].pooled, X["ehr"].pooled[rows])
    mask = np.zeros(n, dtype=bool)
    mask[[2, 9]] = True
    np.testing.assert_array_equal(X[mask]["ct"].subject_id, [2, 9])
    assert X[10:20].shape == (10,)
    with pytest.raises(ValueError, match="different row counts"):
        MultimodalFeatures({"ct": X["ct"], "ehr": X["ehr"].select(np.arange(5))})

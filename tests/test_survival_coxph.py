"""CoxPH against R survival::coxph, the DeepSurv reference C-indices and scikit-survival."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines.utils import concordance_index
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sksurv.linear_model import CoxPHSurvivalAnalysis

from survfuse.interop import to_sksurv
from survfuse.registry import UnknownNameError
from survfuse.survival import CoxPH, breslow_baseline, cox_log_likelihood

HERE = Path(__file__).resolve().parent
R_REF = json.loads((HERE / "reference" / "coxph_r.json").read_text())  # tests/reference/coxph.R
DATASETS = ["lung", "veteran", "pbc", "gbsg"]


def _r_data(name: str):
    d = R_REF[name]
    return np.array(d["X"], dtype=np.float64), np.array(d["time"]), np.array(d["event"]) == 1


@pytest.mark.parametrize("ties", ["efron", "breslow"])
@pytest.mark.parametrize("name", DATASETS)
def test_matches_r_coxph(name, ties):
    x, t, e = _r_data(name)
    ref = R_REF[name][ties]
    fit = CoxPH(ties=ties).fit(x, t, e)
    assert fit.converged_
    np.testing.assert_allclose(fit.coef_, ref["coef"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(fit.se_, ref["se"], rtol=0, atol=1e-5)
    # log partial likelihood at R's own coefficients (fit$loglik[2]) and at zero (fit$loglik[1])
    assert abs(cox_log_likelihood(x, t, e, ref["coef"], ties=ties) - ref["loglik"][1]) < 1e-8
    assert (
        abs(cox_log_likelihood(x, t, e, np.zeros(x.shape[1]), ties=ties) - ref["loglik"][0]) < 1e-8
    )
    assert abs(fit.loglik_null_ - ref["loglik"][0]) < 1e-8
    # basehaz(fit, centered = FALSE): Breslow for breslow fits, Efron-adjusted for efron fits
    h0 = breslow_baseline(t, e, x @ np.array(ref["coef"]), ties=ties)
    np.testing.assert_allclose(h0(ref["basehaz_time"]), ref["basehaz_hazard"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(
        fit.baseline_cumulative_hazard_(ref["basehaz_time"]), ref["basehaz_hazard"], atol=1e-8
    )


def test_ridge_matches_r_ridge():
    x, t, e = _r_data("lung")
    ref = R_REF["lung"]["ridge_efron"]
    fit = CoxPH(alpha=ref["theta"][0]).fit(x, t, e)
    np.testing.assert_allclose(fit.coef_, ref["coef"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(fit.se_, ref["se"], rtol=0, atol=1e-5)


# Harrell's C on the DeepSurv test splits (shared/data/README.md: lifelines 0.30.3, Efron, no penalty)
DEEPSURV = [
    ("metabric_IHC4_clinical_train_test.h5", 0.6324),
    ("support_train_test.h5", 0.5831),
    ("gbsg_cancer_train_test.h5", 0.6563),
    ("whas_train_test.h5", 0.8160),
]


@pytest.mark.parametrize(("file", "expected"), DEEPSURV)
def test_deepsurv_reference_c_index(file, expected, shared_path):
    with h5py.File(shared_path("tabular", "deepsurv", file), "r") as h:
        train = {k: h["train"][k][()] for k in ("x", "t", "e")}
        test = {k: h["test"][k][()] for k in ("x", "t", "e")}
    fit = CoxPH().fit(train["x"], train["t"], train["e"].astype(bool))
    c = concordance_index(test["t"], -fit.predict_risk(test["x"]), test["e"])
    assert abs(c - expected) <= 0.0005


def test_sklearn_params_clone_and_structured_y():
    model = CoxPH(ties="breslow", alpha=0.5)
    assert model.get_params() == {
        "ties": "breslow",
        "alpha": 0.5,
        "max_iter": 50,
        "tol": 1e-10,
        "max_halvings": 30,
    }
    twin = clone(model).set_params(alpha=0.0)
    assert twin.alpha == 0.0 and model.alpha == 0.5 and not hasattr(twin, "coef_")
    x, t, e = _r_data("veteran")
    a = twin.fit(x, to_sksurv(t, e))
    b = CoxPH(ties="breslow").fit(x, t, e)
    np.testing.assert_array_equal(a.coef_, b.coef_)


def test_survival_matches_scikit_survival():
    x, t, e = _r_data("pbc")
    ours = CoxPH(ties="breslow").fit(x, t, e)
    theirs = CoxPHSurvivalAnalysis(ties="breslow").fit(x, to_sksurv(t, e))
    np.testing.assert_allclose(ours.coef_, theirs.coef_, atol=1e-6)
    grid = np.linspace(t.min(), t.max(), 40)  # sksurv clamps times below its first time
    ref = np.stack([fn(grid) for fn in theirs.predict_survival_function(x[:20])])
    np.testing.assert_allclose(ours.predict_survival(x[:20], grid), ref, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(5, 80), scale=st.floats(0.01, 20.0))
def test_predicted_survival_in_unit_interval_and_non_increasing(seed, n, scale):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, 2)) * scale
    t = np.round(g.exponential(10.0, n), 1)
    e = g.random(n) < 0.6
    e[0] = True
    fit = CoxPH(alpha=1.0).fit(x, t, e)
    grid = np.sort(g.uniform(0, 2 * t.max() + 1, 30))
    s = fit.predict_survival(g.normal(size=(10, 2)) * scale, grid)
    assert np.isfinite(s).all() and np.all((s >= 0) & (s <= 1))
    assert np.all(np.diff(s, axis=1) <= 0)


def test_errors_are_clear():
    x, t, e = _r_data("lung")
    with pytest.raises(UnknownNameError, match="did you mean 'efron'"):
        CoxPH(ties="efronn").fit(x, t, e)
    with pytest.raises(ValueError, match="no observed event"):
        CoxPH().fit(x, t, np.zeros_like(e))
    with pytest.raises(ValueError, match="singular"):
        CoxPH().fit(np.c_[x[:, :2], x[:, :1]], t, e)
    with pytest.raises(ValueError, match=r"X\[3, 1\]"):
        bad = x.copy()
        bad[3, 1] = np.nan
        CoxPH().fit(bad, t, e)
    with pytest.raises(NotFittedError, match="not fitted"):
        CoxPH().predict_risk(x)

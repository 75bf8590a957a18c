"""`CoxPH.summary` against R's `summary(coxph(...))` / `confint` and lifelines' `CoxPHFitter.summary`.

R: tests/reference/coxph_summary.R wrote tests/reference/coxph_summary_r.json (pbc and lung from
R survival, Efron ties; the data are those of coxph_r.json). lifelines: fitted here on the
DeepSurv METABRIC training split (real data, 9 covariates) and on R's pbc.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from sklearn.exceptions import NotFittedError

from survfuse.interop import to_lifelines
from survfuse.survival import CoxPH

HERE = Path(__file__).resolve().parent
R_DATA = json.loads((HERE / "reference" / "coxph_r.json").read_text())
R_SUMMARY = json.loads((HERE / "reference" / "coxph_summary_r.json").read_text())
LIFELINES_COLUMNS = [
    "coef",
    "exp(coef)",
    "se(coef)",
    "coef lower 95%",
    "coef upper 95%",
    "exp(coef) lower 95%",
    "exp(coef) upper 95%",
    "cmp to",
    "z",
    "p",
    "-log2(p)",
]


def _r_frame(name: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    d = R_DATA[name]
    x = pd.DataFrame(np.array(d["X"], dtype=np.float64), columns=d["covariates"])
    return x, np.array(d["time"], dtype=np.float64), np.array(d["event"]) == 1


def _metabric(shared_path: Callable[..., Path]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    with h5py.File(shared_path("tabular", "deepsurv", "metabric_IHC4_clinical_train_test.h5")) as h:
        x, t, e = (h["train"][k][()] for k in ("x", "t", "e"))
    cols = ["MKI67", "EGFR", "PGR", "ERBB2", "hormone", "radio", "chemo", "ER", "age"]
    return pd.DataFrame(x.astype(np.float64), columns=cols), t.astype(np.float64), e.astype(bool)


@pytest.mark.parametrize("name", ["pbc", "lung"])
def test_summary_matches_r(name: str) -> None:
    x, t, e = _r_frame(name)
    ref = R_SUMMARY[name]
    assert ref["n"] == [x.shape[0]]  # the same complete cases as coxph_r.json
    s = CoxPH(ties="efron").fit(x, t, e).summary
    assert list(s.index) == ref["covariates"] and s.index.name == "covariate"
    pairs = {
        "coef": "coef",
        "exp(coef)": "exp_coef",
        "se(coef)": "se_coef",
        "z": "z",
        "coef lower 95%": "coef_lower_95",
        "coef upper 95%": "coef_upper_95",
        "exp(coef) lower 95%": "exp_coef_lower_95",
        "exp(coef) upper 95%": "exp_coef_upper_95",
    }
    for ours, theirs in pairs.items():
        np.testing.assert_allclose(s[ours], ref[theirs], rtol=1e-5, atol=1e-7, err_msg=ours)
    # p spans 1e-25 .. 0.5: compare on the log scale, as -log2(p) does
    np.testing.assert_allclose(s["p"], ref["p"], rtol=1e-4)
    np.testing.assert_allclose(s["-log2(p)"], -np.log2(ref["p"]), rtol=1e-5)


@pytest.mark.parametrize("data", ["metabric", "pbc"])
def test_summary_matches_lifelines(data: str, shared_path: Callable[..., Path]) -> None:
    x, t, e = _metabric(shared_path) if data == "metabric" else _r_frame("pbc")
    ours = CoxPH().fit(x, t, e).summary
    fitter = CoxPHFitter().fit(
        to_lifelines(t, e, x),
        duration_col="time",
        event_col="event",
        fit_options={"precision": 1e-12, "max_steps": 100},  # its default stops at ~1e-5
    )
    theirs = fitter.summary
    assert list(ours.columns) == list(theirs.columns) == LIFELINES_COLUMNS
    assert list(ours.index) == list(theirs.index) and ours.index.name == theirs.index.name
    # both converged to 1e-12: the tables agree to rounding
    np.testing.assert_allclose(
        ours.drop(columns="p").to_numpy(),
        theirs.drop(columns="p").to_numpy(),
        rtol=1e-8,
        atol=1e-10,
    )
    np.testing.assert_allclose(ours["p"], theirs["p"], rtol=1e-6, atol=1e-300)


def test_summary_names_plain_array_columns_and_needs_a_fit() -> None:
    x, t, e = _r_frame("pbc")
    with pytest.raises(NotFittedError, match="not fitted"):
        _ = CoxPH().summary
    s = CoxPH().fit(x.to_numpy(), t, e).summary
    assert list(s.index) == [f"x{j}" for j in range(x.shape[1])]
    np.testing.assert_allclose(s["exp(coef)"], np.exp(s["coef"]), rtol=1e-15)
    assert (s["cmp to"] == 0).all()

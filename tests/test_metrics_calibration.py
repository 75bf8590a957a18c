"""Calibration at a horizon, ICI/E50, slope and D-calibration."""

from __future__ import annotations

import numpy as np
import pytest
from lifelines import KaplanMeierFitter
from sksurv.linear_model import CoxPHSurvivalAnalysis

from survfuse.interop import to_sksurv
from survfuse.metrics import calibration, calibration_table, d_calibration, survival_at
from survfuse.metrics.calibration import cox_fit, rcs_basis


def _exp_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    scale = 300.0 * np.exp(-x @ np.array([0.7, -0.3]))
    event_time = rng.exponential(scale)
    cens = rng.exponential(500.0, n)
    return np.round(np.minimum(event_time, cens)) + 1, event_time <= cens, x, scale


def test_cox_fit_matches_sksurv_breslow() -> None:
    t, e, x, _ = _exp_data(400, 1)
    basis = rcs_basis(x[:, 0], np.quantile(x[:, 0], [0.1, 0.5, 0.9]))
    ours = cox_fit(t, e, np.column_stack([basis, x[:, 1]]))
    sk = CoxPHSurvivalAnalysis(alpha=0, ties="breslow", tol=1e-12, n_iter=200)
    sk.fit(np.column_stack([basis, x[:, 1]]), to_sksurv(t, e))
    np.testing.assert_allclose(ours.coef, sk.coef_, atol=1e-7)
    fns = sk.predict_survival_function(np.column_stack([basis, x[:, 1]])[:5])
    lp = np.column_stack([basis, x[:, 1]])[:5] @ ours.coef
    for h in (50.0, 200.0):
        np.testing.assert_allclose(
            np.exp(-ours.cumhaz0(h) * np.exp(lp)), [fn(h) for fn in fns], atol=1e-7
        )


def test_ici_small_for_true_model_large_for_miscalibrated() -> None:
    t, e, _, scale = _exp_data(1500, 2)
    h = 200.0
    truth = np.exp(-h / scale)
    good = calibration(t, e, truth, h)
    bad = calibration(t, e, truth**2, h)  # event probabilities too high
    assert good.ici < 0.03 and good.e50 <= good.e90 <= good.emax
    assert bad.ici > 0.1
    assert abs(good.slope - 1) < 0.15
    # a model whose log(-log S) is spread twice too far has slope near 1/2
    over = np.exp(-np.exp(2 * np.log(h / scale)))
    assert calibration(t, e, over, h).slope == pytest.approx(0.5, abs=0.1)


def test_calibration_table_observed_is_group_km() -> None:
    t, e, _, scale = _exp_data(600, 3)
    h = 150.0
    pred = np.exp(-h / scale)
    tab = calibration_table(t, e, pred, h, n_groups=5)
    assert tab["n"].sum() == 600 and tab.height == 5
    order = np.argsort(1 - pred, kind="stable")
    for g, idx in enumerate(np.array_split(order, 5)):
        kmf = KaplanMeierFitter().fit(t[idx], e[idx])
        observed = 1 - kmf.survival_function_at_times([h]).to_numpy()[0]
        assert tab["observed"][g] == pytest.approx(observed, abs=1e-12)
        assert tab["predicted"][g] == pytest.approx(float(np.mean(1 - pred[idx])), abs=1e-12)


def _d_cal_reference(t: np.ndarray, e: np.ndarray, u: np.ndarray, bins: int) -> np.ndarray:
    """Haider et al. (2020), Algorithm: a per-subject loop over bins."""
    counts = np.zeros(bins)
    for _ti, ei, ui in zip(t, e, u, strict=True):
        for b in range(bins):
            lo, hi = b / bins, (b + 1) / bins
            if ei:
                counts[b] += float(lo <= ui < hi or (b == bins - 1 and ui == 1.0))
            elif ui == 0:
                counts[b] += float(b == 0)
            elif ui >= hi:
                counts[b] += (hi - lo) / ui
            elif ui > lo:
                counts[b] += (ui - lo) / ui
    return counts


def test_d_calibration_counts_and_test() -> None:
    t, e, _, scale = _exp_data(800, 4)
    u_true = np.exp(-t / scale)
    res = d_calibration(t, e, u_true)
    np.testing.assert_allclose(res.bin_counts, _d_cal_reference(t, e, u_true, 10), atol=1e-9)
    assert res.bin_counts.sum() == pytest.approx(800)
    assert res.p_value > 0.001
    assert d_calibration(t, e, u_true**3).p_value < 1e-6
    # curves on a grid are step-evaluated at each subject's own time
    grid = np.linspace(0, t.max(), 400)
    curves = np.exp(-grid[None, :] / scale[:, None])
    stepped = survival_at(curves, grid, t)
    np.testing.assert_allclose(
        d_calibration(t, e, curves, grid).bin_counts, d_calibration(t, e, stepped).bin_counts
    )


def test_calibration_bad_input() -> None:
    t, e, _, _scale = _exp_data(50, 5)
    with pytest.raises(ValueError, match=r"surv_t\[3\]"):
        calibration(t, e, np.r_[np.full(3, 0.5), 1.5, np.full(46, 0.5)], 10.0)
    with pytest.raises(ValueError, match="beyond the last follow-up"):
        calibration(t, e, np.full(50, 0.5), t.max() + 1)
    with pytest.raises(ValueError, match="n_bins"):
        d_calibration(t, e, np.full(50, 0.5), n_bins=1)

"""Calibration slope, intercept, ICI and E50 on resampled data, and their interval coverage."""

from __future__ import annotations

import numpy as np
import pytest

from survfuse.metrics import calibration, calibration_intervals
from survfuse.metrics.bootstrap import Resampler
from survfuse.metrics.calibration import cox_fit, rcs_basis
from survfuse.metrics.calibration_ci import (
    CalibrationIntercept,
    SmoothCalibration,
    _weighted_median,
    bias_corrected,
    calibration_scorers,
    calibration_test,
    error_interval,
)

LAMBDA, BETA, H = 1 / 500, 0.8, 365.0


def _simulate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = rng.normal(size=n)
    t_event = rng.exponential(1 / (LAMBDA * np.exp(BETA * x)))
    t_cens = rng.uniform(0, 1500, n)
    return np.minimum(t_event, t_cens), t_event <= t_cens, x


def _predicted(x: np.ndarray, g0: float, g1: float) -> np.ndarray:
    """S(365 | x) of a model with log(-log S) = g0 + g1 * the true log(-log S)."""
    return np.exp(-np.exp(g0 + g1 * (np.log(LAMBDA * H) + BETA * x)))


def _true_ici(g0: float, g1: float) -> float:
    x = np.random.default_rng(123).normal(size=1_000_000)
    return float(np.mean(np.abs(_predicted(x, g0, g1) - _predicted(x, 0.0, 1.0))))


def test_points_equal_calibration_and_intercept_formula() -> None:
    t, e, x = _simulate(400, np.random.default_rng(0))
    t = np.round(t) + 1  # tied times
    s = _predicted(x, 0.3, 0.7)
    sc = calibration_scorers(t, e, s, H)
    ref = calibration(t, e, s, H)
    assert sc["cal_slope"].point() == pytest.approx(ref.slope, abs=1e-12)
    assert sc["ici"].point() == pytest.approx(ref.ici, abs=1e-12)
    assert sc["e50"].point() == pytest.approx(ref.e50, abs=1e-12)
    # intercept: Breslow H0(h) of the Cox model with offset log(-log S): a double loop
    hz = -np.log(s)
    h0 = sum(1.0 / hz[t >= ti].sum() for ti, ei in zip(t, e, strict=True) if ei and ti <= H)
    assert sc["cal_intercept"].point() == pytest.approx(np.log(h0), abs=1e-12)
    # unit weights reproduce the points; the weighted fits converge to cox_fit
    one = np.ones((1, t.shape[0]))
    for k, v in sc.items():
        assert v.boot(one)[0] == pytest.approx(v.point(), abs=1e-9), k


def test_weighted_statistics_equal_repeated_rows() -> None:
    t, e, x = _simulate(300, np.random.default_rng(1))
    t = np.round(t) + 1
    s = _predicted(x, -0.2, 1.2)
    w = np.random.default_rng(2).integers(0, 3, size=t.shape[0]).astype(float)
    idx = np.repeat(np.arange(t.shape[0]), w.astype(int))
    sc = calibration_scorers(t, e, s, H)
    got = {k: float(v.boot(w[None, :])[0]) for k, v in sc.items()}
    assert got["cal_slope"] == pytest.approx(calibration(t[idx], e[idx], s[idx], H).slope, abs=1e-8)
    assert got["cal_intercept"] == pytest.approx(
        CalibrationIntercept(t[idx], e[idx], s[idx], H).point(), abs=1e-10
    )
    # ICI / E50 keep the full-data spline knots under resampling
    cll = np.log(-np.log(s))
    knots = np.quantile(cll, [0.1, 0.5, 0.9])
    basis = rcs_basis(cll, knots)[idx]
    fit = cox_fit(t[idx], e[idx], basis)
    obs = 1 - np.exp(-fit.cumhaz0(H) * np.exp(basis @ fit.coef))
    delta = np.abs(obs - (1 - s[idx]))
    assert got["ici"] == pytest.approx(delta.mean(), abs=1e-8)
    assert got["e50"] == pytest.approx(np.median(delta), abs=1e-8)
    # the weighted median is np.median of the repeated values, odd and even totals
    rng = np.random.default_rng(3)
    vals = rng.normal(size=(50, 7))
    ws = rng.integers(0, 4, size=(50, 7)).astype(float)
    ws[:, 0] += 1
    want = [np.median(np.repeat(v, ww.astype(int))) for v, ww in zip(vals, ws, strict=True)]
    np.testing.assert_allclose(_weighted_median(vals, ws), want)


def test_interval_methods_and_test() -> None:
    t, e, x = _simulate(500, np.random.default_rng(4))
    good = calibration_intervals(t, e, _predicted(x, 0.0, 1.0), H, n_boot=200, seed=1)
    bad = calibration_intervals(t, e, _predicted(x, 0.4, 0.6), H, n_boot=200, seed=1)
    assert good.p_calibrated > 0.05 and bad.p_calibrated < 1e-4
    assert good.results["ici"].ci_low == 0.0 and bad.results["ici"].ci_low > 0.05
    for r in (*good.results.values(), *bad.results.values()):
        assert r.ci_low <= r.estimate <= r.ci_high, r
    assert good.results["cal_slope"].method == "percentile"
    assert bad.results["ici"].method == "percentile_calibration_test"
    b = np.array([1.0, 2.0, 3.0, 4.0])
    assert error_interval(2.0, b, 0.95, 0.2)[0] == 0.0  # not rejected at 0.05: lower end 0
    assert error_interval(2.0, b, 0.95, np.nan)[0] == 0.0  # no test: not rejected
    assert error_interval(2.0, b, 0.95, 0.01) == pytest.approx(
        tuple(np.quantile(b, [0.025, 0.975]))
    )
    est, lo, hi = bias_corrected(1.0, np.array([1.5, 2.0, 2.5]), 0.9)
    assert est == 0.0 and lo == 0.0 and hi == pytest.approx(max(0.0, 2 - 1.55))
    assert np.isnan(calibration_test(np.zeros(3), np.zeros(3), np.zeros((3, 3))))


def _coverage(n_sims: int, n: int, n_boot: int, g0: float, g1: float) -> float:
    truth = _true_ici(g0, g1)
    hits = 0
    for sim in range(n_sims):
        t, e, x = _simulate(n, np.random.default_rng(50_000 + sim))
        sc = SmoothCalibration(t, e, _predicted(x, g0, g1), H)
        boots, phis = [], []
        for w in Resampler.build(n, None).weights(n_boot, sim):
            boots.append(sc.boot(w))
            phis.append(sc.params(w))
        p = calibration_test(sc.params(np.ones((1, n)))[0], sc.phi0, np.concatenate(phis))
        lo, hi = error_interval(sc.point(), np.concatenate(boots), 0.95, p)
        hits += int(lo - 1e-12 <= truth <= hi + 1e-12)
    return hits / n_sims


@pytest.mark.parametrize("g0, g1", [(0.0, 1.0), (0.3, 0.7)], ids=["calibrated", "miscalibrated"])
def test_ici_interval_coverage_small(g0: float, g1: float) -> None:
    # A smaller version of the slow test below (200 data sets of 250 subjects, 100 resamples):
    # the nominal 95% within about 3 Monte-Carlo standard errors (1.5 points).
    cov = _coverage(200, 250, 100, g0, g1)
    assert 0.905 <= cov <= 0.99, cov


@pytest.mark.slow
@pytest.mark.parametrize("g0, g1", [(0.0, 1.0), (0.3, 0.7)], ids=["calibrated", "miscalibrated"])
def test_ici_interval_coverage_nominal(g0: float, g1: float) -> None:
    # 500 data sets of 500 subjects, 1,000 resamples each (benchmarks/calibration_coverage.py
    # prints every statistic and scenario; figures in docs/benchmarks.md).
    cov = _coverage(500, 500, 1000, g0, g1)
    assert abs(cov - 0.95) <= 0.02, cov

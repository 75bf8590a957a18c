"""Kaplan-Meier extras (log-log band, numbers at risk, reverse-KM median follow-up) and the
log-rank test against R survival (tests/reference/logrank_r.json, made by logrank.R) and
lifelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from lifelines import KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test

from survfuse.metrics.km import (
    kaplan_meier,
    km_confidence_band,
    median_follow_up,
    number_at_risk,
)
from survfuse.metrics.logrank import logrank_test

R = json.loads((Path(__file__).parent / "reference" / "logrank_r.json").read_text())
SETS = ("lung", "veteran", "pbc")


def _arr(x: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in x], dtype=np.float64)


def _data(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = R[name]
    return (
        np.array(r["time"], dtype=np.float64),
        np.array(r["event"]) > 0,
        np.array(r["group"]).astype(np.int64),
    )


@pytest.mark.parametrize("name", SETS)
def test_logrank_matches_r_survdiff(name: str) -> None:
    t, e, g = _data(name)
    res = logrank_test(t, e, g)
    assert res.statistic == pytest.approx(R[name]["chisq"][0], rel=1e-10)
    assert res.df == R[name]["df"][0]
    assert res.p_value == pytest.approx(R[name]["p"][0], rel=1e-8)
    np.testing.assert_allclose(res.observed, R[name]["observed"])
    np.testing.assert_allclose(res.expected, R[name]["expected"], rtol=1e-10)


@pytest.mark.parametrize("name", SETS)
def test_logrank_matches_lifelines(name: str) -> None:
    t, e, g = _data(name)
    ref = multivariate_logrank_test(t, g, e)
    assert logrank_test(t, e, g).statistic == pytest.approx(ref.test_statistic, rel=1e-8)


def test_logrank_is_small_for_equal_groups_and_large_for_different_ones() -> None:
    rng = np.random.default_rng(0)
    g = np.repeat([0, 1, 2], 300)
    same = rng.exponential(100.0, g.size)
    differ = rng.exponential(100.0 * np.exp(-0.5 * g))
    e = np.ones(g.size, dtype=bool)
    assert logrank_test(same, e, g).p_value > 0.01
    assert logrank_test(differ, e, g).p_value < 1e-10
    with pytest.raises(ValueError, match="two groups"):
        logrank_test(same, e, np.zeros(g.size))


@pytest.mark.parametrize("name", SETS)
def test_km_band_matches_r_loglog(name: str) -> None:
    t, e, _ = _data(name)
    km = kaplan_meier(t, e)
    np.testing.assert_allclose(km.times, R[name]["km_time"])
    np.testing.assert_allclose(km.survival, R[name]["km_surv"], atol=1e-12)
    lo, hi = km_confidence_band(km)
    np.testing.assert_allclose(lo, _arr(R[name]["km_lower"]), atol=1e-12)
    np.testing.assert_allclose(hi, _arr(R[name]["km_upper"]), atol=1e-12)


def test_km_band_matches_lifelines() -> None:
    t, e, _ = _data("lung")
    kmf = KaplanMeierFitter(alpha=0.1).fit(t, e)
    km = kaplan_meier(t, e)
    lo, hi = km_confidence_band(km, alpha=0.1)
    ci = kmf.confidence_interval_.loc[km.times]
    np.testing.assert_allclose(lo, ci.iloc[:, 0].to_numpy(), atol=1e-10)
    np.testing.assert_allclose(hi, ci.iloc[:, 1].to_numpy(), atol=1e-10)


@pytest.mark.parametrize("name", SETS)
def test_follow_up_and_at_risk_match_r(name: str) -> None:
    t, e, _ = _data(name)
    expected = _arr(R[name]["median_follow_up"])[0]
    got = median_follow_up(t, e)
    assert (np.isnan(got) and np.isnan(expected)) or got == expected
    np.testing.assert_array_equal(number_at_risk(t, R[name]["at"]), R[name]["n_at_risk"])


def test_median_follow_up_matches_lifelines_reverse_km() -> None:
    t, e, _ = _data("pbc")
    ref = KaplanMeierFitter().fit(t, ~e).median_survival_time_
    assert median_follow_up(t, e) == ref

"""Harrell's and Uno's C against R survival 3.5 (committed JSON) and scikit-survival."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sksurv.metrics import concordance_index_censored
from sksurv.metrics import concordance_index_ipcw as sk_uno

from survfuse.interop import to_sksurv
from survfuse.metrics import (
    NoComparablePairError,
    NoEventBeforeTauError,
    compare_concordance,
    concordance_index,
    concordance_index_ipcw,
)

REF = json.loads((Path(__file__).parent / "reference" / "concordance_r.json").read_text())
CASES = {c["name"]: c for c in REF["cases"]}


def _arrays(c: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.array(c["time"]), np.array(c["event"]).astype(bool), np.array(c["risk"])


def test_reference_covers_four_datasets_and_coarse_scores() -> None:
    assert REF["survival_version"].startswith("3.5")
    assert {c["dataset"] for c in REF["cases"]} >= {"lung", "veteran", "pbc", "gbsg"}
    # at least one coarse, heavily tied score per the issue: more tied than concordant pairs
    assert any(c["count"]["tied.x"] > c["count"]["concordant"] for c in REF["cases"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_harrell_matches_r(name: str) -> None:
    c = CASES[name]
    t, e, r = _arrays(c)
    res = concordance_index(t, e, r, cluster=c["cluster"])
    cnt = c["count"]
    assert res.estimate == pytest.approx(c["concordance"], abs=1e-10)
    assert res.concordant == cnt["concordant"]
    assert res.discordant == cnt["discordant"]
    assert res.tied_risk == cnt["tied.x"]
    assert res.tied_time == cnt["tied.y"]
    assert res.tied_risk_time == cnt["tied.xy"]
    assert res.variance == pytest.approx(c["var"], abs=1e-10, rel=1e-10)
    if c["dfbeta"] is not None:
        np.testing.assert_allclose(res.influence, c["dfbeta"], atol=1e-12, rtol=0)


def test_paired_test_matches_r_covariance() -> None:
    p = REF["paired"]
    test = compare_concordance(p["time"], p["event"], p["risk_a"], p["risk_b"])
    assert test.c_a == pytest.approx(p["c_a"], abs=1e-12)
    assert test.c_b == pytest.approx(p["c_b"], abs=1e-12)
    for ours, theirs in [(test.var_a, "var_a"), (test.var_b, "var_b"), (test.cov_ab, "cov_ab")]:
        assert ours == pytest.approx(p[theirs], abs=1e-12)
    var = p["var_a"] + p["var_b"] - 2 * p["cov_ab"]
    assert test.z == pytest.approx((p["c_a"] - p["c_b"]) / np.sqrt(var), rel=1e-9)
    assert 0 < test.p_value < 1


def test_uno_matches_sksurv_on_real_lung_and_documents_r_n_g2_gap() -> None:
    t, e, r = _arrays(CASES["lung_age"])
    y = to_sksurv(t, e)
    for tau in (None, 600.0, 300.5):
        ours = concordance_index_ipcw(t, e, r, train_time=t, train_event=e, tau=tau)
        assert ours.estimate == pytest.approx(sk_uno(y, y, r, tau=tau)[0], abs=1e-12)
    # R's timewt = "n/G2" (G on the test data at t-, ymax inclusive) differs by < 1e-3 here
    g2 = REF["n_G2"]
    ours = concordance_index_ipcw(t, e, r, train_time=t, train_event=e, tau=g2["tau"])
    assert 0 < abs(ours.estimate - g2["concordance"]) < 1e-3


def test_uno_train_test_split_matches_sksurv_on_metabric(
    shared_path: Callable[..., Path],
) -> None:
    h5 = shared_path("tabular", "deepsurv", "metabric_IHC4_clinical_train_test.h5")
    with h5py.File(h5) as f:
        tr_t, tr_e = f["train"]["t"][:].astype(float), f["train"]["e"][:].astype(bool)
        te_t, te_e = f["test"]["t"][:].astype(float), f["test"]["e"][:].astype(bool)
        x = f["test"]["x"][:].astype(float)
    risk = x @ np.linspace(-1, 1, x.shape[1])
    y_tr, y_te = to_sksurv(tr_t, tr_e), to_sksurv(te_t, te_e)
    for tau in (100.0, 200.0):
        ours = concordance_index_ipcw(te_t, te_e, risk, train_time=tr_t, train_event=tr_e, tau=tau)
        assert ours.estimate == pytest.approx(sk_uno(y_tr, y_te, risk, tau=tau)[0], abs=1e-8)


surv_data = st.integers(2, 40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 12), min_size=n, max_size=n),  # coarse times: many ties
        st.lists(st.booleans(), min_size=n, max_size=n),
        st.lists(st.integers(-4, 4), min_size=n, max_size=n),  # coarse risks: many ties
        st.integers(0, 3),  # all-censored tail: the k largest times censored
    )
)


def _draw(d: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t, e, r, k = (np.array(v) for v in d)
    t = t.astype(float)
    e = e.astype(bool)
    if k:
        e[np.argsort(t, kind="stable")[-int(k) :]] = False
    return t, e, r.astype(float)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(surv_data)
def test_harrell_matches_sksurv_and_invariances(d: tuple) -> None:
    t, e, r = _draw(d)
    try:
        sk = concordance_index_censored(e, t, r)
    except Exception:
        with pytest.raises(NoComparablePairError):
            concordance_index(t, e, r)
        return
    if sk[1] + sk[2] + sk[3] == 0:
        with pytest.raises(NoComparablePairError):
            concordance_index(t, e, r)
        return
    res = concordance_index(t, e, r)
    assert res.estimate == pytest.approx(sk[0], abs=1e-12)
    assert (res.concordant, res.discordant, res.tied_risk) == (sk[1], sk[2], sk[3])
    # monotone transform and permutation invariance
    assert concordance_index(t, e, np.exp(r / 3) * 5 - 2).estimate == res.estimate
    perm = np.random.default_rng(len(t)).permutation(len(t))
    pres = concordance_index(t[perm], e[perm], r[perm])
    assert pres.estimate == pytest.approx(res.estimate, abs=1e-14)
    assert pres.variance == pytest.approx(res.variance, abs=1e-14)
    # reversing risk swaps concordant and discordant; 1 - C exactly when no risk ties
    rev = concordance_index(t, e, -r)
    assert (rev.concordant, rev.discordant) == (res.discordant, res.concordant)
    if res.tied_risk == 0:
        assert rev.estimate == pytest.approx(1 - res.estimate, abs=1e-14)


@settings(max_examples=100, deadline=None)
@given(surv_data, st.sampled_from([None, 3.0, 6.5, 10.0]))
def test_uno_matches_sksurv_hypothesis(d: tuple, tau: float | None) -> None:
    t, e, r = _draw(d)
    y = to_sksurv(t, e)
    if tau is not None and tau > t.max():  # deliberate: sksurv accepts this, we refuse it
        with pytest.raises(ValueError, match="beyond the last training follow-up"):
            concordance_index_ipcw(t, e, r, train_time=t, train_event=e, tau=tau)
        return
    try:
        expected = sk_uno(y, y, r, tau=tau)[0]
    except Exception:
        with pytest.raises(ValueError):
            concordance_index_ipcw(t, e, r, train_time=t, train_event=e, tau=tau)
        return
    assume(np.isfinite(expected))
    ours = concordance_index_ipcw(t, e, r, train_time=t, train_event=e, tau=tau)
    assert ours.estimate == pytest.approx(expected, abs=1e-8)


def test_constant_risk_is_half_and_undefined_cases_raise() -> None:
    t = np.array([1.0, 2.0, 3.0, 4.0])
    e = np.array([True, False, True, False])
    assert concordance_index(t, e, np.zeros(4)).estimate == 0.5
    with pytest.raises(NoComparablePairError):
        concordance_index(t, np.zeros(4, bool), np.arange(4.0))
    with pytest.raises(NoComparablePairError):  # only tied deaths: nothing comparable
        concordance_index(np.ones(3), np.ones(3, bool), np.arange(3.0))
    with pytest.raises(NoEventBeforeTauError):
        concordance_index_ipcw(t, e, np.arange(4.0), train_time=t, train_event=e, tau=0.5)
    with pytest.raises(ValueError, match="beyond the last training follow-up"):
        concordance_index_ipcw(t, e, np.arange(4.0), train_time=t, train_event=e, tau=10.0)


@pytest.mark.parametrize(
    ("time", "event", "risk", "match"),
    [
        ([1.0, 2.0, 3.0], [1, 0, 1], [0.1, np.nan, 0.3], r"risk\[1\]"),
        ([1.0, 2.0, 3.0], [1, 0, 1], [0.1, 0.2, np.inf], r"risk\[2\]"),
        ([1.0, -2.0, 3.0], [1, 0, 1], [0.1, 0.2, 0.3], r"time\[1\]"),
        ([1.0, np.nan, 3.0], [1, 0, 1], [0.1, 0.2, 0.3], r"time\[1\]"),
        ([1.0, 2.0, 3.0], [1, 2, 1], [0.1, 0.2, 0.3], r"event\[1\]"),
        ([1.0, 2.0, 3.0], [1, 0, 1], [0.1, 0.2], "length mismatch"),
    ],
)
def test_bad_input_names_index(time: list, event: list, risk: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        concordance_index(time, event, risk)


def _brute_counts(t: np.ndarray, e: np.ndarray, r: np.ndarray) -> tuple[int, int, int]:
    """O(n^2) pair count with exact float comparisons: i before j when t_i < t_j, or tied
    times with i an event and j censored (R's rule); the pair counts when i is an event."""
    before = (t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & e[:, None] & ~e[None, :])
    comparable = before & e[:, None]
    conc = int((comparable & (r[:, None] > r[None, :])).sum())
    disc = int((comparable & (r[:, None] < r[None, :])).sum())
    tied = int((comparable & (r[:, None] == r[None, :])).sum())
    return conc, disc, tied


def test_near_equal_keys_and_signed_zero_match_exact_pair_counts() -> None:
    # The sorts pack float bits with row indices; values one ulp apart and -0.0 vs 0.0
    # must still order exactly as float comparison does.
    rng = np.random.default_rng(7)
    n = 400
    t = 1e9 + 1e-3 * rng.random(n)
    t[::7] = t[0]  # ties in time
    t[1::11] = np.nextafter(t[0], np.inf)  # one ulp above the tie
    e = rng.random(n) < 0.6
    r = rng.choice([-0.0, 0.0, 1.0, np.nextafter(1.0, 2.0), 1e-300, -1e-300], size=n)
    res = concordance_index(t, e, r)
    conc, disc, tied = _brute_counts(t, e, r)
    assert (res.concordant, res.discordant, res.tied_risk) == (conc, disc, tied)
    assert res.estimate == pytest.approx((conc + 0.5 * tied) / (conc + disc + tied), abs=1e-15)

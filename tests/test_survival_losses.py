"""cox_partial_nll and discrete_time_nll against torchsurv, brute-force formulas and gradcheck."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torchsurv.loss.cox as tsc
from hypothesis import given, settings
from hypothesis import strategies as st

from survfuse.survival import bin_times, cox_partial_nll, discrete_time_nll, time_bin_cuts
from survfuse.survival.losses import _cox_nll_sum_logspace


def _torchsurv_float64(risk: torch.Tensor, event: torch.Tensor, time: torch.Tensor, ties: str):
    """torchsurv's Efron/Breslow kernels in float64 (its public wrapper coerces to float32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ts, idx = torch.sort(time)
        fn = tsc._partial_likelihood_efron if ties == "efron" else tsc._partial_likelihood_breslow
        return -fn(risk[idx], event[idx], ts, False).sum()
    finally:
        torch.set_default_dtype(previous)


def _brute_force(time, event, risk, ties):
    """Textbook double loop over distinct event times (independent of the vectorised code)."""
    t, e, r = np.asarray(time), np.asarray(event, bool), np.asarray(risk, np.float64)
    ll = 0.0
    for tk in np.unique(t[e]):
        ev = (t == tk) & e
        d = ev.sum()
        big = np.sum(np.exp(r[t >= tk]))
        mass = np.sum(np.exp(r[ev]))
        ll += r[ev].sum()
        for k in range(d):
            ll -= math.log(big - (k / d if ties == "efron" else 0.0) * mass)
    return -ll


@st.composite
def tied_batches(draw):
    n = draw(st.integers(3, 60))
    times = draw(st.lists(st.integers(0, 8), min_size=n, max_size=n))
    events = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    risks = draw(st.lists(st.floats(-5, 5, allow_nan=False, width=64), min_size=n, max_size=n))
    # force a tie among events so torchsurv takes its tie-handling branch
    times[1] = times[0]
    events[0] = events[1] = True
    return (
        torch.tensor(times, dtype=torch.float64),
        torch.tensor(events),
        torch.tensor(risks, dtype=torch.float64),
    )


@settings(max_examples=60, deadline=None)
@given(batch=tied_batches(), ties=st.sampled_from(["efron", "breslow"]))
def test_matches_torchsurv_and_brute_force_with_ties(batch, ties):
    time, event, risk = batch
    ours = cox_partial_nll(time, event, risk, ties=ties, reduction="sum")
    ref = _torchsurv_float64(risk, event, time, ties)
    assert abs(ours.item() - ref.item()) < 1e-6
    assert abs(ours.item() - _brute_force(time, event, risk, ties)) < 1e-8
    # the log-space kernel used for extreme risk spreads agrees with the fast kernel
    assert abs(ours.item() - _cox_nll_sum_logspace(time, event, risk, ties).item()) < 1e-9
    # torchsurv's public (float32) function agrees to float32 precision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pub = tsc.neg_partial_log_likelihood(risk.float(), event, time.float(), ties, "sum")
    assert abs(ours.item() - pub.item()) <= 1e-5 * max(1.0, abs(pub.item()))


def test_mean_is_sum_over_events_and_permutation_invariant():
    g = np.random.default_rng(1)
    t = torch.tensor(g.integers(0, 10, 200).astype(float))
    e = torch.tensor(g.random(200) < 0.5)
    r = torch.tensor(g.normal(size=200))
    s = cox_partial_nll(t, e, r, reduction="sum")
    m = cox_partial_nll(t, e, r, reduction="mean")
    assert torch.allclose(m, s / e.sum())
    p = torch.tensor(g.permutation(200))
    assert torch.allclose(cox_partial_nll(t[p], e[p], r[p], reduction="sum"), s)


def test_efron_equals_breslow_without_ties():
    g = np.random.default_rng(2)
    t = torch.tensor(g.permutation(50).astype(float))
    e = torch.tensor(g.random(50) < 0.6)
    r = torch.tensor(g.normal(size=50))
    assert torch.allclose(
        cox_partial_nll(t, e, r, ties="efron"), cox_partial_nll(t, e, r, ties="breslow")
    )


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_stable_at_risk_1e4_where_naive_overflows(ties):
    t = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    e = torch.tensor([True, True, False, True, True, True])
    r = torch.tensor([1e4, -1e4, 5e3, 1e4, -1e4, 1e4], dtype=torch.float64, requires_grad=True)
    loss = cox_partial_nll(t, e, r, ties=ties, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(r.grad).all()
    # shifting every risk by a constant leaves the partial likelihood unchanged
    shifted = cox_partial_nll(t, e, r.detach() - 1e4, ties=ties, reduction="sum")
    assert abs(loss.item() - shifted.item()) < 1e-9 * abs(loss.item())
    assert abs(shifted.item() - _brute_force(t, e, r.detach() - 1e4, ties)) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive = _torchsurv_float64(r.detach(), e, t, ties)
    assert not torch.isfinite(naive)  # exp(1e4) overflows in the naive form
    r32 = r.detach().float()
    assert torch.isfinite(cox_partial_nll(t, e, r32, ties=ties))


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_gradcheck_float64(ties):
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1.0, 1, 1, 2, 2, 3, 3, 3, 3, 4, 5, 5])
    e = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1]).bool()
    r = torch.randn(12, dtype=torch.float64, generator=g, requires_grad=True)
    strata = torch.tensor([0, 1] * 6)
    assert torch.autograd.gradcheck(lambda x: cox_partial_nll(t, e, x, ties=ties), (r,))
    assert torch.autograd.gradcheck(lambda x: _cox_nll_sum_logspace(t.double(), e, x, ties), (r,))
    assert torch.autograd.gradcheck(
        lambda x: cox_partial_nll(t, e, x, ties=ties, strata=strata, reduction="sum"), (r,)
    )


def test_strata_sum_of_separate_likelihoods():
    g = np.random.default_rng(3)
    t = torch.tensor(g.integers(0, 6, 90).astype(float))
    e = torch.tensor(g.random(90) < 0.5)
    r = torch.tensor(g.normal(size=90))
    s = torch.tensor(g.integers(0, 3, 90))
    total = cox_partial_nll(t, e, r, strata=s, reduction="sum")
    parts = sum(cox_partial_nll(t[s == k], e[s == k], r[s == k], reduction="sum") for k in range(3))
    assert torch.allclose(total, parts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = tsc.neg_partial_log_likelihood(r.float(), e, t.float(), "efron", "sum", s)
    assert abs(total.item() - ref.item()) < 1e-4


def test_no_event_returns_attached_zero_or_raises():
    r = torch.zeros(4, requires_grad=True)
    loss = cox_partial_nll([1.0, 2.0, 3.0, 4.0], [0, 0, 0, 0], r)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(r.grad, torch.zeros(4))
    with pytest.raises(ValueError, match="no observed event"):
        cox_partial_nll([1.0, 2.0], [0, 0], torch.zeros(2), no_event="raise")


def test_bad_inputs_name_the_problem():
    r = torch.zeros(3)
    with pytest.raises(ValueError, match=r"time\[1\]"):
        cox_partial_nll(torch.tensor([1.0, -1.0, 2.0]), torch.tensor([1, 0, 1]), r)
    with pytest.raises(ValueError, match="length mismatch"):
        cox_partial_nll([1.0, 2.0], [1, 0], r)
    with pytest.raises(ValueError, match="did you mean 'efron'"):
        cox_partial_nll([1.0, 2.0, 3.0], [1, 0, 1], r, ties="efrom")
    with pytest.raises(ValueError, match=r"risk\[2\]"):
        cox_partial_nll([1.0, 2.0, 3.0], [1, 0, 1], torch.tensor([0.0, 1.0, float("nan")]))


# ----------------------------------------------------------------------------- discrete time
def _mcat_nll(hazards: np.ndarray, y: np.ndarray, c: np.ndarray) -> float:
    """MCAT's NLLSurvLoss (alpha = 0) written with products, c = censorship indicator."""
    s = np.cumprod(1 - hazards, axis=1)
    s_pad = np.concatenate([np.ones((len(y), 1)), s], 1)
    rows = np.arange(len(y))
    unc = -(1 - c) * (np.log(s_pad[rows, y]) + np.log(hazards[rows, y]))
    cen = -c * np.log(s_pad[rows, y + 1])
    return float(np.mean(unc + cen))


def test_discrete_nll_matches_mcat_formula():
    g = np.random.default_rng(4)
    logits = torch.tensor(g.normal(size=(40, 5)), dtype=torch.float64, requires_grad=True)
    y = g.integers(0, 5, 40)
    e = g.random(40) < 0.6
    loss = discrete_time_nll(y, e, logits)
    ref = _mcat_nll(torch.sigmoid(logits).detach().numpy(), y, (~e).astype(float))
    assert abs(loss.item() - ref) < 1e-10
    assert torch.autograd.gradcheck(lambda z: discrete_time_nll(y, e, z), (logits,))
    big = torch.full((3, 4), 60.0, dtype=torch.float32)
    assert torch.isfinite(discrete_time_nll([0, 1, 3], [True, False, True], big))


def test_time_bin_cuts_match_pandas_qcut_on_event_times():
    g = np.random.default_rng(5)
    t = g.exponential(300.0, 500)
    e = g.random(500) < 0.4
    cuts = time_bin_cuts(t, e, 4)
    _, edges = pd.qcut(t[e], q=4, retbins=True)
    np.testing.assert_allclose(cuts, edges[1:-1])
    b = bin_times(t, cuts)
    assert b.min() == 0 and b.max() == 3
    # about a quarter of the events per bin, as the quantile cut intends
    np.testing.assert_allclose(np.bincount(b[e], minlength=4) / e.sum(), 0.25, atol=0.01)
    with pytest.raises(ValueError, match="no observed event"):
        time_bin_cuts(t, np.zeros(500, bool), 4)

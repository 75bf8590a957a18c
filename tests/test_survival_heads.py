"""Heads: registry, interface, survival-curve properties, save/load and a Breslow reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchsurv.loss.cox as tsc
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import survfuse.survival  # noqa: F401  (registers the heads)
from survfuse.registry import HEADS, UnknownNameError
from survfuse.survival import CoxPH


def _data(n: int = 80, d: int = 4, seed: int = 0):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d))
    lin = x @ np.linspace(1.0, -0.5, d)
    t = np.round(g.exponential(100.0 * np.exp(-lin)), 0) + 1.0  # rounded -> ties
    e = g.random(n) < 0.7
    return torch.tensor(x, dtype=torch.float32), t, e


def test_registered_names_and_did_you_mean():
    assert {"cox", "discrete"} <= set(HEADS.list())
    with pytest.raises(UnknownNameError, match="did you mean 'discrete'"):
        HEADS.get("discret")


@pytest.mark.parametrize(
    ("name", "kwargs"), [("cox", {"ties": "breslow"}), ("discrete", {"n_bins": 6})]
)
def test_interface_and_safetensors_round_trip(tmp_path, name, kwargs):
    torch.manual_seed(0)
    x, t, e = _data()
    head = HEADS.get(name)(4, **kwargs)
    head.prepare(t, e)
    out = head(x)
    assert out.shape[0] == 80 and head.risk(out).shape == (80,)
    loss = head.loss(out, torch.tensor(t), torch.tensor(e))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(p.grad is not None for p in head.parameters())
    head.fit_baseline(out.detach(), t, e)
    grid = np.linspace(0.0, t.max() * 1.2, 25)
    surv = head.survival(out.detach(), grid)
    assert surv.shape == (80, 25)
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    again = HEADS.get(name)(**head.config())
    again.load_state_dict(load_file(str(tmp_path / "head.safetensors")))
    torch.testing.assert_close(again.survival(again(x).detach(), grid), surv)
    torch.testing.assert_close(again.risk(again(x)), head.risk(out))


def test_methods_that_need_fitting_say_so():
    x, t, e = _data()
    with pytest.raises(RuntimeError, match="fit_baseline"):
        HEADS.get("cox")(4).survival(x[:, :1], [1.0])
    disc = HEADS.get("discrete")(4)
    with pytest.raises(RuntimeError, match="prepare"):
        disc.loss(disc(x), torch.tensor(t), torch.tensor(e))


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["cox", "discrete"]),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.01, 50.0),
)
def test_survival_curves_in_unit_interval_and_non_increasing(name, seed, scale):
    torch.manual_seed(seed)
    x, t, e = _data(n=40, seed=seed)
    e[0] = True
    head = HEADS.get(name)(4)
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(scale)
    head.prepare(t, e)
    out = head(x).detach()
    head.fit_baseline(out, t, e)
    grid = np.sort(np.r_[0.0, np.random.default_rng(seed).uniform(0, 2 * t.max(), 30)])
    s = head.survival(out, grid).numpy()
    assert np.all((s >= 0) & (s <= 1)) and np.isfinite(s).all()
    assert np.all(np.diff(s, axis=1) <= 0)


def test_cox_head_survival_matches_torchsurv_breslow_baseline():
    x, t, e = _data(n=60, seed=7)
    head = HEADS.get("cox")(4, ties="breslow")
    out = head(x).detach().double()
    head.fit_baseline(out, t, e)
    r = head.risk(out)
    ref = tsc.baseline_survival_function(r, torch.tensor(e), torch.tensor(t))
    ref_times = ref["time"].numpy()
    # S(t | x_i) = S0(t) ** exp(r_i) with torchsurv's uncentered Breslow S0
    expected = ref["baseline_survival"].double().unsqueeze(0) ** torch.exp(r).unsqueeze(1)
    np.testing.assert_allclose(head.survival(out, ref_times).numpy(), expected.numpy(), rtol=1e-5)


def test_cox_head_trained_to_convergence_matches_coxph():
    """Minimising the head's loss (L-BFGS, float64) recovers the Newton-Raphson CoxPH fit."""
    torch.manual_seed(0)
    x, t, e = _data(n=300, seed=1)
    head = HEADS.get("cox")(4).double()
    xd, tt, ee = x.double(), torch.tensor(t), torch.tensor(e)
    opt = torch.optim.LBFGS(
        head.parameters(), max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = head.loss(head(xd), tt, ee)
        loss.backward()
        return loss

    opt.step(closure)
    ref = CoxPH(ties="efron").fit(x.numpy().astype(np.float64), t, e)
    np.testing.assert_allclose(head.linear.weight.detach().numpy().ravel(), ref.coef_, atol=1e-5)


def test_discrete_risk_is_minus_sum_of_bin_survival():
    head = HEADS.get("discrete")(3, n_bins=3)
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 0.5]])
    h = torch.sigmoid(logits)
    s = torch.cumprod(1 - h, 1)
    torch.testing.assert_close(head.risk(logits), -s.sum(1))

"""The independent signal check that vetoes dropping a modality (survfuse.fusion.signal)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from survfuse.fusion.branches import BranchStopper, BranchStopping
from survfuse.fusion.signal import linear_signal
from survfuse.training.options import TrainingOptions
from survfuse.training.state import TrainState


def _data(n: int, d: int, beta: float, seed: int) -> tuple[np.ndarray, ...]:
    """d features, the first carrying log-hazard coefficient `beta` (0: pure noise)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    t_event = rng.exponential(np.exp(-beta * x[:, 0]) * 300.0)
    t_cens = rng.exponential(400.0, n)
    return x, np.minimum(t_event, t_cens), t_event <= t_cens


def _check(beta: float, seed: int, d: int = 40) -> tuple[float, float, bool]:
    x, t, e = _data(600, d, beta, seed)
    xv, tv, ev = _data(300, d, beta, seed + 1000)
    out = linear_signal(x, t, e, xv, tv, ev, alpha=0.05, seed=0)
    assert out is not None
    return out


def test_weak_but_real_signal_is_found() -> None:
    # one feature of 40 with log-HR 0.35 per SD: true C ~0.59, weak but real
    found = [_check(0.35, s)[2] for s in range(6)]
    assert sum(found) >= 5, found


def test_pure_noise_is_not_called_signal_beyond_the_test_level() -> None:
    calls = [_check(0.0, s)[2] for s in range(20)]
    assert sum(calls) <= 3, calls  # level 0.05: about 1 of 20 by chance


def test_too_little_data_cannot_be_judged() -> None:
    x, t, e = _data(6, 3, 0.5, 0)
    assert linear_signal(x, t, e, x, t, e) is None


class _FakeStopper(BranchStopper):
    """A stopper whose "ehr" branch is always a drop candidate."""

    def drop_candidates(self) -> list[str]:
        return [m for m in ("ehr",) if m not in self.dropped]


def _callback(signal: object) -> tuple[BranchStopping, TrainState, list[str]]:
    params = {m: [nn.Parameter(torch.zeros(2))] for m in ("ct", "ehr")}
    stopper = _FakeStopper(params, patience=1, loss_weight=1.0, drop_alpha=0.05)
    stopper.snapshots = {m: [p.detach().clone() for p in ps] for m, ps in params.items()}
    dropped: list[str] = []
    cb = BranchStopping(
        stopper,
        lr=1e-3,
        val_time=np.array([1.0, 2.0, 3.0]),
        val_event=np.array([True, True, False]),
        c_without=lambda m: 0.9,  # masking it would raise the fused C: the old rule drops
        dropped=dropped,
        signal=signal,  # type: ignore[arg-type]
    )
    state = TrainState(module=nn.Linear(1, 1), options=TrainingOptions())
    state.val_c, state.val_payload = 0.6, ({}, {})
    return cb, state, dropped


@pytest.mark.parametrize(("says", "expect_drop"), [(True, False), (False, True), (None, True)])
def test_a_modality_with_signal_of_its_own_is_never_dropped(
    says: object, expect_drop: bool
) -> None:
    asked: list[str] = []

    def signal(m: str) -> object:
        asked.append(m)
        return says

    cb, state, dropped = _callback(signal)
    for epoch in range(3):
        state.epoch, state.record = epoch, {}
        cb.on_validation(state)
    assert (dropped == ["ehr"]) is expect_drop
    assert asked == ["ehr"]  # judged once, not every epoch
    assert math.isfinite(state.val_c)

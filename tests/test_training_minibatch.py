"""The mini-batch Cox approximation of the training loop, measured against the full batch.

Above `FULL_BATCH_MAX` training patients (or with an explicit `batch_size`) the estimator trains
on shuffled mini-batches and the Cox partial likelihood of a batch uses risk sets inside that
batch (see `survfuse.fusion.batch`). These tests record the batches the estimator really builds
(its training loop replaced by a recorder) on a simulated 20,000-patient cohort and compare, at
a fixed linear risk, the per-batch losses and gradients with the full-cohort loss computed by
torchsurv (an independent implementation):

- E[batch loss + log((n - 1) / (B - 1))] is within `LOSS_BIAS_MAX` of the full loss;
- the mean of the batch gradients has cosine >= `GRAD_COSINE_MIN` with the full gradient and a
  norm within `GRAD_NORM_RATIO` of it.

Broken batchings (times not aligned with their rows, event flags inverted, unshuffled batches
of a time-ordered cohort) violate these bounds: the last test shows the bounds can fail.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torchsurv.loss.cox import neg_partial_log_likelihood

import survfuse.fusion.model as model_module
from survfuse.features import ModalityFeatures
from survfuse.fusion import FusionSurvivalModel
from survfuse.fusion.model import LARGE_BATCH
from survfuse.survival.losses import cox_partial_nll
from survfuse.training import TrainState

N = 20_000
EPOCHS = 12
BETA_TRUE = np.array([0.8, -0.6, 0.4, 0.0, 0.5, -0.3, 0.2, 0.0])
# documented bounds (see survfuse.fusion.batch and docs/benchmarks.md for the measured values)
LOSS_BIAS_MAX = 0.01
GRAD_COSINE_MIN = 0.999
GRAD_NORM_RATIO = (0.98, 1.02)

# (row ids, covariates [B, 8] float64, time [B], event [B]) of one training step
Step = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _cohort(seed: int = 0) -> tuple[dict[str, ModalityFeatures], np.ndarray, np.ndarray]:
    """Exponential Cox times (log hazard x @ BETA_TRUE), ~44% censored; CT pooled column 0 is
    the row id, so a recorded batch says which patients it holds."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, BETA_TRUE.size))
    t_event = rng.exponential(365.0, N) / np.exp(x @ BETA_TRUE)
    t_cens = rng.exponential(500.0, N)
    # distinct float32-exact times (the rank order: all a Cox model reads), so torchsurv, which
    # works in float32, sees no ties
    time = np.argsort(np.argsort(np.minimum(t_event, t_cens))) + 1.0
    event = t_event <= t_cens
    ids = np.arange(N, dtype=np.int64)
    pt = np.full(N, np.datetime64("2020-01-01", "us"))
    ct = ModalityFeatures(ids, pt, np.column_stack([ids, x[:, :4]]), np.ones(N, bool))
    ehr = ModalityFeatures(ids, pt, x[:, 4:], np.ones(N, bool))
    return {"ct": ct, "ehr": ehr}, time, event


@pytest.fixture(scope="module")
def cohort() -> tuple[dict[str, ModalityFeatures], np.ndarray, np.ndarray]:
    return _cohort()


def record_batches(
    features: dict[str, ModalityFeatures],
    time: np.ndarray,
    event: np.ndarray,
    batch_size: int | None,
    epochs: int = EPOCHS,
) -> list[list[Step]]:
    """The estimator's training batches for `epochs` epochs (its loop replaced by a recorder)."""
    recorded: list[list[Step]] = []

    def recorder(module: Any, options: Any, *, batches: Any, **_: Any) -> TrainState:
        for _epoch in range(epochs):
            steps = []
            for batch, bt, be in batches():
                ct = batch["ct"]["pooled"].numpy().astype(np.float64)
                x = np.column_stack([ct[:, 1:], batch["ehr"]["pooled"].numpy()])
                steps.append((ct[:, 0].astype(np.int64), x, bt.numpy(), be.numpy()))
            recorded.append(steps)
        return TrainState(module=module, options=options)

    mp = pytest.MonkeyPatch()
    mp.setattr(model_module, "fit_loop", recorder)
    try:
        FusionSurvivalModel(
            "concat", seed=0, device="cpu", batch_size=batch_size, branch_stopping=False
        ).fit(features, time, event)
    finally:
        mp.undo()
    return recorded


def _loss_and_grad(
    x: np.ndarray, time: np.ndarray, event: np.ndarray, beta: np.ndarray, *, full: bool
) -> tuple[float, np.ndarray]:
    """Mean-over-events Cox NLL of risk x @ beta and its gradient in beta (full: torchsurv)."""
    b = torch.tensor(beta, requires_grad=True)
    risk = torch.from_numpy(x) @ b
    if full:
        loss = neg_partial_log_likelihood(
            risk, torch.from_numpy(event), torch.from_numpy(time), reduction="mean"
        )
    else:  # what the training loop computes on a batch
        loss = cox_partial_nll(torch.from_numpy(time), torch.from_numpy(event), risk)
    (grad,) = torch.autograd.grad(loss, b)
    return float(loss.detach()), grad.numpy()


def measure(
    epochs: list[list[Step]], x: np.ndarray, time: np.ndarray, event: np.ndarray, beta: np.ndarray
) -> dict[str, float]:
    """Bias of the scaled batch loss, cosine and norm ratio of the mean batch gradient."""
    full_loss, full_grad = _loss_and_grad(x, time, event, beta, full=True)
    scaled, grads = [], []
    for steps in epochs:
        for _rows, xb, tb, eb in steps:
            loss, grad = _loss_and_grad(xb, tb, eb, beta, full=False)
            scaled.append(loss + np.log((N - 1) / (len(tb) - 1)))
            grads.append(grad)
    g = np.mean(grads, axis=0)
    return {
        "bias": float(np.mean(scaled)) - full_loss,
        "bias_se": float(np.std(scaled, ddof=1) / np.sqrt(len(scaled))),
        "cosine": float(g @ full_grad / np.linalg.norm(g) / np.linalg.norm(full_grad)),
        "norm_ratio": float(np.linalg.norm(g) / np.linalg.norm(full_grad)),
    }


def _covariates(features: dict[str, ModalityFeatures]) -> np.ndarray:
    return np.column_stack([features["ct"].pooled[:, 1:], features["ehr"].pooled]).astype(
        np.float64
    )


def _within_bounds(m: dict[str, float]) -> bool:
    lo, hi = GRAD_NORM_RATIO
    return bool(
        abs(m["bias"]) <= LOSS_BIAS_MAX
        and m["cosine"] >= GRAD_COSINE_MIN
        and lo <= m["norm_ratio"] <= hi
    )


@pytest.mark.parametrize("batch_size", [None, 1024])
def test_batches_partition_each_epoch_with_their_own_outcomes(cohort, batch_size):
    features, time, event = cohort
    epochs = record_batches(features, time, event, batch_size, epochs=3)
    size = batch_size or LARGE_BATCH
    partitions = []
    for steps in epochs:
        rows = np.concatenate([s[0] for s in steps])
        assert np.array_equal(np.sort(rows), np.arange(N))  # every patient once per epoch
        assert [len(s[0]) for s in steps] == [min(size, N - i) for i in range(0, N, size)]
        for rows_b, _x, tb, eb in steps:
            assert np.array_equal(tb, time[rows_b]) and np.array_equal(eb, event[rows_b])
        assert sum(int(s[3].sum()) for s in steps) == int(event.sum())  # no event lost
        partitions.append(frozenset(steps[0][0].tolist()))
    assert len(set(partitions)) == 3  # reshuffled every epoch


@pytest.mark.parametrize("batch_size", [None, 1024])
@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_minibatch_cox_loss_and_gradient_match_the_full_batch(cohort, batch_size, scale):
    features, time, event = cohort
    epochs = record_batches(features, time, event, batch_size)
    m = measure(epochs, _covariates(features), time, event, scale * BETA_TRUE)
    assert m["bias_se"] < LOSS_BIAS_MAX / 3  # the bound is not lost in Monte Carlo noise
    assert _within_bounds(m), m


def test_broken_batchings_violate_the_bounds(cohort):
    features, time, event = cohort
    x = _covariates(features)
    beta = 0.5 * BETA_TRUE
    epochs = record_batches(features, time, event, 1024, epochs=4)
    rng = np.random.default_rng(1)
    misaligned = [[(r, xb, rng.permutation(tb), eb) for r, xb, tb, eb in s] for s in epochs]
    flipped = [[(r, xb, tb, ~eb) for r, xb, tb, eb in s] for s in epochs]
    by_time = np.argsort(time)
    unshuffled = [
        [
            (rows, x[rows], time[rows], event[rows])
            for rows in np.array_split(by_time, int(np.ceil(N / 1024)))
        ]
    ]
    assert _within_bounds(measure(epochs, x, time, event, beta))
    for broken in (misaligned, flipped, unshuffled):
        assert not _within_bounds(measure(broken, x, time, event, beta))

"""Callbacks of the training loop (`survfuse.training.loop.fit_loop`).

A callback hooks into one training run; the loop calls every hook of every callback in list
order, except `on_fit_end`, which runs in reverse order (teardown: the last set up is the first
undone). Shared facts live on `TrainState`.

Per step:   `extra_loss` (terms added to the loss) -> backward -> `after_backward` (inspect or
            change gradients) -> optimiser step -> `after_step`
Per epoch:  `on_train_end` (write to `state.record`) -> validation -> `on_validation` (judge
            the epoch) -> `after_validation` (act on the judgement)
Stopping:   the loop stops when validation exists and every callback is `ready_to_stop`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
from torch import Tensor, nn

from survfuse.training.state import TrainState

__all__ = ["Callback", "EarlyStopping", "GradientLogging", "grad_norm"]


class Callback:
    """No-op hooks; subclasses override what they need."""

    def on_fit_start(self, state: TrainState) -> None:
        """Before the first epoch."""

    def extra_loss(
        self, state: TrainState, output: Any, batch: Any, time: Tensor, event: Tensor
    ) -> Tensor | None:
        """Return a term added to the training loss of this step (None: nothing)."""
        return None

    def after_backward(
        self, state: TrainState, output: Any, batch: Any, time: Tensor, event: Tensor
    ) -> None:
        """Gradients are computed and not yet clipped or applied."""

    def after_step(self, state: TrainState) -> None:
        """Act after the optimiser has stepped."""

    def on_train_end(self, state: TrainState) -> None:
        """Act once the epoch's training steps are done; add to `state.record`."""

    def on_validation(self, state: TrainState) -> None:
        """`state.val_c` holds this epoch's validation C-index; judge the epoch."""

    def after_validation(self, state: TrainState) -> None:
        """Every callback has judged the epoch; act on it."""

    def ready_to_stop(self, state: TrainState) -> bool:
        """Return whether training may stop now (it stops only when every callback agrees)."""
        return True

    def on_fit_end(self, state: TrainState) -> None:
        """After the last epoch (reverse callback order)."""


def grad_norm(params: list[nn.Parameter]) -> float:
    """L2 norm of the gradients of `params` (0 when none has a gradient)."""
    import torch

    sq = [p.grad.detach().pow(2).sum() for p in params if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


class GradientLogging(Callback):
    """Log the mean gradient L2 norm of each modality's encoder side per epoch.

    Records `grad_norm_<m>` and `grad_ratio` = ct / ehr: the modality-imbalance diagnostic.
    """

    def __init__(self, params: dict[str, list[nn.Parameter]]) -> None:
        self.params = params
        self.norms: dict[str, list[float]] = {m: [] for m in params}

    def after_backward(
        self, state: TrainState, output: Any, batch: Any, time: Tensor, event: Tensor
    ) -> None:
        for m, ps in self.params.items():
            self.norms[m].append(grad_norm(ps))

    def on_train_end(self, state: TrainState) -> None:
        rec = state.record
        for m, vals in self.norms.items():
            rec[f"grad_norm_{m}"] = float(np.mean(vals))
        if {"ct", "ehr"} <= set(self.norms):
            den = rec["grad_norm_ehr"]
            rec["grad_ratio"] = rec["grad_norm_ct"] / den if den > 0 else math.inf
        self.norms = {m: [] for m in self.params}


class EarlyStopping(Callback):
    """Keep the weights of the best validation C-index and stop after `patience` idle epochs.

    An idle epoch gains no more than `min_delta`. Only epochs of the "survival" training stage
    count.

    Other callbacks may reset the count (`state.froze`: a branch was frozen, the fusion layers
    get `patience` epochs to adapt) or restart it from the current weights (`state.dropped`: a
    modality is now masked, so no weights scored with it present are kept).
    """

    def __init__(self, patience: int, min_delta: float = 1e-6) -> None:
        self.patience = int(patience)
        self.min_delta = float(min_delta)

    def on_validation(self, state: TrainState) -> None:
        state.improved = False
        if state.stage == "survival":
            state.score = state.val_c if math.isfinite(state.val_c) else -math.inf
            state.improved = state.score > state.best_score + self.min_delta or (
                state.best_state is None
            )

    def after_validation(self, state: TrainState) -> None:
        if state.stage != "survival":
            return
        if state.improved:
            self._keep(state, state.score)
        else:
            state.bad_epochs += 1
        if state.froze:
            state.bad_epochs = 0
        if state.dropped:
            self._keep(state, state.val_c if math.isfinite(state.val_c) else -math.inf)

    def _keep(self, state: TrainState, score: float) -> None:
        state.best_score = score
        state.best_state = copy.deepcopy(state.module.state_dict())
        state.best_epoch = state.epoch
        state.bad_epochs = 0

    def ready_to_stop(self, state: TrainState) -> bool:
        return state.bad_epochs >= self.patience

    def on_fit_end(self, state: TrainState) -> None:
        if state.best_state is not None:
            state.module.load_state_dict(state.best_state)
        elif state.history:
            state.best_epoch = state.history[-1]["epoch"]

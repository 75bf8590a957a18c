"""`fit_loop`: the training loop every fusion model runs, and the state its callbacks share.

The loop does one thing: for each epoch, run the optimiser over the batches, validate, ask the
callbacks whether to stop. Everything else (early stopping, branch stopping, OGM-GE, gradient
logging) is a `Callback`. Deterministic on CPU for a fixed seed: the loop draws no random
numbers itself; batches and callbacks take their generators from the caller.
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from survfuse.training.callbacks import Callback
from survfuse.training.options import TrainingOptions
from survfuse.training.state import Step, TrainState

__all__ = ["Step", "TrainState", "fit_loop"]


def fit_loop(
    module: nn.Module,
    options: TrainingOptions,
    *,
    batches: Callable[[], Iterable[Step]],
    validate: Callable[[], tuple[float, Any]] | None = None,
    callbacks: Sequence[Callback] = (),
    verbose: bool = False,
) -> TrainState:
    """Train `module` (AdamW, gradient clipping) for up to `options.max_epochs` epochs.

    `module(batch)` gives an output and `module.loss(output, time, event)` its loss;
    `module.set_epoch(e)` / `module.training_stage()` let a strategy stage its training.
    `batches()` yields one epoch's steps; `validate()` returns (validation C-index, payload).
    Returns the final `TrainState` (history, best epoch); weights are whatever the callbacks
    left (EarlyStopping restores the best epoch's).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    state = TrainState(module=module, options=options)
    for cb in callbacks:
        cb.on_fit_start(state)
    for epoch in range(options.max_epochs):
        started = _time.perf_counter()
        state.epoch = epoch
        module.set_epoch(epoch)  # type: ignore[operator]
        module.train()
        state.stage = str(module.training_stage())  # type: ignore[operator]
        losses: list[float] = []
        fused: list[float] = []  # the module's own loss, without callbacks' extras (probes)
        for batch, bt, be in batches():
            output = module(batch)
            loss = module.loss(output, bt, be)  # type: ignore[operator]
            fused.append(float(loss.detach()))
            opt.zero_grad(set_to_none=True)
            for cb in callbacks:
                extra = cb.extra_loss(state, output, batch, bt, be)
                if extra is not None:
                    loss = loss + extra
            loss.backward()
            for cb in callbacks:
                cb.after_backward(state, output, batch, bt, be)
            if options.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, options.grad_clip)
            opt.step()
            for cb in callbacks:
                cb.after_step(state)
            losses.append(float(loss.detach()))
        state.record = {
            "epoch": epoch,
            "stage": state.stage,
            "train_loss": float(np.mean(losses)),
            "fused_loss": float(np.mean(fused)),
        }
        for cb in callbacks:
            cb.on_train_end(state)
        if validate is not None:
            state.val_c, state.val_payload = validate()
            state.record["val_c_index"] = state.val_c
            state.froze = state.dropped = False
            for cb in callbacks:
                cb.on_validation(state)
            for cb in callbacks:
                cb.after_validation(state)
        state.record["seconds"] = _time.perf_counter() - started
        state.history.append(state.record)
        if verbose:
            print(state.record)
        if validate is not None and all(cb.ready_to_stop(state) for cb in callbacks):
            break
    for cb in reversed(callbacks):
        cb.on_fit_end(state)
    return state

"""A linear Cox offset: a deep strategy learns the residual of the elastic-net Cox model.

With `offset: linear` in a strategy's parameters the fused Cox output becomes

    out(x) = x_lin^T beta + f_deep(x)

where x_lin^T beta is the `linear` strategy (`survfuse.fusion.linear.LinearCox`: elastic-net
Cox on the same standardised pooled features and presence flags, penalty chosen on the
validation split) fitted by its exact solver *before* training and then frozen, and f_deep is
the strategy's own network, whose output layer starts at zero. Training therefore starts at the
linear model and early stopping (on the validation C) keeps an epoch only where the deep part
helps; f_deep only has to learn what a linear Cox cannot (interactions, token-level findings).

Why: on simulated cohorts survfuse was not tuned on, a well-regularised linear Cox on the
pooled features often beats every deep model on the same inputs (docs/benchmarks.md,
fusion_generalisation); a network trained from random weights by early stopping on a noisy
validation C stops before it has learnt what the penalised linear model finds in closed form.
This is the "wide and deep" construction (Cheng et al. 2016) with the wide part fitted first.

Only the `cox` head applies (the offset shifts the log-hazard), and late fusion is excluded:
its fused output is a combination of unimodal models trained on their own, not one learnt
output a residual can be added to.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from survfuse.fusion.base import FusionStrategy
from survfuse.fusion.batch import Batch
from survfuse.fusion.linear import LinearCox
from survfuse.registry import look_up_option

__all__ = ["OFFSETS", "attach_offset", "fit_offset"]

#: Values of the `offset` strategy parameter.
OFFSETS = ("none", "linear")


def attach_offset(module: FusionStrategy, kind: str, *, strategy: str) -> None:
    """Give `module` an (unfitted) linear offset when `kind` is "linear"; checks the head and
    strategy, and zeroes the output head so training starts at the linear model."""
    kind = look_up_option(kind, OFFSETS, kind="offset")
    if kind == "none":
        return
    if module.head_name != "cox":
        raise ValueError(
            f"offset 'linear' shifts a Cox log-hazard: strategy {strategy!r} has head "
            f"{module.head_name!r} (use head cox, or offset none)"
        )
    if module.fits_exactly or module.needs_validation_after_training or strategy == "late":
        raise ValueError(
            f"offset 'linear' applies to strategies trained end to end; {strategy!r} is "
            "fitted exactly or combines separately trained unimodal models"
        )
    mods = module.modalities
    linear = LinearCox(module.specs, head="cox", modality=None if len(mods) > 1 else mods[0])
    # the strategy's input balance; its standardisation is copied at `fit_offset`
    linear.pooled_scale = dict(module.pooled_scale)
    for p in linear.parameters():
        p.requires_grad_(False)
    module.offset = linear
    with torch.no_grad():
        for p in module.output_head.parameters():
            p.zero_()


def fit_offset(
    module: FusionStrategy,
    train: Batch,
    time: np.ndarray,
    event: np.ndarray,
    validation: tuple[Batch, np.ndarray, np.ndarray] | None,
) -> list[dict[str, Any]]:
    """Fit the offset's elastic-net path on the training split (penalty chosen on validation);
    returns its history rows with `stage` = "offset". No-op without an offset."""
    linear = module.offset
    if linear is None:
        return []
    assert isinstance(linear, LinearCox)
    # the strategy's standardisation statistics (fitted on the training split by now); a
    # copy, not a shared module, so the weights save as separate tensors
    linear.norms.load_state_dict(module.norms.state_dict())
    linear.eval()
    rows = linear.fit_exact(train, time, event, validation)
    return [{**row, "stage": "offset"} for row in rows]


def offset_risk(offset: nn.Module, batch: Batch) -> Tensor:
    """The offset's log-hazard [N] of a raw (not yet normalised) batch."""
    out: Tensor = offset(batch).risk
    return out

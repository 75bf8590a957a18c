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

Late fusion combines unimodal models, so there each branch gets its own offset: branch m is
out_m = x_m^T beta_m + f_m(x_m) with beta_m the unimodal elastic-net Cox of modality m, and the
learnt weights (or the stacking fitted on validation) combine these. Only the `cox` head
applies (the offset shifts a log-hazard); the exactly fitted `linear` strategy takes none.
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

__all__ = ["OFFSETS", "attach_offset", "fit_offset", "has_offset"]

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
    if module.fits_exactly:
        raise ValueError(
            f"offset 'linear' applies to strategies trained end to end; {strategy!r} is "
            "fitted exactly"
        )
    if module.offset_per_branch:
        module.branch_offsets = nn.ModuleDict({m: _linear(module, (m,)) for m in module.modalities})
    else:
        module.offset = _linear(module, module.modalities)
    with torch.no_grad():  # every head starts at zero: the model starts at the linear Cox
        for head in module.survival_heads():
            for p in head.parameters():
                p.zero_()


def _linear(module: FusionStrategy, mods: tuple[str, ...]) -> LinearCox:
    """A frozen `LinearCox` on `mods` with the strategy's input balance (its standardisation
    statistics are copied at `fit_offset`, once they are fitted)."""
    linear = LinearCox(module.specs, head="cox", modality=None if len(mods) > 1 else mods[0])
    linear.pooled_scale = {m: module.pooled_scale[m] for m in mods}
    for p in linear.parameters():
        p.requires_grad_(False)
    return linear


def has_offset(module: FusionStrategy) -> bool:
    """Whether `module` has a linear offset (on its output or on its branches) to fit."""
    return module.offset is not None or module.branch_offsets is not None


def fit_offset(
    module: FusionStrategy,
    train: Batch,
    time: np.ndarray,
    event: np.ndarray,
    validation: tuple[Batch, np.ndarray, np.ndarray] | None,
) -> list[dict[str, Any]]:
    """Fit the offset's elastic-net path on the training split (penalty chosen on validation);
    returns its history rows with `stage` = "offset" (and `modality` for branch offsets).
    No-op without an offset."""
    fits: dict[str | None, nn.Module] = {}
    if module.offset is not None:
        fits[None] = module.offset
    fits.update(module.branch_offsets.items() if module.branch_offsets is not None else {})
    rows: list[dict[str, Any]] = []
    for branch, linear in fits.items():
        assert isinstance(linear, LinearCox)
        # the strategy's standardisation statistics (fitted on the training split by now); a
        # copy, not a shared module, so the weights save as separate tensors
        for m in linear.modalities:
            linear.norms[m].load_state_dict(module.norms[m].state_dict())
        linear.eval()
        for row in linear.fit_exact(train, time, event, validation):
            rows.append(
                {**row, "stage": "offset", **({} if branch is None else {"modality": branch})}
            )
    return rows


def offset_risk(offset: nn.Module, batch: Batch) -> Tensor:
    """The offset's log-hazard [N] of a raw (not yet normalised) batch."""
    out: Tensor = offset(batch).risk
    return out

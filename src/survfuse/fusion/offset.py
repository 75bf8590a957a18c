"""A linear Cox offset: a deep strategy learns the residual of the elastic-net Cox model.

With `offset: linear` in a strategy's parameters the fused Cox output becomes

    out(x) = x_lin^T beta + f_deep(x)

where x_lin^T beta is the `linear` strategy (`survfuse.fusion.linear.LinearCox`: elastic-net
Cox on the same standardised pooled features and presence flags, penalty chosen on the
validation split, on the concatenation of the strategy's modalities, `LinearOffset`) fitted by
its exact solver *before* training and then frozen, and f_deep is the strategy's own network,
whose output layer starts at zero. Training therefore starts at the linear model and early
stopping (on the validation C) keeps an epoch only where the deep part helps; f_deep only has
to learn what a linear Cox cannot (interactions, token-level findings).

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

from survfuse.fusion.base import ExactStrategy, FusionOutput, FusionStrategy
from survfuse.fusion.batch import Batch
from survfuse.fusion.linear import LinearCox
from survfuse.registry import look_up_option

__all__ = [
    "OFFSETS",
    "LinearOffset",
    "attach_offset",
    "fit_offset",
    "has_offset",
]

#: Values of the `offset` strategy parameter.
OFFSETS = ("none", "linear")


def attach_offset(module: FusionStrategy, kind: str, *, strategy: str) -> None:
    """Give `module` an (unfitted) linear offset when `kind` is "linear".

    Checks the head and the strategy, and zeroes every survival head so that training starts
    at the linear model.
    """
    kind = look_up_option(kind, OFFSETS, kind="offset")
    if kind == "none":
        return
    if module.head_name != "cox":
        raise ValueError(
            f"offset 'linear' shifts a Cox log-hazard: strategy {strategy!r} has head "
            f"{module.head_name!r} (use head cox, or offset none)"
        )
    if isinstance(module, ExactStrategy):
        raise ValueError(
            f"offset 'linear' applies to strategies trained end to end; {strategy!r} is "
            "fitted exactly"
        )
    if module.offset_per_branch:
        module.branch_offsets = nn.ModuleDict(
            {m: LinearOffset(module, (m,)) for m in module.modalities}
        )
    else:
        module.offset = LinearOffset(module, module.modalities)
    with torch.no_grad():  # every head starts at zero: the model starts at the linear Cox
        for head in module.survival_heads():
            for p in head.parameters():
                p.zero_()


class LinearOffset(nn.Module):
    """The frozen linear Cox of a strategy's inputs: the elastic-net Cox on the concatenation.

    One `LinearCox` on every modality of the strategy, its penalty chosen on validation; a
    modality without linear signal gets coefficients near zero from the penalty, so it barely
    enters. Why never a single modality (until session 9 the best on validation of the
    concatenation and each modality alone was kept): a modality left out of the offset is lost
    wherever the other one fails. On fresh simulator seeds (docs/benchmarks.md, session 9), at
    imbalance 1 CT alone beat the concatenation on the development sites' validation split by
    more than a standard error, and on the external site, whose scanner does not render the
    calcium, every deep fusion fell to C 0.50-0.53 while the linear concatenation, keeping the
    EHR's age, held 0.61.

    `candidates` is a one-entry ModuleDict and `pick` stays 0; models saved with the former
    candidates (the concatenation, then each modality) load with their choice.
    """

    pick: Tensor

    def __init__(self, module: FusionStrategy, modalities: tuple[str, ...]) -> None:
        super().__init__()
        self.candidates = nn.ModuleDict({"+".join(modalities): _linear(module, modalities)})
        self.register_buffer("pick", torch.tensor(0))

        def add_saved_candidates(state: dict[str, Any], prefix: str, *args: Any) -> None:
            # an older saved model has one candidate per modality after the concatenation
            for m in modalities:
                saved = any(k.startswith(f"{prefix}candidates.{m}.") for k in state)
                if saved and m not in self.candidates:
                    self.candidates[m] = _linear(module, (m,))

        self._register_load_state_dict_pre_hook(add_saved_candidates)

    @property
    def chosen(self) -> LinearCox:
        """The candidate in use."""
        linear = list(self.candidates.values())[int(self.pick)]
        assert isinstance(linear, LinearCox)
        return linear

    def forward(self, batch: Batch) -> FusionOutput:
        """Linear Cox output of a raw batch."""
        out: FusionOutput = self.chosen(batch)
        return out

    def fuse(self, batch: Batch) -> FusionOutput:
        """Linear Cox output of a batch already normalised as the strategy normalises."""
        return self.chosen.fuse(batch)

    def fit(
        self,
        module: FusionStrategy,
        train: Batch,
        time: np.ndarray,
        event: np.ndarray,
        validation: tuple[Batch, np.ndarray, np.ndarray] | None,
    ) -> list[dict[str, Any]]:
        """Fit the penalty path, keep the penalty best on validation; history rows per penalty."""
        rows: list[dict[str, Any]] = []
        for name, linear in self.candidates.items():
            assert isinstance(linear, LinearCox)
            # the strategy's standardisation statistics (fitted on the training split by
            # now); a copy, not a shared module, so the weights save as separate tensors
            for m in linear.modalities:
                linear.norms[m].load_state_dict(module.norms[m].state_dict())
            linear.eval()
            history = linear.fit_exact(train, time, event, validation)
            rows += [{**h, "stage": "offset", "candidate": name} for h in history]
        self.pick.fill_(0)
        return [{**r, "kept": True} for r in rows]


def _linear(module: FusionStrategy, mods: tuple[str, ...]) -> LinearCox:
    """Frozen `LinearCox` on `mods` with the strategy's input balance.

    Its standardisation statistics are copied by `LinearOffset.fit`, once they are fitted.
    """
    linear = LinearCox(module.specs, head="cox", modality=None if len(mods) > 1 else mods[0])
    linear.pooled_scale = {m: module.pooled_scale[m] for m in mods}
    for p in linear.parameters():
        p.requires_grad_(False)
    return linear


def has_offset(module: FusionStrategy) -> bool:
    """Return whether `module` has a linear offset (on its output or its branches)."""
    return module.offset is not None or module.branch_offsets is not None


def fit_offset(
    module: FusionStrategy,
    train: Batch,
    time: np.ndarray,
    event: np.ndarray,
    validation: tuple[Batch, np.ndarray, np.ndarray] | None,
) -> list[dict[str, Any]]:
    """Fit the offset(s) on the training split, choosing penalties and candidates on validation.

    Returns the history rows (`stage` = "offset", `candidate`, `kept`, and `branch` for late
    fusion's branch offsets); a no-op without an offset.
    """
    fits: dict[str | None, nn.Module] = {}
    if module.offset is not None:
        fits[None] = module.offset
    fits.update(module.branch_offsets.items() if module.branch_offsets is not None else {})
    rows: list[dict[str, Any]] = []
    for branch, offset in fits.items():
        assert isinstance(offset, LinearOffset)
        for row in offset.fit(module, train, time, event, validation):
            rows.append(row if branch is None else {**row, "branch": branch})
    return rows

"""A linear Cox offset: a deep strategy learns the residual of the elastic-net Cox model.

With `offset: linear` in a strategy's parameters the fused Cox output becomes

    out(x) = x_lin^T beta + f_deep(x)

where x_lin^T beta is the `linear` strategy (`survfuse.fusion.linear.LinearCox`: elastic-net
Cox on the same standardised pooled features and presence flags, penalty chosen on the
validation split; for two modalities the best on validation of the concatenation and each
modality alone, `LinearOffset`) fitted by its exact solver *before* training and then frozen,
and f_deep is
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

from survfuse.fusion.base import ExactStrategy, FusionOutput, FusionStrategy
from survfuse.fusion.batch import Batch
from survfuse.fusion.linear import LinearCox
from survfuse.metrics.paired import concordance_matrix
from survfuse.registry import look_up_option

__all__ = [
    "OFFSETS",
    "SINGLE_MODALITY_Z",
    "LinearOffset",
    "attach_offset",
    "choose_candidate",
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


#: a single-modality candidate replaces the concatenation only when its validation C is higher
#: by more than this many standard errors of the paired difference (IJ variance)
SINGLE_MODALITY_Z = 1.0


class LinearOffset(nn.Module):
    """The frozen linear Cox of a strategy's inputs (the concatenation unless one modality wins).

    Candidates: the elastic-net Cox on the concatenation of the modalities and, with two
    modalities, on each modality alone (`LinearCox`, each with its own penalty path). The
    concatenation is kept (`pick` = 0) unless a single modality's validation Harrell C beats it
    by more than `SINGLE_MODALITY_Z` standard errors of the paired difference (z = d / se(d),
    the infinitesimal-jackknife variance of `metrics.paired`); then the single modality with the
    largest z. Why not the plain maximum: the concatenation nests each modality (its penalty
    can zero the other one out), and the maximum of three C's on a few hundred validation
    patients picks a single modality on noise. Measured (docs/benchmarks.md, session 9): with
    the plain maximum, at imbalance 1 the offset was CT alone and lost the age the EHR carries,
    leaving every deep fusion below the linear concatenation. A modality that is pure noise
    still stays out when the data show it: the concatenation then loses C to the modality alone.
    """

    pick: Tensor

    def __init__(self, module: FusionStrategy, modalities: tuple[str, ...]) -> None:
        super().__init__()
        names = ["+".join(modalities)] + (list(modalities) if len(modalities) > 1 else [])
        mods = [modalities] + ([(m,) for m in modalities] if len(modalities) > 1 else [])
        self.candidates = nn.ModuleDict(
            {n: _linear(module, m) for n, m in zip(names, mods, strict=True)}
        )
        self.register_buffer("pick", torch.tensor(0))

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
        """Fit every candidate's penalty path, keep the best; history rows per penalty."""
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
        pick = 0 if validation is None else self._choose(validation)
        self.pick.fill_(pick)
        kept = list(self.candidates)[pick]
        return [{**r, "kept": r["candidate"] == kept} for r in rows]

    @torch.no_grad()
    def _choose(self, validation: tuple[Batch, np.ndarray, np.ndarray]) -> int:
        """Index of the candidate to keep (`choose_candidate` on the validation risks)."""
        batch, time, event = validation
        risks = {
            name: linear(batch).out[:, 0].double().cpu().numpy()
            for name, linear in self.candidates.items()
        }
        return choose_candidate(time, event, risks)


def choose_candidate(time: np.ndarray, event: np.ndarray, risks: dict[str, np.ndarray]) -> int:
    """Index in `risks` of the linear offset to keep (0, the concatenation, by default).

    Another candidate k replaces the concatenation when its Harrell C beats it with
    z = (C_k - C_0) / se > `SINGLE_MODALITY_Z` (se: IJ standard error of the paired
    difference); among several, the largest z.

    time, event, each risk: [N] (validation split).
    """
    names = list(risks)
    if len(names) == 1 or not np.any(event):
        return 0
    cm = concordance_matrix(time, event, risks)
    best, best_z = 0, SINGLE_MODALITY_Z
    for i, name in enumerate(names[1:], start=1):
        _, _, z, _ = cm.contrast(name, names[0])
        if np.isfinite(z) and z > best_z:
            best, best_z = i, z
    return best


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

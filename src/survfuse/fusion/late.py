"""`late`: one head per modality, outputs combined by learned non-negative weights (or stacking)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from survfuse.features import MODALITIES
from survfuse.fusion.base import FusionOutput, FusionStrategy
from survfuse.fusion.batch import Batch, ModalitySpec
from survfuse.fusion.cross_fit import cross_fit_folds
from survfuse.fusion.offset import LinearOffset
from survfuse.registry import FUSIONS, look_up_option


@FUSIONS.register("late")
class Late(FusionStrategy):
    """Late fusion of per-modality survival heads.

    Branch m: out_m = head_m(MLP_m(pooled_m)). `combine="weights"` (default):
    w_m = softplus(a_m) >= 0 and out = sum_m p_m w_m out_m / sum_m p_m w_m with p_m the presence
    flag, so with one modality absent the fused output *equals* the present branch's output
    (a Cox risk is a log-hazard, so this is a weighted average of log-risks).
    Loss = head loss of the fused output + `aux_weight` * mean_m (head_m loss on the rows with
    modality m present), so every branch stays a standalone risk model. After training the
    weights are refitted on the validation split, where there is one, with the branches frozen
    (`fit_weight_logits`):
    trained jointly, a branch that overfits the training risk sets (a weak, high-dimensional
    EHR) earns a weight its held-out performance does not justify, and the average then dilutes
    a strong branch (fusion_generalisation at imbalance 1: PE C 0.671 against CT-only 0.756).

    `combine="stacking"` (INSPECT): branches train as above; afterwards `fit_stacking` fits, on
    the validation split, out = b + sum_m p_m beta_m (out_m - mu_m) by minimising the head's
    loss + `stack_ridge` * |beta|^2 (for the Cox head: a Cox model on the unimodal risks;
    mu_m = validation mean, so an
    absent modality contributes its mean).
    """

    offset_per_branch = True  # the linear offset is unimodal, one per branch

    def __init__(
        self,
        specs: Mapping[str, ModalitySpec],
        *,
        head: str = "cox",
        head_params: Mapping[str, Any] | None = None,
        hidden: int = 32,
        layers: int = 1,
        dropout: float = 0.1,
        combine: str = "weights",
        aux_weight: float = 1.0,
        stack_ridge: float = 1e-3,
    ) -> None:
        super().__init__(specs, head=head, head_params=head_params)
        self._setup(MODALITIES)
        combine = look_up_option(combine, ("weights", "stacking"), kind="late combine")
        self.params = {
            "hidden": hidden,
            "layers": layers,
            "dropout": dropout,
            "combine": combine,
            "aux_weight": aux_weight,
            "stack_ridge": stack_ridge,
        }
        self.stack_ridge = stack_ridge
        self.combine = combine
        self.aux_weight = aux_weight
        self.branches = self.pooled_mlps(hidden, layers, dropout)
        self.branch_heads = nn.ModuleDict({m: self.make_head(hidden) for m in MODALITIES})
        # softplus(0.5413) = 1: equal initial weights
        self.weight_logits = nn.Parameter(torch.full((len(MODALITIES),), 0.5413))
        # the fused output's head: carries the loss, Breslow baseline and curves; its own layer
        # is not used (the fused output is a combination of branch outputs)
        self.head = self.make_head(hidden)
        for p in self.head.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            k = int(self.head(torch.zeros(2, hidden)).shape[-1])
        self.register_buffer("stack_beta", torch.ones(len(MODALITIES)))
        self.register_buffer("stack_mu", torch.zeros(len(MODALITIES), k))
        self.register_buffer("stack_bias", torch.zeros(k))
        self.register_buffer("stack_fitted", torch.tensor(False))

    def survival_heads(self) -> list[Any]:
        return [self.head, *self.branch_heads.values()]

    def _branch_head(self, modality: str) -> Any:
        return self.branch_heads[modality]

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {
            m: [*self.branches[m].parameters(), *self.branch_heads[m].parameters()]
            for m in MODALITIES
        }

    def weights(self) -> Tensor:
        """Non-negative combination weights [M] (before renormalisation over present ones)."""
        return F.softplus(self.weight_logits)

    def branch_outputs(self, batch: Batch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Return (outs [M, N, K], present [M, N] float, hidden per modality).

        With branch offsets (`fusion.offset`) out_m = x_m^T beta_m + head_m(MLP_m(x_m)).
        """
        hidden = {m: self.branches[m](batch[m]["pooled"]) for m in MODALITIES}
        outs = torch.stack([self._branch_out(m, hidden[m], batch) for m in MODALITIES])
        present = torch.stack([batch[m]["present"] for m in MODALITIES]).float()
        return outs, present, hidden

    def _branch_out(self, modality: str, hidden: Tensor, batch: Batch) -> Tensor:
        out: Tensor = self.branch_heads[modality](hidden)
        if self.branch_offsets is not None:
            # `batch` is normalised with the statistics and input balance the offset was
            # fitted with, so its `fuse` (not `forward`, which would normalise again) applies
            linear = self.branch_offsets[modality]
            assert isinstance(linear, LinearOffset)
            out = out + linear.fuse(batch).out.to(out.dtype)
        return out

    def fuse(self, batch: Batch) -> FusionOutput:
        outs, present, hidden = self.branch_outputs(batch)
        out = self._combine(outs, present)
        extras = {"branch_out": outs, "present": present}
        return FusionOutput(out=out, risk=self.head.risk(out), modality_repr=hidden, extras=extras)

    def loss(self, output: FusionOutput, time: Tensor, event: Tensor) -> Tensor:
        total = self.head.loss(output.out, time, event)
        outs, present = output.extras["branch_out"], output.extras["present"].bool()
        branch: list[Tensor] = []
        for i, m in enumerate(MODALITIES):
            rows = present[i]
            if int(rows.sum()) >= 2 and bool(event[rows].any()):
                branch.append(self._branch_head(m).loss(outs[i][rows], time[rows], event[rows]))
        if branch and self.aux_weight > 0:
            total = total + self.aux_weight * torch.stack(branch).mean()
        return total

    @property
    def needs_validation_after_training(self) -> bool:
        return bool(self.combine == "stacking")

    @property
    def uses_validation_after_training(self) -> bool:
        return True  # the weights are refitted when there is a validation split

    def finish_training(self, batch: Batch, time: Tensor, event: Tensor) -> None:
        """Fit the combination of branch risks (weights or stacking) on the validation split.

        Also sets `cross_fitted_out`: each validation row's output with the combination fitted
        on the other `CROSS_FIT_FOLDS` - 1 folds (the branches stay frozen), so the validation
        C used to choose among strategies is not scored on the rows it was fitted on.
        """
        was_training = self.training
        self.eval()
        with torch.no_grad():
            # the inputs `fuse` sees at prediction (normalised *and* input-balanced)
            outs, present, _ = self.branch_outputs(self.normalise(batch))
        trained = self.weight_logits.detach().clone()  # every fold's fit starts here too
        self._fit_combination(outs, present, time, event)
        self.cross_fitted_out = self._cross_fit(outs, present, time, event, trained)
        self.train(was_training)

    def _fit_combination(self, outs: Tensor, present: Tensor, time: Tensor, event: Tensor) -> None:
        if self.combine == "stacking":
            beta, mu, bias = fit_stacking(outs, present, time, event, self.head, self.stack_ridge)
            self.stack_beta, self.stack_mu, self.stack_bias = beta, mu, bias
            self.stack_fitted = torch.tensor(True, device=outs.device)
        else:
            logits = fit_weight_logits(outs, present, time, event, self.head, self.weight_logits)
            with torch.no_grad():
                self.weight_logits.copy_(logits)

    def _cross_fit(
        self, outs: Tensor, present: Tensor, time: Tensor, event: Tensor, init: Tensor
    ) -> Tensor:
        """Out-of-fold combined outputs [N, K] of the validation rows (`CROSS_FIT_FOLDS`)."""
        folds = cross_fit_folds(event.cpu().numpy(), CROSS_FIT_FOLDS)
        oof = torch.empty(outs.shape[1:], dtype=outs.dtype, device=outs.device)
        for k in range(CROSS_FIT_FOLDS):
            held = torch.as_tensor(folds == k, device=outs.device)
            fit = ~held
            if not bool(held.any()):
                continue
            if int(fit.sum()) < 2 or not bool(event[fit].any()):
                oof[held] = self._combine(outs[:, held], present[:, held])
                continue
            if self.combine == "stacking":
                beta, mu, bias = fit_stacking(
                    outs[:, fit],
                    present[:, fit],
                    time[fit],
                    event[fit],
                    self.head,
                    self.stack_ridge,
                )
                oof[held] = stacked(outs[:, held], present[:, held], beta, mu, bias)
            else:
                logits = fit_weight_logits(
                    outs[:, fit],
                    present[:, fit],
                    time[fit],
                    event[fit],
                    self.head,
                    self.weight_logits,
                )
                oof[held] = weighted(outs[:, held], present[:, held], F.softplus(logits))
        return oof

    def _combine(self, outs: Tensor, present: Tensor) -> Tensor:
        if self.combine == "stacking" and bool(self.stack_fitted):
            return stacked(outs, present, self.stack_beta, self.stack_mu, self.stack_bias)
        return weighted(outs, present, self.weights())


#: folds of the cross-fitted validation output of late fusion's combination
CROSS_FIT_FOLDS = 5


def weighted(outs: Tensor, present: Tensor, w: Tensor) -> Tensor:
    """Out = sum_m p_m w_m out_m / sum_m p_m w_m: outs [M, N, K], present [M, N], w [M] -> [N, K]."""
    pw = w[:, None] * present
    return (pw[..., None] * outs).sum(0) / pw.sum(0).clamp_min(1e-12)[:, None]


def stacked(outs: Tensor, present: Tensor, beta: Tensor, mu: Tensor, bias: Tensor) -> Tensor:
    """Out = b + sum_m p_m beta_m (out_m - mu_m): outs [M, N, K], beta [M], mu [M, K], b [K]."""
    centred = (outs - mu[:, None, :]) * present[..., None]
    return bias + (beta[:, None, None] * centred).sum(0)


@torch.enable_grad()
def fit_weight_logits(
    outs: Tensor, present: Tensor, time: Tensor, event: Tensor, head: Any, init: Tensor
) -> Tensor:
    """Logits a [M] minimising the head loss of `weighted(outs, present, softplus(a))`.

    L-BFGS from `init`; returns `init` where the fit is not finite. Only the weights' ratios
    matter where every modality is present, so this is M - 1 degrees of freedom.
    """
    logits = init.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([logits], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = head.loss(weighted(outs, present, F.softplus(logits)), time, event)
        loss.backward()
        return loss

    opt.step(closure)
    out = logits.detach()
    return out if bool(torch.isfinite(out).all()) else init.detach().clone()


@torch.enable_grad()
def fit_stacking(
    outs: Tensor, present: Tensor, time: Tensor, event: Tensor, head: Any, ridge: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Fit (beta [M], mu [M, K], b [K]) of `stacked` on outs [M, N, K], present [M, N].

    mu = the mean output of the rows with the modality present; beta and b minimise the head
    loss + `ridge` * |beta|^2 (L-BFGS from beta = 1, b = 0; for the Cox head a Cox model on the
    unimodal risks).
    """
    k = outs.shape[-1]
    mu = (outs * present[..., None]).sum(1) / present.sum(1).clamp_min(1)[:, None]
    mu = mu.detach()
    beta = torch.ones(outs.shape[0], device=outs.device, requires_grad=True)
    bias = torch.zeros(k, device=outs.device, requires_grad=True)
    opt = torch.optim.LBFGS([beta, bias], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        # a small ridge keeps beta finite when a risk separates the validation events
        loss = head.loss(stacked(outs, present, beta, mu, bias), time, event)
        loss = loss + ridge * (beta**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return beta.detach().clone(), mu.clone(), bias.detach().clone()

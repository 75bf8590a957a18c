"""OGM-GE gradient rebalancing (Peng et al., CVPR 2022) adapted to survival, as a callback.

A linear Cox probe per modality is trained on that modality's detached representation r_m
(`FusionOutput.modality_repr`; Adam, `PROBE_STEPS` steps per training step). Its score is the
geometric-mean partial likelihood per event relative to the null model (risk 0),
s_m = exp(nll_null - nll_m) (the analogue of OGM-GE's softmax probability of the true class),
both computed on the batch rows where *both* modalities are present: the Cox NLL grows with
risk-set size, so scoring each probe on its own present rows would favour the modality that is
missing more often. With rho_ct = s_ct / s_ehr and rho_ehr = 1 / rho_ct, the dominant modality
(rho_m > 1) has its encoder-side gradients scaled by k_m = 1 - tanh(alpha * (rho_m - 1)) and,
for generalisation enhancement, Gaussian noise with the gradient's own standard deviation added
(`noise=True`); the other modality is untouched. The mean k_m per epoch is logged as
`ogm_coef_<m>`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from survfuse.survival.losses import cox_partial_nll
from survfuse.training.callbacks import Callback
from survfuse.training.state import TrainState

__all__ = ["OGMGE", "PROBE_LR", "PROBE_STEPS"]

PROBE_STEPS = 5
PROBE_LR = 1e-2


class OGMGE(Callback):
    """OGM-GE for a two-modality strategy.

    `params[m]` are modality m's encoder-side parameters; `generator` draws the noise (shared with
    the estimator's modality dropout, in step order).
    """

    def __init__(
        self,
        params: dict[str, list[nn.Parameter]],
        *,
        alpha: float = 0.5,
        noise: bool = True,
        generator: torch.Generator,
    ) -> None:
        self.params = params
        self.alpha = float(alpha)
        self.noise = bool(noise)
        self.gen = generator
        self.probes: nn.ModuleDict | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.coefs: dict[str, list[float]] = {m: [] for m in params}

    def after_backward(
        self, state: TrainState, output: Any, batch: Any, time: Tensor, event: Tensor
    ) -> None:
        if len(self.params) != 2:
            return
        if self.probes is None:
            dev = time.device
            self.probes = nn.ModuleDict(
                {m: nn.Linear(r.shape[-1], 1).to(dev) for m, r in output.modality_repr.items()}
            )
            self.opt = torch.optim.Adam(self.probes.parameters(), lr=PROBE_LR)
        for m, c in self._modulate(output, batch, time, event).items():
            self.coefs[m].append(c)

    def on_train_end(self, state: TrainState) -> None:
        for m, vals in self.coefs.items():
            if vals:
                state.record[f"ogm_coef_{m}"] = float(np.mean(vals))
        self.coefs = {m: [] for m in self.params}

    def _modulate(self, output: Any, batch: Any, bt: Tensor, be: Tensor) -> dict[str, float]:
        """Train the probes one step and scale the dominant modality's gradients."""
        assert self.probes is not None and self.opt is not None
        probes = self.probes
        scores: dict[str, float] = {}
        probe_losses: list[Tensor] = []
        # Scores on the rows where every modality is present (see the module docstring); each
        # is the improvement over the null model (risk 0) on those rows (1 = uninformative).
        both = torch.stack([batch[m]["present"] for m in output.modality_repr]).all(0)
        scorable = bool(be[both].any())
        nll_null = (
            float(cox_partial_nll(bt[both], be[both], torch.zeros_like(bt[both])))
            if scorable
            else 0.0
        )
        for m, r in output.modality_repr.items():
            rows = batch[m]["present"]
            risk = probes[m](r.detach()[rows])[:, 0]
            probe_losses.append(cox_partial_nll(bt[rows], be[rows], risk))
            if scorable:
                with torch.no_grad():
                    shared = probes[m](r.detach()[both])[:, 0]
                    nll = float(cox_partial_nll(bt[both], be[both], shared))
                scores[m] = math.exp(nll_null - nll)
            else:
                scores[m] = 0.0
        # a few cheap steps per training step so the linear probes track the representations
        for step in range(PROBE_STEPS):
            if step:
                probe_losses = [
                    cox_partial_nll(
                        bt[batch[m]["present"]],
                        be[batch[m]["present"]],
                        probes[m](r.detach()[batch[m]["present"]])[:, 0],
                    )
                    for m, r in output.modality_repr.items()
                ]
            self.opt.zero_grad(set_to_none=True)
            torch.stack(probe_losses).sum().backward()
            self.opt.step()
        names = sorted(scores)
        coef = {m: 1.0 for m in names}
        a, b = names
        if scores[a] > 0 and scores[b] > 0:
            rho = {a: scores[a] / scores[b], b: scores[b] / scores[a]}
            for m in names:
                if rho[m] > 1:
                    coef[m] = 1.0 - math.tanh(self.alpha * (rho[m] - 1.0))
                    for p in self.params[m]:
                        if p.grad is None:
                            continue
                        g = p.grad * coef[m]
                        if self.noise and p.grad.numel() > 1:
                            noise = torch.randn(p.grad.shape, generator=self.gen).to(g.device)
                            g = g + noise * (float(p.grad.std()) + 1e-8)
                        p.grad.copy_(g)
        return coef

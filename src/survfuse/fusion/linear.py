"""`linear`: a penalised linear Cox model on the pooled features, the classical baseline.

x = [standardised pooled features of each modality used, presence flags when two are used]
(a missing modality contributes zeros, i.e. its training mean, and its flag says so) and
risk = x^T beta, with beta maximising the Efron partial log-likelihood l(beta) minus a penalty,
fitted by an exact solver (no learning rate, no epochs, no early stopping):

- elastic net (`l1_ratio` in (0, 1], default 0.5): the coordinate-descent path of
  scikit-survival's `CoxnetSurvivalAnalysis` over `n_alphas` penalties,
  alpha (l1_ratio ||beta||_1 + (1 - l1_ratio) ||beta||^2 / 2) on l(beta) / N;
- ridge (`l1_ratio: 0`): `survfuse.survival.CoxPH` (Newton, matches R's coxph ridge) with
  penalty (lambda d / 2) ||beta||^2 for each lambda of `penalties`, d = training events.

The penalty with the best validation Harrell C is kept (without validation data: the middle of
the grid). Why it is in every study: a deep model that does not beat a linear Cox on its own
inputs has not earned its cost, and on simulated cohorts survfuse was not tuned on the
elastic-net Cox often wins (docs/benchmarks.md, fusion_generalisation). The L1 part matters when
few of many features carry signal (tests/test_fusion_linear.py).

`modality: ct` / `modality: ehr` give the unimodal linear baselines (they join the reference
pool "best unimodal"), no modality the linear concatenation. Only the `cox` head applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from survfuse.features import MODALITIES
from survfuse.fusion.base import ExactStrategy, FusionOutput
from survfuse.fusion.batch import Batch, ModalitySpec
from survfuse.fusion.params import harrell_c
from survfuse.registry import FUSIONS, look_up_option
from survfuse.survival.coxph import CoxPH
from survfuse.survival.losses import cox_partial_nll

__all__ = ["LinearCox"]

PENALTIES = (0.01, 0.1, 1.0, 10.0)


def _mean_nll(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Mean negative Efron partial log-likelihood per event (the cox head's loss)."""
    t = torch.as_tensor(time, dtype=torch.float64)
    e = torch.as_tensor(np.asarray(event, bool))
    return float(cox_partial_nll(t, e, torch.as_tensor(risk), ties="efron", reduction="mean"))


@FUSIONS.register("linear")
class LinearCox(ExactStrategy):
    """Ridge Cox on the pooled features (see the module docstring)."""

    supported_heads = ("cox",)

    def __init__(
        self,
        specs: Mapping[str, ModalitySpec],
        *,
        head: str = "cox",
        head_params: Mapping[str, Any] | None = None,
        modality: str | None = None,
        l1_ratio: float = 0.5,
        n_alphas: int = 30,
        penalties: Sequence[float] = PENALTIES,
    ) -> None:
        super().__init__(specs, head=head, head_params=head_params)
        look_up_option(head, self.supported_heads, kind="head of the linear strategy")
        mods = MODALITIES if modality is None else (look_up_option(modality, MODALITIES),)
        pens = [float(p) for p in penalties]
        if not pens or any(not p > 0 for p in pens):
            raise ValueError(f"penalties must be a non-empty list of values > 0, got {penalties}")
        if not 0.0 <= l1_ratio <= 1.0:
            raise ValueError(f"l1_ratio must lie in [0, 1], got {l1_ratio}")
        if n_alphas < 1:
            raise ValueError(f"n_alphas must be >= 1, got {n_alphas}")
        self._setup(mods)
        self.params: dict[str, Any] = {
            "modality": modality,
            "l1_ratio": float(l1_ratio),
            "n_alphas": int(n_alphas),
            "penalties": pens,
        }
        self.flags = len(mods) > 1
        width = sum(self.specs[m].pooled_dim for m in mods) + (len(mods) if self.flags else 0)
        self.head = self.make_head(max(width, 1))
        with torch.no_grad():
            for p in self.head.parameters():
                p.zero_()
        # the penalty kept (NaN before fitting); a buffer, so it is saved with the weights
        self.penalty: Tensor
        self.register_buffer("penalty", torch.tensor(math.nan, dtype=torch.float64))

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {}  # one linear map: no modality-specific layers to rebalance or freeze

    def design(self, batch: Batch) -> Tensor:
        """Return the design x [N, sum d_m (+ M flags)] of a normalised batch."""
        parts = [batch[m]["pooled"] for m in self.modalities]
        if self.flags:
            parts.append(torch.stack([batch[m]["present"] for m in self.modalities], 1).float())
        return torch.cat(parts, 1)

    def fuse(self, batch: Batch) -> FusionOutput:
        x = self.design(batch)
        out = self.head(x)
        return FusionOutput(out=out, risk=self.head.risk(out))

    @torch.no_grad()
    def fit_exact(
        self,
        train: Batch,
        time: np.ndarray,
        event: np.ndarray,
        validation: tuple[Batch, np.ndarray, np.ndarray] | None,
    ) -> list[dict[str, Any]]:
        """Fit beta along the penalty grid and keep the best on validation.

        Returns one history row per penalty (`penalty`, `train_loss` = mean NLL per event,
        `val_c_index`).
        """
        x = self.design(self.normalise(train)).double().cpu().numpy()
        xv = None
        if validation is not None:
            xv = self.design(self.normalise(validation[0])).double().cpu().numpy()
        path = self._path(x, time, event)
        history: list[dict[str, Any]] = []
        best: tuple[float, float, np.ndarray] | None = None
        for i, (lam, beta) in enumerate(path):
            c = math.nan
            if validation is not None and xv is not None:
                c = harrell_c(validation[1], validation[2], xv @ beta)
            history.append(
                {
                    "epoch": i,
                    "stage": "exact",
                    "penalty": lam,
                    "train_loss": _mean_nll(time, event, x @ beta),
                    "val_c_index": c,
                }
            )
            score = c if math.isfinite(c) else -math.inf
            if validation is None:
                if i == len(path) // 2:
                    best = (score, lam, beta)
            elif best is None or score > best[0] + 1e-12:
                best = (score, lam, beta)
        assert best is not None
        weight = next(p for p in self.head.parameters() if p.dim() == 2)
        weight.copy_(torch.as_tensor(best[2], dtype=weight.dtype).reshape(weight.shape))
        self.penalty.fill_(best[1])
        return history

    def _path(
        self, x: np.ndarray, time: np.ndarray, event: np.ndarray
    ) -> list[tuple[float, np.ndarray]]:
        """(penalty, beta [p]) along the grid, strongest penalty first for the elastic net."""
        l1 = self.params["l1_ratio"]
        if l1 == 0.0:
            d = max(int(np.sum(event)), 1)
            ties = getattr(self.head, "ties", "efron")
            out = []
            for lam in self.params["penalties"]:
                fit = CoxPH(ties=ties, alpha=lam * d).fit(x, time, event)
                out.append((float(lam), np.asarray(fit.coef_, dtype=np.float64)))
            return out
        try:
            from sksurv.linear_model import CoxnetSurvivalAnalysis
            from sksurv.util import Surv
        except ImportError as exc:
            raise ImportError(
                "the linear strategy's elastic net (l1_ratio > 0) needs scikit-survival: "
                "pip install 'survfuse[classical]' (or use l1_ratio: 0 for ridge)"
            ) from exc
        net = CoxnetSurvivalAnalysis(
            l1_ratio=l1,
            n_alphas=self.params["n_alphas"],
            alpha_min_ratio=0.01,
            fit_baseline_model=False,
        )
        try:
            net.fit(x, Surv.from_arrays(event=np.asarray(event, bool), time=time))
        except ArithmeticError as exc:  # coxnet's own convergence error
            raise ValueError(
                f"linear strategy: the elastic-net path did not converge ({exc})"
            ) from None
        coef = np.asarray(net.coef_, dtype=np.float64)
        return [(float(a), coef[:, k]) for k, a in enumerate(net.alphas_)]

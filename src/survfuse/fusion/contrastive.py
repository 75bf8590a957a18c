"""`contrastive`: CLIP-style alignment of CT and EHR embeddings plus a survival head.

The survival head sits on the fused aligned embedding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from survfuse.features import MODALITIES
from survfuse.fusion.base import FusionOutput, FusionStrategy
from survfuse.fusion.batch import Batch, ModalitySpec
from survfuse.fusion.layers import MLP
from survfuse.registry import FUSIONS


def symmetric_info_nce(z_a: Tensor, z_b: Tensor, logit_scale: Tensor) -> Tensor:
    """Compute the symmetric InfoNCE (CLIP) loss.

    With S = exp(s) * z_a z_b^T for L2-normalised z [n, d],
    L = (CE(S, diag) + CE(S^T, diag)) / 2, i.e. each patient's CT must pick its own EHR among the
    batch and vice versa.
    """
    logits = logit_scale.exp() * z_a @ z_b.T
    target = torch.arange(z_a.shape[0], device=z_a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@FUSIONS.register("contrastive")
class Contrastive(FusionStrategy):
    """Projection heads to a shared space, InfoNCE alignment, survival on the aligned embedding.

        z_m = normalize(P_m(MLP_m(pooled_m))) [N, d]; fused e = sum_m p_m z_m / sum_m p_m (present
        modalities only) -> MLP -> head. Loss = head loss(e) + lambda * InfoNCE(z_ct, z_ehr) over the
        patients with both modalities (learnable temperature: logit scale s = log(1/0.07) at start,
        clamped to <= log(100) as in CLIP). `align_epochs` > 0 gives the two-stage schedule: the first
        `align_epochs` epochs optimise InfoNCE only (unweighted, also with lambda = 0; a batch with
    fewer than two patients having both modalities gives a zero loss), then survival +
    lambda * InfoNCE.
    """

    def __init__(
        self,
        specs: Mapping[str, ModalitySpec],
        *,
        head: str = "cox",
        head_params: Mapping[str, Any] | None = None,
        hidden: int = 32,
        proj_dim: int = 32,
        layers: int = 1,
        dropout: float = 0.1,
        lam: float = 0.1,
        temperature: float = 0.07,
        align_epochs: int = 0,
    ) -> None:
        super().__init__(specs, head=head, head_params=head_params)
        self._setup(MODALITIES)
        self.params = {
            "hidden": hidden,
            "proj_dim": proj_dim,
            "layers": layers,
            "dropout": dropout,
            "lam": lam,
            "temperature": temperature,
            "align_epochs": align_epochs,
        }
        self.lam = lam
        self.align_epochs = align_epochs
        self.encoders = self.pooled_mlps(hidden, layers, dropout)
        self.projections = nn.ModuleDict({m: nn.Linear(hidden, proj_dim) for m in MODALITIES})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.fused = MLP(proj_dim, hidden, 1, dropout)
        self.head = self.make_head(hidden)

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {
            m: [*self.encoders[m].parameters(), *self.projections[m].parameters()]
            for m in MODALITIES
        }

    def training_stage(self) -> str:
        return "align" if self.training and self.epoch < self.align_epochs else "survival"

    def embed(self, batch: Batch) -> dict[str, Tensor]:
        """L2-normalised shared-space embeddings z_m [N, proj_dim] (zero where absent)."""
        z = {}
        for m in MODALITIES:
            zm = F.normalize(self.projections[m](self.encoders[m](batch[m]["pooled"])), dim=-1)
            z[m] = zm * batch[m]["present"][:, None]
        return z

    def fuse(self, batch: Batch) -> FusionOutput:
        z = self.embed(batch)
        present = torch.stack([batch[m]["present"] for m in MODALITIES]).float()
        e = sum(z.values()) / present.sum(0).clamp_min(1.0)[:, None]
        out = self.head(self.fused(e))
        aux = None
        both = present.bool().all(0)
        align = self.training_stage() == "align"
        # the align stage optimises InfoNCE alone whatever `lam` is (lam weights it only in the
        # survival stage); InfoNCE needs at least two patients with both modalities
        if self.training and (align or self.lam > 0) and int(both.sum()) >= 2:
            with torch.no_grad():
                self.logit_scale.clamp_(max=math.log(100.0))
            nce = symmetric_info_nce(z["ct"][both], z["ehr"][both], self.logit_scale)
            aux = nce if align else self.lam * nce
        return FusionOutput(out=out, risk=self.head.risk(out), aux_loss=aux, modality_repr=z)

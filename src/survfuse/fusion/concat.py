"""`concat`: pooled features of both modalities concatenated -> MLP -> head (early fusion)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from survfuse.features import MODALITIES
from survfuse.fusion.base import FusionOutput, FusionStrategy
from survfuse.fusion.batch import Batch, ModalitySpec
from survfuse.fusion.layers import MLP
from survfuse.registry import FUSIONS


@FUSIONS.register("concat")
class Concat(FusionStrategy):
    """h = GELU(W_ct x_ct + W_ehr x_ehr + W_p [present_ct, present_ehr] + b) -> MLP -> head.

    The first layer is a Linear on [x_ct, x_ehr, present flags] written as one Linear per
    modality (mathematically identical), so each modality's encoder-side parameters and its
    contribution W_m x_m are separable for imbalance measurement. An absent modality has x_m = 0
    and its presence flag tells the model so.
    """

    def __init__(
        self,
        specs: Mapping[str, ModalitySpec],
        *,
        head: str = "cox",
        head_params: Mapping[str, Any] | None = None,
        hidden: int = 32,
        layers: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(specs, head=head, head_params=head_params)
        self._setup(MODALITIES)
        self.params = {"hidden": hidden, "layers": layers, "dropout": dropout}
        self.inputs = nn.ModuleDict(
            {m: nn.Linear(self.specs[m].pooled_dim, hidden, bias=False) for m in MODALITIES}
        )
        self.presence = nn.Linear(len(MODALITIES), hidden)
        self.act = nn.Sequential(nn.GELU(), nn.Dropout(dropout))
        self.mlp = MLP(hidden, hidden, layers - 1, dropout) if layers > 1 else nn.Identity()
        self.head = self.make_head(hidden)

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {m: list(self.inputs[m].parameters()) for m in MODALITIES}

    def fuse(self, batch: Batch) -> FusionOutput:
        parts = {m: self.inputs[m](batch[m]["pooled"]) for m in MODALITIES}
        flags = torch.stack([batch[m]["present"] for m in MODALITIES], 1).float()
        h = self.act(sum(parts.values()) + self.presence(flags))
        out = self.head(self.mlp(h))
        return FusionOutput(out=out, risk=self.head.risk(out), modality_repr=parts)

"""`unimodal`: one modality's pooled features -> MLP -> head (the baselines)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from survfuse.fusion.base import MLP, MODALITIES, Batch, FusionOutput, FusionStrategy, ModalitySpec
from survfuse.registry import FUSIONS, look_up_option


@FUSIONS.register("unimodal")
class Unimodal(FusionStrategy):
    """Risk from one modality only (`modality` = "ct" | "ehr"): head(MLP(pooled)).

    A patient whose modality is absent gets pooled = 0, i.e. the risk of an "average" patient.
    """

    def __init__(
        self,
        specs: Mapping[str, ModalitySpec],
        *,
        head: str = "cox",
        head_params: Mapping[str, Any] | None = None,
        modality: str = "ct",
        hidden: int = 32,
        layers: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(specs, head=head, head_params=head_params)
        modality = look_up_option(modality, MODALITIES, kind="modality")
        self._setup((modality,))
        self.params = {"modality": modality, "hidden": hidden, "layers": layers, "dropout": dropout}
        self.modality = modality
        self.mlp = MLP(self.specs[modality].pooled_dim, hidden, layers, dropout)
        self.head = self.make_head(hidden)

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {self.modality: list(self.mlp.parameters())}

    def fuse(self, batch: Batch) -> FusionOutput:
        h = self.mlp(batch[self.modality]["pooled"])
        out = self.head(h)
        return FusionOutput(out=out, risk=self.head.risk(out), modality_repr={self.modality: h})

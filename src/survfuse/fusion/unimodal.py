"""`unimodal`: one modality -> head (the baselines).

Two encoders: the pooled vector through an MLP (default), or, with `tokens=True`, the
modality's tokens through the token encoder the attention strategies use (embedding, one
self-attention block, gated attention pooling, MLP). Why the second: an attention strategy
reads EHR tokens, a pooled baseline does not, so without a token baseline the "fusion gain" of
an attention strategy over the best unimodal model mixes two things: what the other modality
adds and what reading tokens adds (simulator, CT uninformative: cross-attention gained 0.04 C
over the pooled EHR baseline with a CT Shapley share of 2-11%).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from survfuse.features import MODALITIES
from survfuse.fusion.base import FusionOutput, FusionStrategy
from survfuse.fusion.batch import Batch, ModalitySpec
from survfuse.fusion.layers import MLP, AttentionBlock, GatedAttentionPool, ModalityEmbedding
from survfuse.registry import FUSIONS, look_up_option


@FUSIONS.register("unimodal")
class Unimodal(FusionStrategy):
    """Risk from one modality only (`modality` = "ct" | "ehr").

    tokens=False: head(MLP(pooled [N, D])); tokens=True: head(MLP(pool(SelfAttn(embed(tokens
    [N, T, ...]))))) with `d_model` and `heads`. A patient whose modality is absent gets the
    risk of an "average" patient (pooled = 0, or no token to pool).
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
        tokens: bool = False,
        d_model: int = 32,
        heads: int = 2,
    ) -> None:
        super().__init__(specs, head=head, head_params=head_params)
        modality = look_up_option(modality, MODALITIES, kind="modality")
        self._setup((modality,))
        self.params = {
            "modality": modality,
            "hidden": hidden,
            "layers": layers,
            "dropout": dropout,
            "tokens": bool(tokens),
            "d_model": d_model,
            "heads": heads,
        }
        self.modality = modality
        self.uses_tokens = bool(tokens)
        self.encoder = nn.ModuleDict()
        if self.uses_tokens:
            self.encoder["embed"] = ModalityEmbedding(self.specs[modality], d_model)
            self.encoder["block"] = AttentionBlock(d_model, heads, dropout)
            self.encoder["pool"] = GatedAttentionPool(d_model, dropout=dropout)
        in_dim = d_model if self.uses_tokens else self.specs[modality].pooled_dim
        self.mlp = MLP(in_dim, hidden, layers, dropout)
        self.head = self.make_head(hidden)

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {self.modality: [*self.encoder.parameters(), *self.mlp.parameters()]}

    def fuse(self, batch: Batch) -> FusionOutput:
        m = batch[self.modality]
        if self.uses_tokens:
            x, mask = self.encoder["embed"](m)
            x, _ = self.encoder["block"](x, mask, x, mask, need_weights=False)
            x, _ = self.encoder["pool"](x, mask)
        else:
            x = m["pooled"]
        h = self.mlp(x)
        out = self.head(h)
        return FusionOutput(out=out, risk=self.head.risk(out), modality_repr={self.modality: h})

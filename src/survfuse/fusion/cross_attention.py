"""`cross_attention`: one modality's tokens attend over the other's tokens."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from survfuse.features import MODALITIES
from survfuse.fusion.base import AttentionStrategy, FusionOutput
from survfuse.fusion.batch import Batch, ModalitySpec
from survfuse.fusion.buckets import fuse_in_buckets, prepare_strategy_batch
from survfuse.fusion.layers import MLP, AttentionBlock, masked_mean
from survfuse.registry import FUSIONS, look_up_option

DIRECTIONS = ("ehr->ct", "ct->ehr", "both")


@FUSIONS.register("cross_attention")
class CrossAttention(AttentionStrategy):
    """Cross-attention fusion; `direction` "a->b" means a's tokens are the queries over b's tokens.

    For a->b: x_a' = LN(x_a + MHA(x_a, x_b, key_padding=~mask_b)); x_a'' = LN(x_a' + FFN(x_a'));
    fused = [masked_mean(x_a''), masked_mean(x_b)] -> MLP -> head (b's own mean keeps a patient
    without modality a informative). `both`: fused = [masked_mean(ct attended over ehr),
    masked_mean(ehr attended over ct)]. An absent modality has no real token: as queries its
    rows pool to zero, as keys its attention output is zero (the residual carries the query).
    `dropout` and `token_dropout`: see `AttentionStrategy`.
    """

    def __init__(
        self,
        specs: Mapping[str, ModalitySpec],
        *,
        head: str = "cox",
        head_params: Mapping[str, Any] | None = None,
        direction: str = "both",
        d_model: int = 32,
        heads: int = 2,
        hidden: int = 32,
        dropout: float = 0.1,
        token_dropout: float = 0.0,
    ) -> None:
        super().__init__(specs, head=head, head_params=head_params)
        self._setup(MODALITIES)
        direction = look_up_option(direction, DIRECTIONS, kind="cross-attention direction")
        self.params = {
            "direction": direction,
            "d_model": d_model,
            "heads": heads,
            "hidden": hidden,
            "dropout": dropout,
            "token_dropout": token_dropout,
        }
        self.direction = direction
        self.embed_tokens(d_model)
        pairs = (
            [("ct", "ehr"), ("ehr", "ct")]
            if direction == "both"
            else [tuple(direction.split("->"))]
        )
        self.pairs: list[tuple[str, str]] = [(a, b) for a, b in pairs]
        self.blocks = nn.ModuleDict(
            {f"{a}_{b}": AttentionBlock(d_model, heads, token_dropout) for a, b in self.pairs}
        )
        self.mlp = MLP(2 * d_model, hidden, 1, dropout)
        self.head = self.make_head(hidden)

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {m: list(self.embed[m].parameters()) for m in MODALITIES}

    def prepare(self, batch: Batch) -> Batch:
        return prepare_strategy_batch(self, batch)  # normalised, bucketed and bagged once

    def fuse(self, batch: Batch) -> FusionOutput:
        # rows of similar token length together, without their padding (`fusion.buckets`);
        # recorded attention weights keep the batch's full token axis
        if self.record_attention:
            return self._fuse(batch)
        return fuse_in_buckets(self._fuse, batch)

    def _fuse(self, batch: Batch) -> FusionOutput:
        tokens: dict[str, tuple[Tensor, Tensor]] = {m: self.embed[m](batch[m]) for m in MODALITIES}
        pooled: list[Tensor] = []
        extras: dict[str, Tensor] = {}
        for a, b in self.pairs:
            (xa, ma), (xb, mb) = tokens[a], tokens[b]
            y, w = self.blocks[f"{a}_{b}"](xa, ma, xb, mb, need_weights=self.record_attention)
            pooled.append(masked_mean(y, ma))
            if w is not None:
                extras[f"attention_{a}->{b}"] = w
        if len(self.pairs) == 1:
            b = self.pairs[0][1]
            pooled.append(masked_mean(*tokens[b]))
        out = self.head(self.mlp(torch.cat(pooled, dim=-1)))
        reprs = {m: masked_mean(*tokens[m]) for m in MODALITIES}
        return FusionOutput(out=out, risk=self.head.risk(out), modality_repr=reprs, extras=extras)

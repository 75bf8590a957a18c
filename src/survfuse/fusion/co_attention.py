"""`co_attention`: MCAT-style guided co-attention (Chen et al., ICCV 2021) for two modalities."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from survfuse.features import MODALITIES
from survfuse.fusion.base import AttentionStrategy, FusionOutput
from survfuse.fusion.batch import Batch, ModalitySpec
from survfuse.fusion.buckets import fuse_in_buckets, prepare_strategy_batch
from survfuse.fusion.layers import (
    MLP,
    AttentionBlock,
    GatedAttentionPool,
    MaskedAttention,
)
from survfuse.registry import FUSIONS, look_up_option


@FUSIONS.register("co_attention")
class CoAttention(AttentionStrategy):
    """Guided co-attention; `guide` = "ct" (image-guided) or "ehr".

    G = guide tokens, O = the other modality's token bag (no positional encoding: a set).
    Guided tokens H = MHA(Q=G, K=O, V=O) [N, T_G, d] (attention weights `coattn` [N, h, T_G, T_O]).
    Stream "guided": transformer encoder layer on H, gated attention pooling -> h_guided.
    Stream "guide": transformer encoder layer on G, gated attention pooling -> h_guide.
    With `other_stream` (default) the other modality's own tokens also get gated attention
    pooling (no self-attention layer: O may hold hundreds of tokens), so a patient without the
    guide modality keeps its other-modality signal.
    fused = concat(h_guided, h_guide[, h_other]) -> MLP -> head. Everything applied to O is
    permutation-equivariant and then pooled, so the output is invariant to O's token order.
    `record_attention = True` puts the co-attention and pooling weights in `extras`;
    `dropout` and `token_dropout`: see `AttentionStrategy`.
    """

    def __init__(
        self,
        specs: Mapping[str, ModalitySpec],
        *,
        head: str = "cox",
        head_params: Mapping[str, Any] | None = None,
        guide: str = "ct",
        d_model: int = 32,
        heads: int = 2,
        hidden: int = 32,
        dropout: float = 0.1,
        token_dropout: float = 0.0,
        other_stream: bool = True,
    ) -> None:
        super().__init__(specs, head=head, head_params=head_params)
        self._setup(MODALITIES)
        guide = look_up_option(guide, MODALITIES, kind="co-attention guide")
        self.params = {
            "guide": guide,
            "d_model": d_model,
            "heads": heads,
            "hidden": hidden,
            "dropout": dropout,
            "token_dropout": token_dropout,
            "other_stream": other_stream,
        }
        self.guide = guide
        self.other = next(m for m in MODALITIES if m != guide)
        self.other_stream = other_stream
        self.embed_tokens(d_model)
        self.coattn = MaskedAttention(d_model, heads)
        streams = ["guided", "guide"] + (["other"] if other_stream else [])
        self.layers = nn.ModuleDict(
            {s: AttentionBlock(d_model, heads, token_dropout) for s in ("guided", "guide")}
        )
        self.pools = nn.ModuleDict(
            {s: GatedAttentionPool(d_model, dropout=token_dropout) for s in streams}
        )
        self.streams = streams
        self.mlp = MLP(len(streams) * d_model, hidden, 1, dropout)
        self.head = self.make_head(hidden)

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        params = {m: list(self.embed[m].parameters()) for m in MODALITIES}
        params[self.guide] += [
            *self.layers["guide"].parameters(),
            *self.pools["guide"].parameters(),
        ]
        if self.other_stream:
            params[self.other] += list(self.pools["other"].parameters())
        return params

    def prepare(self, batch: Batch) -> Batch:
        return prepare_strategy_batch(self, batch)  # normalised, bucketed and bagged once

    def fuse(self, batch: Batch) -> FusionOutput:
        # rows of similar token length together, without their padding (`fusion.buckets`);
        # recorded attention weights keep the batch's full token axis
        if self.record_attention:
            return self._fuse(batch)
        return fuse_in_buckets(self._fuse, batch)

    def _fuse(self, batch: Batch) -> FusionOutput:
        g, gm = self.embed[self.guide](batch[self.guide])
        o, om = self.embed[self.other](batch[self.other])
        # the guided tokens' padding positions are not zeroed: the layer below masks them as
        # keys and its output is pooled with the same mask
        guided, coattn = self.coattn(g, o, om, need_weights=self.record_attention)
        inputs = {"guided": (guided, gm), "guide": (g, gm), "other": (o, om)}
        pooled: list[Tensor] = []
        extras: dict[str, Tensor] = {}
        reprs: dict[str, Tensor] = {}
        for s in self.streams:
            x, mask = inputs[s]
            if s in self.layers:
                y = self.layers[s](x, mask, x, mask, need_weights=False)[0]
            else:
                y = x
            p, w = self.pools[s](y, mask)
            pooled.append(p)
            if self.record_attention:
                extras[f"pool_{s}"] = w
            if s == "guide":
                reprs[self.guide] = p
            elif s == "other":
                reprs[self.other] = p
        if self.other not in reprs:
            reprs[self.other] = (o * om[..., None]).sum(1) / om.sum(1, keepdim=True).clamp_min(1)
        if coattn is not None:
            extras["coattn"] = coattn
        out = self.head(self.mlp(torch.cat(pooled, dim=-1)))
        return FusionOutput(out=out, risk=self.head.risk(out), modality_repr=reprs, extras=extras)

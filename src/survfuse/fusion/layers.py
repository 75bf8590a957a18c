"""Layers shared by the fusion strategies.

Input standardisation, token embedding, MLPs, masked attention and gated attention pooling.
Masks make a missing modality or padding token contribute nothing, and a fully-masked attention
row yields zeros instead of NaN.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from survfuse.features import ModalityFeatures
from survfuse.fusion.batch import ModalitySpec

__all__ = [
    "MLP",
    "AttentionBlock",
    "FeatureNorm",
    "GatedAttentionPool",
    "MaskedAttention",
    "ModalityEmbedding",
    "code_bags",
    "masked_mean",
]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 (a well-mixed hash; wraps modulo 2**64 by design)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _seeded_subsample(f: ModalityFeatures, rows: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Return `k` of `rows`, a seeded random subsample independent of the cohort's row order.

    Rows are ranked by a seeded hash of (subject_id, prediction_time) and the k smallest kept.
    """
    sid = np.asarray(f.subject_id)[rows].astype(np.int64).view(np.uint64)
    pt = np.asarray(f.prediction_time)[rows].astype("datetime64[us]").astype(np.int64)
    key = _splitmix64(_splitmix64(sid ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)) ^ pt.view(np.uint64))
    order = np.lexsort((pt, sid, key))
    return np.sort(rows[order[:k]])


class FeatureNorm(nn.Module):
    """Standardise pooled and dense token features with training statistics (buffers).

    x' = clip((x - mean) / std, -CLIP, CLIP), statistics over present rows (pooled) and real
    tokens (tokens); absent rows / padding tokens are left at zero. The clip (CLIP = 5) matters
    for sparse count features: a code seen in 1 of 2,000 training patients would otherwise get a
    z-score near 45 and swamp every other input.
    """

    CLIP = 5.0

    pooled_mean: Tensor
    pooled_std: Tensor
    token_mean: Tensor
    token_std: Tensor

    def __init__(self, spec: ModalitySpec) -> None:
        super().__init__()
        self.register_buffer("pooled_mean", torch.zeros(spec.pooled_dim))
        self.register_buffer("pooled_std", torch.ones(spec.pooled_dim))
        self.register_buffer("token_mean", torch.zeros(spec.token_dim))
        self.register_buffer("token_std", torch.ones(spec.token_dim))

    # token statistics use at most this many present rows (a seeded random subsample)
    TOKEN_STAT_ROWS = 2000

    @torch.no_grad()
    def fit(self, f: ModalityFeatures, seed: int = 0) -> None:
        """Fit the statistics.

        Token statistics use a seeded random subsample of `TOKEN_STAT_ROWS` present rows that
        is independent of the cohort's row order.
        """

        def stats(x: np.ndarray) -> tuple[Tensor, Tensor]:
            if x.shape[0] == 0:
                return torch.zeros(x.shape[1]), torch.ones(x.shape[1])
            x64 = x.astype(np.float64)
            mu = x64.mean(0)
            sd = x64.std(0)
            sd = np.where(sd > 1e-8, sd, 1.0)
            return torch.from_numpy(mu).float(), torch.from_numpy(sd).float()

        present = np.asarray(f.present)
        mu, sd = stats(np.asarray(f.pooled)[present])
        self.pooled_mean.copy_(mu)
        self.pooled_std.copy_(sd)
        if f.tokens is not None and f.mask is not None:
            # subsample rows so statistics of a memory-mapped 100k cohort stay cheap
            rows = np.flatnonzero(present)
            if rows.size > self.TOKEN_STAT_ROWS:
                rows = _seeded_subsample(f, rows, self.TOKEN_STAT_ROWS, seed)
            tok = np.asarray(f.tokens[rows])[np.asarray(f.mask[rows])]
            mu, sd = stats(tok)
            self.token_mean.copy_(mu)
            self.token_std.copy_(sd)

    def forward(self, m: dict[str, Tensor]) -> dict[str, Tensor]:
        out = dict(m)
        present = m["present"][:, None]
        out["pooled"] = torch.where(
            present,
            ((m["pooled"] - self.pooled_mean) / self.pooled_std).clamp(-self.CLIP, self.CLIP),
            0.0,
        )
        if "tokens" in m:
            real = m["mask"][..., None]
            z = ((m["tokens"] - self.token_mean) / self.token_std).clamp(-self.CLIP, self.CLIP)
            out["tokens"] = torch.where(real, z, 0.0)
        return out


def code_bags(codes: Tensor, num_embeddings: int) -> tuple[Tensor, Tensor]:
    """Return the bag matrix S [N*T, V] of `codes` [N, T, K] (-1 padding) and its transpose (CSR).

    S[r, c + 1] counts code c among the K codes of token r (index 0, the padding row, is never
    used), so S @ W is the embedding-bag sum of every token. Built once for a batch that comes
    back every epoch (`survfuse.fusion.buckets.prepare_buckets`): the embedding's forward is then
    one sparse product and its weight gradient S^T @ grad another, where `nn.EmbeddingBag` sorts
    all N*T*K indices in every backward (about 12 ms of a 160-row bucket's step, against 1.7 ms).
    """
    n, t, k = codes.shape
    idx = (codes + 1).reshape(n * t, k)
    rows = torch.arange(n * t, device=codes.device).repeat_interleave(k)
    cols = idx.reshape(-1)
    real = cols > 0
    rows, cols = rows[real], cols[real]
    ones = torch.ones(rows.shape[0], device=codes.device)
    shape = (n * t, num_embeddings)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the products used are not
        warnings.simplefilter("ignore", UserWarning)
        # coalesce sorts the entries and sums a code repeated within a token (the bag counts it
        # twice too)
        s = torch.sparse_coo_tensor(torch.stack([rows, cols]), ones, shape).coalesce()
        st = torch.sparse_coo_tensor(torch.stack([cols, rows]), ones, shape[::-1]).coalesce()
        return s.to_sparse_csr(), st.to_sparse_csr()


class _BagSum(torch.autograd.Function):
    """S @ W with the weight gradient S^T @ grad (S, S^T from `code_bags`; both constant)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, s: Tensor, st: Tensor) -> Tensor:
        ctx.save_for_backward(st)
        return torch.sparse.mm(s, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (st,) = ctx.saved_tensors
        return torch.sparse.mm(st, grad.contiguous()), None, None


class ModalityEmbedding(nn.Module):
    """Tokens of one modality in a d-dimensional space: ([N, T', d], mask [N, T']).

    Dense `tokens` go through a Linear; sparse `token_codes` (-1 padding) through an
    embedding-bag *sum* over the K codes of a token (as sparse products when the batch carries
    its `code_bags` matrices); both are added when both exist. Features without tokens (pooled
    only) become a single token Linear(pooled). The mask is AND-ed with `present`, so an absent
    modality has no real token; masked positions are zero.
    """

    def __init__(self, spec: ModalitySpec, d_model: int) -> None:
        super().__init__()
        self.spec = spec
        self.single = nn.Linear(spec.pooled_dim, d_model) if spec.num_tokens == 0 else None
        self.dense = (
            nn.Linear(spec.token_dim, d_model) if spec.num_tokens and spec.token_dim else None
        )
        self.codes = (
            nn.EmbeddingBag(spec.vocab_size + 1, d_model, mode="sum", padding_idx=0)
            if spec.num_tokens and spec.vocab_size
            else None
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, m: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        present = m["present"]
        if self.single is not None:
            x = self.single(m["pooled"]).unsqueeze(1)
            mask = present[:, None]
        else:
            mask = m["mask"] & present[:, None]
            x = None
            if self.dense is not None:
                x = self.dense(m["tokens"])
            if self.codes is not None:
                codes = m["token_codes"]
                n, t, k = codes.shape
                if "code_bags" in m:  # the bag matrices of a prepared batch (`code_bags`)
                    e = _BagSum.apply(self.codes.weight, m["code_bags"], m["code_bags_t"])
                else:
                    # shift so -1 padding becomes index 0 = padding_idx (contributes nothing)
                    e = self.codes((codes + 1).reshape(n * t, k))
                e = e.reshape(n, t, -1)
                x = e if x is None else x + e
            assert x is not None
        x = self.norm(x) * mask[..., None]
        return x, mask


class MLP(nn.Module):
    """Linear -> GELU -> Dropout, `layers` times (the last hidden size is `out_dim`)."""

    def __init__(self, in_dim: int, hidden: int, layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(max(layers, 1)):
            mods += [nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout)]
            d = hidden
        self.net = nn.Sequential(*mods)
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens: x [N, T, d], mask [N, T] -> [N, d] (zero for fully-masked rows)."""
    w = mask.to(x.dtype)
    # one batched mask-vector product: no [N, T, d] product tensor (half the time of x * w)
    return torch.bmm(w[:, None, :], x)[:, 0] / w.sum(1, keepdim=True).clamp_min(1.0)


class MaskedAttention(nn.Module):
    """Multi-head attention with a key padding mask that never yields NaN.

    attn = softmax(Q K^T / sqrt(d_h)) with masked keys at -inf (weight exactly 0); a query row
    whose keys are all masked gets all-zero weights and a zero output (before the output
    projection). Returns (out [N, Tq, d], attn [N, H, Tq, Tk] or None).

    With `need_weights=False` (training and prediction) the product runs in torch's fused
    `scaled_dot_product_attention` (no [N, H, Tq, Tk] weight tensor kept for backward: about 5x
    less CPU time than the explicit softmax at 64 x 256 tokens); `need_weights=True` computes the
    weights explicitly for inspection. Both give the same output. `dropout` on the attention
    weights is 0 by default: a non-zero value makes the fused kernel fall back to the explicit
    one (the blocks regularise with residual and feed-forward dropout instead).
    """

    def __init__(self, d_model: int, heads: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
        self.h = heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, query: Tensor, key: Tensor, key_mask: Tensor, *, need_weights: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        n, tq, d = query.shape
        tk = key.shape[1]
        dh = d // self.h
        q = self.q(query).view(n, tq, self.h, dh).transpose(1, 2)
        k = self.k(key).view(n, tk, self.h, dh).transpose(1, 2)
        v = self.v(key).view(n, tk, self.h, dh).transpose(1, 2)
        has_key = key_mask.any(-1)[:, None, None, None]
        attn: Tensor | None = None
        if need_weights:
            scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
            km = key_mask[:, None, None, :]
            scores = scores.masked_fill(~km, float("-inf")).masked_fill(~has_key, 0.0)
            attn = torch.softmax(scores, dim=-1) * has_key
            ctx = self.drop(attn) @ v
        else:
            p = self.drop.p if self.training else 0.0
            if bool(has_key.all()):
                km = key_mask[:, None, None, :]
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=km, dropout_p=p)
            else:
                # rows without any real key attend to everything, with their values zeroed
                # (zero output, zero gradient, no NaN); the values are the smaller tensor to
                # zero when there are fewer keys than queries, else the output is zeroed
                km = (key_mask | ~has_key[:, 0, 0])[:, None, None, :]
                if tk <= tq:
                    v = v * has_key
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=km, dropout_p=p)
                if tk > tq:
                    ctx = ctx * has_key
        out = ctx.transpose(1, 2).reshape(n, tq, d)
        return self.o(out), attn


class AttentionBlock(nn.Module):
    """Post-norm transformer block: x = LN(x + Attn(x, ctx)); x = LN(x + FFN(x)).

    With ctx = x it is a self-attention encoder layer; otherwise cross-attention. `dropout`
    applies to the residual branches and the feed-forward layer, not to the attention weights.
    The output's padding positions (`x_mask` False) are left as computed, not zeroed: every
    caller pools the output with that mask (`masked_mean`, `GatedAttentionPool`), which gives
    them weight zero, so zeroing them was a pass over the tokens, forward and backward, that
    changed no number.
    """

    def __init__(self, d_model: int, heads: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.attn = MaskedAttention(d_model, heads)
        self.ln1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, 2 * d_model),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * d_model, d_model),
        )
        self.ln2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, x_mask: Tensor, ctx: Tensor, ctx_mask: Tensor, *, need_weights: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        a, w = self.attn(x, ctx, ctx_mask, need_weights=need_weights)
        x = self.ln1(x + self.drop(a))
        x = self.ln2(x + self.drop(self.ffn(x)))
        return x, w


class GatedAttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al. 2018, as in MCAT).

    a_t = w^T (tanh(V h_t) * sigmoid(U h_t)), weights softmax over real tokens,
    pooled = sum_t weight_t h_t; [N, T, d] -> ([N, d], [N, T]).
    """

    def __init__(self, d_model: int, hidden: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        hidden = hidden or d_model
        self.v = nn.Linear(d_model, hidden)
        self.u = nn.Linear(d_model, hidden)
        self.w = nn.Linear(hidden, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        a = self.w(self.drop(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h)))).squeeze(-1)
        has = mask.any(-1, keepdim=True)
        a = a.masked_fill(~mask, float("-inf")).masked_fill(~has, 0.0)
        weights = torch.softmax(a, dim=-1) * has
        return torch.bmm(weights[:, None, :], h)[:, 0], weights  # sum_t weight_t h_t

"""Shared fusion building blocks: batch tensors, input normalisation, token embedding, masked attention.

A *batch* is `dict[modality, dict[str, Tensor]]` with, per modality (N rows, T tokens):
`pooled` [N, Dp] float, `present` [N] bool, and when the encoder produced tokens `mask` [N, T]
bool plus `tokens` [N, T, D] float and/or `token_codes` [N, T, K] long (-1 = padding).

Every strategy subclasses `FusionStrategy`, returns a `FusionOutput`, and handles a missing
modality (present=False) through masks: absent rows contribute zeros / no attention keys, and a
fully-masked attention row yields a zero output instead of NaN.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from survfuse.encoders.features import ModalityFeatures
from survfuse.registry import HEADS, look_up_option
from survfuse.survival.heads import SurvivalHead

MODALITIES = ("ct", "ehr")

Batch = dict[str, dict[str, Tensor]]


# ----------------------------------------------------------------------------- specs and batches
@dataclass(frozen=True)
class ModalitySpec:
    """Shape facts of one modality's features (what a strategy is built for)."""

    pooled_dim: int
    token_dim: int = 0
    vocab_size: int = 0
    num_tokens: int = 0

    @classmethod
    def of(cls, features: ModalityFeatures) -> ModalitySpec:
        return cls(
            pooled_dim=features.pooled_dim,
            token_dim=features.token_dim,
            vocab_size=features.vocab_size,
            num_tokens=features.num_tokens,
        )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def check_modalities(features: Mapping[str, ModalityFeatures], needed: Iterable[str]) -> None:
    """Raise a clear error when a needed modality is missing or row counts disagree."""
    for m in features:
        look_up_option(m, MODALITIES, kind="modality")
    for m in needed:
        if m not in features:
            raise ValueError(f"features dict lacks modality {m!r} (has: {sorted(features)})")
    lengths = {m: len(f) for m, f in features.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"modalities have different row counts: {lengths}")
    for m, f in features.items():
        if f.token_codes is not None and f.token_codes.size:
            hi = int(np.max(f.token_codes))
            if hi >= f.vocab_size:
                raise ValueError(
                    f"modality {m!r}: token code {hi} >= meta['vocab_size'] = {f.vocab_size}"
                )


def to_batch(
    features: Mapping[str, ModalityFeatures],
    index: np.ndarray | None = None,
    *,
    modalities: Iterable[str],
    with_tokens: bool,
    device: torch.device | str = "cpu",
) -> Batch:
    """Tensors of rows `index` (all rows when None) of the named modalities."""
    out: Batch = {}
    for m in modalities:
        f = features[m]

        def take(a: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(a if index is None else a[index])

        d: dict[str, Tensor] = {
            "pooled": torch.from_numpy(take(f.pooled).astype(np.float32, copy=False)),
            "present": torch.from_numpy(take(f.present).astype(bool, copy=False)),
        }
        if with_tokens and f.mask is not None:
            d["mask"] = torch.from_numpy(take(f.mask).astype(bool, copy=False))
            if f.tokens is not None:
                d["tokens"] = torch.from_numpy(take(f.tokens).astype(np.float32, copy=False))
            if f.token_codes is not None:
                d["token_codes"] = torch.from_numpy(take(f.token_codes).astype(np.int64))
        out[m] = {k: v.to(device) for k, v in d.items()}
    return out


def batch_size_of(batch: Batch) -> int:
    return int(next(iter(batch.values()))["present"].shape[0])


def mask_modalities(batch: Batch, modalities: Iterable[str]) -> Batch:
    """The batch with `modalities` missing for every patient (`present` and `mask` False; a new
    dict of shallow copies): how a fused model sees a modality it has dropped."""
    names = set(modalities) & set(batch)
    if not names:
        return batch
    out: Batch = dict(batch)
    for m in names:
        d = dict(batch[m])
        d["present"] = torch.zeros_like(d["present"])
        if "mask" in d:
            d["mask"] = torch.zeros_like(d["mask"])
        out[m] = d
    return out


def drop_modalities(batch: Batch, p: float, generator: torch.Generator) -> Batch:
    """Modality dropout: a patient with both modalities loses one (chosen at random) with prob. p.

    Returns a new batch (shallow copies); `present` and `mask` of the dropped rows become False.
    """
    if p <= 0 or len(batch) < 2:
        return batch
    names = sorted(batch)
    n = batch_size_of(batch)
    dev = batch[names[0]]["present"].device
    both = torch.stack([batch[m]["present"] for m in names]).all(0)
    drop = (torch.rand(n, generator=generator) < p).to(dev) & both
    which = torch.randint(len(names), (n,), generator=generator).to(dev)
    out: Batch = {}
    for i, m in enumerate(names):
        keep = ~(drop & (which == i))
        d = dict(batch[m])
        d["present"] = d["present"] & keep
        if "mask" in d:
            d["mask"] = d["mask"] & keep[:, None]
        out[m] = d
    return out


@dataclass
class FusionOutput:
    """What a strategy returns: head outputs `out` [N, K], `risk` [N] (higher = worse),
    an auxiliary loss added to the head loss (or None), the modality-specific representations
    [N, d_m] used for imbalance scoring, and extras (attention weights when recorded)."""

    out: Tensor
    risk: Tensor
    aux_loss: Tensor | None = None
    modality_repr: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------- layers
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 (a well-mixed hash; wraps modulo 2**64 by design)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _seeded_subsample(f: ModalityFeatures, rows: np.ndarray, k: int, seed: int) -> np.ndarray:
    """`k` of `rows`, a seeded random subsample that does not depend on the cohort's row order:
    rows are ranked by a seeded hash of (subject_id, prediction_time) and the k smallest kept."""
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
        """Fit the statistics; token statistics use a seeded random subsample of
        `TOKEN_STAT_ROWS` present rows that is independent of the cohort's row order."""

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


class ModalityEmbedding(nn.Module):
    """Tokens of one modality in a d-dimensional space: ([N, T', d], mask [N, T']).

    Dense `tokens` go through a Linear; sparse `token_codes` (-1 padding) through an
    embedding-bag *sum* over the K codes of a token; both are added when both exist. Features
    without tokens (pooled only) become a single token Linear(pooled). The mask is AND-ed with
    `present`, so an absent modality has no real token; masked positions are zero.
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
                # shift so -1 padding becomes index 0 = padding_idx (contributes nothing)
                e = self.codes((codes + 1).reshape(n * t, k)).reshape(n, t, -1)
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
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


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
            # rows without any real key attend to everything, then are zeroed (no NaN)
            km = (key_mask | ~key_mask.any(-1, keepdim=True))[:, None, None, :]
            p = self.drop.p if self.training else 0.0
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=km, dropout_p=p) * has_key
        out = ctx.transpose(1, 2).reshape(n, tq, d)
        return self.o(out), attn


class AttentionBlock(nn.Module):
    """Post-norm transformer block: x = LN(x + Attn(x, ctx)); x = LN(x + FFN(x)).

    With ctx = x it is a self-attention encoder layer; otherwise cross-attention. `dropout`
    applies to the residual branches and the feed-forward layer, not to the attention weights.
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
        return x * x_mask[..., None], w


class GatedAttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al. 2018, as in MCAT): a_t = w^T (tanh(V h_t) * sigmoid(U h_t)),
    weights softmax over real tokens, pooled = sum_t weight_t h_t; [N, T, d] -> ([N, d], [N, T])."""

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
        return (weights[..., None] * h).sum(1), weights


# ----------------------------------------------------------------------------- strategy base
class FusionStrategy(nn.Module, abc.ABC):
    """Base of every registered strategy.

    Subclasses set `modalities` (the feature keys they read) and `uses_tokens`, build their
    layers in `__init__(specs, *, head, head_params, **params)` and implement `fuse(batch)`.
    `head` names a survival head from `survfuse.registry.HEADS` (the
    interface, `survfuse.survival.SurvivalHead`: prepare / risk / loss / fit_baseline / survival).

    A strategy that fits parts after training on the validation split (late fusion's stacking)
    sets `needs_validation_after_training` and implements `finish_training`.
    """

    uses_tokens: bool = False
    head: SurvivalHead

    def __init__(
        self,
        specs: Mapping[str, ModalitySpec],
        *,
        head: str = "cox",
        head_params: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.modalities: tuple[str, ...] = MODALITIES
        self.specs = dict(specs)
        self.head_name = head
        self.head_params = dict(head_params or {})
        self.epoch = 0

    def _setup(self, modalities: tuple[str, ...]) -> None:
        for m in modalities:
            if m not in self.specs:
                raise ValueError(
                    f"{type(self).__name__} needs modality {m!r}; specs have {sorted(self.specs)}"
                )
        self.modalities = modalities
        self.norms = nn.ModuleDict({m: FeatureNorm(self.specs[m]) for m in modalities})
        # Input balance: Adam moves every weight by ~lr per step, so a Linear on d standardised
        # inputs changes its output ~d times faster than one on a single input. A 521-dimensional
        # pure-noise EHR vector then fits the training risk sets within a few full-batch steps,
        # long before a 6-dimensional informative CT vector is learned, and early stopping keeps
        # that epoch (C ~0.55 vs 0.67 CT-only). Scaling each modality's standardised pooled
        # vector by d_min / d_m equalises the learning speed, but then a low-dimensional
        # pure-noise modality is fitted as fast as a high-dimensional informative one (the
        # imbalance-0 simulator test: ablating the noise CT dropped C by 0.11). The square root,
        # sqrt(d_min / d_m), is the compromise that passes both tests; a single-modality strategy
        # is unchanged (scale 1).
        dims = [self.specs[m].pooled_dim for m in modalities if self.specs[m].pooled_dim > 0]
        d_min = min(dims) if dims else 1
        self.pooled_scale = {
            m: (d_min / self.specs[m].pooled_dim) ** 0.5 if self.specs[m].pooled_dim > 0 else 1.0
            for m in modalities
        }

    def make_head(self, in_features: int) -> SurvivalHead:
        head: SurvivalHead = HEADS.get(self.head_name)(in_features, **self.head_params)
        return head

    # the head that scores the fused output (loss, baseline, survival curves)
    @property
    def output_head(self) -> SurvivalHead:
        return self.head

    def feature_norm(self, modality: str) -> FeatureNorm:
        norm = self.norms[modality]
        assert isinstance(norm, FeatureNorm)
        return norm

    def survival_heads(self) -> list[SurvivalHead]:
        """Every head that needs `prepare(time, event)` before training."""
        return [self.output_head]

    @abc.abstractmethod
    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters used by one modality only (its encoder side), for gradient-norm logging."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def training_stage(self) -> str:
        """ "survival" (default) or "align" (contrastive two-stage: survival loss off)."""
        return "survival"

    def normalise(self, batch: Batch) -> Batch:
        """What `fuse` sees: each modality standardised (`FeatureNorm`) and its pooled vector
        scaled by the input balance `pooled_scale`."""
        normed = {m: self.norms[m](batch[m]) for m in self.modalities}
        for m, scale in getattr(self, "pooled_scale", {}).items():
            if scale != 1.0:
                normed[m] = {**normed[m], "pooled": normed[m]["pooled"] * scale}
        return normed

    def forward(self, batch: Batch) -> FusionOutput:
        return self.fuse(self.normalise(batch))

    @abc.abstractmethod
    def fuse(self, batch: Batch) -> FusionOutput:
        """Fuse a normalised batch into head outputs and risks."""

    def loss(self, output: FusionOutput, time: Tensor, event: Tensor) -> Tensor:
        """Head loss on the fused output plus the strategy's auxiliary loss."""
        parts: list[Tensor] = []
        if self.training_stage() == "survival":
            parts.append(self.output_head.loss(output.out, time, event))
        if output.aux_loss is not None:
            parts.append(output.aux_loss)
        if not parts:
            # nothing to optimise in this batch (e.g. the align stage without a pair of patients
            # having both modalities): a zero attached to the graph, so backward() still works
            return output.out.sum() * 0.0
        return torch.stack(parts).sum()

    @property
    def needs_validation_after_training(self) -> bool:
        """Whether `finish_training` must run (on the validation split) after training."""
        return False

    def finish_training(self, batch: Batch, time: Tensor, event: Tensor) -> None:
        """Fit post-training parts on the validation `batch` (no-op by default)."""

    def config(self) -> dict[str, Any]:
        """JSON-serialisable strategy parameters (set by subclasses in `self.params`)."""
        params: dict[str, Any] = dict(getattr(self, "params", {}))
        return params

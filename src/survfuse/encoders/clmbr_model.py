"""The CLMBR-style model of `ehr_clmbr`: timelines, the causal transformer and its losses.

A timeline is one prediction's windowed events as token ids (static first, then by time).
`CLMBRModel` embeds ids (+ a time-aware embedding when `position="time"`, or rotary position
embeddings on the event index when `position="rotary"`) and runs pre-norm causal self-attention
blocks with key padding masks. Next-code loss:

    L_clmbr = -1/|S| sum_{(b,i) in S} log softmax(W h_{b,i})[x_{b,i+1}]

MOTOR-style loss (piecewise-exponential time to the next occurrence of each frequent code c,
log-hazards eta_{i,p,c} on pieces p of `MOTOR_PIECES`, T = min(time to next c, end of timeline),
delta = 1 when c occurs):

    L_motor = mean_{i,c} [ sum_p exp(eta_{i,p,c}) * exposure_p(T) - delta * eta_{i,p(T),c} ]
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn

from survfuse.encoders.ehr_onehot import TIME_DIM, time_features
from survfuse.encoders.ehr_vocab import EventBatch

__all__ = [
    "MOTOR_PIECES",
    "POSITIONS",
    "CLMBRModel",
    "Timeline",
    "motor_loss",
    "motor_targets",
    "next_code_loss",
    "pad_timelines",
    "timelines_of",
    "unigram_perplexity",
]

MOTOR_PIECES = (0.0, 1.0, 7.0, 30.0, 90.0, 365.0, 1095.0, math.inf)  # piece edges, days
POSITIONS = ("rotary", "time")


# ---------------------------------------------------------------------- timelines
class Timeline:
    """One event sequence.

    `ids` [L] int64, `days` [L] float64 days since its first timed event (0 for static events),
    `static` [L] bool.
    """

    __slots__ = ("days", "ids", "static")

    def __init__(
        self, ids: NDArray[np.int64], days: NDArray[np.float64], static: NDArray[np.bool_]
    ):
        self.ids, self.days, self.static = ids, days, static

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def tail(self, n: int) -> Timeline:
        """Return the last n events, days re-based on the first timed event kept."""
        ids, static = self.ids[-n:], self.static[-n:]
        t = self.days[-n:]
        timed = t[~static]
        base = timed.min() if timed.size else 0.0
        return Timeline(ids, np.where(static, 0.0, t - base), static)


def timelines_of(batch: EventBatch, ids: NDArray[np.int32]) -> dict[int, Timeline]:
    """Split a batch (events contiguous per key, in time order) into per-key timelines."""
    out: dict[int, Timeline] = {}
    if len(batch) == 0:
        return out
    # MEDS gives no order among events at the same time: sort them by token id so a timeline
    # does not depend on how the shards happen to be ordered
    order = np.lexsort((ids, batch.time_us, batch.key))
    ids = ids[order]
    batch = EventBatch(
        key=batch.key[order],
        subject_id=batch.subject_id[order],
        days_before=batch.days_before[order],
        day_index=batch.day_index[order],
        code=batch.code,
        value=batch.value[order],
        time_us=batch.time_us[order],
    )
    starts = np.flatnonzero(np.r_[True, batch.key[1:] != batch.key[:-1]])
    ends = np.r_[starts[1:], len(batch)]
    static = batch.time_us == np.iinfo(np.int64).min
    t_days = np.where(static, np.nan, batch.time_us / 86_400_000_000)
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        st = static[a:b]
        t = t_days[a:b]
        base = np.nanmin(t) if (~st).any() else 0.0
        out[int(batch.key[a])] = Timeline(
            ids[a:b].astype(np.int64), np.where(st, 0.0, t - base), st
        )
    return out


def pad_timelines(timelines: list[Timeline], pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-padded ids [B, L] (pad = pad_id), time feats [B, L, 8], mask [B, L], days [B, L]."""
    length = max(len(t) for t in timelines)
    b = len(timelines)
    ids = np.full((b, length), pad_id, np.int64)
    feats = np.zeros((b, length, TIME_DIM), np.float32)
    mask = np.zeros((b, length), bool)
    days = np.zeros((b, length), np.float64)
    for i, t in enumerate(timelines):
        n = len(t)
        ids[i, :n] = t.ids
        feats[i, :n] = time_features(t.days, t.static)
        mask[i, :n] = True
        days[i, :n] = t.days
    return (
        torch.from_numpy(ids),
        torch.from_numpy(feats),
        torch.from_numpy(mask),
        torch.from_numpy(days),
    )


# ---------------------------------------------------------------------- model
def _rotary(x: Tensor, positions: Tensor) -> Tensor:
    """Rotary position embedding of x [B, H, L, Dh] (Dh even) at integer positions [L]."""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-torch.arange(half, device=x.device, dtype=x.dtype) / half)
    ang = positions.to(x.dtype)[:, None] * freq[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int, dropout: float, rotary: bool) -> None:
        super().__init__()
        self.heads, self.rotary, self.dropout = heads, rotary, dropout
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.rotary:
            pos = torch.arange(length, device=x.device)
            q, k = _rotary(q, pos), _rotary(k, pos)
        a = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, length, d)))
        return x + self.drop(self.ff(self.norm2(x)))


class CLMBRModel(nn.Module):
    """Causal transformer over token ids.

    `forward(ids [B,L], time_feats [B,L,8], mask [B,L])` -> hidden states [B, L, d_model]
    (final LayerNorm applied).
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        position: str,
        motor_codes: int = 0,
    ) -> None:
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model {d_model} must split into n_heads {n_heads} even parts")
        self.vocab_size = vocab_size
        self.position = position
        self.embed = nn.Embedding(vocab_size + 1, d_model, padding_idx=vocab_size)
        self.time_proj = nn.Linear(TIME_DIM, d_model)
        self.blocks = nn.ModuleList(
            _Block(d_model, n_heads, d_ff, dropout, position == "rotary") for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.motor_codes = motor_codes
        n_pieces = len(MOTOR_PIECES) - 1
        self.motor = nn.Linear(d_model, n_pieces * motor_codes) if motor_codes else None

    def forward(self, ids: Tensor, time_feats: Tensor, mask: Tensor) -> Tensor:
        x = self.embed(ids)
        # the static flag always enters; the time features only for the time-aware position
        tf = time_feats if self.position == "time" else time_feats * (time_feats[..., -1:] > 0)
        x = x + self.time_proj(tf)
        if not bool((mask[:, 1:] <= mask[:, :-1]).all()):
            raise ValueError("CLMBRModel expects right-padded timelines (mask True then False)")
        # With right padding the causal mask is also the key padding mask for every real
        # query (its keys are earlier, hence real); pad rows are never read. This keeps the
        # fused is_causal attention kernel instead of a slow explicit [B, 1, L, L] mask.
        x = x * mask[..., None]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)  # type: ignore[no-any-return]


def next_code_loss(model: CLMBRModel, h: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, int]:
    """Return the summed next-token NLL over positions whose next token is real, and their count."""
    valid = mask[:, :-1] & mask[:, 1:]
    logits = model.head(h[:, :-1][valid])
    nll = F.cross_entropy(logits, ids[:, 1:][valid], reduction="sum")
    return nll, int(valid.sum())


def motor_targets(
    ids: NDArray[np.int64], days: NDArray[np.float64], mask: NDArray[np.bool_], n_codes: int
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Time to the next occurrence of each code 1..n_codes after each position.

    Returns `t` [B, L, C] days (time to the end of the timeline when censored) and `event`
    [B, L, C] bool (True when the code occurs later in the timeline).
    """
    b, length = ids.shape
    last = np.where(mask, days, -np.inf).max(axis=1)
    nxt = np.full((b, n_codes), np.inf)
    out = np.empty((b, length, n_codes))
    rows = np.arange(b)
    for i in range(length - 1, -1, -1):
        out[:, i] = nxt
        c = ids[:, i]
        hit = mask[:, i] & (c >= 1) & (c <= n_codes)
        nxt[rows[hit], c[hit] - 1] = days[hit, i]
    event = np.isfinite(out)
    t = np.where(event, out, last[:, None, None]) - days[:, :, None]
    return np.maximum(t, 0.0), event


def motor_loss(model: CLMBRModel, h: Tensor, ids: Tensor, mask: Tensor, days: Tensor) -> Tensor:
    """Mean piecewise-exponential NLL of time-to-next-code (see module docstring)."""
    assert model.motor is not None
    c = model.motor_codes
    t, ev = motor_targets(ids.cpu().numpy(), days.cpu().numpy(), mask.cpu().numpy(), c)
    real = mask.cpu().numpy()
    t_r = torch.as_tensor(t[real], dtype=h.dtype, device=h.device)  # [n, C]
    e_r = torch.as_tensor(ev[real], device=h.device)
    eta = model.motor(h[mask]).view(-1, len(MOTOR_PIECES) - 1, c)  # [n, P, C]
    lo = torch.tensor(MOTOR_PIECES[:-1], dtype=h.dtype, device=h.device)
    hi = torch.tensor(MOTOR_PIECES[1:], dtype=h.dtype, device=h.device)
    exposure = (t_r[:, None, :] - lo[None, :, None]).clamp(min=0)
    exposure = torch.minimum(exposure, (hi - lo)[None, :, None]) / 365.25  # years
    in_piece = (t_r[:, None, :] >= lo[None, :, None]) & (t_r[:, None, :] < hi[None, :, None])
    nll = (eta.exp() * exposure).sum(1) - (e_r[:, None, :] & in_piece).to(h.dtype).mul(eta).sum(1)
    return nll.mean()


def unigram_perplexity(
    train_ids: list[NDArray[np.int64]], val_ids: list[NDArray[np.int64]], vocab_size: int
) -> float:
    """exp(-mean log p(x)) over validation *next* tokens, p = add-one smoothed train frequency."""
    counts = np.ones(vocab_size)
    for a in train_ids:
        counts += np.bincount(a[1:], minlength=vocab_size)
    logp = np.log(counts / counts.sum())
    tot, n = 0.0, 0
    for a in val_ids:
        tot -= float(logp[a[1:]].sum())
        n += max(len(a) - 1, 0)
    return float(math.exp(tot / max(n, 1)))

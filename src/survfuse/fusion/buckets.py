"""Token batches without their padding: rows bucketed by token length, each bucket trimmed.

A batch pads every patient's tokens to the cohort's longest sequence (the simulator's EHR: 256
token slots, a third of them padding). An attention strategy's work on a patient's tokens does
not depend on the other patients in the batch, so `fuse_in_buckets` runs its `fuse` on groups of
rows sorted by token extent (the position after a row's last real token, per modality), each
group trimmed to its own longest extent, and puts the outputs back in the batch's row order.

Exact: the masks already give padding zero weight (attention, pooling and means), so a patient's
output is the same whatever its padding, up to floating-point summation order (tests:
`tests/test_fusion_buckets.py`). The Cox loss is computed by the caller on the reassembled risks,
so risk sets are unchanged. Not bit-identical to one padded batch: gradients are summed bucket by
bucket, and dropout draws its masks in bucket order.

A batch that comes back every epoch (the full training batch, the validation chunks) is split
once: `prepare_buckets` returns a `BucketedBatch` that carries its buckets, their inverse order
and each bucket's embedding-bag matrices (`survfuse.fusion.layers.code_bags`), and
`fuse_in_buckets` reuses them instead of sorting, slicing and copying the batch again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from survfuse.fusion.base import FusionOutput, FusionStrategy, PreparedBatch
from survfuse.fusion.batch import Batch, batch_size_of
from survfuse.fusion.layers import code_bags

__all__ = [
    "MAX_BUCKETS",
    "MIN_BUCKET_ROWS",
    "BucketedBatch",
    "fuse_in_buckets",
    "prepare_buckets",
    "prepare_strategy_batch",
    "split_buckets",
    "take_rows",
    "token_extent",
]

#: at most this many buckets per batch, and at least this many rows in each
MAX_BUCKETS = 16
MIN_BUCKET_ROWS = 64


def token_extent(m: dict[str, Tensor]) -> Tensor:
    """Per row, 1 + the index of its last real token (0: none); real = `mask` and `present`."""
    real = m["mask"] & m["present"][:, None]
    t = real.shape[1]
    last = t - torch.argmax(real.flip(1).to(torch.uint8), dim=1)
    return torch.where(real.any(1), last, torch.zeros_like(last))


def take_rows(batch: Batch, rows: Tensor, extent: dict[str, int]) -> Batch:
    """Rows `rows` of `batch`, each modality's token axis cut to `extent[m]` slots."""
    out: Batch = {}
    for m, d in batch.items():
        t = extent.get(m)
        sub: dict[str, Tensor] = {}
        for k, v in d.items():
            v = v.index_select(0, rows)
            if t is not None and k in ("mask", "tokens", "token_codes"):
                v = v[:, :t]
            sub[k] = v
        out[m] = sub
    return out


class BucketedBatch(dict[str, dict[str, Tensor]]):
    """A batch together with its buckets (`parts`) and the order that undoes them (`inverse`).

    Made by `prepare_buckets`; a plain `Batch` everywhere else (a copy made by `dict(batch)`,
    e.g. when a modality is masked, is a plain dict again and is split afresh).
    """

    parts: list[Batch]
    inverse: Tensor | None


def split_buckets(batch: Batch) -> tuple[list[Batch], Tensor | None]:
    """Return the buckets of `batch` and the row order that puts their rows back (None: one part).

    Rows sorted by token extent (module docstring), `array_split` into at most `MAX_BUCKETS`
    parts of at least `MIN_BUCKET_ROWS` rows, each trimmed to its longest extent per modality.
    """
    tokened = [m for m, d in batch.items() if "mask" in d and d["mask"].shape[1] > 0]
    if not tokened:
        return [batch], None
    n = batch_size_of(batch)
    ext = {m: token_extent(batch[m]).cpu().numpy() for m in tokened}
    # sort by the modality with most token slots first, the others breaking ties
    keys = sorted(tokened, key=lambda m: batch[m]["mask"].shape[1])
    order = np.lexsort([ext[m] for m in keys]) if n else np.zeros(0, np.int64)
    k = max(1, min(MAX_BUCKETS, n // MIN_BUCKET_ROWS))
    parts: list[Batch] = []
    device = batch[tokened[0]]["mask"].device
    for part in np.array_split(order, k):
        extent = {m: max(int(ext[m][part].max(initial=0)), 1) for m in tokened}
        rows = torch.from_numpy(np.ascontiguousarray(part)).to(device)
        parts.append(take_rows(batch, rows, extent))
    return parts, torch.from_numpy(np.argsort(order)).to(device)


def prepare_buckets(batch: Batch, vocab: Mapping[str, int]) -> BucketedBatch:
    """`batch` split once for reuse (`BucketedBatch`).

    `vocab[m]`: the number of embedding rows of modality m's codes (its vocabulary + 1 for
    padding); each bucket with `token_codes` gets their bag matrices (`code_bags`,
    `code_bags_t`).
    """
    out = BucketedBatch(batch)
    out.parts, out.inverse = split_buckets(batch)
    for part in out.parts if out.inverse is not None else []:  # parts are fresh dicts
        for m, d in part.items():
            if "token_codes" in d and m in vocab:
                d["code_bags"], d["code_bags_t"] = code_bags(d["token_codes"], vocab[m])
    return out


@torch.no_grad()
def prepare_strategy_batch(module: FusionStrategy, batch: Batch) -> PreparedBatch:
    """`module.prepare` of a bucketed strategy: `batch` normalised and `prepare_buckets` once.

    Redoing this at every step on the same batch cost 5 to 17% of a training step at n = 3,000
    (docs/benchmarks.md, session 7).
    """
    vocab = {m: s.vocab_size + 1 for m, s in module.specs.items() if s.vocab_size}
    out = PreparedBatch(batch)
    out.normalised = prepare_buckets(module.normalise(batch), vocab)
    return out


def fuse_in_buckets(fuse: Callable[[Batch], FusionOutput], batch: Batch) -> FusionOutput:
    """`fuse(batch)` computed on buckets of rows of similar token extent (module docstring).

    `fuse` must treat rows independently and return per-row tensors (`out`, `risk`,
    `modality_repr`) and no `extras` or `aux_loss`. A `BucketedBatch` brings its buckets.
    """
    if isinstance(batch, BucketedBatch):
        parts, inv = batch.parts, batch.inverse
    else:
        parts, inv = split_buckets(batch)
    if inv is None:
        return fuse(parts[0])
    outs: list[FusionOutput] = []
    for part in parts:
        o = fuse(part)
        if o.extras or o.aux_loss is not None:
            raise ValueError("fuse_in_buckets: fuse returned extras or an auxiliary loss")
        outs.append(o)

    def cat(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts, 0).index_select(0, inv)

    return FusionOutput(
        out=cat([o.out for o in outs]),
        risk=cat([o.risk for o in outs]),
        modality_repr={m: cat([o.modality_repr[m] for o in outs]) for m in outs[0].modality_repr},
    )

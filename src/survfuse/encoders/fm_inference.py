"""Memory-bounded inference for the CT foundation models, giving the published outputs.

- `segres_deepest_tiled`: the CT-FM card's whole-volume pass `SegResEncoder(x)[-1]`, computed
  in tiles. A CT at native resolution (512 x 512 x 300) would need tens of GB for the first
  levels' 32- and 64-channel maps, so the first `split` levels (up to and including the
  `split`-th stride-2 downsampling) run on overlapping crops whose halo covers their receptive
  field, and only the valid centre of each crop's output is kept; the deeper levels (1/64 of the
  voxels) run on the stitched map. Convolutions are local and batch norm in eval mode is a
  per-voxel affine map, so the result is the whole-volume result (up to float summation order,
  ~1e-6 relative; `tests/test_encoders_fm.py` checks it against the whole-volume pass).
- `patch_embeddings`: the CT-FM scripts' patch embedding (project-lighter/CT-FM,
  `scripts/feature_extractor.py`): MONAI `SlidingWindowSplitter(patch_size, overlap)` patches
  (zero-padded at the far borders, as there), each embedded as
  `adaptive_avg_pool3d(SegResEncoder(patch)[-1], 1)`; returned on the patch grid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["patch_embeddings", "segres_deepest", "segres_deepest_tiled", "segres_halo"]


def _convs(module: nn.Module) -> Iterator[nn.Conv3d]:
    """Yield the Conv3d layers of `module` in forward order (SegResEncoder registers them so)."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            yield m


def segres_halo(net: Any, split: int = 2) -> tuple[tuple[int, ...], int]:
    """(halo per axis in input voxels, stride) of the tiled part of a SegResEncoder.

    The halo is the receptive-field radius of `conv_init` + levels 0..split-1 (blocks and
    downsampling), rounded up to a multiple of the cumulative stride 2**split.
    """
    modules: list[Any] = [net.conv_init]
    for level in list(net.layers)[:split]:
        modules += [level["blocks"], level["downsample"]]
    radius = [0, 0, 0]
    jump = [1, 1, 1]
    for mod in modules:
        for conv in _convs(mod):
            for ax in range(3):
                radius[ax] += (int(conv.kernel_size[ax]) // 2) * jump[ax] * int(conv.dilation[ax])
                jump[ax] *= int(conv.stride[ax])
    stride = 2**split
    if any(j != stride for j in jump):
        raise ValueError(f"expected a cumulative stride {stride} after {split} levels, got {jump}")
    return tuple(math.ceil(r / stride) * stride for r in radius), stride


def _head(net: Any, x: torch.Tensor, split: int) -> torch.Tensor:
    x = net.conv_init(x)
    for level in list(net.layers)[:split]:
        x = level["downsample"](level["blocks"](x))
    return x


def segres_deepest(net: Any, x: torch.Tensor) -> torch.Tensor:
    """`net(x)[-1]` of a SegResEncoder without keeping the shallower levels' maps."""
    x = net.conv_init(x)
    for level in net.layers:
        x = level["downsample"](level["blocks"](x))  # the last level's downsample is Identity
    return x


@torch.inference_mode()
def segres_deepest_tiled(
    net: Any,
    x: torch.Tensor,
    tile: Sequence[int] = (128, 128, 128),
    split: int = 2,
) -> torch.Tensor:
    """`SegResEncoder(x)[-1]` for x [B, C, X, Y, Z], with bounded memory (module docstring).

    tile: core size of each crop in input voxels (rounded down to a multiple of 2**split); the
    crops add the receptive-field halo on each side. A volume within one tile runs whole.
    """
    halo, stride = segres_halo(net, split)
    shape = tuple(int(s) for s in x.shape[2:])
    core = [max(stride, (int(t) // stride) * stride) for t in tile]
    if all(n <= c for n, c in zip(shape, core, strict=True)):
        return segres_deepest(net, x)
    out_shape = [math.ceil(n / stride) for n in shape]
    head: torch.Tensor | None = None
    starts = [range(0, n, c) for n, c in zip(shape, core, strict=True)]
    for corner in itertools.product(*starts):
        crop, keep, dest = [], [], []
        for ax in range(3):
            c0, n = corner[ax], shape[ax]
            c1 = min(c0 + core[ax], n)
            a, b = max(c0 - halo[ax], 0), min(c1 + halo[ax], n)
            crop.append(slice(a, b))
            j0, j1 = c0 // stride, math.ceil(c1 / stride)  # output rows this core owns
            keep.append(slice(j0 - a // stride, j1 - a // stride))
            dest.append(slice(j0, j1))
        everything = (slice(None), slice(None))
        part = _head(net, x[everything + tuple(crop)], split)
        if head is None:
            head = part.new_empty(tuple(part.shape[:2]) + tuple(out_shape))
        head[everything + tuple(dest)] = part[everything + tuple(keep)]
        del part
    assert head is not None
    y = head
    levels = list(net.layers)
    for level in levels[split:]:
        y = level["downsample"](level["blocks"](y))
    return y


@torch.inference_mode()
def patch_embeddings(
    net: Any,
    x: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.0,
    batch_size: int = 4,
) -> torch.Tensor:
    """Per-patch embeddings [C, n1, n2, n3] of one volume x [1, 1, X, Y, Z] (module docstring).

    Patch (i, j, k) starts at the splitter's location; its embedding is the global average of
    the deepest SegResEncoder map of the patch, as in the CT-FM scripts.
    """
    from monai.inferers import SlidingWindowSplitter

    splitter = SlidingWindowSplitter(tuple(int(p) for p in patch_size), overlap)
    locations: list[tuple[int, ...]] = []
    feats: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            fmap = segres_deepest(net, torch.cat(batch))
            feats.append(torch.nn.functional.adaptive_avg_pool3d(fmap, 1).flatten(1))
            batch.clear()

    for patch, loc in splitter(x):
        batch.append(patch)
        locations.append(tuple(int(v) for v in loc))
        if len(batch) >= batch_size:
            flush()
    flush()
    emb = torch.cat(feats)  # [P, C], in the splitter's (C-order) location order
    grid = [len(sorted({loc[ax] for loc in locations})) for ax in range(3)]
    if math.prod(grid) != emb.shape[0]:
        raise RuntimeError(f"patch locations do not form a grid: {grid} vs {emb.shape[0]}")
    order = sorted(range(len(locations)), key=lambda i: locations[i])
    return emb[order].T.reshape(emb.shape[1], *grid)

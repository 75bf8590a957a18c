"""`ct_monai`: frozen CT foundation-model architectures loaded from a local checkpoint.

Presets. The foundation-model presets see exactly their published input: MONAI's own transforms,
configured as upstream (`survfuse.encoders.fm_transforms`, which cites each source), and, where a
whole-volume pass would not fit in memory, an inference that gives the same output
(`survfuse.encoders.fm_inference`):

- `ct-fm` (CT-FM, Pai et al. 2025; the `project-lighter/ct_fm_feature_extractor` model card):
  MONAI `SegResEncoder(spatial_dims=3, in_channels=1, init_filters=32, blocks_down=(1, 2, 2, 4,
  4))`; SPL, native spacing, HU -1024..2048 -> [0, 1] clipped, `CropForeground` (> 0 after
  scaling); the whole volume's deepest (512-channel) map, computed in tiles with a
  receptive-field halo (`tile`, default 128^3 voxels per crop core) so a 512 x 512 x 300 CT fits
  in a few GB. Weights: Hugging Face `project-lighter/ct_fm_feature_extractor`
  (`model.safetensors`).
- `ct-fm-patches` (CT-FM's embedding scripts, `scripts/feature_extractor.py`): the same network
  and weights; SPL, 3 x 1 x 1 mm, `CropForeground` on the raw HU (> 0 HU) before scaling, then
  24 x 128 x 128 sliding-window patches (overlap 0), each embedded as the average of its deepest
  map; `pooled` is the average of the patch embeddings, the tokens are the patch grid.
- `merlin` (Merlin, Blankemeier et al. 2024; `merlin/data/monai_transforms.py`): the I3D
  ResNet-152 image encoder of `survfuse.encoders.merlin_i3d`; RAS, 1.5 x 1.5 x 3 mm, HU
  -1000..1000 -> [0, 1] clipped, pad + centre crop to 224 x 224 x 160; the 2048-channel layer4
  map. Weights: Hugging Face `stanfordmimi/Merlin`
  (`i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt`; its
  `encode_image.*` keys are used, the text tower is ignored).
- `generic`: any network of `monai.networks.nets` named by `network` with `network_args`, with
  survfuse's hand-written preprocessing (`survfuse.data.imaging.CTPreprocessing`: there is no
  published pipeline to follow).

`preprocessing` overrides a foundation-model pipeline's few parameters (`FMPreprocessing`: e.g.
merlin's `spatial_size`, ct-fm-patches' `pixdim`, `patch_size`, `overlap`) for tests and
benchmarks; the features' meta records whether the pipeline is the published one.

The spatial feature map [C, a, b, c] becomes tokens: adaptive-average-pooled to `token_grid`
cells (one token per cell, C-dim; `token_grid=None` keeps every map position) and `pooled` is its
global average [C] (a map smaller than the grid along an axis keeps its size there).
Checkpoints load with `strict=True` (safetensors, or `torch.load` with `weights_only=True`); a
missing or mismatched checkpoint raises an error naming the expected file and where the weights
are published.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from survfuse.data.imaging import CTLoadError, CTPreprocessing
from survfuse.device import resolve_device
from survfuse.encoders import fm_inference
from survfuse.encoders.base import (
    CTSource,
    Encoder,
    cohort_keys,
    hash_files,
    hash_parts,
    iter_ct_volumes,
    register_encoder,
)
from survfuse.encoders.fm_transforms import FMPreprocessing, load_fm, require_monai
from survfuse.encoders.merlin_i3d import MerlinImageEncoder
from survfuse.features import ModalityFeatures
from survfuse.registry import look_up_option

__all__ = ["PRESETS", "CTMonaiEncoder", "CheckpointError", "Preset", "resolve_device"]

NO_STUDY = "no CT study at or before prediction_time"  # as survfuse.data.ct_index.iter_ct


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or does not match the architecture."""


@dataclass(frozen=True)
class Preset:
    """A named architecture + its preprocessing + where its weights are published."""

    network: str
    network_args: dict[str, Any]
    preprocessing: dict[str, Any]
    out_channels: int | None
    expected_file: str | None = None
    published_at: str | None = None
    key_prefix: str | None = None  # keys of the published file under this prefix are the model
    ignored_prefixes: tuple[str, ...] = field(default_factory=tuple)
    pipeline: str | None = None  # the published MONAI chain (fm_transforms); None: hand-written
    inference: str = "whole"  # "whole" (batched), "tiled" (SegResEncoder, exact) or "patches"


CTFM_NETWORK_ARGS: dict[str, Any] = {  # project-lighter/ct_fm_feature_extractor config.json
    "spatial_dims": 3,
    "in_channels": 1,
    "init_filters": 32,
    "blocks_down": [1, 2, 2, 4, 4],
}
CTFM_FILE = "model.safetensors"
CTFM_AT = "Hugging Face project-lighter/ct_fm_feature_extractor"

PRESETS: dict[str, Preset] = {
    "ct-fm": Preset(
        network="SegResEncoder",
        network_args=CTFM_NETWORK_ARGS,
        preprocessing={},
        out_channels=512,
        pipeline="ct-fm",
        inference="tiled",
        expected_file=CTFM_FILE,
        published_at=CTFM_AT,
    ),
    "ct-fm-patches": Preset(
        network="SegResEncoder",
        network_args=CTFM_NETWORK_ARGS,
        preprocessing={},
        out_channels=512,
        pipeline="ct-fm-patches",
        inference="patches",
        expected_file=CTFM_FILE,
        published_at=CTFM_AT,
    ),
    "merlin": Preset(
        network="merlin_i3d",
        network_args={"blocks": [3, 8, 36, 3]},
        preprocessing={},
        out_channels=2048,
        expected_file="i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt",
        published_at="Hugging Face stanfordmimi/Merlin",
        key_prefix="encode_image.",
        ignored_prefixes=("encode_text.", "logit_scale"),
        pipeline="merlin",
    ),
    "generic": Preset(network="", network_args={}, preprocessing={}, out_channels=None),
}


def _build_network(name: str, args: dict[str, Any]) -> nn.Module:
    if name == "merlin_i3d":
        return MerlinImageEncoder(**args)

    require_monai()  # an ImportError that says how to install MONAI
    import monai.networks.nets as nets
    from monai.networks.nets.segresnet_ds import SegResEncoder

    available: dict[str, Callable[..., nn.Module]] = {
        k: v for k, v in vars(nets).items() if isinstance(v, type) and issubclass(v, nn.Module)
    }
    available["SegResEncoder"] = SegResEncoder
    klass = available[look_up_option(name, available, kind="MONAI network")]
    net: nn.Module = klass(**args)
    return net


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def load_checkpoint(
    net: nn.Module,
    checkpoint: str | os.PathLike[str] | None,
    preset_name: str,
    preset: Preset,
    *,
    assign: bool = False,
) -> None:
    """Load `checkpoint` into `net` with strict=True; errors say what file is expected where.

    `assign=True` makes the file's tensors the module's (for a module built on the meta device).
    """
    where = (
        f"expected {preset.expected_file!r} from {preset.published_at} (download it and pass its "
        "local path as checkpoint=...)"
        if preset.published_at
        else "pass the local path of a checkpoint for this network as checkpoint=..."
    )
    if checkpoint is None:
        raise CheckpointError(f"ct_monai preset {preset_name!r} needs a checkpoint: {where}")
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found for preset {preset_name!r}: {where}")
    try:
        state = _read_state_dict(path)
    except CheckpointError:
        raise
    except Exception as err:  # unreadable/corrupt file
        raise CheckpointError(f"cannot read checkpoint {path} ({err}); {where}") from err
    if preset.key_prefix and any(k.startswith(preset.key_prefix) for k in state):
        extra = [
            k
            for k in state
            if not k.startswith(preset.key_prefix)
            and not k.startswith(preset.ignored_prefixes or ("\0",))
        ]
        if extra:
            raise CheckpointError(
                f"checkpoint {path} has unexpected keys outside {preset.key_prefix!r}: "
                f"{extra[:5]}; {where}"
            )
        n = len(preset.key_prefix)
        state = {k[n:]: v for k, v in state.items() if k.startswith(preset.key_prefix)}
    try:
        net.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as err:
        own = set(net.state_dict())
        missing = sorted(own - set(state))[:5]
        unexpected = sorted(set(state) - own)[:5]
        msg = str(err).splitlines()
        detail = (
            f"missing keys {missing}, unexpected keys {unexpected}"
            if missing or unexpected
            else msg[1].strip()
            if len(msg) > 1
            else msg[0]
        )
        raise CheckpointError(
            f"checkpoint {path} does not match the {preset_name!r} architecture ({detail}); {where}"
        ) from err


def _foreground_crop(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Crop x to the bounding box of its voxels > 0.

    The `generic` preset's crop="foreground" without a target_shape; the ct-fm presets use
    MONAI's CropForeground itself.
    """
    fg = x > 0
    if not fg.any():
        return x
    sl = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(fg.any(axis=other))
        sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return x[tuple(sl)]


@register_encoder("ct_monai")
class CTMonaiEncoder(Encoder):
    """A frozen 3-D CNN from a local checkpoint (see module docstring for the presets).

    tokens [N, T, C] (T = prod(token_grid)), mask [N, T], pooled [N, C].
    `tile` (ct-fm) is the crop core of the tiled whole-volume pass and `batch_size` the number of
    volumes (merlin, generic) or patches (ct-fm-patches) per forward pass; neither changes the
    features, so neither is part of the config.
    """

    modality = "ct"
    learns = False

    def __init__(
        self,
        *,
        preset: str = "ct-fm",
        checkpoint: str | None = None,
        network: str | None = None,
        network_args: dict[str, Any] | None = None,
        preprocessing: dict[str, Any] | None = None,
        token_grid: tuple[int, int, int] | list[int] | None = (4, 4, 4),
        batch_size: int = 2,
        tile: Sequence[int] = (128, 128, 128),
        device: str = "auto",
    ) -> None:

        preset = look_up_option(preset, PRESETS, kind="ct_monai preset")
        p = PRESETS[preset]
        net_name = network or p.network
        if not net_name:
            raise ValueError("ct_monai preset 'generic' needs network='<monai.networks.nets name>'")
        prep: CTPreprocessing | FMPreprocessing
        if p.pipeline is not None:
            if net_name != p.network:
                raise ValueError(
                    f"preset {preset!r} is the published {p.network} network; use "
                    f"preset='generic' for network={network!r}"
                )
            given = dict(preprocessing or {})
            if given.pop("pipeline", p.pipeline) != p.pipeline:  # a saved config repeats it
                raise ValueError(f"preset {preset!r} runs pipeline {p.pipeline!r}")
            prep = FMPreprocessing(pipeline=p.pipeline, **given)
        else:
            prep = CTPreprocessing(**{**p.preprocessing, **(preprocessing or {})})
        super().__init__(
            preset=preset,
            checkpoint=None if checkpoint is None else str(Path(checkpoint).resolve()),
            network=net_name,
            network_args={**p.network_args, **(network_args or {})},
            preprocessing=prep.model_dump(mode="json"),
            token_grid=None if token_grid is None else [int(g) for g in token_grid],
        )
        self.device = resolve_device(device)  # not part of the config: results do not depend on it
        self.batch_size = int(batch_size)
        self.tile = tuple(int(t) for t in tile)
        self._prep = prep
        self._preset = p
        self._net: nn.Module | None = None

    # ------------------------------------------------------------------ network
    def network(self) -> nn.Module:
        """Return the network with its checkpoint loaded (built once, eval mode, on `device`)."""
        if self._net is None:
            cfg = self._config
            # built on the meta device: no time spent on a random init the checkpoint replaces
            with torch.device("meta"):
                net = _build_network(cfg["network"], cfg["network_args"])
            load_checkpoint(net, cfg["checkpoint"], cfg["preset"], self._preset, assign=True)
            if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):
                # a tensor that is not in the state dict (non-persistent buffer): build for real
                net = _build_network(cfg["network"], cfg["network_args"])
                load_checkpoint(net, cfg["checkpoint"], cfg["preset"], self._preset)
            self._net = net.to(self.device).eval()
        return self._net

    def fingerprint(self) -> str:
        """Return the base fingerprint + the checkpoint file's (path, size, mtime)."""
        ckpt = self._config["checkpoint"]
        return hash_parts(super().fingerprint(), hash_files([ckpt]) if ckpt else "no-checkpoint")

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Return the network's feature map [B, C, a, b, c] of inputs x [B, 1, X, Y, Z]."""
        net = self.network()
        if self._preset.inference == "tiled":
            return fm_inference.segres_deepest_tiled(net, x, self.tile)
        if self._preset.inference == "patches":
            prep: Any = self._prep
            maps = [
                fm_inference.patch_embeddings(
                    net, x[i : i + 1], prep.patch_size, prep.overlap, self.batch_size
                )
                for i in range(x.shape[0])
            ]
            return torch.stack(maps)  # [B, C, n1, n2, n3]: one position per patch
        out: Any = net(x)
        if isinstance(out, (list, tuple)):
            out = out[-1]  # deepest level of an encoder pyramid
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"network output must be a tensor or list of tensors, got {type(out)}")
        if out.ndim == 2:  # already pooled: one token
            out = out[:, :, None, None, None]
        if out.ndim != 5:
            raise ValueError(
                f"expected a [B, C, a, b, c] feature map, got shape {tuple(out.shape)}"
            )
        return out

    def out_channels(self) -> int:
        """C of the feature map (the preset's, else probed with one zero volume)."""
        if self._preset.out_channels is not None and self._config["preset"] != "generic":
            return self._preset.out_channels
        shape = getattr(self._prep, "target_shape", None) or (32, 32, 32)
        return int(self.embed([np.zeros(shape, np.float32)])[1].shape[1])

    @torch.inference_mode()
    def embed(self, volumes: list[np.ndarray[Any, Any]]) -> tuple[np.ndarray[Any, Any], ...]:
        """Volumes [X, Y, Z] of one shape -> (tokens [B, T, C], pooled [B, C]) float32."""
        x = torch.from_numpy(np.stack(volumes)[:, None].astype(np.float32)).to(self.device)
        fmap = self._feature_map(x).float()
        pooled = fmap.mean(dim=(2, 3, 4))
        grid = self._config["token_grid"]
        if grid is not None:  # never upsample: a map smaller than the grid keeps its size
            size = tuple(min(g, m) for g, m in zip(grid, fmap.shape[2:], strict=True))
            fmap = torch.nn.functional.adaptive_avg_pool3d(fmap, size)
        tokens = fmap.flatten(2).transpose(1, 2)
        return tokens.cpu().numpy(), pooled.cpu().numpy()

    # ------------------------------------------------------------------ encode
    def _volumes(
        self, cohort: pl.DataFrame, source: CTSource
    ) -> Iterator[tuple[int, Any, dict[str, Any] | None]]:
        """(row, CTVolume or None, manifest entry or None) per cohort row (`iter_ct_volumes`)."""
        if self._preset.pipeline is None:
            yield from iter_ct_volumes(cohort, source, self._prep)
            return

        assert isinstance(self._prep, FMPreprocessing)
        studies = source.studies(cohort).select("subject_id", "prediction_time", "path")
        for i, rec in enumerate(studies.iter_rows(named=True)):
            entry = dict(rec, prediction_time=str(rec["prediction_time"]))
            if rec["path"] is None:
                yield i, None, {**entry, "status": "no_study", "reason": NO_STUDY}
                continue
            try:
                vol = load_fm(rec["path"], self._prep)
            except CTLoadError as exc:
                yield i, None, {**entry, "status": "failed", "reason": exc.reason}
                continue
            yield i, vol, None

    def encode(self, cohort: pl.DataFrame, source: CTSource) -> ModalityFeatures:
        sid, pt = cohort_keys(cohort)
        n = len(sid)
        batch: list[tuple[int, np.ndarray[Any, Any]]] = []
        results: dict[int, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = {}
        manifest: list[dict[str, Any]] = []
        crop_fg = (
            self._preset.pipeline is None
            and getattr(self._prep, "crop", None) == "foreground"
            and getattr(self._prep, "target_shape", None) is None
        )
        # a tiled or patch-wise volume is its own batch; merlin / generic batch `batch_size`
        per_batch = self.batch_size if self._preset.inference == "whole" else 1

        def flush() -> None:
            # volumes of different shapes (no fixed input size) run one shape-group at a time
            groups: dict[tuple[int, ...], list[tuple[int, np.ndarray[Any, Any]]]] = {}
            for i, v in batch:
                groups.setdefault(v.shape, []).append((i, v))
            for items in groups.values():
                tok, pool = self.embed([v for _, v in items])
                for k, (i, _) in enumerate(items):
                    results[i] = (tok[k], pool[k])
            batch.clear()

        for i, vol, entry in self._volumes(cohort, source):
            if vol is None:
                manifest.append(entry or {})
                continue
            arr = np.asarray(vol.array, dtype=np.float32)
            batch.append((i, _foreground_crop(arr) if crop_fg else arr))
            if len(batch) >= per_batch:
                flush()
        flush()

        t = max((r[0].shape[0] for r in results.values()), default=1)
        c = next(iter(results.values()))[1].shape[0] if results else self.out_channels()
        tokens = np.zeros((n, t, c), np.float32)
        mask = np.zeros((n, t), bool)
        pooled = np.zeros((n, c), np.float32)
        present = np.zeros(n, bool)
        for i, (tok, pool) in results.items():
            tokens[i, : tok.shape[0]] = tok
            mask[i, : tok.shape[0]] = True
            pooled[i] = pool
            present[i] = True
        return ModalityFeatures(
            subject_id=sid,
            prediction_time=pt,
            pooled=pooled,
            present=present,
            tokens=tokens,
            mask=mask,
            meta={
                "encoder": self.name,
                "modality": "ct",
                "preset": self._config["preset"],
                "pipeline": self._preset.pipeline,
                "published_pipeline": bool(getattr(self._prep, "published", False)),
                "token_grid": self._config["token_grid"],
                "manifest": manifest,
            },
        )

"""`ct_monai`: frozen CT foundation-model architectures loaded from a local checkpoint.

Presets (each with the model's own preprocessing, as a `CTPreprocessing`):

- `ct-fm` (CT-FM, Pai et al. 2025): MONAI `SegResEncoder(spatial_dims=3, in_channels=1,
  init_filters=32, blocks_down=(1, 2, 2, 4, 4))`; SPL orientation, native spacing,
  HU -1024..2048 -> [0, 1], crop to the foreground bounding box (MONAI `CropForeground`: voxels
  > 0 after scaling); the last level's 512-channel map. Weights: Hugging Face
  `project-lighter/ct_fm_feature_extractor` (`model.safetensors`).
- `merlin` (Merlin, Blankemeier et al. 2024): the I3D ResNet-152 image encoder of
  `survfuse.encoders.merlin_i3d`; RAS, 1.5 x 1.5 x 3 mm, HU -1000..1000 -> [0, 1], centre
  crop/pad to 224 x 224 x 160; the 2048-channel layer4 map. Weights: Hugging Face
  `stanfordmimi/Merlin` (`i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt`;
  its `encode_image.*` keys are used, the text tower is ignored).
- `generic`: any network of `monai.networks.nets` named by `network` with `network_args`, with
  the preprocessing you give.

The spatial feature map [C, a, b, c] becomes tokens: adaptive-average-pooled to `token_grid`
cells (one token per cell, C-dim; `token_grid=None` keeps every map position) and `pooled` is its
global average [C] (a map smaller than the grid along an axis keeps its size there). Checkpoints load with `strict=True` (safetensors, or `torch.load` with
`weights_only=True`); a missing or mismatched checkpoint raises an error naming the expected file
and where the weights are published.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from survfuse.device import resolve_device
from survfuse.encoders.base import (
    CTSource,
    Encoder,
    cohort_keys,
    hash_files,
    hash_parts,
    iter_ct_volumes,
    register_encoder,
)
from survfuse.encoders.features import ModalityFeatures
from survfuse.registry import look_up_option

__all__ = ["PRESETS", "CTMonaiEncoder", "CheckpointError", "Preset", "resolve_device"]


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


PRESETS: dict[str, Preset] = {
    "ct-fm": Preset(
        network="SegResEncoder",
        network_args={
            "spatial_dims": 3,
            "in_channels": 1,
            "init_filters": 32,
            "blocks_down": [1, 2, 2, 4, 4],
        },
        preprocessing={
            "orientation": "SPL",
            "spacing": None,
            "hu_window": [-1024.0, 2048.0],
            "scale_to_unit": True,
            "target_shape": None,
            "crop": "foreground",
        },
        out_channels=512,
        expected_file="model.safetensors",
        published_at="Hugging Face project-lighter/ct_fm_feature_extractor",
    ),
    "merlin": Preset(
        network="merlin_i3d",
        network_args={"blocks": [3, 8, 36, 3]},
        preprocessing={
            "orientation": "RAS",
            "spacing": [1.5, 1.5, 3.0],
            "hu_window": [-1000.0, 1000.0],
            "scale_to_unit": True,
            "target_shape": [224, 224, 160],
            "crop": "center",
        },
        out_channels=2048,
        expected_file="i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt",
        published_at="Hugging Face stanfordmimi/Merlin",
        key_prefix="encode_image.",
        ignored_prefixes=("encode_text.", "logit_scale"),
    ),
    "generic": Preset(network="", network_args={}, preprocessing={}, out_channels=None),
}


def _build_network(name: str, args: dict[str, Any]) -> nn.Module:
    if name == "merlin_i3d":
        from survfuse.encoders.merlin_i3d import MerlinImageEncoder

        return MerlinImageEncoder(**args)
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
    """Bounding box of voxels > 0 (MONAI CropForeground's default select_fn, margin 0)."""
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
        device: str = "auto",
    ) -> None:
        from survfuse.data.imaging import CTPreprocessing

        preset = look_up_option(preset, PRESETS, kind="ct_monai preset")
        p = PRESETS[preset]
        net_name = network or p.network
        if not net_name:
            raise ValueError("ct_monai preset 'generic' needs network='<monai.networks.nets name>'")
        prep = CTPreprocessing(**{**p.preprocessing, **(preprocessing or {})})
        if not prep.scale_to_unit and preset != "generic":
            raise ValueError(f"preset {preset!r} expects preprocessing.scale_to_unit=True")
        super().__init__(
            preset=preset,
            checkpoint=None if checkpoint is None else str(Path(checkpoint).resolve()),
            network=net_name,
            network_args={**p.network_args, **(network_args or {})},
            preprocessing=prep.model_dump(mode="json"),
            token_grid=None if token_grid is None else [int(g) for g in token_grid],
            batch_size=int(batch_size),
        )
        self.device = resolve_device(device)  # not part of the config: results do not depend on it
        self._prep = prep
        self._preset = p
        self._net: nn.Module | None = None

    # ------------------------------------------------------------------ network
    def network(self) -> nn.Module:
        """The network with its checkpoint loaded (built once, eval mode, on `device`)."""
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
        """Base fingerprint + the checkpoint file's (path, size, mtime)."""
        ckpt = self._config["checkpoint"]
        return hash_parts(super().fingerprint(), hash_files([ckpt]) if ckpt else "no-checkpoint")

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        out: Any = self.network()(x)
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
        shape = self._prep.target_shape or (32, 32, 32)
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
    def encode(self, cohort: pl.DataFrame, source: CTSource) -> ModalityFeatures:
        sid, pt = cohort_keys(cohort)
        n = len(sid)
        batch: list[tuple[int, np.ndarray[Any, Any]]] = []
        results: dict[int, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = {}
        manifest: list[dict[str, Any]] = []
        crop_fg = self._prep.crop == "foreground" and self._prep.target_shape is None

        def flush() -> None:
            # volumes of different shapes (no target_shape) run one shape-group at a time
            groups: dict[tuple[int, ...], list[tuple[int, np.ndarray[Any, Any]]]] = {}
            for i, v in batch:
                groups.setdefault(v.shape, []).append((i, v))
            for items in groups.values():
                tok, pool = self.embed([v for _, v in items])
                for k, (i, _) in enumerate(items):
                    results[i] = (tok[k], pool[k])
            batch.clear()

        for i, vol, entry in iter_ct_volumes(cohort, source, self._prep):
            if vol is None:
                manifest.append(entry or {})
                continue
            arr = np.asarray(vol.array, dtype=np.float32)
            batch.append((i, _foreground_crop(arr) if crop_fg else arr))
            if len(batch) >= self._config["batch_size"]:
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
                "token_grid": self._config["token_grid"],
                "manifest": manifest,
            },
        )

"""Saving and loading a fitted `FusionSurvivalModel`.

`config.json` (the constructor's arguments, feature specs, training history) beside
`model.safetensors` (weights, normalisation statistics, the head's fitted state).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from survfuse.device import resolve_device
from survfuse.fusion.batch import ModalitySpec

__all__ = ["load_model", "save_model"]


def save_model(model: Any, directory: str | Path) -> Path:
    """Write `model` (a fitted `FusionSurvivalModel`) to `directory`; returns the folder."""
    from safetensors.torch import save_file

    module = model._module
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    params = model.get_params(deep=False)
    params["strategy_params"] = dict(model.strategy_params or {})
    params["head_params"] = dict(model.head_params or {})
    params["rebalance_params"] = model._rebalance_settings()
    cfg = {
        "model": params,
        "specs": {m: s.to_dict() for m, s in model.specs_.items()},
        "history": model.history_,
        "best_epoch": model.best_epoch_,
        "dropped_modalities": model.dropped_modalities_,
        "validation_slope": getattr(model, "validation_slope_", None),
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=float))
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    return out


def load_model(cls: Any, directory: str | Path, *, device: str | None = None) -> Any:
    """Recreate a model of class `cls` saved by `save_model` (`device` overrides the saved one)."""
    from safetensors.torch import load_file

    src = Path(directory)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"no saved FusionSurvivalModel in {src} (config.json missing)")
    cfg = json.loads((src / "config.json").read_text())
    kwargs = dict(cfg["model"])
    strategy = kwargs.pop("strategy")
    if device is not None:
        kwargs["device"] = device
    model = cls(strategy, **kwargs)
    model.specs_ = {m: ModalitySpec(**s) for m, s in cfg["specs"].items()}
    model.history_ = cfg.get("history", [])
    model.best_epoch_ = cfg.get("best_epoch")
    model.dropped_modalities_ = list(cfg.get("dropped_modalities", []))
    model.validation_slope_ = cfg.get("validation_slope")  # the scale itself is in the state
    model.branch_summary_, model.offset_history_ = {}, []
    module = model._build(model.specs_)
    weights = src / "model.safetensors"
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise ValueError(
            f"{weights}: not a valid safetensors file ({' '.join(str(exc).split())}); "
            "refusing to load it (retrain the cell)"
        ) from exc
    module.load_state_dict(state)
    module.to(resolve_device(model.device)).eval()
    model.module_ = module
    return model

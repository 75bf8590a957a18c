"""`TrainingOptions`: how a fusion model is trained, declared once.

The estimator (`survfuse.fusion.FusionSurvivalModel(**options)`) and the study config (the YAML
`training:` section, `survfuse.experiment.config`) both take exactly these fields, with these
defaults and this validation.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from survfuse.device import resolve_device
from survfuse.registry import look_up_option

__all__ = ["REBALANCE", "REBALANCE_PARAMS", "TrainingOptions"]

#: Gradient rebalancing methods: none, or OGM-GE (Peng et al., CVPR 2022; see fusion.rebalance).
REBALANCE = ("none", "ogm_ge")
#: Keys of `rebalance_params` (OGM-GE): `alpha` (default 0.5), `noise` (default True).
REBALANCE_PARAMS = ("alpha", "noise")


class TrainingOptions(BaseModel):
    """Optimiser, early stopping, branch stopping, rebalancing and runtime of one training run.

    Branch stopping (`survfuse.fusion.branches`) adds a linear Cox probe per modality
    (`branch_loss` weight), freezes each modality's encoder side at its best epoch after
    `branch_patience` epochs without gain (default `patience`), and drops a chance-level one
    at one-sided level `branch_drop_alpha` (None: never drop). `validation_slope` rescales a Cox
    model's risk by its calibration slope on the validation split after training.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(default=3e-3, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    max_epochs: int = Field(default=100, ge=1)
    patience: int = Field(default=10, ge=1)
    # None: the whole training split is one batch up to FULL_BATCH_MAX patients (exact Cox
    # risk sets), else mini-batches of LARGE_BATCH (see survfuse.fusion.model)
    batch_size: int | None = Field(default=None, ge=2)
    modality_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    grad_clip: float = Field(default=1.0, ge=0.0)  # 0: no clipping
    rebalance: str = "none"
    rebalance_params: dict[str, Any] = Field(default_factory=dict)
    branch_stopping: bool = True
    branch_loss: float = Field(default=1.0, ge=0.0)
    branch_patience: int | None = Field(default=None, ge=1)
    branch_drop_alpha: float | None = Field(default=0.05, gt=0.0, lt=1.0)
    # after training, scale a Cox model's risk by its calibration slope on the validation split
    # (one-parameter Cox fit of the outcome on the risk): ranks and C unchanged, predicted
    # spread calibrated (a penalty or an epoch chosen by validation C leaves it too narrow or
    # too wide: docs/benchmarks.md, issue 18)
    validation_slope: bool = True
    device: str = "auto"  # "auto": CUDA when available, else CPU (the reference)
    # torch intra-op threads while training and predicting: fixed, so results do not depend on
    # the machine's core count or on how many models train side by side
    threads: int | None = Field(default=1, ge=1)

    @field_validator("rebalance")
    @classmethod
    def _rebalance(cls, v: str) -> str:
        return look_up_option(v, REBALANCE, kind="rebalance")

    @field_validator("rebalance_params")
    @classmethod
    def _rebalance_params(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            look_up_option(key, REBALANCE_PARAMS, kind="rebalance parameter")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:

        resolve_device(v)  # "cuda" on a machine without CUDA fails here, not mid-run
        return v

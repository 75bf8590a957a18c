"""`TrainState`: what the training loop and its callbacks share during one run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from survfuse.training.options import TrainingOptions

__all__ = ["Step", "TrainState"]

#: One training step's inputs: (batch, time [B], event [B]).
Step = tuple[Any, Tensor, Tensor]


@dataclass
class TrainState:
    """What the loop and its callbacks share during one training run."""

    module: nn.Module
    options: TrainingOptions
    epoch: int = 0
    stage: str = "survival"  # the module's training stage ("survival" epochs are scored)
    record: dict[str, Any] = field(default_factory=dict)  # this epoch's history row
    history: list[dict[str, Any]] = field(default_factory=list)
    val_c: float = math.nan  # this epoch's validation C-index
    val_payload: Any = None  # what `validate` returned beside the C-index
    score: float = -math.inf
    improved: bool = False
    froze: bool = False  # a branch was frozen this epoch
    dropped: bool = False  # a modality was dropped this epoch
    best_score: float = -math.inf
    best_state: dict[str, Tensor] | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0

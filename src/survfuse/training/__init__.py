"""Training: one options type, one loop, callbacks (early stopping, gradient logging).

Fusion-specific callbacks (branch stopping, OGM-GE rebalancing) live with the fusion code that
defines what they act on (`survfuse.fusion.branches`, `survfuse.fusion.rebalance`).
"""

from survfuse.training.callbacks import Callback, EarlyStopping, GradientLogging
from survfuse.training.loop import TrainState, fit_loop
from survfuse.training.options import TrainingOptions

__all__ = [
    "Callback",
    "EarlyStopping",
    "GradientLogging",
    "TrainState",
    "TrainingOptions",
    "fit_loop",
]

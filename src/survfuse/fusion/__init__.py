"""Fusion strategies (registered in `survfuse.registry.FUSIONS`) and their estimator.

Importing this package registers `unimodal`, `concat`, `late`, `contrastive`,
`cross_attention` and `co_attention`.
"""

from survfuse.fusion import (  # noqa: F401  (imported so the strategies register)
    co_attention,
    concat,
    contrastive,
    cross_attention,
    late,
    linear,
    unimodal,
)
from survfuse.fusion.base import FusionOutput, FusionStrategy
from survfuse.fusion.batch import ModalitySpec
from survfuse.fusion.model import FusionSurvivalModel
from survfuse.fusion.multimodal import MultimodalFeatures

__all__ = [
    "FusionOutput",
    "FusionStrategy",
    "FusionSurvivalModel",
    "ModalitySpec",
    "MultimodalFeatures",
]

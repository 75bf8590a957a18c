"""Frozen modality encoders (registered in `survfuse.registry.ENCODERS`) and the feature store."""

from survfuse.encoders.features import ModalityFeatures

__all__ = ["ModalityFeatures"]

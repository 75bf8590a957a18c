"""Frozen modality encoders (registered in `survfuse.registry.ENCODERS`) and the feature store."""

from survfuse.encoders.base import CTSource, Encoder, build_encoder
from survfuse.encoders.features import ModalityFeatures
from survfuse.encoders.store import FeatureStore

__all__ = ["CTSource", "Encoder", "FeatureStore", "ModalityFeatures", "build_encoder"]

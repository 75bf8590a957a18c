"""Frozen modality encoders (registered in `survfuse.registry.ENCODERS`) and the feature store."""

# Encoder modules: importing them registers them in survfuse.registry.ENCODERS (one per line).
from survfuse.encoders import (
    ct_monai,  # noqa: F401
    ct_radiomics,  # noqa: F401
    ehr_clmbr,  # noqa: F401
    ehr_counts,  # noqa: F401
    ehr_onehot,  # noqa: F401
    precomputed,  # noqa: F401
)
from survfuse.encoders.base import CTSource, Encoder, build_encoder
from survfuse.encoders.store import FeatureStore
from survfuse.features import ModalityFeatures

__all__ = ["CTSource", "Encoder", "FeatureStore", "ModalityFeatures", "build_encoder"]

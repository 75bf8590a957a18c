"""Moved: `ModalityFeatures` lives in `survfuse.features`.

That is the type encoders, fusion and analysis share. This name is kept so code written against
earlier versions keeps importing.
"""

from survfuse.features import ModalityFeatures

__all__ = ["ModalityFeatures"]

"""Analyses of trained models: modality contributions and imbalance.

The public names of `survfuse.analysis.imbalance`.
"""

from survfuse.analysis.imbalance import *  # noqa: F403
from survfuse.analysis.imbalance import __all__ as __all__

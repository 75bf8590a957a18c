"""Analyses of trained models: modality contributions and imbalance."""

from survfuse.analysis.imbalance import (
    ImbalanceAnalysis,
    ablation_risks,
    analyse_imbalance,
    imbalance_index,
    mask_modality,
    modality_contributions,
    shapley_two_player,
)

__all__ = [
    "ImbalanceAnalysis",
    "ablation_risks",
    "analyse_imbalance",
    "imbalance_index",
    "mask_modality",
    "modality_contributions",
    "shapley_two_player",
]

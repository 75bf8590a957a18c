"""Analyses of trained models: modality contributions and imbalance."""

"""Survival metrics with their own statistics: concordance, AUC, Brier, calibration, bootstrap."""

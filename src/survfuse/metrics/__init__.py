"""Survival metrics with their own statistics.

Concordance, AUC, Brier, calibration, bootstrap and paired tests.

Conventions: arguments `(time, event, risk)`; risk higher = worse; survival curves are
[N, len(times)] on a strictly increasing grid; IPCW metrics take the training outcomes
(`train_time`, `train_event`) for the censoring Kaplan-Meier.
"""

from survfuse.metrics.auc import TimeDependentAUC, cumulative_dynamic_auc
from survfuse.metrics.bootstrap import METRICS, Resampler, bootstrap, interval, make_scorer
from survfuse.metrics.brier import brier_score, integrated_brier_score
from survfuse.metrics.calibration import (
    CalibrationResult,
    DCalibrationResult,
    calibration,
    calibration_table,
    d_calibration,
    survival_at,
)
from survfuse.metrics.calibration_ci import (
    CalibrationIntervals,
    calibration_intervals,
    calibration_test,
    error_interval,
)
from survfuse.metrics.compare import Comparison, compare
from survfuse.metrics.concordance import (
    ConcordanceResult,
    IPCWConcordanceResult,
    PairedConcordanceTest,
    compare_concordance,
    concordance_index,
    concordance_index_ipcw,
)
from survfuse.metrics.ipcw import CensoringModel
from survfuse.metrics.km import KaplanMeier, censoring_kaplan_meier, kaplan_meier
from survfuse.metrics.paired import (
    ConcordanceMatrix,
    concordance_matrix,
    holm,
    holm_family,
    paired_concordance,
    z_test,
)
from survfuse.metrics.result import (
    MetricResult,
    MetricUndefinedError,
    NoComparablePairError,
    NoEventBeforeTauError,
)

__all__ = [
    "METRICS",
    "CalibrationIntervals",
    "CalibrationResult",
    "CensoringModel",
    "Comparison",
    "ConcordanceMatrix",
    "ConcordanceResult",
    "DCalibrationResult",
    "IPCWConcordanceResult",
    "KaplanMeier",
    "MetricResult",
    "MetricUndefinedError",
    "NoComparablePairError",
    "NoEventBeforeTauError",
    "PairedConcordanceTest",
    "Resampler",
    "TimeDependentAUC",
    "bootstrap",
    "brier_score",
    "calibration",
    "calibration_intervals",
    "calibration_table",
    "calibration_test",
    "censoring_kaplan_meier",
    "compare",
    "compare_concordance",
    "concordance_index",
    "concordance_index_ipcw",
    "concordance_matrix",
    "cumulative_dynamic_auc",
    "d_calibration",
    "error_interval",
    "holm",
    "holm_family",
    "integrated_brier_score",
    "interval",
    "kaplan_meier",
    "make_scorer",
    "paired_concordance",
    "survival_at",
    "z_test",
]

"""Result records and named exceptions shared by every survival metric."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "MetricResult",
    "MetricUndefinedError",
    "NoComparablePairError",
    "NoEventBeforeTauError",
]


class MetricUndefinedError(ValueError):
    """A metric is undefined on these data (never silently reported as 0 or 0.5)."""


class NoComparablePairError(MetricUndefinedError):
    """No comparable pair: no event with a later (or same-time censored) subject."""


class NoEventBeforeTauError(MetricUndefinedError):
    """No event strictly before the truncation time tau (Uno's C is undefined)."""


@dataclass(frozen=True)
class MetricResult:
    """One metric estimate with its confidence interval, rendered verbatim by reports.

    `method` names the interval: "percentile", "bca", "ij-normal" (infinitesimal jackknife),
    or "none" (point estimate only; then ci_low/ci_high are NaN and n_boot is 0).
    """

    name: str
    estimate: float
    ci_low: float
    ci_high: float
    level: float
    method: str
    n_boot: int
    seed: int | None
    n_subjects: int
    n_events: int

    def __post_init__(self) -> None:
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if not (math.isnan(self.ci_low) or math.isnan(self.ci_high)) and self.ci_low > self.ci_high:
            raise ValueError(f"ci_low {self.ci_low} > ci_high {self.ci_high} for {self.name!r}")

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "estimate": self.estimate,
            "lower": self.ci_low,  # the tables' vocabulary (metrics.parquet: lower / upper)
            "upper": self.ci_high,
            "level": self.level,
            "method": self.method,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "n_subjects": self.n_subjects,
            "n_events": self.n_events,
        }

    def __str__(self) -> str:
        pct = round(100 * self.level)
        if math.isnan(self.ci_low):
            return f"{self.name} {self.estimate:.4f}"
        return (
            f"{self.name} {self.estimate:.4f} ({pct}% CI {self.ci_low:.4f}-{self.ci_high:.4f}, "
            f"{self.method}, {self.n_boot} resamples)"
        )

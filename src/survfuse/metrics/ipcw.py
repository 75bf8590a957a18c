"""Inverse probability of censoring weights from a Kaplan-Meier fit on the training data."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from survfuse.metrics.km import KaplanMeier, censoring_kaplan_meier

__all__ = ["CensoringModel"]


class CensoringModel:
    """G(t) = P(C > t), the censoring Kaplan-Meier estimated on `(train_time, train_event)`.

    G is undefined after the last training follow-up unless it has already dropped to 0, so
    evaluating it there raises a ValueError (as scikit-survival does).
    """

    def __init__(self, train_time: ArrayLike, train_event: ArrayLike) -> None:
        self.km: KaplanMeier = censoring_kaplan_meier(train_time, train_event)

    @property
    def last_time(self) -> float:
        return self.km.last_time

    def check_horizon(self, t: float, what: str, *, strict: bool = False) -> None:
        """Raise when t is after the last training follow-up (strict: even if G has hit 0)."""
        if t > self.km.last_time and (strict or self.km.survival[-1] > 0):
            raise ValueError(
                f"{what} = {t} is beyond the last training follow-up time {self.km.last_time}; "
                "the censoring distribution is not estimable there (choose a smaller horizon)"
            )

    def survival(self, t: ArrayLike, what: str = "time") -> NDArray[np.float64]:
        """G(t) (right-continuous) at each t; raises beyond the last training follow-up."""
        tt = np.atleast_1d(np.asarray(t, dtype=np.float64))
        if tt.size:
            self.check_horizon(float(tt.max()), f"largest {what}")
        return self.km(tt)

    def inverse(self, t: ArrayLike, what: str = "event time") -> NDArray[np.float64]:
        """1 / G(t); raises when G(t) = 0 (a weight would be infinite)."""
        g = self.survival(t, what)
        zero = g <= 0
        if zero.any():
            i = int(np.flatnonzero(zero)[0])
            raise ValueError(
                f"censoring survival G is 0 at {what} {np.atleast_1d(t)[i]} (index {i}); "
                "its inverse-probability weight is infinite"
            )
        return 1.0 / g

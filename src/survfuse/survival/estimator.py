"""scikit-survival style methods shared by survfuse's estimators (`CoxPH`, `FusionSurvivalModel`).

An estimator mixing in `SurvivalEstimatorMixin` provides `predict(X)` (risk [N], higher =
worse), `predict_survival(X, times)` and `predict_cumulative_hazard(X, times)` ([N, T] at given
times) and `_curve_times()` (the times [M] at which its curves can change); the mixin adds
`score` (Harrell's C), `predict_survival_function` and `predict_cumulative_hazard_function`
with scikit-survival's signatures and return types.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.utils import Tags

from survfuse.interop import survival_from_y
from survfuse.metrics import concordance_index
from survfuse.survival.baseline import StepFunction

__all__ = ["SurvivalEstimatorMixin", "step_functions"]


def step_functions(
    times: NDArray[np.float64], values: NDArray[np.float64], before: float
) -> NDArray[np.object_]:
    """Return one right-continuous `StepFunction` per row of `values` [N, M] on knots `times` [M].

    Each equals `before` left of the first knot; returned as an object array [N]
    (scikit-survival's return type for `predict_survival_function`).
    """
    out = np.empty(values.shape[0], dtype=object)
    for i, row in enumerate(values):
        out[i] = StepFunction(x=times, y=row, y_before=before)
    return out


class _SurvivalModel(Protocol):
    """What the mixin's methods need from the estimator."""

    def predict(self, X: Any) -> NDArray[np.float64]: ...
    def predict_survival(self, X: Any, times: ArrayLike) -> NDArray[np.float64]: ...
    def predict_cumulative_hazard(self, X: Any, times: ArrayLike) -> NDArray[np.float64]: ...
    def _curve_times(self) -> NDArray[np.float64]: ...


class SurvivalEstimatorMixin:
    """`score`, `predict_survival_function`, `predict_cumulative_hazard_function` (see module)."""

    def score(self: _SurvivalModel, X: Any, y: ArrayLike) -> float:
        """Return Harrell's C of `predict(X)` against the structured `y` (event, time).

        The fraction of comparable pairs (i has an event, T_i < T_j) with risk_i > risk_j, ties
        counting 1/2. Raises when `y` has no comparable pair.
        """
        time, event = survival_from_y(y)
        return float(concordance_index(time, event, self.predict(X)).estimate)

    def predict_survival_function(
        self: _SurvivalModel, X: Any, return_array: bool = False
    ) -> NDArray[np.object_] | NDArray[np.float64]:
        """Predict S(t | x) per row.

        Returns an object array [N] of `StepFunction` (callable on times, with knots `.x` [M] and
        values `.y` [M], S = 1 before the first knot and constant after the last), or with
        `return_array` the values [N, M] at the knots. The knots are the times at which the model's
        curves can change (CoxPH: the distinct training times).
        """
        knots = self._curve_times()
        values = np.asarray(self.predict_survival(X, knots), dtype=np.float64)
        return values if return_array else step_functions(knots, values, 1.0)

    def predict_cumulative_hazard_function(
        self: _SurvivalModel, X: Any, return_array: bool = False
    ) -> NDArray[np.object_] | NDArray[np.float64]:
        """H(t | x) per row, as `predict_survival_function` (H = 0 before the first knot)."""
        knots = self._curve_times()
        values = np.asarray(self.predict_cumulative_hazard(X, knots), dtype=np.float64)
        return values if return_array else step_functions(knots, values, 0.0)

    def __sklearn_tags__(self) -> Tags:
        tags: Tags = super().__sklearn_tags__()  # type: ignore[misc]
        tags.target_tags.required = True  # fit needs the survival outcome
        return tags

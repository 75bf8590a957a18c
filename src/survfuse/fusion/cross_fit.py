"""Cross-fitted validation predictions of strategies that fit a part on the validation split.

Late fusion fits its combination of branch risks (weights or stacking) on the validation split
after training. Scored on the same rows, its validation C is optimistic by those fitted
parameters, and choosing among strategies by validation C then favours it on near-ties
(docs/benchmarks.md, session 8: validation chose `late_stacking`, test C 0.752, over `concat`,
0.805). `finish_training` therefore also stores each validation row's output with the
combination fitted on the other folds (`FusionStrategy.cross_fitted_out`); this module turns it
into the risk and survival curves written for the validation rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:  # the model module imports the strategies, which use `cross_fit_folds`
    from survfuse.fusion.model import FusionSurvivalModel

__all__ = ["cross_fit_folds", "cross_fitted_validation"]


def cross_fit_folds(event: ArrayLike, k: int) -> NDArray[np.int64]:
    """Fold index [N] in 0..k-1, stratified by event (every fold gets its share of events).

    Events, then censored rows, are dealt round-robin in a fixed shuffled order (seed 0).
    """
    ev = np.asarray(event, dtype=bool)
    rng = np.random.default_rng(0)
    folds = np.empty(ev.shape[0], dtype=np.int64)
    for rows in (np.flatnonzero(ev), np.flatnonzero(~ev)):
        folds[rng.permutation(rows)] = np.arange(rows.size) % k
    return folds


def cross_fitted_validation(
    model: FusionSurvivalModel, times: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
    """Cross-fitted (risk [N_val], survival [N_val, len(times)]) of the validation rows.

    The rows passed to `fit` as validation, in that order, on the fitted model's scale and
    baseline; None when the strategy fits nothing on validation (its validation predictions are
    already honest).
    """
    module = model.module_
    out = module.cross_fitted_out
    if out is None:
        return None
    head = module.output_head
    risk = head.risk(out).detach().cpu().numpy().astype(np.float64)
    surv = head.survival(out, np.asarray(times, dtype=np.float64))
    return risk, surv.detach().cpu().numpy().astype(np.float64)

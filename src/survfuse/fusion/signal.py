"""Does a modality carry signal on its own? A check independent of the fused model's training.

Why: branch stopping's chance test reads a linear probe on the *fused model's* representation of
a modality, scored on one validation split while training is under way. On cohorts it was not
tuned on it dropped modalities that carry signal (benchmarks/fusion_generalisation.py: 8 of 8
drops, each of a modality whose own oracle C was 0.63-0.76). Before a modality is dropped this
check asks the data directly: an elastic-net Cox on that modality's standardised pooled features
(penalty chosen by 3-fold cross-validation on the training rows, so the validation split is used
once), scored on validation; the modality carries signal when its Harrell C exceeds 0.5 at
one-sided level `alpha`: (C - 0.5) / SE > z_{1-alpha}, SE the infinitesimal-jackknife standard
error. Without scikit-survival (the `classical` extra) the check is unavailable (None).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from statistics import NormalDist

import numpy as np
from numpy.typing import NDArray

from survfuse.features import ModalityFeatures
from survfuse.fusion.params import harrell_c
from survfuse.metrics import concordance_index
from survfuse.metrics.result import NoComparablePairError

__all__ = ["linear_signal", "signal_check"]

N_ALPHAS = 20
FOLDS = 3


def linear_signal(
    x_train: NDArray[np.float64],
    time: NDArray[np.float64],
    event: NDArray[np.bool_],
    x_val: NDArray[np.float64],
    val_time: NDArray[np.float64],
    val_event: NDArray[np.bool_],
    *,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, bool] | None:
    """Return (validation C, its SE, whether C > 0.5 at one-sided level `alpha`).

    The model is an elastic-net Cox fitted on x_train [N, d] (rows with the modality present);
    None when it cannot be judged (scikit-survival missing, too few events or rows).
    """
    try:
        from sksurv.linear_model import CoxnetSurvivalAnalysis
        from sksurv.util import Surv
    except ImportError:
        return None
    e = np.asarray(event, bool)
    if x_train.shape[0] < 3 * FOLDS or int(e.sum()) < 2 * FOLDS or x_val.shape[0] < 2:
        return None
    mu, sd = x_train.mean(0), x_train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    xt, xv = (x_train - mu) / sd, (x_val - mu) / sd

    def path(x: NDArray[np.float64], t: NDArray[np.float64], ev: NDArray[np.bool_], alphas=None):  # type: ignore[no-untyped-def]
        net = CoxnetSurvivalAnalysis(
            l1_ratio=0.5, n_alphas=N_ALPHAS, alphas=alphas, alpha_min_ratio=0.01,
            fit_baseline_model=False,
        )  # fmt: skip
        return net.fit(x, Surv.from_arrays(event=ev, time=t))

    try:
        full = path(xt, time, e)
        alphas = np.asarray(full.alphas_)
        folds = np.random.default_rng(seed).permutation(xt.shape[0]) % FOLDS
        score = np.zeros(alphas.shape[0])
        for k in range(FOLDS):
            tr, te = folds != k, folds == k
            if int(e[tr].sum()) < 2:
                return None
            fold = path(xt[tr], time[tr], e[tr], alphas)
            risk = xt[te] @ np.asarray(fold.coef_)
            score += np.array(
                [harrell_c(time[te], e[te], risk[:, j]) for j in range(alphas.shape[0])]
            )
    except (ArithmeticError, ValueError):  # coxnet did not converge / degenerate data
        return None
    best = int(np.nanargmax(np.where(np.isfinite(score), score, -np.inf)))
    risk = xv @ np.asarray(full.coef_)[:, best]
    try:
        res = concordance_index(val_time, np.asarray(val_event, bool), risk)
    except NoComparablePairError:
        return None
    c, se = float(res.estimate), float(res.std_error)
    above = (
        (c - 0.5) / se > NormalDist().inv_cdf(1.0 - alpha)
        if math.isfinite(se) and se > 0
        else c > 0.5
    )
    return c, se, bool(above)


def signal_check(
    features: Mapping[str, ModalityFeatures],
    time: NDArray[np.float64],
    event: NDArray[np.bool_],
    validation: tuple[Mapping[str, ModalityFeatures], NDArray[np.float64], NDArray[np.bool_]],
    *,
    alpha: float = 0.05,
    seed: int = 0,
) -> Callable[[str], bool | None]:
    """Return `check(m)`, which says whether modality m carries signal on its own.

    `linear_signal` on its pooled features, on the training and validation rows where it is
    present; None: cannot say.
    """
    vf, vt, ve = validation

    def check(m: str) -> bool | None:
        tr = np.asarray(features[m].present, bool)
        va = np.asarray(vf[m].present, bool)
        out = linear_signal(
            np.asarray(features[m].pooled, np.float64)[tr], time[tr], event[tr],
            np.asarray(vf[m].pooled, np.float64)[va], vt[va], ve[va],
            alpha=alpha, seed=seed,
        )  # fmt: skip
        return None if out is None else out[2]

    return check

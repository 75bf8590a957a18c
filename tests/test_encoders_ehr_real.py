"""EHR encoders on real MEDS data (../shared/data/meds): MIMIC-IV demo and PBC2.

Survival models are scikit-survival's (independent of survfuse): a near-ridge penalised Cox
(`CoxnetSurvivalAnalysis`, l1_ratio 0.01, a path from alpha 1 down to the stated alpha) on
standardised features, and an unpenalised `CoxPHSurvivalAnalysis` for the age-only baseline;
C-index = Harrell's (`concordance_index_censored`) of out-of-fold risks from stratified 5-fold
cross-validation, where every fold fits the encoder on its training subjects only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
from numpy.typing import NDArray
from sklearn.model_selection import StratifiedKFold
from sksurv.linear_model import CoxnetSurvivalAnalysis, CoxPHSurvivalAnalysis
from sksurv.metrics import concordance_index_censored
from sksurv.util import Surv

from survfuse.data.meds import MEDSDataset
from survfuse.encoders import FeatureStore, build_encoder
from survfuse.encoders.ehr_counts import EHRCountsEncoder

Featurise = Callable[[pl.DataFrame, pl.DataFrame], tuple[NDArray[np.float64], NDArray[np.float64]]]


def cv_c_index(
    featurise: Featurise,
    cohort: pl.DataFrame,
    time: NDArray[np.float64],
    event: NDArray[np.bool_],
    *,
    seed: int,
    alpha: float | None,
) -> float:
    """Out-of-fold Harrell's C; alpha None = unpenalised Cox (scikit-survival)."""
    risk = np.zeros(len(time))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed).split(time, event)
    for tr, te in folds:
        x_tr, x_te = featurise(cohort[tr], cohort[te])
        keep = x_tr.std(0) > 0
        mu, sd = x_tr[:, keep].mean(0), x_tr[:, keep].std(0)
        z_tr = np.clip((x_tr[:, keep] - mu) / sd, -5, 5)
        z_te = np.clip((x_te[:, keep] - mu) / sd, -5, 5)
        y = Surv.from_arrays(event[tr], time[tr])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if alpha is None:
                model: CoxPHSurvivalAnalysis | CoxnetSurvivalAnalysis = CoxPHSurvivalAnalysis()
            else:
                model = CoxnetSurvivalAnalysis(
                    l1_ratio=0.01, alphas=np.geomspace(1.0, alpha, 10), max_iter=100_000
                )
            model.fit(z_tr, y)
        risk[te] = model.predict(z_te)
    return float(concordance_index_censored(event, time, risk)[0])


def counts_featuriser(source: MEDSDataset, **config: object) -> Featurise:
    def featurise(train: pl.DataFrame, test: pl.DataFrame) -> tuple[NDArray[np.float64], ...]:
        enc = EHRCountsEncoder(**config).fit(train, source)  # type: ignore[arg-type]
        return (
            enc.encode(train, source).pooled.astype(np.float64),
            enc.encode(test, source).pooled.astype(np.float64),
        )

    return featurise  # type: ignore[return-value]


def test_mimic_demo_all_encoders_and_counts_cox(
    tmp_path: Path, shared_path: Callable[..., Path]
) -> None:
    root = shared_path("meds", "mimic_iv_demo")
    src = MEDSDataset(root)
    labels = pl.read_parquet(root / "labels_death_from_first_admission.parquet")
    assert labels.height == 100 and int(labels["event"].sum()) == 31
    cohort = labels.select("subject_id", pl.col("index_time").alias("prediction_time"))
    time = labels["days"].to_numpy().astype(np.float64)
    event = labels["event"].to_numpy().astype(bool)

    # all three encoders end to end through the feature store (fit on 70 subjects)
    train, rest = cohort.head(70), cohort
    store = FeatureStore(tmp_path / "store")
    configs = {
        "ehr_onehot": dict(max_codes=512),
        "ehr_counts": dict(max_codes=512),
        "ehr_clmbr": dict(
            max_codes=256,
            d_model=16,
            n_layers=1,
            n_heads=2,
            max_len=64,
            epochs=1,
            progress=False,
            num_threads=1,
            device="cpu",
        ),
    }
    for name, cfg in configs.items():
        f = store.encode(build_encoder(name, **cfg), rest, src, fit_cohort=train, progress=False)
        assert len(f) == 100 and f.present.all(), name
        assert np.isfinite(f.pooled).all() and np.abs(f.pooled).sum(1).min() > 0, name

    # Cox on ehr_counts: the demo's history before the first admission is sparse, so one
    # all-history window; 3 repeats of 5-fold CV (seeds 0, 1, 2)
    featurise = counts_featuriser(src, windows=(None,), max_codes=256, max_numeric=32)
    cs = [cv_c_index(featurise, cohort, time, event, seed=s, alpha=1.0) for s in range(3)]
    print(f"MIMIC-IV demo, death from first admission, ehr_counts + Coxnet: C = {cs}")
    assert np.mean(cs) > 0.5 and min(cs) > 0.5


def test_pbc2_landmark_counts_beat_age(shared_path: Callable[..., Path]) -> None:
    """Landmark cohort: every PBC2 subject still followed 2 years after study entry (all enter
    on 2000-01-01 in this MEDS; years > 2 in subject_outcomes.csv, i.e. alive and uncensored
    at 2 years: 278 subjects, 107 later deaths). prediction_time = entry + 2 years; time = days
    from the landmark to death or censoring (transplant = censored); features = ehr_counts of
    the labs, exams and drug before the landmark (windows 30 d, 1 y, all; age_years included);
    baseline = age at the landmark alone (unpenalised Cox)."""
    src = MEDSDataset(shared_path("meds", "pbc2"))
    outcomes = pl.read_csv(shared_path("meds", "pbc2", "subject_outcomes.csv"))
    landmark = datetime(2000, 1, 1) + timedelta(days=2 * 365.25)
    at_risk = outcomes.filter(pl.col("years") > 2)
    cohort = at_risk.select(
        pl.col("id").cast(pl.Int64).alias("subject_id"),
        pl.lit(landmark).cast(pl.Datetime("us")).alias("prediction_time"),
        (pl.col("age") + 2).alias("age"),
    )
    time = ((at_risk["years"] - 2) * 365.25).to_numpy()
    event = (at_risk["status"] == "dead").to_numpy()
    assert cohort.height == 278 and event.sum() == 107

    def age(train: pl.DataFrame, test: pl.DataFrame) -> tuple[NDArray[np.float64], ...]:
        return train["age"].to_numpy()[:, None], test["age"].to_numpy()[:, None]

    featurise = counts_featuriser(src, max_codes=64, max_numeric=16)
    c_counts = [cv_c_index(featurise, cohort, time, event, seed=s, alpha=0.1) for s in range(2)]
    c_age = [cv_c_index(age, cohort, time, event, seed=s, alpha=None) for s in range(2)]  # type: ignore[arg-type]
    print(f"PBC2 2-year landmark: ehr_counts C = {c_counts}, age alone C = {c_age}")
    assert min(c_counts) > max(c_age) + 0.05

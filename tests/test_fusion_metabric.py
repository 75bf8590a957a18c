"""Real data: METABRIC (DeepSurv train/test split) as two modalities for every fusion strategy.

The 4 gene-expression indicators (MKI67, EGFR, PGR, ERBB2: the first 4 columns) take the "ct"
slot and the 5 clinical covariates (hormone treatment, radiotherapy, chemotherapy, ER status,
age) the "ehr" slot; both are pooled-only features (one token each). Reference: a linear Cox
model scores Harrell's C = 0.6324 on the test split (shared/data/README.md; lifelines, sksurv and
R agree). 20% of the DeepSurv training split (seeded) is held out for early stopping.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from survfuse.features import ModalityFeatures
from survfuse.fusion import FusionSurvivalModel
from survfuse.metrics import concordance_index

LINEAR_COX_TEST_C = 0.6324

MODELS = {
    "genes_only": ("unimodal", {"modality": "ct"}),
    "clinical_only": ("unimodal", {"modality": "ehr"}),
    "concat": ("concat", {}),
    "late": ("late", {}),
    "late_stacking": ("late", {"combine": "stacking"}),
    "contrastive": ("contrastive", {}),
    "cross_attention": ("cross_attention", {}),
    "co_attention": ("co_attention", {}),
}


# tiny models: one intra-op thread is faster and immune to a busy shared CPU
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def two_views(x: np.ndarray) -> dict[str, ModalityFeatures]:
    n = x.shape[0]
    ids = np.arange(n)
    pt = np.zeros(n, "datetime64[us]")
    present = np.ones(n, bool)
    return {
        "ct": ModalityFeatures(
            ids, pt, x[:, :4].astype(np.float32), present, meta={"encoder": "genes"}
        ),
        "ehr": ModalityFeatures(
            ids, pt, x[:, 4:].astype(np.float32), present, meta={"encoder": "clinical"}
        ),
    }


@pytest.fixture(scope="module")
def h5(shared_path: Callable[..., Path]) -> Path:
    """../shared/data/tabular/deepsurv/metabric_IHC4_clinical_train_test.h5 (skip/fail if missing)."""
    return shared_path("tabular", "deepsurv", "metabric_IHC4_clinical_train_test.h5")


def load(h5: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    import h5py

    with h5py.File(h5, "r") as f:
        return {
            s: (f[s]["x"][:], f[s]["t"][:].astype(np.float64), f[s]["e"][:].astype(bool))
            for s in ("train", "test")
        }


def metabric_scores(h5: Path, names: list[str], seed: int = 0) -> dict[str, float]:
    data = load(h5)
    x, t, e = data["train"]
    rng = np.random.default_rng(seed)
    val = np.zeros(t.shape[0], bool)
    val[rng.permutation(t.shape[0])[: t.shape[0] // 5]] = True
    xt, tt, et = data["test"]
    scores = {}
    for name in names:
        strategy, params = MODELS[name]
        model = FusionSurvivalModel(
            strategy, strategy_params=params, seed=seed, max_epochs=100, patience=15, device="cpu"
        )
        model.fit(
            two_views(x[~val]), t[~val], e[~val], validation=(two_views(x[val]), t[val], e[val])
        )
        scores[name] = concordance_index(tt, et, model.predict_risk(two_views(xt))).estimate
    return scores


def check(scores: dict[str, float]) -> None:
    print({k: round(v, 4) for k, v in scores.items()}, "linear Cox", LINEAR_COX_TEST_C)
    # each view alone carries signal; the clinical view is the stronger one on METABRIC
    assert 0.53 < scores["genes_only"] < 0.68
    assert 0.55 < scores["clinical_only"] < 0.70
    # every fusion uses both views: within 0.03 of the linear Cox on all 9 covariates, or above
    for name in scores:
        if name.endswith("_only"):
            continue
        assert scores[name] > LINEAR_COX_TEST_C - 0.03, (name, scores[name])
        assert scores[name] > min(scores["genes_only"], scores["clinical_only"]), name


def test_metabric_unimodal_and_late_fusion(h5: Path) -> None:
    check(metabric_scores(h5, ["genes_only", "clinical_only", "late"]))


@pytest.mark.slow
def test_metabric_every_strategy_scores_sensibly(h5: Path) -> None:
    check(metabric_scores(h5, list(MODELS)))

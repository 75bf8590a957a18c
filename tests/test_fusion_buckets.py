"""Attention strategies without their token padding (`survfuse.fusion.buckets`).

A patient's risk must not depend on how much padding surrounds its tokens, nor on which other
patients share its bucket; training on buckets, split at each step or prepared once
(`FusionStrategy.prepare`), must give the gradient of the one padded batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from survfuse.features import ModalityFeatures
from survfuse.fusion import FusionSurvivalModel
from survfuse.fusion.base import PreparedBatch
from survfuse.fusion.batch import to_batch
from survfuse.fusion.buckets import BucketedBatch, fuse_in_buckets, take_rows, token_extent
from survfuse.fusion.synthetic import synthetic_features

ATTENTION = [
    ("cross_attention", {}),
    ("cross_attention", {"direction": "ehr->ct"}),
    ("co_attention", {}),
    ("co_attention", {"guide": "ehr"}),
]


def _pad(
    f: ModalityFeatures, slots: int, rng: np.random.Generator | None = None
) -> ModalityFeatures:
    """The same EHR with `slots` token slots: padding appended, or (rng) spread among the tokens."""
    assert f.token_codes is not None and f.mask is not None
    n, t, k = f.token_codes.shape
    codes = np.full((n, slots, k), -1, f.token_codes.dtype)
    mask = np.zeros((n, slots), bool)
    for i in range(n):
        pos = np.arange(t) if rng is None else np.sort(rng.choice(slots, t, replace=False))
        codes[i, pos], mask[i, pos] = f.token_codes[i], f.mask[i]
    return dataclasses.replace(f, token_codes=codes, mask=mask)


@pytest.fixture(scope="module")
def cohorts() -> tuple:
    kw = {"ct_tokens": 8, "ct_dim": 6, "ehr_tokens": 100, "vocab_size": 50}
    tr = synthetic_features(400, seed=0, p_missing_ct=0.1, p_missing_ehr=0.1, **kw)  # type: ignore[arg-type]
    te = synthetic_features(300, seed=1, p_missing_ct=0.1, p_missing_ehr=0.1, **kw)  # type: ignore[arg-type]
    return tr, te


@pytest.mark.parametrize(("strategy", "params"), ATTENTION)
def test_a_patients_risk_does_not_depend_on_its_padding(
    cohorts: tuple, strategy: str, params: dict
) -> None:
    tr, te = cohorts
    train = {**tr.features, "ehr": _pad(tr.features["ehr"], 256)}
    model = FusionSurvivalModel(
        strategy, strategy_params=params, seed=0, device="cpu", max_epochs=3
    )
    model.fit(train, tr.time, tr.event)
    at_100 = model.predict_risk(te.features)  # at most 100 token slots
    at_256 = model.predict_risk({**te.features, "ehr": _pad(te.features["ehr"], 256)})
    scattered = {**te.features, "ehr": _pad(te.features["ehr"], 256, np.random.default_rng(0))}
    np.testing.assert_allclose(at_256, at_100, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.predict_risk(scattered), at_100, rtol=0, atol=1e-6)
    assert np.std(at_100) > 0.01  # a model that learnt something, not a constant
    # one patient alone gets the risk it gets among 300 (no other row changes it)
    alone = {m: f.select(np.array([7])) for m, f in te.features.items()}
    np.testing.assert_allclose(model.predict_risk(alone), at_100[[7]], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("strategy", "params"), ATTENTION)
def test_buckets_give_the_padded_batchs_outputs_and_gradients(
    cohorts: tuple, strategy: str, params: dict
) -> None:
    tr, _ = cohorts
    model = FusionSurvivalModel(
        strategy, strategy_params=params, seed=0, device="cpu", max_epochs=2
    )
    model.fit(tr.features, tr.time, tr.event)
    module = model.module_
    module.eval()  # no dropout: both paths see the same function
    raw = to_batch(tr.features, modalities=module.modalities, with_tokens=True)
    batch = module.normalise(raw)
    # the batch as the estimator trains on it: normalised, bucketed and bagged once
    prepared = module.prepare(raw)
    assert isinstance(prepared, PreparedBatch) and isinstance(prepared.normalised, BucketedBatch)
    t, e = torch.as_tensor(tr.time), torch.as_tensor(tr.event)
    grads = []
    outs = []
    for fuse, b in (
        (module._fuse, batch),  # type: ignore[operator]
        (lambda b: fuse_in_buckets(module._fuse, b), batch),  # type: ignore[operator]
        (module.fuse, prepared.normalised),
    ):
        module.zero_grad()
        out = fuse(b)
        module.loss(out, t, e).backward()
        outs.append(out)
        grads.append(
            {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
        )
    padded = outs[0]
    for out, grad in zip(outs[1:], grads[1:], strict=True):
        np.testing.assert_allclose(out.risk.detach(), padded.risk.detach(), rtol=0, atol=1e-6)
        for m in padded.modality_repr:
            np.testing.assert_allclose(
                out.modality_repr[m].detach(), padded.modality_repr[m].detach(), atol=1e-5
            )
        assert grads[0].keys() == grad.keys() and len(grad) > 4
        for k in grads[0]:
            np.testing.assert_allclose(grad[k], grads[0][k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert any("codes" in k for k in grads[0])  # the bag matrices' weight gradient is checked


def test_token_extent_and_trimmed_rows() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    present = torch.tensor([True, True, True, True, False])
    m = {"mask": mask.bool(), "present": present}
    # reference: one past the last True of mask & present, row by row
    ref = [max((j + 1 for j in range(4) if mask[i, j] and present[i]), default=0) for i in range(5)]
    assert token_extent(m).tolist() == ref == [2, 0, 3, 4, 0]
    batch = {
        "ehr": {**m, "pooled": torch.arange(5.0)[:, None], "token_codes": torch.zeros(5, 4, 2)}
    }
    sub = take_rows(batch, torch.tensor([2, 0]), {"ehr": 3})
    assert sub["ehr"]["mask"].shape == (2, 3) and sub["ehr"]["token_codes"].shape == (2, 3, 2)
    assert sub["ehr"]["pooled"][:, 0].tolist() == [2.0, 0.0]
    assert sub["ehr"]["mask"].tolist() == [[True, False, True], [True, True, False]]

"""Batches prepared once (`FusionStrategy.prepare`): the same numbers as a plain batch.

The estimator prepares the batches it feeds every epoch: normalised, split into token buckets
and given each bucket's embedding-bag matrices once (`survfuse.fusion.buckets.prepare_buckets`,
`survfuse.fusion.layers.code_bags`). Each piece is checked against an independent reference:
`nn.EmbeddingBag` for the bag sums and their weight gradient, the plain batch for the whole
strategy (outputs and gradients: tests/test_fusion_buckets.py), torch's explicit softmax for
attention rows without keys.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from survfuse.fusion import FusionSurvivalModel
from survfuse.fusion.batch import mask_modalities, to_batch
from survfuse.fusion.buckets import prepare_buckets, split_buckets
from survfuse.fusion.layers import MaskedAttention, code_bags
from survfuse.fusion.synthetic import synthetic_features


def test_code_bags_give_the_embedding_bag_sums_and_weight_gradient() -> None:
    rng = np.random.default_rng(0)
    vocab = 30
    codes = torch.from_numpy(rng.integers(-1, vocab, (7, 9, 4)))
    codes[2] = -1  # a patient without tokens
    codes[3, :, 1] = codes[3, :, 0]  # codes repeated within a token count twice
    bag = torch.nn.EmbeddingBag(vocab + 1, 5, mode="sum", padding_idx=0)
    ref = bag((codes + 1).reshape(-1, 4)).reshape(7, 9, 5)
    g = torch.from_numpy(rng.normal(size=(7, 9, 5)).astype(np.float32))
    ref.backward(g)
    assert bag.weight.grad is not None
    ref_grad = bag.weight.grad.clone()
    bag.weight.grad = None
    s, st = code_bags(codes, vocab + 1)
    assert s.layout == st.layout == torch.sparse_csr
    assert s.shape == (63, vocab + 1) and st.shape == (vocab + 1, 63)
    from survfuse.fusion.layers import _BagSum

    out = _BagSum.apply(bag.weight, s, st).reshape(7, 9, 5)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    out.backward(g)
    torch.testing.assert_close(bag.weight.grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert float(bag.weight.grad[0].abs().sum()) == 0.0  # the padding row is never used


@pytest.fixture(scope="module")
def cohort() -> object:
    kw = {"ct_tokens": 8, "ct_dim": 6, "ehr_tokens": 60, "vocab_size": 40}
    return synthetic_features(300, seed=3, p_missing_ct=0.15, p_missing_ehr=0.15, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("strategy", "params"), [("cross_attention", {}), ("co_attention", {})])
def test_a_masked_copy_of_a_prepared_batch_is_prepared_afresh(
    cohort: object, strategy: str, params: dict
) -> None:
    # outputs and gradients of prepared batches: tests/test_fusion_buckets.py
    data = cohort
    model = FusionSurvivalModel(
        strategy, strategy_params=params, seed=0, device="cpu", max_epochs=2
    )
    model.fit(data.features, data.time, data.event)  # type: ignore[attr-defined]
    module = model.module_
    module.eval()
    batch = to_batch(data.features, modalities=module.modalities, with_tokens=True)  # type: ignore[attr-defined]
    prepared = module.prepare(batch)
    with torch.no_grad():
        np.testing.assert_allclose(module(prepared).risk, module(batch).risk, rtol=0, atol=1e-6)
        # masking a modality copies the batch: a plain batch again, normalised and split afresh
        masked = mask_modalities(prepared, ["ct"])
        assert type(masked) is dict
        np.testing.assert_array_equal(
            module(masked).risk, module(mask_modalities(batch, ["ct"])).risk
        )
    assert mask_modalities(prepared, []) is prepared  # nothing masked: still prepared


def test_prepared_buckets_are_the_plain_split(cohort: object) -> None:
    data = cohort
    batch = to_batch(data.features, modalities=("ct", "ehr"), with_tokens=True)  # type: ignore[attr-defined]
    parts, inverse = split_buckets(batch)
    prepared = prepare_buckets(batch, {"ehr": 41})
    assert inverse is not None and prepared.inverse is not None
    assert torch.equal(prepared.inverse, inverse) and len(prepared.parts) == len(parts) == 4
    rows = 0
    for p, q in zip(prepared.parts, parts, strict=True):
        for m in q:
            for k, v in q[m].items():
                assert torch.equal(p[m][k], v)
        assert set(p["ehr"]) - set(q["ehr"]) == {"code_bags", "code_bags_t"}
        assert "code_bags" not in p["ct"]  # dense tokens: nothing to bag
        rows += len(q["ct"]["present"])
    assert rows == 300
    assert "code_bags" not in batch["ehr"]  # the caller's batch is not changed


@pytest.mark.parametrize(("tq", "tk"), [(3, 6), (6, 3), (4, 4)])
def test_rows_without_keys_give_zero_output_and_gradient(tq: int, tk: int) -> None:
    # the fused path zeroes the values (tk <= tq) or the output (tk > tq) of rows without a key,
    # and skips both when every row has one; all must equal the explicit softmax path
    torch.manual_seed(tq * 10 + tk)
    att = MaskedAttention(8, heads=2)
    q = torch.randn(4, tq, 8, requires_grad=True)
    k = torch.randn(4, tk, 8, requires_grad=True)
    some = torch.rand(4, tk) < 0.6
    some[:, 0] = True
    for mask in (some, torch.cat([some[:2], torch.zeros(2, tk, dtype=torch.bool)])):
        grads = []
        for need_weights in (True, False):
            q.grad = k.grad = None
            out, _ = att(q, k, mask, need_weights=need_weights)
            out.pow(2).sum().backward()
            assert q.grad is not None and k.grad is not None
            grads.append((out.detach(), q.grad.clone(), k.grad.clone()))
        for explicit, fused in zip(*grads, strict=True):
            torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)
        none = ~mask.any(-1)
        out, q_grad, k_grad = grads[1]
        torch.testing.assert_close(out[none], att.o.bias.expand(int(none.sum()), tq, 8))
        assert (q_grad[none] == 0).all() and (k_grad[none] == 0).all()

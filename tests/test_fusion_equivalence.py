"""Equivalences and invariances of the fusion strategies and their building blocks (issue 9/11)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from survfuse.fusion import FusionSurvivalModel
from survfuse.fusion.batch import ModalitySpec, to_batch
from survfuse.fusion.contrastive import symmetric_info_nce
from survfuse.fusion.layers import GatedAttentionPool, MaskedAttention, ModalityEmbedding
from survfuse.fusion.synthetic import synthetic_features

DATA = synthetic_features(
    60, seed=5, ct_tokens=6, ehr_tokens=8, p_missing_ct=0.2, p_missing_ehr=0.3
)
VAL = synthetic_features(40, seed=6, ct_tokens=6, ehr_tokens=8, p_missing_ehr=0.3)


# tiny models: one intra-op thread is faster and immune to a busy shared CPU
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fitted(strategy: str, **params: object) -> FusionSurvivalModel:
    sp = {"hidden": 8, **params}
    if strategy in ("cross_attention", "co_attention"):
        sp["d_model"] = 8
    m = FusionSurvivalModel(strategy, strategy_params=sp, max_epochs=4, seed=0, device="cpu")
    return m.fit(
        DATA.features, DATA.time, DATA.event, validation=(VAL.features, VAL.time, VAL.event)
    )


def batch_of(model: FusionSurvivalModel, data=VAL):  # type: ignore[no-untyped-def]
    mod = model._module
    return to_batch(data.features, modalities=mod.modalities, with_tokens=mod.uses_tokens)


@pytest.mark.parametrize("head", ["cox", "discrete"])
def test_late_without_ehr_equals_ct_branch(head: str) -> None:
    model = FusionSurvivalModel(
        "late", head=head, strategy_params={"hidden": 8}, max_epochs=4, seed=0, device="cpu"
    ).fit(DATA.features, DATA.time, DATA.event)
    late = model._module
    with torch.no_grad():
        batch = batch_of(model)
        outs, _, _ = late.branch_outputs(late.normalise(batch))  # type: ignore[operator]
        fused = late(batch)
    no_ehr = ~VAL.features["ehr"].present
    assert no_ehr.sum() >= 5 and (VAL.features["ct"].present[no_ehr]).all()
    ct_risk = late.branch_heads["ct"].risk(outs[0])
    torch.testing.assert_close(fused.risk[no_ehr], ct_risk[no_ehr], rtol=1e-6, atol=1e-6)
    # with both present it is a strict combination, not the CT branch alone
    both = ~no_ehr
    assert not torch.allclose(fused.risk[both], ct_risk[both])
    # predict_risk agrees with the module
    np.testing.assert_allclose(
        model.predict_risk(VAL.features)[no_ehr], ct_risk[no_ehr].numpy(), rtol=1e-6
    )


def _permute_tokens(data, modality: str, seed: int):  # type: ignore[no-untyped-def]
    """Shuffle each patient's token order (tokens, codes and mask together)."""
    f = data.features[modality]
    rng = np.random.default_rng(seed)
    perm = np.stack([rng.permutation(f.num_tokens) for _ in range(len(f))])

    def take(a):
        return (
            None
            if a is None
            else np.take_along_axis(a, perm.reshape(perm.shape + (1,) * (a.ndim - 2)), axis=1)
        )

    g = replace(f, tokens=take(f.tokens), token_codes=take(f.token_codes), mask=take(f.mask))
    return {**data.features, modality: g}


@pytest.mark.parametrize("guide", ["ct", "ehr"])
def test_co_attention_invariant_to_other_token_order(guide: str) -> None:
    model = fitted("co_attention", guide=guide)
    other = "ehr" if guide == "ct" else "ct"
    shuffled = _permute_tokens(VAL, other, seed=1)
    np.testing.assert_allclose(
        model.predict_risk(shuffled), model.predict_risk(VAL.features), rtol=1e-5, atol=1e-6
    )
    # ... but not to the guide's own order being replaced by different content
    changed = {**VAL.features, other: DATA.features[other].select(np.arange(40))}
    assert not np.allclose(model.predict_risk(changed), model.predict_risk(VAL.features))


@pytest.mark.parametrize(
    ("strategy", "params"),
    [
        ("co_attention", {"guide": "ct"}),
        ("co_attention", {"guide": "ehr"}),
        ("cross_attention", {}),
    ],
)
def test_padding_tokens_never_receive_attention(strategy: str, params: dict[str, object]) -> None:
    model = fitted(strategy, **params)
    att = model.attention(VAL.features)
    mask = {m: VAL.features[m].mask & VAL.features[m].present[:, None] for m in ("ct", "ehr")}
    assert att
    for name, w in att.items():
        assert np.isfinite(w).all(), name
        if name == "coattn":
            keys = mask[model._module.other]  # type: ignore[attr-defined]
            # weight on a padding key (or a key of an absent modality) is exactly 0
            assert (w * ~keys[:, None, None, :] == 0).all()
            has = keys.any(1)
            np.testing.assert_allclose(w[has].sum(-1), 1.0, rtol=1e-5)
            assert (w[~has] == 0).all()
        elif name.startswith("attention_"):
            key_mod = name.split("->")[1]
            assert (w * ~mask[key_mod][:, None, None, :] == 0).all()
        else:  # pooling weights over a stream's tokens
            stream = name.removeprefix("pool_")
            mod = model._module
            m = {"guided": mod.guide, "guide": mod.guide, "other": mod.other}[stream]  # type: ignore[attr-defined]
            assert (w * ~mask[m] == 0).all()
    # values in padding positions do not change any prediction
    noisy = {}
    for m in ("ct", "ehr"):
        f = VAL.features[m]
        pad = ~f.mask
        tokens = (
            None if f.tokens is None else np.where(pad[..., None], 1e3, f.tokens).astype(np.float32)
        )
        codes = (
            None
            if f.token_codes is None
            else np.where(pad[..., None], 1, f.token_codes).astype(np.int32)
        )
        noisy[m] = replace(f, tokens=tokens, token_codes=codes)
    np.testing.assert_array_equal(model.predict_risk(noisy), model.predict_risk(VAL.features))


def test_fully_masked_attention_gives_zero_not_nan() -> None:
    torch.manual_seed(0)
    att = MaskedAttention(8, heads=2)
    q = torch.randn(3, 4, 8, requires_grad=True)
    k = torch.randn(3, 5, 8, requires_grad=True)
    mask = torch.tensor([[True] * 5, [False] * 5, [True, False, False, False, True]])
    out, w = att(q, k, mask)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert (w[1] == 0).all() and (w[2][..., 1:4] == 0).all()
    # a row with no key outputs the output projection of a zero vector: its bias
    torch.testing.assert_close(out[1], att.o.bias.expand(4, 8))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()  # type: ignore[arg-type]
    # agrees with torch's reference attention where some key is real
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([att.q.weight, att.k.weight, att.v.weight]))
        ref.in_proj_bias.copy_(torch.cat([att.q.bias, att.k.bias, att.v.bias]))
        ref.out_proj.weight.copy_(att.o.weight)
        ref.out_proj.bias.copy_(att.o.bias)
    r, _ = ref(q, k, k, key_padding_mask=~mask)
    torch.testing.assert_close(out[[0, 2]], r[[0, 2]], rtol=1e-5, atol=1e-6)
    pool = GatedAttentionPool(8)
    p, pw = pool(k, mask)
    assert torch.isfinite(p).all() and (p[1] == 0).all() and (pw[1] == 0).all()


def test_fused_attention_path_equals_explicit_weights_path() -> None:
    # training/prediction use torch's fused scaled_dot_product_attention (need_weights=False);
    # it must agree with the explicit softmax path, including rows without any real key
    torch.manual_seed(2)
    att = MaskedAttention(8, heads=2)
    q = torch.randn(4, 3, 8)
    k = torch.randn(4, 6, 8)
    mask = torch.tensor(
        [[True] * 6, [False] * 6, [True, False, True, False, False, True], [False] * 5 + [True]]
    )
    for training in (True, False):  # no attention-weight dropout: identical in both modes
        att.train(training)
        explicit, w = att(q, k, mask, need_weights=True)
        fused, none = att(q, k, mask, need_weights=False)
        assert w is not None and none is None
        torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused[1], att.o.bias.expand(3, 8))


def test_code_tokens_are_an_embedding_bag_sum() -> None:
    spec = ModalitySpec(pooled_dim=3, token_dim=0, vocab_size=7, num_tokens=2)
    emb = ModalityEmbedding(spec, 4)
    codes = torch.tensor([[[0, 6, -1], [-1, -1, -1]], [[2, 2, 5], [1, -1, -1]]])
    m = {
        "token_codes": codes,
        "mask": codes[..., 0] >= 0,
        "present": torch.tensor([True, True]),
        "pooled": torch.zeros(2, 3),
    }
    x, mask = emb(m)
    table = emb.codes.weight  # type: ignore[union-attr]
    raw = torch.stack([torch.stack([table[(c + 1)[c >= 0]].sum(0) for c in row]) for row in codes])
    expected = F.layer_norm(raw, (4,), emb.norm.weight, emb.norm.bias) * mask[..., None]
    torch.testing.assert_close(x, expected)
    assert mask.tolist() == [[True, False], [True, True]]


def test_info_nce_matches_clip_reference() -> None:
    torch.manual_seed(1)
    a = F.normalize(torch.randn(6, 5), dim=-1)
    b = F.normalize(torch.randn(6, 5), dim=-1)
    scale = torch.tensor(np.log(1 / 0.07))
    logits = (a @ b.T / 0.07).double().numpy()

    def ce(lg: np.ndarray) -> float:
        lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
        return float(np.mean(lse - np.diag(lg)))

    expected = 0.5 * (ce(logits) + ce(logits.T))
    assert float(symmetric_info_nce(a, b, scale)) == pytest.approx(expected, rel=1e-5)


def test_late_stacking_is_a_cox_model_on_branch_risks() -> None:
    """The stacked weights equal a lifelines Cox fit on the validation split's branch risks."""
    from lifelines import CoxPHFitter

    model = FusionSurvivalModel(
        "late",
        strategy_params={"hidden": 8, "combine": "stacking", "stack_ridge": 0.0},
        max_epochs=4,
        seed=0,
        device="cpu",
    ).fit(DATA.features, DATA.time, DATA.event, validation=(VAL.features, VAL.time, VAL.event))
    late = model._module
    assert late.pooled_scale["ehr"] != 1.0 or late.pooled_scale["ct"] != 1.0  # balance applies
    with torch.no_grad():  # the branch risks of the prediction path (normalised + balanced)
        out = late(batch_of(model))
        outs, present = out.extras["branch_out"], out.extras["present"]
    x = ((outs[..., 0] - late.stack_mu[:, :1]) * present).T.numpy()  # type: ignore[index]
    import pandas as pd

    df = pd.DataFrame({"ct": x[:, 0], "ehr": x[:, 1], "T": VAL.time, "E": VAL.event.astype(int)})
    ref = CoxPHFitter().fit(df, "T", "E").params_.to_numpy()
    np.testing.assert_allclose(late.stack_beta.numpy(), ref, rtol=2e-3, atol=2e-3)  # type: ignore[union-attr]


def test_gradient_norms_logged_and_ogm_ge_damps_the_dominant_modality() -> None:
    # CT carries all the signal: OGM-GE must damp CT (coefficient < 1), never EHR
    strong_ct = synthetic_features(200, seed=7, w_ct=2.0, w_ehr=0.0, ct_tokens=4, ehr_tokens=4)
    kw = {"strategy_params": {"hidden": 8}, "max_epochs": 15, "seed": 0, "device": "cpu"}
    base = FusionSurvivalModel("concat", **kw).fit(
        strong_ct.features, strong_ct.time, strong_ct.event
    )  # type: ignore[arg-type]
    for h in base.history_:
        assert h["grad_norm_ct"] > 0 and h["grad_norm_ehr"] > 0
        assert h["grad_ratio"] == pytest.approx(h["grad_norm_ct"] / h["grad_norm_ehr"])
        assert "ogm_coef_ct" not in h
    ogm = FusionSurvivalModel("concat", rebalance="ogm_ge", **kw).fit(  # type: ignore[arg-type]
        strong_ct.features, strong_ct.time, strong_ct.event
    )
    late_epochs = ogm.history_[5:]
    coef_ct = np.mean([h["ogm_coef_ct"] for h in late_epochs])
    coef_ehr = np.mean([h["ogm_coef_ehr"] for h in late_epochs])
    assert coef_ehr == 1.0 and coef_ct < 0.95
    assert all(0 < h["ogm_coef_ct"] <= 1 for h in ogm.history_)


def test_modality_dropout_only_drops_one_of_two_present_modalities() -> None:
    from survfuse.fusion.batch import drop_modalities

    batch = to_batch(DATA.features, modalities=("ct", "ehr"), with_tokens=True)
    dropped = drop_modalities(batch, 0.5, torch.Generator().manual_seed(0))
    before = torch.stack([batch[m]["present"] for m in ("ct", "ehr")])
    after = torch.stack([dropped[m]["present"] for m in ("ct", "ehr")])
    assert (after <= before).all()
    # nobody loses a modality they had alone, and nobody loses both
    assert (after.any(0) == before.any(0)).all()
    lost = (before & ~after).any(0)
    assert 0 < int(lost.sum()) < int(before.all(0).sum())
    for m in ("ct", "ehr"):
        assert not (dropped[m]["mask"] & ~dropped[m]["present"][:, None]).any()
    assert drop_modalities(batch, 0.0, torch.Generator()) is batch


def test_token_code_beyond_vocabulary_is_a_clear_error() -> None:
    ehr = DATA.features["ehr"]
    codes = np.array(ehr.token_codes, copy=True)
    codes[3, 0, 0] = ehr.vocab_size
    bad = {**DATA.features, "ehr": replace(ehr, token_codes=codes)}
    with pytest.raises(ValueError, match=r"modality 'ehr': token code 20 >= meta\['vocab_size'\]"):
        FusionSurvivalModel("co_attention", max_epochs=1, device="cpu").fit(
            bad, DATA.time, DATA.event
        )

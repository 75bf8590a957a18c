"""Synthetic two-modality `ModalityFeatures` with a known log-hazard, for tests and benchmarks.

CT: dense tokens [N, T_ct, D] (patch-like, a few tokens carry the CT signal), pooled = token
mean. EHR: sparse `token_codes` [N, T_ehr, K] over a vocabulary (-1 padding, variable length),
where the frequency of "risk codes" follows the EHR signal; pooled = code counts [N, V] / T.
True log-hazard = w_ct * z_ct + w_ehr * z_ehr + interaction * z_ct * z_ehr; exponential times
with independent exponential censoring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from survfuse.features import ModalityFeatures


@dataclass
class SyntheticFusionData:
    """A synthetic two-modality data set: features, outcome and the true log hazard."""

    features: dict[str, ModalityFeatures]
    time: NDArray[np.float64]
    event: NDArray[np.bool_]
    log_hazard: NDArray[np.float64]


def synthetic_features(
    n: int,
    *,
    seed: int,
    ct_tokens: int = 8,
    ct_dim: int = 6,
    ehr_tokens: int = 12,
    codes_per_token: int = 3,
    vocab_size: int = 20,
    w_ct: float = 1.0,
    w_ehr: float = 1.0,
    interaction: float = 0.0,
    p_missing_ct: float = 0.0,
    p_missing_ehr: float = 0.0,
    censoring: float = 0.3,
) -> SyntheticFusionData:
    """Generate `n` patients (deterministic for `seed`); see the module docstring."""
    rng = np.random.default_rng(seed)
    z_ct = rng.standard_normal(n)
    z_ehr = rng.standard_normal(n)
    ids = np.arange(n, dtype=np.int64)
    pt = np.full(n, np.datetime64("2020-01-01T00:00:00", "us"))

    present_ct = rng.random(n) >= p_missing_ct
    tokens = rng.standard_normal((n, ct_tokens, ct_dim)).astype(np.float32)
    signal_tokens = max(1, ct_tokens // 4)
    tokens[:, :signal_tokens, 0] += 1.5 * z_ct[:, None].astype(np.float32)
    ct_mask = np.ones((n, ct_tokens), dtype=bool)
    tokens[~present_ct] = 0
    ct_mask[~present_ct] = False
    ct = ModalityFeatures(
        subject_id=ids,
        prediction_time=pt,
        pooled=np.where(present_ct[:, None], tokens.mean(1), 0).astype(np.float32),
        present=present_ct,
        tokens=tokens,
        mask=ct_mask,
        meta={"encoder": "synthetic_ct"},
    )

    present_ehr = rng.random(n) >= p_missing_ehr
    lengths = rng.integers(max(1, ehr_tokens // 3), ehr_tokens + 1, size=n)
    ehr_mask = np.arange(ehr_tokens)[None, :] < lengths[:, None]
    ehr_mask[~present_ehr] = False
    # risk codes 0..3 appear with probability rising with z_ehr; others uniform
    p_risk = 1.0 / (1.0 + np.exp(-1.5 * z_ehr))
    codes = rng.integers(4, vocab_size, size=(n, ehr_tokens, codes_per_token))
    is_risk = rng.random((n, ehr_tokens)) < p_risk[:, None] * 0.8
    codes[:, :, 0] = np.where(is_risk, rng.integers(0, 4, size=(n, ehr_tokens)), codes[:, :, 0])
    drop = rng.random((n, ehr_tokens, codes_per_token)) < 0.3
    drop[:, :, 0] = False
    codes[drop] = -1
    codes[~ehr_mask] = -1
    counts = np.zeros((n, vocab_size), dtype=np.float32)
    rows = np.repeat(np.arange(n), ehr_tokens * codes_per_token)
    flat = codes.reshape(-1)
    keep = flat >= 0
    np.add.at(counts, (rows[keep], flat[keep]), 1.0)
    counts /= np.maximum(ehr_mask.sum(1, keepdims=True), 1)
    ehr = ModalityFeatures(
        subject_id=ids,
        prediction_time=pt,
        pooled=counts,
        present=present_ehr,
        token_codes=codes.astype(np.int32),
        mask=ehr_mask,
        meta={"encoder": "synthetic_ehr", "vocab_size": vocab_size},
    )

    log_h = w_ct * z_ct + w_ehr * z_ehr + interaction * z_ct * z_ehr
    t_event = rng.exponential(1.0, n) * 365.0 / np.exp(log_h)
    t_cens = rng.exponential(1.0 / max(censoring, 1e-9), n) * 365.0
    time = np.minimum(t_event, t_cens)
    event = t_event <= t_cens
    return SyntheticFusionData({"ct": ct, "ehr": ehr}, time, event, log_h)

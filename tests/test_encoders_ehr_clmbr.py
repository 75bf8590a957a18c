"""ehr_clmbr pretraining on the simulator (sim_small fixture): perplexity, resume, MOTOR task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from survfuse.data.meds import MEDSDataset
from survfuse.data.splits import attach_splits, make_splits
from survfuse.encoders.clmbr_model import motor_targets, unigram_perplexity
from survfuse.encoders.ehr_clmbr import EHRCLMBREncoder

FAST = dict(
    d_model=32,
    n_layers=1,
    n_heads=2,
    max_len=64,
    batch_size=32,
    lr=1e-2,
    progress=False,
    device="cpu",
    num_threads=1,
)


@pytest.fixture(scope="module")
def sim(sim_small: Path) -> tuple[MEDSDataset, pl.DataFrame, pl.DataFrame]:
    cohort = pl.read_parquet(sim_small / "cohort.parquet")
    cohort = attach_splits(cohort, make_splits(cohort, external_sites=["C"], seed=0))
    return (
        MEDSDataset(sim_small / "meds"),
        cohort.filter(pl.col("split") == "train"),
        cohort.filter(pl.col("split") == "internal_test"),
    )


def test_pretraining_beats_unigram(sim: tuple[MEDSDataset, pl.DataFrame, pl.DataFrame]) -> None:
    src, train, test = sim
    enc = EHRCLMBREncoder(epochs=2, **FAST).fit(train, src)
    last = enc.history[-1]
    ppl, uni = last["val_perplexity"], last["unigram_perplexity"]
    print(f"sim_small CLMBR: validation perplexity {ppl:.1f}, unigram {uni:.1f}")
    assert enc.history[0]["val_perplexity"] > ppl  # it keeps learning
    assert ppl < 0.6 * uni
    # held-out (internal test) subjects: also well below the training unigram model
    assert enc.validation_perplexity(test, src) < 0.6 * uni
    f = enc.encode(test, src)
    assert f.pooled.shape == (test.height, 32) and f.tokens.shape == (test.height, 32, 32)
    # pooled = the hidden state of the last event = the last real token
    last_tok = f.tokens[np.arange(len(f)), f.mask.sum(1) - 1]
    np.testing.assert_array_equal(f.pooled[f.present], last_tok[f.present])
    # deterministic on CPU for a seed
    again = EHRCLMBREncoder(epochs=2, **FAST).fit(train, src)
    assert again.fingerprint() == enc.fingerprint()


def test_checkpoint_resume_equals_straight_run(
    sim: tuple[MEDSDataset, pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    src, train, _ = sim
    train = train.head(60)
    straight = EHRCLMBREncoder(epochs=2, **FAST).fit(train, src)
    ck = tmp_path / "ck"
    EHRCLMBREncoder(epochs=1, checkpoint_dir=str(ck), **FAST).fit(train, src)
    assert (ck / "checkpoint.safetensors").exists() and (ck / "trainer.json").exists()
    resumed = EHRCLMBREncoder(epochs=2, checkpoint_dir=str(ck), **FAST).fit(train, src)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for k, v in straight.state().items():
        if v.dtype.kind == "f":
            np.testing.assert_allclose(resumed.state()[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(resumed.state()[k], v, err_msg=k)


def test_motor_targets_by_hand_and_training(
    sim: tuple[MEDSDataset, pl.DataFrame, pl.DataFrame],
) -> None:
    ids = np.array([[3, 1, 2, 1, 0]])
    days = np.array([[0.0, 1.0, 1.0, 5.0, 0.0]])
    mask = np.array([[True, True, True, True, False]])
    t, ev = motor_targets(ids, days, mask, n_codes=2)
    # code 1 next occurs at day 1 (from position 0) and day 5 (positions 1, 2); code 2 at day 1
    assert t[0, :4, 0].tolist() == [1.0, 4.0, 4.0, 0.0]
    assert ev[0, :4, 0].tolist() == [True, True, True, False]  # censored at the last event
    assert t[0, :4, 1].tolist() == [1.0, 0.0, 4.0, 0.0]
    assert ev[0, :4, 1].tolist() == [True, True, False, False]
    assert unigram_perplexity([np.array([0, 1, 1])], [np.array([0, 1])], 2) == pytest.approx(
        1 / (3 / 4)
    )
    src, train, _ = sim
    enc = EHRCLMBREncoder(epochs=1, motor_weight=0.5, motor_codes=8, position="time", **FAST)
    enc.fit(train.head(60), src)
    assert enc.model is not None and enc.model.motor is not None
    assert np.isfinite(enc.history[0]["train_loss"])
    assert torch.isfinite(next(enc.model.parameters())).all()


def test_device_through_the_shared_resolver() -> None:
    # survfuse.device.resolve_device: did-you-mean for a misspelt name, clear no-CUDA error
    assert EHRCLMBREncoder(device="cpu").device == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda"):
        _ = EHRCLMBREncoder(device="cdua").device
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            _ = EHRCLMBREncoder(device="cuda").device

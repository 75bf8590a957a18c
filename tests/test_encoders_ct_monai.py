"""ct_monai: the CT-FM and Merlin architectures (random weights saved by the test, loaded strict)
encode the real TotalSegmentator CT volumes at a reduced input size."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from survfuse.encoders import CTSource, FeatureStore, build_encoder
from survfuse.encoders.ct_monai import PRESETS, CheckpointError, _build_network
from survfuse.encoders.fm_transforms import FMPreprocessing, load_fm

T0 = dt.datetime(2020, 1, 1)
FILES = [
    "example_ct_sm.nii.gz",
    "pulmonary_report__models__ct_cropped.nii.gz",
    "example_mr_sm.nii.gz",
]


@pytest.fixture(scope="module")
def source(shared_path: Callable[..., Path]) -> CTSource:
    """The real volumes in ../shared/data/ct/totalsegmentator (skip, or fail in CI, if missing)."""
    return CTSource(
        pl.DataFrame(
            {
                "subject_id": [1, 2, 3],
                "study_time": [T0] * 3,
                "path": [str(shared_path("ct", "totalsegmentator", f)) for f in FILES],
            }
        )
    )


def cohort() -> pl.DataFrame:
    return pl.DataFrame({"subject_id": [1, 2, 3], "prediction_time": [T0] * 3})


def random_checkpoint(preset: str, path: Path, **args: object) -> dict[str, torch.Tensor]:
    """Random weights of the preset's full architecture, saved as the published file would be."""
    p = PRESETS[preset]
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):  # skip the slow default init: fill He-normal weights directly
        net = _build_network(p.network, {**p.network_args, **args})
    net.to_empty(device="cpu")
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        with torch.no_grad():
            if name.endswith("num_batches_tracked"):
                t.zero_()
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5, generator=gen)
            elif t.ndim > 1:  # conv kernels: He normal
                t.normal_(0.0, (2.0 / t[0].numel()) ** 0.5, generator=gen)
            elif name.endswith("weight"):  # norm scales
                t.uniform_(0.8, 1.2, generator=gen)
            else:  # biases, running means
                t.uniform_(-0.1, 0.1, generator=gen)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:  # Merlin: the whole CLIP model's state dict; the image tower sits under encode_image.
        full = {f"encode_image.{k}": v for k, v in state.items()}
        full["logit_scale"] = torch.ones(())
        full["encode_text.linear_layer.weight"] = torch.zeros(512, 768)
        torch.save(full, str(path))
    return state


def test_ct_fm_architecture_encodes_real_ct(tmp_path: Path, source: CTSource) -> None:
    ckpt = tmp_path / "model.safetensors"
    state = random_checkpoint("ct-fm", ckpt)
    assert len(state) > 100
    # the model card's pipeline at native resolution; tile=64 makes the 1st volume (SPL
    # 30 x 101 x 122) and the 2nd (112 x 102 x 122) run in tiles
    enc = build_encoder(
        "ct_monai", preset="ct-fm", checkpoint=str(ckpt), tile=[64] * 3, device="cpu"
    )
    net = enc.network()
    loaded = net.state_dict()  # strict load put the file's tensors in place
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    f = FeatureStore(tmp_path / "store").encode(enc, cohort(), source, progress=False)
    np.testing.assert_array_equal(f.present, [True, True, False])  # the MR is refused
    assert f.pooled.shape == (3, 512) and f.tokens is not None
    # deepest maps 2x7x8 and 7x7x8 -> token grids 2x4x4 and 4x4x4 (never upsampled)
    assert f.tokens.shape == (3, 64, 512) and f.mask is not None
    np.testing.assert_array_equal(f.mask.sum(1), [32, 64, 0])
    assert f.meta["pipeline"] == "ct-fm" and f.meta["published_pipeline"]
    tok, pooled = np.asarray(f.tokens), np.asarray(f.pooled)
    assert np.isfinite(tok).all() and not np.allclose(pooled[0], pooled[1])
    # the tiled pass is the model card's whole-volume pass `model(x)[-1]` (full-size network)
    vol = load_fm(source.index["path"][0], FMPreprocessing(pipeline="ct-fm"))
    with torch.inference_mode():
        whole = net(torch.from_numpy(vol.array)[None, None])[-1].mean(dim=(2, 3, 4))[0]
    np.testing.assert_allclose(pooled[0], whole.numpy(), rtol=1e-4, atol=1e-6)


def test_merlin_architecture_encodes_real_ct(tmp_path: Path, source: CTSource) -> None:
    ckpt = tmp_path / "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt"
    state = random_checkpoint("merlin", ckpt)
    # the published module names of Merlin's image encoder
    assert "i3_resnet.layer3.35.conv2.weight" in state
    assert state["i3_resnet.conv1.weight"].shape == (64, 3, 3, 7, 7)
    assert state["i3_resnet.contrastive_head.weight"].shape == (512, 2048, 1, 1, 1)
    assert state["i3_resnet.classifier.weight"].shape == (1692, 2048, 1, 1, 1)
    enc = build_encoder(
        "ct_monai",
        preset="merlin",
        checkpoint=str(ckpt),
        preprocessing={"spatial_size": [64, 64, 32]},  # reduced from 224x224x160
        token_grid=[1, 2, 2],
        device="cpu",
    )
    f = FeatureStore(tmp_path / "store").encode(enc, cohort(), source, progress=False)
    np.testing.assert_array_equal(f.present, [True, True, False])
    assert f.pooled.shape == (3, 2048) and f.tokens is not None
    # [1, 3, Z=32, X=64, Y=64] -> layer4 map 1 x 2 x 2 (strides 2,2,2,2 in Z; 32 in-plane)
    assert f.tokens.shape == (3, 4, 2048)
    assert np.isfinite(np.asarray(f.tokens)).all()
    assert f.meta["pipeline"] == "merlin" and not f.meta["published_pipeline"]


def test_checkpoint_errors_name_the_file_and_where_it_is_published(tmp_path: Path) -> None:
    enc = build_encoder("ct_monai", preset="ct-fm", checkpoint=str(tmp_path / "missing.st"))
    with pytest.raises(CheckpointError, match="project-lighter/ct_fm_feature_extractor"):
        enc.network()
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        build_encoder("ct_monai", preset="ct-fm").network()
    # a CT-FM file given to the Merlin preset: mismatched keys
    small = tmp_path / "small.safetensors"
    save_file({"conv_init.weight": torch.zeros(2, 1, 3, 3, 3)}, str(small))
    merlin = build_encoder("ct_monai", preset="merlin", checkpoint=str(small))
    with pytest.raises(CheckpointError, match=r"does not match.*stanfordmimi/Merlin"):
        merlin.network()
    with pytest.raises(ValueError, match="did you mean 'merlin'"):
        build_encoder("ct_monai", preset="merlinn")


def test_generic_preset_any_monai_network(tmp_path: Path, source: CTSource) -> None:
    from monai.networks.nets import BasicUNet

    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "features": [4, 4, 8, 8, 16, 4]}
    torch.manual_seed(1)
    ckpt = tmp_path / "unet.pt"
    torch.save(BasicUNet(**args).state_dict(), str(ckpt))  # type: ignore[arg-type]
    enc = build_encoder(
        "ct_monai",
        preset="generic",
        network="BasicUNet",
        network_args=args,
        checkpoint=str(ckpt),
        preprocessing={"hu_window": [-1000, 1000], "scale_to_unit": True, "target_shape": [32] * 3},
        token_grid=[2, 2, 2],
    )
    f = enc.encode(cohort().head(2), source)
    assert f.pooled.shape == (2, 3) and f.tokens is not None and f.tokens.shape == (2, 8, 3)
    only_mr = enc.encode(cohort()[2:], source)  # no CT loads: the output size is still known
    assert only_mr.pooled.shape == (1, 3) and not only_mr.present.any()
    a = build_encoder("ct_monai", preset="generic", network="BasicUNet", checkpoint=str(ckpt))
    b = build_encoder(
        "ct_monai",
        preset="generic",
        network="BasicUNet",
        checkpoint=str(ckpt),
        preprocessing={"hu_window": [-1000, 999]},
    )
    assert a.fingerprint() != b.fingerprint()
    with pytest.raises(ValueError, match="did you mean 'BasicUNet'"):
        build_encoder(
            "ct_monai", preset="generic", network="BasicUNett", checkpoint=str(ckpt)
        ).network()

"""Foundation-model presets against their published sources.

- Preprocessing: each `ct_monai` FM pipeline gives, on the real TotalSegmentator CTs, the tensor
  of the published chain written out here from the upstream files with MONAI (max |diff| == 0).
- Weights: a state dict built from the published module definitions (copied below, not
  survfuse's model) loads into the preset with strict=True.
- Inference: the tiled CT-FM pass equals the whole-volume pass; the patch embedding equals the
  CT-FM script's DataLoader loop.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from survfuse.encoders import CTSource, build_encoder
from survfuse.encoders.fm_inference import patch_embeddings, segres_deepest_tiled
from survfuse.encoders.fm_transforms import FMPreprocessing, load_fm

mt = pytest.importorskip("monai.transforms")
CTS = [
    "example_ct_sm.nii.gz",  # 122 x 101 x 30, 3 mm, RAS
    "example_ct.nii.gz",  # 122 x 101 x 112, 3 mm, int32
    "pulmonary_report__models__ct_cropped.nii.gz",  # 122 x 102 x 112, 1.5 mm, LPS
    "example_ct_dicom",  # DICOM series, 512 x 512 x 20, 0.98 x 0.98 x 2 mm
]


def _published(pipeline: str) -> Callable[[str], np.ndarray[Any, Any]]:
    """The published chain, loading included, exactly as its source writes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if pipeline == "merlin":
            # StanfordMIMI/Merlin merlin/data/monai_transforms.py (ImageTransforms)
            chain = mt.Compose(
                [
                    mt.LoadImaged(keys=["image"]),
                    mt.EnsureChannelFirstd(keys=["image"]),
                    mt.Orientationd(keys=["image"], axcodes="RAS"),
                    mt.Spacingd(keys=["image"], pixdim=(1.5, 1.5, 3), mode=("bilinear")),
                    mt.ScaleIntensityRanged(
                        keys=["image"], a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True
                    ),
                    mt.SpatialPadd(keys=["image"], spatial_size=[224, 224, 160]),
                    mt.CenterSpatialCropd(roi_size=[224, 224, 160], keys=["image"]),
                    mt.ToTensord(keys=["image"]),
                ]
            )
            return lambda p: np.asarray(chain({"image": p})["image"])
        if pipeline == "ct-fm":
            # project-lighter/ct_fm_feature_extractor model card (README, "preprocess")
            card = mt.Compose(
                [
                    mt.LoadImage(ensure_channel_first=True),
                    mt.EnsureType(),
                    mt.Orientation(axcodes="SPL"),
                    mt.ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True),
                    mt.CropForeground(),
                ]
            )
            return lambda p: np.asarray(card(p))
        # project-lighter/CT-FM scripts/feature_extractor.py (TRANSFORMS)
        scripts = mt.Compose(
            [
                mt.LoadImaged(keys=["image"], ensure_channel_first=True),
                mt.EnsureTyped(keys=["image"]),
                mt.Orientationd(keys=["image"], axcodes="SPL"),
                mt.Spacingd(keys=["image"], pixdim=[3, 1, 1], mode="bilinear"),
                mt.CropForegroundd(keys=["image"], source_key="image"),
                mt.ScaleIntensityRanged(
                    keys="image", a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True
                ),
                mt.Lambda(func=lambda x: x["image"].as_tensor()),
            ]
        )
        return lambda p: np.asarray(scripts({"image": p}))


@pytest.mark.parametrize("pipeline", ["merlin", "ct-fm", "ct-fm-patches"])
def test_fm_preprocessing_is_the_published_chain(
    pipeline: str, shared_path: Callable[..., Path]
) -> None:
    """max |survfuse - published| == 0 on every real CT (NIfTI, and the DICOM series, which
    survfuse assembles itself and MONAI reads with its DICOM reader)."""
    ref = _published(pipeline)
    prep = FMPreprocessing(pipeline=pipeline)
    assert prep.published
    for name in CTS:
        path = str(shared_path("ct", "totalsegmentator", name))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = ref(path)[0]
        got = load_fm(path, prep)
        assert got.array.shape == want.shape, name
        assert got.array.dtype == want.dtype == np.float32
        assert float(np.abs(got.array - want).max()) == 0.0, name
    if pipeline == "merlin":
        assert got.array.shape == (224, 224, 160)


def test_fm_pipeline_overrides_are_named_and_checked() -> None:
    merlin = FMPreprocessing(pipeline="merlin", spatial_size=(64, 64, 32))
    assert merlin.pixdim == (1.5, 1.5, 3.0) and not merlin.published
    with pytest.raises(ValueError, match="'ct-fm' has no parameter 'pixdim'"):
        FMPreprocessing(pipeline="ct-fm", pixdim=(1, 1, 1))
    with pytest.raises(ValueError, match="did you mean 'ct-fm-patches'"):
        FMPreprocessing(pipeline="ct-fm-patchs")
    with pytest.raises(ValueError, match="extra"):
        FMPreprocessing(pipeline="merlin", target_shape=(1, 2, 3))  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="'ct-fm-patches' has no parameter 'spatial_size'"):
        build_encoder("ct_monai", preset="ct-fm-patches", preprocessing={"spatial_size": [8] * 3})
    with pytest.raises(ValueError, match="preset='generic'"):
        build_encoder("ct_monai", preset="ct-fm", network="BasicUNet")


def test_missing_monai_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "monai", None)  # `import monai` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'survfuse\[imaging\]'"):
        load_fm("ct.nii.gz", FMPreprocessing(pipeline="merlin"))
    enc: Any = build_encoder("ct_monai", preset="ct-fm", checkpoint="model.safetensors")
    with pytest.raises(ImportError, match="ct_monai needs MONAI"):
        enc.network()


def test_fm_encoder_config_rebuilds_the_same_encoder(tmp_path: Path) -> None:
    """Saved and reloaded (as `Encoder.load` and the Ray actors do): same config, fingerprint."""
    from survfuse.encoders import Encoder

    enc = build_encoder(
        "ct_monai", preset="ct-fm-patches", preprocessing={"pixdim": [3, 3, 3]}, token_grid=None
    )
    again = Encoder.load(enc.save(tmp_path / "enc"))
    assert again.config() == enc.config() and again.fingerprint() == enc.fingerprint()
    assert enc.config()["preprocessing"]["pipeline"] == "ct-fm-patches"
    with pytest.raises(ValueError, match="runs pipeline 'merlin'"):
        build_encoder("ct_monai", preset="merlin", preprocessing={"pipeline": "ct-fm"})


# ----------------------------------------------------------------------------- published modules
# Merlin: torchvision's ResNet-152 key structure (the 2-D model Merlin inflates;
# merlin/models/build.py: torchvision.models.resnet152) and Merlin's inflation
# (merlin/models/i3res.py, merlin/models/inflate.py), copied module for module.
class _Bottleneck2d(nn.Module):  # torchvision.models.resnet.Bottleneck
    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride


class _ResNet2d(nn.Module):  # torchvision.models.resnet.ResNet(Bottleneck, [3, 8, 36, 3])
    def __init__(self) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 3, 1)
        self.layer2 = self._make_layer(128, 8, 2)
        self.layer3 = self._make_layer(256, 36, 2)
        self.layer4 = self._make_layer(512, 3, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, 1000)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
        layers = [_Bottleneck2d(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [_Bottleneck2d(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


def _inflate_conv(conv2d: nn.Conv2d, time_dim: int = 3, time_padding: int = 0,
                  time_stride: int = 1) -> nn.Conv3d:  # fmt: skip
    """merlin/models/inflate.py::inflate_conv (center=True)."""
    k = conv2d.kernel_size
    if k[0] == 7:
        kernel, padding, stride = (3, 7, 7), (1, 3, 3), (1, 2, 2)
    else:
        kernel = (time_dim, k[0], k[1])
        padding = (time_padding, int(conv2d.padding[0]), int(conv2d.padding[1]))  # type: ignore[index]
        stride = (time_stride, conv2d.stride[0], conv2d.stride[0])
    conv3d = nn.Conv3d(conv2d.in_channels, conv2d.out_channels, kernel, padding=padding,
                       stride=stride)  # fmt: skip
    w = torch.zeros(*conv2d.weight.shape).unsqueeze(2).repeat(1, 1, kernel[0], 1, 1)
    w[:, :, kernel[0] // 2] = conv2d.weight.data
    conv3d.weight = nn.Parameter(w)
    conv3d.bias = conv2d.bias  # type: ignore[assignment]  # None: the key disappears
    return conv3d


class _Bottleneck3d(nn.Module):  # merlin/models/i3res.py::Bottleneck3d
    def __init__(self, b: _Bottleneck2d) -> None:
        super().__init__()
        s = b.conv2.stride[0]
        self.conv1 = _inflate_conv(b.conv1, time_dim=1)
        self.bn1 = b.bn1  # inflate_batch_norm returns the 2-d module itself
        self.conv2 = _inflate_conv(b.conv2, time_dim=3, time_padding=1, time_stride=s)
        self.bn2 = b.bn2
        self.conv3 = _inflate_conv(b.conv3, time_dim=1)
        self.bn3 = b.bn3
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if b.downsample is not None:  # inflate_downsample
            conv, bn = b.downsample[0], b.downsample[1]  # type: ignore[index]
            self.downsample = nn.Sequential(_inflate_conv(conv, time_dim=1, time_stride=s), bn)


class _I3ResNet(nn.Module):  # merlin/models/i3res.py::I3ResNet(conv_class=True, class_nb=1692)
    def __init__(self, r: _ResNet2d) -> None:
        super().__init__()
        self.conv1 = _inflate_conv(r.conv1, time_dim=3, time_padding=1)
        self.bn1 = r.bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d((3, 3, 3), padding=(1, 1, 1), stride=(2, 2, 2))
        self.layer1 = nn.Sequential(*[_Bottleneck3d(b) for b in r.layer1])  # type: ignore[arg-type]
        self.layer2 = nn.Sequential(*[_Bottleneck3d(b) for b in r.layer2])  # type: ignore[arg-type]
        self.layer3 = nn.Sequential(*[_Bottleneck3d(b) for b in r.layer3])  # type: ignore[arg-type]
        self.layer4 = nn.Sequential(*[_Bottleneck3d(b) for b in r.layer4])  # type: ignore[arg-type]
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.classifier = nn.Conv3d(2048, 1692, (1, 1, 1), bias=True)
        self.contrastive_head = nn.Conv3d(2048, 512, (1, 1, 1), bias=True)


class _MerlinArchitecture(nn.Module):  # merlin/models/build.py (text tower: its linear head only)
    def __init__(self) -> None:
        super().__init__()
        self.encode_image = nn.Module()
        self.encode_image.i3_resnet = _I3ResNet(_ResNet2d())
        self.encode_text = nn.Module()
        self.encode_text.linear_layer = nn.Linear(768, 512)
        self.logit_scale = nn.Parameter(torch.ones([]))


def _random_state(make: Callable[[], nn.Module], seed: int) -> dict[str, torch.Tensor]:
    """The module's state dict (names, shapes, order) filled with seeded random values."""
    with torch.device("meta"):
        net = make()
    net.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in net.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros_like(t)
        elif name.endswith("running_var"):
            state[name] = torch.empty_like(t).uniform_(0.5, 1.5, generator=gen)
        elif t.ndim > 1:
            state[name] = torch.empty_like(t).normal_(0, (2.0 / t[0].numel()) ** 0.5, generator=gen)
        else:
            state[name] = torch.empty_like(t).uniform_(-0.1, 0.1, generator=gen)
    return state


def test_merlin_published_state_dict_loads_strict(tmp_path: Path) -> None:
    state = _random_state(_MerlinArchitecture, 0)
    image = [k for k in state if k.startswith("encode_image.")]
    assert len(image) == 934  # the published image encoder: 934 tensors
    ckpt = tmp_path / "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt"
    torch.save(state, str(ckpt))
    enc: Any = build_encoder("ct_monai", preset="merlin", checkpoint=str(ckpt), device="cpu")
    own = enc.network().state_dict()  # load_state_dict(strict=True) passed
    assert list(own) == [k.removeprefix("encode_image.") for k in image]  # names and order
    for k in image:
        assert torch.equal(own[k.removeprefix("encode_image.")], state[k])


def _ctfm_config() -> dict[str, Any]:
    """project-lighter/ct_fm_feature_extractor config.json; lighter_zoo.SegResEncoder is
    MONAI's SegResEncoder with the Hugging Face mixin."""
    return {"blocks_down": [1, 2, 2, 4, 4], "in_channels": 1, "init_filters": 32, "spatial_dims": 3}


@pytest.mark.parametrize("preset", ["ct-fm", "ct-fm-patches"])
def test_ctfm_published_state_dict_loads_strict(preset: str, tmp_path: Path) -> None:
    from monai.networks.nets.segresnet_ds import SegResEncoder

    state = _random_state(lambda: SegResEncoder(**_ctfm_config()), 1)
    ckpt = tmp_path / "model.safetensors"
    save_file(state, str(ckpt))
    enc: Any = build_encoder("ct_monai", preset=preset, checkpoint=str(ckpt), device="cpu")
    own = enc.network().state_dict()
    assert list(own) == list(state)
    assert all(torch.equal(own[k], state[k]) for k in state)


# ----------------------------------------------------------------------------- inference
def _small_segres(seed: int) -> nn.Module:
    from monai.networks.nets.segresnet_ds import SegResEncoder

    torch.manual_seed(seed)
    net = SegResEncoder(spatial_dims=3, in_channels=1, init_filters=4, blocks_down=(1, 2, 2, 4, 4))
    for m in net.modules():  # non-trivial eval statistics
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_tiled_pass_equals_whole_volume_pass() -> None:
    net = _small_segres(0)
    x = torch.rand(1, 1, 45, 52, 37, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = net(x)[-1]
    # 2 x 2 x 2 crops (the far ones clipped by the volume), and 1 x 1 x 5 thin ones
    for tile in ([24, 28, 20], [64, 200, 8]):
        tiled = segres_deepest_tiled(net, x, tile)
        assert tiled.shape == whole.shape == (1, 64, 3, 4, 3)
        torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)


def test_patch_embeddings_equal_the_ctfm_script_loop() -> None:
    """scripts/feature_extractor.py: SlidingWindowSplitter + DataLoader(batch_size=32) +
    head_module = adaptive_avg_pool3d(x[-1], 1).flatten(1)."""
    from monai.inferers import SlidingWindowSplitter

    net = _small_segres(2)
    img = torch.rand(1, 50, 70, 40, generator=torch.Generator().manual_seed(3))  # [C, S, P, L]
    patch = (24, 32, 32)

    class IterableDataset(torch.utils.data.IterableDataset):  # scripts/utils.py
        def __init__(self, generator: Any) -> None:
            self.generator = generator

        def __iter__(self) -> Any:
            return self.generator

    loader = torch.utils.data.DataLoader(
        IterableDataset(SlidingWindowSplitter(patch, 0.0)(img.unsqueeze(0))), batch_size=32
    )
    features = []
    with torch.no_grad():
        for batch, _ in loader:
            out = net(batch.squeeze(1))
            features.extend(torch.nn.functional.adaptive_avg_pool3d(out[-1], 1).flatten(1))
    want = torch.stack(features)  # [P, C] in the splitter's order
    got = patch_embeddings(net, img.unsqueeze(0), patch, 0.0, batch_size=3)
    assert got.shape == (64, 3, 3, 2)  # ceil(50/24), ceil(70/32), ceil(40/32) patches
    torch.testing.assert_close(got.flatten(1).T, want, rtol=1e-5, atol=1e-6)


def test_ctfm_patches_encodes_real_ct(tmp_path: Path, shared_path: Callable[..., Path]) -> None:
    from monai.networks.nets.segresnet_ds import SegResEncoder

    ckpt = tmp_path / "model.safetensors"
    save_file(_random_state(lambda: SegResEncoder(**_ctfm_config()), 4), str(ckpt))
    t0 = dt.datetime(2020, 1, 1)
    ts = shared_path("ct", "totalsegmentator")
    files = ["example_ct_sm.nii.gz", "example_mr_sm.nii.gz", "missing.nii.gz"]
    src = CTSource(
        pl.DataFrame(
            {
                "subject_id": [1, 2, 3],
                "study_time": [t0] * 3,
                "path": [str(ts / f) for f in files],
            }
        )
    )
    cohort = pl.DataFrame({"subject_id": [1, 2, 3, 4], "prediction_time": [t0] * 4})
    enc = build_encoder(
        "ct_monai",
        preset="ct-fm-patches",
        checkpoint=str(ckpt),
        preprocessing={"pixdim": [3, 3, 3], "patch_size": [16, 64, 64]},  # reduced size
        token_grid=[2, 2, 2],
        device="cpu",
    )
    f = enc.encode(cohort, src)
    np.testing.assert_array_equal(f.present, [True, False, False, False])
    assert f.pooled.shape == (4, 512) and f.tokens is not None and f.mask is not None
    # the pooled embedding is the average of the patch embeddings; one token per patch cell
    prep = FMPreprocessing(pipeline="ct-fm-patches", pixdim=(3, 3, 3), patch_size=(16, 64, 64))
    vol = load_fm(src.index["path"][0], prep)
    assert vol.array.shape[0] == 30  # SPL: 30 axial slices at 3 mm, in-plane cropped to HU > 0
    grid = patch_embeddings(enc.network(), torch.from_numpy(vol.array)[None, None], (16, 64, 64))
    n = [-(-a // p) for a, p in zip(vol.array.shape, (16, 64, 64), strict=True)]
    assert grid.shape == (512, *n)
    np.testing.assert_allclose(f.pooled[0], grid.mean(dim=(1, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    assert f.mask[0].sum() == np.prod([min(2, k) for k in n]) and not f.mask[1:].any()
    reasons = {m["subject_id"]: (m["status"], m["reason"]) for m in f.meta["manifest"]}
    assert reasons[2][0] == "failed" and "implausible HU" in reasons[2][1]
    assert reasons[3] == ("failed", "file not found")
    assert reasons[4] == ("no_study", "no CT study at or before prediction_time")
    assert f.meta["pipeline"] == "ct-fm-patches" and not f.meta["published_pipeline"]

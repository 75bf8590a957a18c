"""The published preprocessing of the CT foundation models, as MONAI transform chains.

A frozen encoder gives its published representation only on its published input, so the
foundation-model presets of `ct_monai` do not use survfuse's hand-written resampling
(`survfuse.data.imaging.preprocess_ct`, kept for `ct_radiomics` and the `generic` preset, where
no published pipeline exists): they run MONAI's own transforms, configured exactly as upstream
(each chain below cites its file). Pipelines:

- `merlin`: Merlin (StanfordMIMI/Merlin, `merlin/data/monai_transforms.py::ImageTransforms`):
  RAS, `Spacingd((1.5, 1.5, 3), bilinear)`, HU -1000..1000 -> [0, 1] clipped,
  `SpatialPadd` + `CenterSpatialCropd` to 224 x 224 x 160.
- `ct-fm`: CT-FM model card (Hugging Face `project-lighter/ct_fm_feature_extractor`,
  README "Running instructions"): SPL, HU -1024..2048 -> [0, 1] clipped, `CropForeground()`
  (voxels > 0 after scaling), native spacing; the whole volume is one input.
- `ct-fm-patches`: CT-FM's embedding scripts (project-lighter/CT-FM,
  `scripts/feature_extractor.py`, `scripts/3d_mir_generate_embeddings.py`): SPL,
  `Spacingd([3, 1, 1], bilinear)`, `CropForegroundd` on the raw HU (voxels > 0 HU) *before*
  scaling, HU -1024..2048 -> [0, 1] clipped; the encoder then embeds 24 x 128 x 128 sliding-window
  patches (`survfuse.encoders.fm_inference.patch_embeddings`).

Loading: a NIfTI file is read by MONAI's `LoadImage` with its `NibabelReader` (what the published
`LoadImage(d)` picks for `.nii` / `.nii.gz`: it tries NibabelReader first), channel first; a DICOM
series folder or another SimpleITK file is read by survfuse (`read_ct_hu`: HU, RAS+ affine) into
a `MetaTensor` with the same layout. Before the chain, survfuse's data checks run on the raw HU
(`check_ct_array`: enough slices, plausible CT HU); they reject a volume, never change a value.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from survfuse.data.imaging import CTLoadError, CTPreprocessing, CTVolume, check_ct_array, read_ct_hu
from survfuse.registry import look_up_option

__all__ = [
    "PIPELINES",
    "PUBLISHED",
    "FMPreprocessing",
    "build_chain",
    "load_fm",
    "load_hu_tensor",
    "require_monai",
]

PIPELINES = ("merlin", "ct-fm", "ct-fm-patches")
# The published values of each pipeline's parameters (the only ones a user may override).
PUBLISHED: dict[str, dict[str, Any]] = {
    "merlin": {"pixdim": (1.5, 1.5, 3.0), "spatial_size": (224, 224, 160)},
    "ct-fm": {},
    "ct-fm-patches": {"pixdim": (3.0, 1.0, 1.0), "patch_size": (24, 128, 128), "overlap": 0.0},
}
SOURCES = {
    "merlin": "StanfordMIMI/Merlin merlin/data/monai_transforms.py",
    "ct-fm": "Hugging Face project-lighter/ct_fm_feature_extractor model card",
    "ct-fm-patches": "project-lighter/CT-FM scripts/feature_extractor.py",
}


def require_monai() -> Any:
    """`monai` itself, or an ImportError that says how to install it."""
    try:
        import monai
    except ImportError as err:  # monai is part of survfuse[imaging]
        raise ImportError(
            "ct_monai needs MONAI (its networks, and the published transforms the "
            "foundation-model presets preprocess with): install it with "
            "`pip install 'survfuse[imaging]'` (or `pip install monai`)"
        ) from err
    return monai


class FMPreprocessing(BaseModel):
    """A published pipeline and the few parameters that may be changed (default: as published).

    pipeline: "merlin", "ct-fm" or "ct-fm-patches" (module docstring).
    pixdim: target spacing of `Spacingd` (merlin, ct-fm-patches; the ct-fm card does not resample).
    spatial_size: merlin's pad + centre-crop size.
    patch_size, overlap: ct-fm-patches' sliding-window patches (`SlidingWindowSplitter`).
    check_hu, min_slices, max_p01_hu, min_p01_hu, max_p99_hu, floor_hu: survfuse's data checks on
        the raw HU (see `CTPreprocessing`); they refuse a volume, they never change its values.

    Any value other than the published one leaves the published pipeline (`published` is False):
    meant for tests and benchmarks at reduced size.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    pipeline: str
    pixdim: tuple[float, float, float] | None = None
    spatial_size: tuple[int, int, int] | None = None
    patch_size: tuple[int, int, int] | None = None
    overlap: float | None = Field(default=None, ge=0.0, lt=1.0)
    check_hu: bool = True
    min_slices: int = Field(default=16, ge=1)
    max_p01_hu: float = -500.0
    min_p01_hu: float = -2000.0
    max_p99_hu: float = 4000.0
    floor_hu: float = -1024.0

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        pipeline = look_up_option(str(data.get("pipeline")), PIPELINES, kind="FM pipeline")
        allowed = PUBLISHED[pipeline]
        for key in ("pixdim", "spatial_size", "patch_size", "overlap"):
            if key not in allowed and data.get(key) is not None:
                raise ValueError(
                    f"pipeline {pipeline!r} has no parameter {key!r} (its published chain, "
                    f"{SOURCES[pipeline]}, has {sorted(allowed) or 'none'})"
                )
        return {**allowed, **{k: v for k, v in data.items() if v is not None}, "pipeline": pipeline}

    @model_validator(mode="after")
    def _positive(self) -> FMPreprocessing:
        for key in ("pixdim", "spatial_size", "patch_size"):
            v = getattr(self, key)
            if v is not None and not all(s > 0 for s in v):
                raise ValueError(f"{key} must be positive on every axis, got {v}")
        return self

    @property
    def published(self) -> bool:
        """True when every parameter has its published value."""
        return all(getattr(self, k) == v for k, v in PUBLISHED[self.pipeline].items())

    def checks(self) -> CTPreprocessing:
        """Return the data checks as a `CTPreprocessing` (for `check_ct_array`)."""
        return CTPreprocessing(
            check_hu=self.check_hu,
            min_slices=self.min_slices,
            max_p01_hu=self.max_p01_hu,
            min_p01_hu=self.min_p01_hu,
            max_p99_hu=self.max_p99_hu,
            floor_hu=self.floor_hu,
        )


def build_chain(prep: FMPreprocessing) -> Callable[[Any], Any]:
    """Build the published transform chain after loading: MetaTensor [1, X, Y, Z] HU -> input.

    Keyword for keyword as upstream (Merlin and the CT-FM scripts use dictionary transforms on
    key "image", the CT-FM card array transforms; each is built here as its source writes it).
    Returns a function of the loaded tensor that gives the chain's output tensor [1, ...].
    """
    require_monai()
    import monai.transforms as mt

    with warnings.catch_warnings():
        # Orientation(d)'s `labels` default is announced to change; upstream passes none, so
        # neither do we (the loaded tensor's space is RAS: the same axes either way).
        warnings.simplefilter("ignore", FutureWarning)
        if prep.pipeline == "merlin":
            # StanfordMIMI/Merlin merlin/data/monai_transforms.py (ImageTransforms), after
            # LoadImaged(keys=["image"]) + EnsureChannelFirstd(keys=["image"]):
            size = list(prep.spatial_size or ())
            chain = mt.Compose(
                [
                    mt.Orientationd(keys=["image"], axcodes="RAS"),
                    mt.Spacingd(keys=["image"], pixdim=prep.pixdim or (), mode=("bilinear")),
                    mt.ScaleIntensityRanged(
                        keys=["image"], a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True
                    ),
                    mt.SpatialPadd(keys=["image"], spatial_size=size),
                    mt.CenterSpatialCropd(roi_size=size, keys=["image"]),
                    mt.ToTensord(keys=["image"]),
                ]
            )
        elif prep.pipeline == "ct-fm":
            # Hugging Face project-lighter/ct_fm_feature_extractor README ("preprocess"), after
            # LoadImage(ensure_channel_first=True):
            card = mt.Compose(
                [
                    mt.EnsureType(),
                    mt.Orientation(axcodes="SPL"),
                    mt.ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True),
                    mt.CropForeground(),  # select_fn: > 0 (after scaling), margin 0
                ]
            )
            return card  # type: ignore[no-any-return]
        else:
            # project-lighter/CT-FM scripts/feature_extractor.py (TRANSFORMS), after
            # LoadImaged(keys=["image"], ensure_channel_first=True):
            chain = mt.Compose(
                [
                    mt.EnsureTyped(keys=["image"]),
                    mt.Orientationd(keys=["image"], axcodes="SPL"),
                    mt.Spacingd(keys=["image"], pixdim=list(prep.pixdim or ()), mode="bilinear"),
                    mt.CropForegroundd(keys=["image"], source_key="image"),  # raw HU > 0
                    mt.ScaleIntensityRanged(
                        keys="image", a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True
                    ),
                ]
            )

    def run(img: Any) -> Any:
        return chain({"image": img})["image"]

    return run


@functools.cache
def _nifti_loader() -> Any:
    """MONAI `LoadImage(reader=NibabelReader(), ensure_channel_first=True)`, built once.

    LoadImage instantiates every reader MONAI knows while it is built; the optional ones that
    are missing here (nvImageCodec DICOM decoding) warn then, which is noise for a NIfTI reader.
    """
    from monai.data.image_reader import NibabelReader
    from monai.transforms import LoadImage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return LoadImage(reader=NibabelReader(), ensure_channel_first=True)


def load_hu_tensor(path: str | Path) -> Any:
    """Load a CT as MONAI's loader gives it: `MetaTensor` [1, X, Y, Z] float32 HU, RAS affine.

    NIfTI: `LoadImage(reader=NibabelReader(), ensure_channel_first=True)` (the reader the
    published `LoadImage(d)` picks for NIfTI). Others (DICOM series folder, .mha, .nrrd):
    survfuse's `read_ct_hu`. Raises `CTLoadError` for a missing or unreadable file.
    """
    require_monai()
    import torch
    from monai.data import MetaTensor

    path = Path(path)
    if not path.exists():
        raise CTLoadError(path, "file not found")
    if path.is_file() and path.name.endswith((".nii", ".nii.gz")):
        try:
            img = _nifti_loader()(str(path))
        except Exception as exc:  # any reader failure is this subject's failure, with its cause
            raise CTLoadError(path, f"unreadable: {type(exc).__name__}: {exc}") from exc
    else:
        arr, affine, _ = read_ct_hu(path)
        img = MetaTensor(
            torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None],
            affine=torch.as_tensor(affine, dtype=torch.float64),
            meta={
                "space": "RAS",
                "filename_or_obj": str(path),
                "original_channel_dim": "no_channel",
            },
        )
    if img.ndim != 4 or img.shape[0] != 1:
        raise CTLoadError(path, f"expected a 3-d volume, got shape {tuple(img.shape)}")
    return img


def load_fm(path: str | Path, prep: FMPreprocessing) -> CTVolume:
    """Load a CT and run its published pipeline: `CTVolume.array` float32 = the model input.

    The array is the chain's output without its channel axis (merlin: RAS 224 x 224 x 160;
    ct-fm / ct-fm-patches: SPL, cropped to the foreground), `affine` the chain's (RAS+ world).
    Raises `CTLoadError(path, reason)` when the file is missing, unreadable or fails a data check.
    """
    import nibabel as nib

    img = load_hu_tensor(path)
    raw = img.as_tensor()[0].numpy()
    native = np.asarray(img.affine, dtype=np.float64)
    meta: dict[str, Any] = {
        "path": str(path),
        "pipeline": prep.pipeline,
        "published": prep.published,
        "native_shape": tuple(int(s) for s in raw.shape),
        "native_spacing": tuple(float(s) for s in np.sqrt((native[:3, :3] ** 2).sum(axis=0))),
        "native_orientation": "".join(nib.aff2axcodes(native)),
    }
    meta.update(check_ct_array(raw, prep.checks(), path=path))
    del raw
    out = build_chain(prep)(img)
    del img
    arr = out.detach().cpu().numpy()[0]
    affine = np.asarray(getattr(out, "affine", native), dtype=np.float64)
    if arr.size == 0:
        raise CTLoadError(path, f"{prep.pipeline} pipeline left an empty volume (no foreground)")
    return CTVolume(
        array=np.ascontiguousarray(arr, dtype=np.float32),
        spacing=np.sqrt((affine[:3, :3] ** 2).sum(axis=0)),
        affine=affine,
        meta=meta,
    )

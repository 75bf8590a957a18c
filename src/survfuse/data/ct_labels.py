"""Region label maps (segmentations) aligned with a preprocessed CT volume.

A CT index may name, per study, a label map in the study's own voxel grid (`mask_path`,
`survfuse.data.ct_index.MASK_COLUMN`): integer labels per voxel, 0 = background, as a
segmentation model writes them (TotalSegmentator, or the simulator's `*_seg.nii.gz`). Region
radiomics (`ct_radiomics(regions=...)`) read it with `load_region_labels`, which applies the
volume's reorientation and checks that the label map's grid is the study's. Resampling or
cropping the volume (`spacing`, `target_shape`) is not supported for label maps yet: those
preprocessing options are refused with regions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from survfuse.data.imaging import CTPreprocessing, CTVolume

__all__ = ["check_label_preprocessing", "load_region_labels"]


def check_label_preprocessing(preprocessing: CTPreprocessing) -> None:
    """Raise ValueError if `preprocessing` changes the voxel grid beyond a reorientation."""
    if preprocessing.spacing is not None or preprocessing.target_shape is not None:
        raise ValueError(
            "region label maps need CT preprocessing without resampling or cropping "
            f"(spacing: null, target_shape: null); got spacing={preprocessing.spacing}, "
            f"target_shape={preprocessing.target_shape}"
        )


def load_region_labels(
    path: str | Path, volume: CTVolume, preprocessing: CTPreprocessing
) -> NDArray[np.int32]:
    """Return the label map at `path` [X, Y, Z] int32 in the voxel grid of `volume`.

    `volume` is the preprocessed CT the labels belong to (`load_ct(..., preprocessing)`). Raises
    ValueError naming both files when the label map cannot be read, is not 3-D integer labels, or
    its grid (shape, affine within 0.01 mm) differs from the study's.
    """
    import nibabel as nib
    import nibabel.orientations as nio

    check_label_preprocessing(preprocessing)
    path = Path(path)
    ct = volume.meta.get("path", "<array>")
    try:
        img: Any = nib.load(path)
        arr = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise ValueError(f"region labels {path} (of CT {ct}): cannot read: {exc}") from exc
    if arr.ndim != 3:
        raise ValueError(f"region labels {path} (of CT {ct}): expected 3-D, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"region labels {path} (of CT {ct}): labels must be integers")
    native = tuple(volume.meta.get("native_shape", arr.shape))
    if tuple(arr.shape) != native:
        raise ValueError(
            f"region labels {path}: shape {tuple(arr.shape)} differs from its CT {ct} "
            f"{native}: a label map must be in the study's own voxel grid"
        )
    transform = nio.ornt_transform(
        nio.io_orientation(img.affine), nio.axcodes2ornt(tuple(preprocessing.orientation))
    )
    out = nio.apply_orientation(arr, transform)
    affine = img.affine @ nio.inv_ornt_aff(transform, arr.shape)
    if out.shape != volume.shape or not np.allclose(affine, volume.affine, atol=1e-2):
        raise ValueError(
            f"region labels {path}: its affine differs from its CT {ct} "
            "(a label map must be in the study's own voxel grid)"
        )
    return np.ascontiguousarray(out, dtype=np.int32)

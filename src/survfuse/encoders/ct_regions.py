"""Per-region radiomics of `ct_radiomics(regions=...)`: features over each labelled organ.

`RegionFeatures` reads, for every cohort row with a CT, the study's label map (the CT index's
`mask_path`, `survfuse.data.ct_labels.load_region_labels`) and computes the radiomic feature
vector [F] over the voxels of each configured label; `region_stats` gives the training mean / sd
that standardise them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
from numpy.typing import NDArray
from scipy import ndimage

from survfuse.data.ct_index import MASK_COLUMN
from survfuse.data.ct_labels import load_region_labels
from survfuse.data.imaging import CTPreprocessing, CTVolume

__all__ = [
    "RegionFeatures",
    "check_focal",
    "check_hyperdensity",
    "check_regions",
    "focal_features",
    "focal_footprint",
    "hyperdensity_features",
    "region_stats",
]

#: features of the voxels `roi` [X, Y, Z] bool of a volume array -> [F] float32
RoiFeatures = Callable[[NDArray[np.float32], NDArray[np.bool_]], NDArray[np.float32]]


def check_regions(regions: Mapping[str, int] | None) -> dict[str, int]:
    """Return `regions` as {name: label} in label order, labels checked (distinct, >= 1)."""
    if not regions:
        return {}
    out: dict[str, int] = {}
    for name, label in regions.items():
        if isinstance(label, bool) or not isinstance(label, int | np.integer) or label < 1:
            raise ValueError(f"regions: label of {name!r} must be an integer >= 1, got {label!r}")
        out[str(name)] = int(label)
    if len(set(out.values())) != len(out):
        raise ValueError(f"regions: each region needs its own label, got {out}")
    # in label order: a config dumped to JSON (keys sorted by name) rebuilds the same columns
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def check_hyperdensity(
    thresholds: Sequence[float] | None, hu_window: tuple[float, float]
) -> list[float]:
    """Return the hyperdensity thresholds (HU) as floats, checked.

    They must increase strictly and lie inside the HU window (a threshold at or above the
    window's top would always give 0).
    """
    if not thresholds:
        return []
    out = [float(t) for t in thresholds]
    if not all(np.isfinite(out)) or any(b <= a for a, b in itertools.pairwise(out)):
        raise ValueError(f"hyperdensity: thresholds must be finite and increasing, got {out}")
    if out[0] < hu_window[0] or out[-1] >= hu_window[1]:
        raise ValueError(
            f"hyperdensity: thresholds {out} must lie in the HU window [{hu_window[0]}, "
            f"{hu_window[1]})"
        )
    return out


def hyperdensity_features(
    hu: NDArray[np.float32],
    roi: NDArray[np.bool_],
    spacing: Sequence[float],
    thresholds: Sequence[float],
) -> NDArray[np.float32]:
    """Excess mass over each threshold: [len(thresholds)] of log(1 + m_T).

    m_T = sum over the `roi` voxels of max(HU - T, 0) x voxel volume, in HU x mL.

    Why: the excess mass of a focal hyperdensity (coronary or aortic calcium) is its volume times
    its contrast, so it follows the lesion's size, which fractions and percentiles of a large
    organ barely move (a 150 mm^3 spot is 0.05% of a heart); on a contrast CT the threshold
    must sit above enhanced blood (about 200-350 HU). The log tames the heavy right tail.
    """
    v = hu[roi].astype(np.float64)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return np.array(
        [np.log1p(np.clip(v - t, 0.0, None).sum() * voxel_ml) for t in thresholds], np.float32
    )


def check_focal(contrasts: Sequence[float] | None, size_mm: float) -> list[float]:
    """Return the focal contrasts (HU above the surroundings) as floats, checked.

    They must be positive and increase strictly; `size_mm` must be positive.
    """
    if not contrasts:
        return []
    out = [float(t) for t in contrasts]
    if not all(np.isfinite(out)) or out[0] <= 0 or any(b <= a for a, b in itertools.pairwise(out)):
        raise ValueError(f"focal: contrasts must be positive and increasing HU, got {out}")
    if not (np.isfinite(size_mm) and size_mm > 0):
        raise ValueError(f"focal_size_mm must be > 0, got {size_mm}")
    return out


def focal_footprint(spacing: Sequence[float], size_mm: float) -> tuple[int, int, int]:
    """Box edge in voxels per axis: the odd voxel count nearest `size_mm` (at least 1)."""
    return tuple(  # type: ignore[return-value]
        2 * max(0, int(np.floor((size_mm / float(s) - 1.0) / 2.0 + 0.5))) + 1 for s in spacing
    )


def focal_features(
    hu: NDArray[np.float32],
    roi: NDArray[np.bool_],
    spacing: Sequence[float],
    contrasts: Sequence[float],
    size_mm: float,
) -> NDArray[np.float32]:
    """Focal excess mass over each contrast: [len(contrasts)] of log(1 + f_T).

    top-hat = HU - opening(HU) with a box of about `size_mm` per side (`focal_footprint`): what
    rises above its surroundings in a structure narrower than the box;
    f_T = sum over the `roi` voxels of max(top-hat - T, 0) x voxel volume, in HU x mL.

    Why: an absolute threshold (`hyperdensity_features`) must sit above enhanced blood, but a
    blurring scanner pulls a small calcified plaque's peak below it (a 150 mm^3 spot reaches 316
    HU on the simulator's blurriest development scanner, against blood at 240-330 HU). The
    top-hat compares each voxel with its own neighbourhood instead: blood pools wider than the
    box are removed whatever their HU, a small bright spot is kept (benchmarks/ct_signal_probe.py).
    The opening (separable min / max filters) is computed on the ROI's bounding box widened by
    the box edge on each side, which gives the same values as opening the whole volume.
    """
    box = focal_footprint(spacing, size_mm)
    if max(box) == 1:  # an opening with a 1-voxel box is the volume itself: every mass 0
        raise ValueError(
            f"focal_size_mm={size_mm:g} is under 2 voxels on every axis at spacing "
            f"{tuple(round(float(v), 3) for v in spacing)} mm: the box must be wider than a spot"
        )
    if not roi.any():
        return np.zeros(len(contrasts), np.float32)
    sl = []
    for ax, (b, n) in enumerate(zip(box, hu.shape, strict=True)):
        # the ROI's extent along `ax` from a projection (no [3, n_voxels] index array)
        idx = np.flatnonzero(roi.any(axis=tuple(a for a in range(3) if a != ax)))
        sl.append(slice(max(0, int(idx[0]) - b), min(n, int(idx[-1]) + b + 1)))
    sub_roi = roi[tuple(sl)]
    sub = np.asarray(hu[tuple(sl)], dtype=np.float32)
    tophat = ndimage.grey_opening(sub, size=box, mode="nearest")
    np.subtract(sub, tophat, out=tophat)
    t = tophat[sub_roi]
    t = t[t > min(contrasts)].astype(np.float64)  # most voxels rise less than any contrast
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return np.array(
        [np.log1p(np.clip(t - c, 0.0, None).sum() * voxel_ml) for c in contrasts], np.float32
    )


class RegionFeatures:
    """Accumulates region features [N, R, F] and their validity [N, R] over a cohort's rows."""

    def __init__(
        self,
        regions: Mapping[str, int],
        studies: pl.DataFrame,
        preprocessing: CTPreprocessing,
        n_features: int,
    ) -> None:
        """`studies`: the cohort's selected studies (`CTSource.studies`), one row per cohort row."""
        n, r = studies.height, len(regions)
        self.labels = list(regions.values())
        self.preprocessing = preprocessing
        self.values = np.zeros((n, r, n_features), np.float32)
        self.valid = np.zeros((n, r), bool)
        self.mask_paths: list[str | None] = [None] * n
        if r:
            if MASK_COLUMN not in studies.columns:
                raise ValueError(
                    f"ct_radiomics regions {list(regions)} need a {MASK_COLUMN!r} column in the "
                    "CT index (each study's label map, e.g. a TotalSegmentator segmentation)"
                )
            self.mask_paths = studies[MASK_COLUMN].to_list()

    def add(self, row: int, volume: CTVolume, features: RoiFeatures) -> None:
        """Compute row `row`'s region features from `volume` and its label map (if it has one)."""
        path = self.mask_paths[row] if self.labels else None
        if path is None:
            return
        labels = load_region_labels(path, volume, self.preprocessing)
        for k, label in enumerate(self.labels):
            roi = labels == label
            if roi.any():
                self.values[row, k] = features(volume.array, roi)
                self.valid[row, k] = True


def region_stats(values: NDArray[np.float32], valid: NDArray[np.bool_]) -> dict[str, Any]:
    """Training mean / sd [R, F] of each region's features over the rows where it is valid.

    Empty dict without regions; a region never seen in training gets mean 0, sd 1.
    """
    if values.shape[1] == 0:
        return {}
    r, f = values.shape[1], values.shape[2]
    mean, sd = np.zeros((r, f)), np.ones((r, f))
    for k in range(r):
        x = values[valid[:, k], k].astype(np.float64)
        if len(x):
            mean[k] = x.mean(axis=0)
            s = x.std(axis=0)
            sd[k] = np.where(s > 1e-8, s, 1.0)
    return {"region_mean": mean, "region_std": sd}

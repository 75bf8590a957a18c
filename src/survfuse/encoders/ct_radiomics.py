"""`ct_radiomics`: a fast, deterministic CT encoder that needs no weights (the default).

Per region (the whole volume, and each cell of a `grid` of 3-D patches) it computes, from HU:

- `n_bins` histogram fractions over the HU window;
- 8 tissue fractions by HU range: air < -990, emphysema [-990, -950) (LAA-950), lung
  [-950, -500), fat [-190, -30), soft tissue [-30, 100), contrast [100, 300), bone >= 300,
  calcium >= 130 (Agatston threshold; overlaps contrast/bone by definition);
- first-order statistics of HU/1000: mean, std, skewness, excess kurtosis, p10/p25/p50/p75/p90
  (from a fine histogram), histogram entropy;
- texture: mean |forward difference| along x, y, z and mean/std of the gradient magnitude
  (in HU/1000 per mm).

Each grid cell is one token (its features + its normalised centre position); `pooled` is the
whole-volume feature vector (`pooled="volume"`), or that vector followed by every cell's
features (`pooled="volume+cells"`, for a coarse grid): whole-volume statistics dilute focal
findings (a clot, a dilated ventricle), so pooled-only fusion strategies see them only this way. Features are standardised with training-split statistics (`fit`).
All per-cell sums (histogram, moments, texture) come from one compiled (numba) pass over the
voxels with a precomputed voxel -> cell label map; the whole-volume features are the sums over
cells, so the volume and all cells cost one pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache, partial
from typing import Any

import numpy as np
import polars as pl
from numpy.typing import NDArray

from survfuse.data.ct_labels import check_label_preprocessing
from survfuse.data.imaging import CTPreprocessing
from survfuse.encoders.base import CTSource, Encoder, cohort_keys, iter_ct_volumes, register_encoder
from survfuse.encoders.ct_radiomics_kernel import radiomics_sums
from survfuse.encoders.ct_regions import (
    RegionFeatures,
    check_focal,
    check_hyperdensity,
    check_regions,
    focal_features,
    hyperdensity_features,
    region_stats,
)
from survfuse.features import ModalityFeatures
from survfuse.registry import look_up_option

__all__ = ["TISSUES", "CTRadiomicsEncoder", "radiomics_features"]

#: tissue name -> [lo, hi) HU range.
TISSUES: dict[str, tuple[float, float]] = {
    "air": (-np.inf, -990.0),
    "emphysema": (-990.0, -950.0),
    "lung": (-950.0, -500.0),
    "fat": (-190.0, -30.0),
    "soft_tissue": (-30.0, 100.0),
    "contrast": (100.0, 300.0),
    "bone": (300.0, np.inf),
    "calcium": (130.0, np.inf),
}
_FIRST_ORDER = ("mean", "std", "skewness", "kurtosis", "p10", "p25", "p50", "p75", "p90", "entropy")
_TEXTURE = ("absdiff_x", "absdiff_y", "absdiff_z", "gradmag_mean", "gradmag_std")
_FINE = 8  # fine histogram bins per output bin (percentile resolution)

DEFAULT_PREPROCESSING: dict[str, Any] = {
    "orientation": "RAS",
    "spacing": None,
    "hu_window": (-1024.0, 3071.0),
    "scale_to_unit": False,
    "target_shape": None,
}


def feature_names(n_bins: int = 16) -> list[str]:
    """Names of the per-region features, in order."""
    return [
        *(f"hist_{i}" for i in range(n_bins)),
        *(f"frac_{t}" for t in TISSUES),
        *_FIRST_ORDER,
        *_TEXTURE,
    ]


def _axis_cells(
    shape: tuple[int, int, int], grid: tuple[int, int, int]
) -> tuple[NDArray[np.int64], ...]:
    """Return, per axis, the cell index of every voxel position.

    Cells split each axis as evenly as possible; voxel (i, j, k) is in cell
    (ix[i] * gy + iy[j]) * gz + iz[k]. Three vectors instead of an [X, Y, Z] label volume (8 bytes
    a voxel: 0.6 GB at 512 x 512 x 300).
    """
    ids = []
    for size, g in zip(shape, grid, strict=True):
        edges = np.linspace(0, size, g + 1).round().astype(np.int64)
        ids.append(np.searchsorted(edges[1:], np.arange(size), side="right").astype(np.int64))
    return tuple(ids)


@lru_cache(maxsize=16)
def _bins(
    lo: float, hi: float, n_bins: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Fine bin edges (uniform + tissue thresholds), fine->coarse and fine->tissue matrices."""
    uniform = np.linspace(lo, hi, n_bins * _FINE + 1)
    thresholds = [
        v
        for rng in TISSUES.values()
        for v in rng
        if np.isfinite(v) and lo < v < hi and not np.isclose(uniform, v).any()
    ]
    edges = np.unique(np.concatenate([uniform, thresholds]))
    centres_lo, centres_hi = edges[:-1], edges[1:]
    mid = (centres_lo + centres_hi) / 2
    coarse = np.linspace(lo, hi, n_bins + 1)
    to_coarse = np.zeros((len(mid), n_bins))
    to_coarse[np.arange(len(mid)), np.clip(np.searchsorted(coarse, mid) - 1, 0, n_bins - 1)] = 1
    to_tissue = np.stack(
        [((mid >= a) & (mid < b)).astype(np.float64) for a, b in TISSUES.values()], axis=1
    )
    # values at exactly `hi` (clipped) fall in the last bin, below `lo` in the first
    return edges, to_coarse, to_tissue, mid


def _percentiles(hist: NDArray[np.float64], edges: NDArray[np.float64], qs: list[float]) -> Any:
    """Per-row quantiles from fine histogram counts [C, B] by linear interpolation in a bin."""
    cdf = np.cumsum(hist, axis=1)
    total = np.maximum(cdf[:, -1:], 1.0)
    cdf = cdf / total
    out = np.empty((hist.shape[0], len(qs)))
    for j, q in enumerate(qs):
        k = (cdf < q).sum(axis=1).clip(0, hist.shape[1] - 1)
        prev = np.where(k > 0, cdf[np.arange(len(k)), k - 1], 0.0)
        width = np.maximum(cdf[np.arange(len(k)), k] - prev, 1e-12)
        frac = np.clip((q - prev) / width, 0, 1)
        out[:, j] = edges[k] + frac * (edges[k + 1] - edges[k])
    return out


def radiomics_features(
    hu: NDArray[Any],
    *,
    grid: tuple[int, int, int] = (4, 4, 4),
    hu_window: tuple[float, float] = (-1024.0, 3071.0),
    n_bins: int = 16,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    roi: NDArray[np.bool_] | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.bool_], NDArray[np.float32]]:
    """Radiomic features of one HU volume [X, Y, Z].

    Returns (cells [C, F] float32, cell_valid [C] bool, volume [F] float32) with
    C = prod(grid) in C order of (gx, gy, gz) and F = len(feature_names(n_bins)).
    `roi` [X, Y, Z] bool restricts every statistic to those voxels (e.g. a lung mask); texture
    then uses voxel pairs with both voxels inside.
    """
    if hu.ndim != 3:
        raise ValueError(f"radiomics_features needs a 3-D volume, got shape {hu.shape}")
    lo, hi = float(hu_window[0]), float(hu_window[1])
    grid = tuple(int(g) for g in grid)  # type: ignore[assignment]
    x = np.asarray(hu, dtype=np.float32)
    # already windowed (ct_radiomics' own preprocessing clips): no 4-byte-a-voxel copy
    if not (x.flags.c_contiguous and x.size and x.min() >= lo and x.max() <= hi):
        x = np.ascontiguousarray(np.clip(x, lo, hi))
    n_cells = int(np.prod(grid))
    ix, iy, iz = _axis_cells(x.shape, grid)  # type: ignore[arg-type]
    if roi is not None:
        if roi.shape != x.shape:
            raise ValueError(f"roi shape {roi.shape} differs from volume shape {x.shape}")
        # voxels outside the ROI go to an extra "dump" cell that is dropped
        roi_arr = np.ascontiguousarray(roi, dtype=np.bool_)
    else:
        roi_arr = np.ones((1, 1, 1), np.bool_)
    edges, to_coarse, to_tissue, _ = _bins(lo, hi, n_bins)
    n_uniform = n_bins * _FINE
    uniform = np.linspace(lo, hi, n_uniform + 1)
    splits = np.array(
        sorted(v for v in edges[1:-1] if not np.isclose(uniform, v).any()), dtype=np.float64
    )
    hist, sums, tex_sums = radiomics_sums(
        x,
        ix,
        iy,
        iz,
        grid[1],
        grid[2],
        roi_arr,
        n_cells,
        len(edges) - 1,
        lo,
        n_uniform / (hi - lo),
        n_uniform,
        splits,
        1.0 / float(spacing[0]),
        1.0 / float(spacing[1]),
        1.0 / float(spacing[2]),
    )

    def finish(h: Any, s: Any, t: Any) -> Any:
        n = np.maximum(s[:, 0:1], 1.0)
        p_coarse = (h @ to_coarse) / n
        p_tissue = (h @ to_tissue) / n
        m1, m2, m3, m4 = (s[:, k : k + 1] / n for k in range(1, 5))
        var = np.maximum(m2 - m1**2, 0.0)
        sd = np.sqrt(var)
        safe = np.where(sd > 1e-6, sd, 1.0)
        skew = np.where(sd > 1e-6, (m3 - 3 * m1 * var - m1**3) / safe**3, 0.0)
        kurt = np.where(
            sd > 1e-6, (m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4) / safe**4 - 3.0, 0.0
        )
        pct = _percentiles(h, edges, [0.1, 0.25, 0.5, 0.75, 0.9]) / 1000.0
        ent = -(p_coarse * np.log(np.where(p_coarse > 0, p_coarse, 1.0))).sum(1, keepdims=True)

        def ratio(num: Any, den: Any) -> Any:
            return num / np.maximum(den, 1.0)

        gm_mean = ratio(t[:, 7], t[:, 6])
        gm_sd = np.sqrt(np.maximum(ratio(t[:, 8], t[:, 6]) - gm_mean**2, 0.0))
        texture = np.stack(
            [
                ratio(t[:, 1], t[:, 0]),
                ratio(t[:, 3], t[:, 2]),
                ratio(t[:, 5], t[:, 4]),
                gm_mean,
                gm_sd,
            ],
            axis=1,
        )
        return np.concatenate(
            [p_coarse, p_tissue, m1, sd, skew, kurt, pct, ent, texture], axis=1
        ).astype(np.float32)

    cells = finish(hist, sums, tex_sums)
    volume = finish(hist.sum(0, keepdims=True), sums.sum(0, keepdims=True), tex_sums.sum(0)[None])
    valid = sums[:, 0] > 0
    cells[~valid] = 0
    return cells, valid, volume[0]


def grid_positions(grid: tuple[int, int, int]) -> NDArray[np.float32]:
    """Normalised cell centres [prod(grid), 3] in [0, 1], in the cell order of the features."""
    axes = [(np.arange(g) + 0.5) / g for g in grid]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1).astype(np.float32)


POOLED_MODES = ("volume", "volume+cells")


@register_encoder("ct_radiomics")
class CTRadiomicsEncoder(Encoder):
    """HU histograms, tissue fractions, first-order and texture statistics per volume and cell.

    tokens [N, prod(grid), F + 3] (features standardised, then the cell centre position),
    mask [N, prod(grid)], pooled [N, F] (standardised whole-volume features) or, with
    `pooled="volume+cells"`, [N, F * (1 + prod(grid))] (volume then each cell, zeros for cells
    outside the volume). With `regions` ({name: label value}, e.g. `{heart: 1, lungs: 2}`), pooled
    ends with F standardised features per region (F + len(hyperdensity) with `hyperdensity`
    thresholds: `ct_regions.hyperdensity_features`, each region's excess HU mass over them;
    + len(focal) with `focal` contrasts: `ct_regions.focal_features`, the mass of what rises
    that far above its surroundings within a box of `focal_size_mm`),
    computed over the voxels of that label in the study's label map (the CT index's `mask_path`;
    `survfuse.data.ct_labels`); a region absent from a study's map, or a study without a map,
    gets zeros (the training mean).
    Why: whole-volume and coarse-cell statistics mix a small organ with everything around it
    (coronary calcium at 1,200 HU with ribs and spine at 450-650 HU), while radiomics as practised
    is computed per segmented organ (benchmarks/ct_signal_probe.py).
    """

    modality = "ct"
    learns = True

    def __init__(
        self,
        *,
        preprocessing: dict[str, Any] | None = None,
        grid: tuple[int, int, int] | list[int] = (4, 4, 4),
        n_bins: int = 16,
        pooled: str = "volume",
        regions: Mapping[str, int] | None = None,
        hyperdensity: list[float] | None = None,
        focal: list[float] | None = None,
        focal_size_mm: float = 18.0,
    ) -> None:

        pooled = look_up_option(pooled, POOLED_MODES, kind="ct_radiomics pooled mode")
        prep = CTPreprocessing(**{**DEFAULT_PREPROCESSING, **(preprocessing or {})}).model_dump(
            mode="json"
        )
        if prep["hu_window"] is None:
            raise ValueError("ct_radiomics needs preprocessing.hu_window (the histogram range)")
        if prep["scale_to_unit"]:
            raise ValueError("ct_radiomics works in HU: preprocessing.scale_to_unit must be False")
        grid = tuple(int(g) for g in grid)  # type: ignore[assignment]
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"grid must be three positive ints, got {grid}")
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        region_map = check_regions(regions)
        if region_map:
            check_label_preprocessing(CTPreprocessing(**prep))
        hyper = check_hyperdensity(hyperdensity, (prep["hu_window"][0], prep["hu_window"][1]))
        if hyper and not region_map:
            raise ValueError("ct_radiomics hyperdensity is computed per region: it needs regions")
        focal_c = check_focal(focal, focal_size_mm)
        if focal_c and not region_map:
            raise ValueError("ct_radiomics focal is computed per region: it needs regions")
        extra: dict[str, Any] = {"regions": region_map} if region_map else {}
        if hyper:  # fingerprints of configs without these options stay as they were
            extra["hyperdensity"] = hyper
        if focal_c:
            extra["focal"] = focal_c
            extra["focal_size_mm"] = float(focal_size_mm)
        super().__init__(
            preprocessing=prep, grid=list(grid), n_bins=int(n_bins), pooled=pooled, **extra
        )
        self.regions = region_map
        self.hyperdensity = hyper
        self.focal = focal_c
        self.focal_size_mm = float(focal_size_mm)
        self.grid: tuple[int, int, int] = grid  # type: ignore[assignment]
        self.n_bins = int(n_bins)
        self.pooled_mode = pooled
        self.hu_window = (float(prep["hu_window"][0]), float(prep["hu_window"][1]))
        self._stats: dict[str, NDArray[np.float64]] = {}

    def preprocessing(self) -> Any:
        """Return the `survfuse.data.imaging.CTPreprocessing` this encoder loads volumes with."""
        return CTPreprocessing(**self._config["preprocessing"])

    @property
    def n_features(self) -> int:
        return len(feature_names(self.n_bins))

    def region_feature_names(self) -> list[str]:
        """Names of each region's features: radiomics, `hyper_{T}` per threshold, `focal_{T}`."""
        return (
            feature_names(self.n_bins)
            + [f"hyper_{t:g}" for t in self.hyperdensity]
            + [f"focal_{t:g}" for t in self.focal]
        )

    def _region_features(
        self, arr: NDArray[np.float32], roi: NDArray[np.bool_], spacing: tuple[float, ...]
    ) -> NDArray[np.float32]:
        """[F_region] features of one region's voxels (`region_feature_names`)."""
        base = radiomics_features(
            arr, grid=(1, 1, 1), hu_window=self.hu_window, n_bins=self.n_bins,
            spacing=spacing, roi=roi,  # type: ignore[arg-type]
        )[2]  # fmt: skip
        parts = [base]
        if self.hyperdensity:
            parts.append(hyperdensity_features(arr, roi, spacing, self.hyperdensity))
        if self.focal:
            parts.append(focal_features(arr, roi, spacing, self.focal, self.focal_size_mm))
        return np.concatenate(parts)

    # ------------------------------------------------------------------ raw features
    def raw(self, cohort: pl.DataFrame, source: CTSource) -> dict[str, Any]:
        """Unstandardised features: cells [N, C, F], valid [N, C], volume [N, F], present, manifest."""
        n, c, f = cohort.height, int(np.prod(self.grid)), self.n_features
        cells = np.zeros((n, c, f), np.float32)
        valid = np.zeros((n, c), bool)
        volume = np.zeros((n, f), np.float32)
        present = np.zeros(n, bool)
        manifest: list[dict[str, Any]] = []
        studies = source.studies(cohort)  # one selection for the volumes and their label maps
        reg = RegionFeatures(
            self.regions, studies, self.preprocessing(), len(self.region_feature_names())
        )
        for i, vol, entry in iter_ct_volumes(cohort, source, self.preprocessing(), studies):
            if vol is None:
                manifest.append(entry or {})
                continue
            spacing = tuple(float(s) for s in vol.spacing)
            cells[i], valid[i], volume[i] = radiomics_features(
                vol.array,
                grid=self.grid,
                hu_window=self.hu_window,
                n_bins=self.n_bins,
                spacing=spacing,  # type: ignore[arg-type]
            )
            present[i] = True
            reg.add(i, vol, partial(self._region_features, spacing=spacing))
        return {
            "cells": cells,
            "valid": valid,
            "volume": volume,
            "present": present,
            "manifest": manifest,
            "regions": reg.values,
            "region_valid": reg.valid,
        }

    # ------------------------------------------------------------------ fit / encode
    def fit(self, cohort: pl.DataFrame, source: CTSource) -> CTRadiomicsEncoder:
        """Mean/std of cell and volume features over the training rows' volumes."""
        r = self.raw(cohort, source)
        if not r["present"].any():
            reasons = {e.get("reason") for e in r["manifest"]}
            raise ValueError(f"ct_radiomics.fit: no training CT could be loaded ({reasons})")
        cells = r["cells"][r["valid"] & r["present"][:, None]].astype(np.float64)
        vols = r["volume"][r["present"]].astype(np.float64)

        def sd(a: Any) -> Any:
            s = a.std(axis=0)
            return np.where(s > 1e-8, s, 1.0)

        self._stats = {
            "token_mean": cells.mean(axis=0),
            "token_std": sd(cells),
            "pooled_mean": vols.mean(axis=0),
            "pooled_std": sd(vols),
            **region_stats(r["regions"], r["region_valid"]),
        }
        self.fitted = True
        return self

    def state(self) -> dict[str, NDArray[Any]]:
        return dict(self._stats)

    def set_state(self, state: Any) -> None:
        need = {"token_mean", "token_std", "pooled_mean", "pooled_std"}
        if self.regions:
            need |= {"region_mean", "region_std"}
        if set(state) != need:
            raise ValueError(f"ct_radiomics state needs {sorted(need)}, got {sorted(state)}")
        self._stats = {k: np.asarray(state[k], np.float64) for k in need}
        self.fitted = True

    def encode(self, cohort: pl.DataFrame, source: CTSource) -> ModalityFeatures:
        self.check_fitted()
        sid, pt = cohort_keys(cohort)
        r = self.raw(cohort, source)
        st = self._stats
        mask = r["valid"] & r["present"][:, None]
        feats = (r["cells"] - st["token_mean"]) / st["token_std"]
        feats[~mask] = 0
        pos = np.broadcast_to(grid_positions(self.grid), (*feats.shape[:2], 3))
        tokens = np.concatenate([feats, pos * mask[..., None]], axis=2).astype(np.float32)
        pooled = ((r["volume"] - st["pooled_mean"]) / st["pooled_std"]).astype(np.float32)
        pooled[~r["present"]] = 0
        if self.pooled_mode == "volume+cells":
            flat = feats.reshape(feats.shape[0], -1).astype(np.float32)
            pooled = np.concatenate([pooled, flat], axis=1)
        if self.regions:
            z = (r["regions"] - st["region_mean"]) / st["region_std"]
            z[~r["region_valid"]] = 0
            pooled = np.concatenate([pooled, z.reshape(z.shape[0], -1).astype(np.float32)], 1)
        return ModalityFeatures(
            subject_id=sid,
            prediction_time=pt,
            pooled=pooled,
            present=r["present"],
            tokens=tokens,
            mask=mask,
            meta={
                "encoder": self.name,
                "modality": "ct",
                "grid": list(self.grid),
                "feature_names": feature_names(self.n_bins),
                "regions": list(self.regions),
                "region_feature_names": self.region_feature_names() if self.regions else [],
                "manifest": r["manifest"],
            },
        )

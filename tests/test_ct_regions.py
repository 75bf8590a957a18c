"""Per-organ radiomics (`ct_radiomics(regions=...)`) from a CT index's label maps (`mask_path`)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest

from survfuse.data.ct_index import select_studies
from survfuse.data.imaging import load_ct
from survfuse.encoders.base import CTSource, build_encoder
from survfuse.encoders.ct_radiomics import CTRadiomicsEncoder, radiomics_features
from survfuse.simulate import simulate
from survfuse.simulate.ct import HEART, REGION_LABELS, Scanner, render_ct

REGIONS = {"heart": 1, "lungs": 2, "pulmonary_arteries": 3}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(simulate(tmp_path_factory.mktemp("regions") / "sim", n=40, seed=4, progress=False))


def _rows(sim: Path) -> pl.DataFrame:
    return pl.read_parquet(sim / "cohort.parquet").select("subject_id", "prediction_time")


def test_label_map_leaves_the_volume_unchanged_and_holds_the_calcium() -> None:
    anatomy = {
        "body_scale": 1.0, "age": 60.0, "emphysema": 0.1, "rv_lv": 1.0, "clot": 0.3,
        "calcium_mm3": 2500.0, "heart_dx": 0.0, "heart_dy": 0.0,
    }  # fmt: skip
    shape, scanner = (64, 64, 40), Scanner()
    plain, _ = render_ct(anatomy, shape, scanner, np.random.default_rng(1))
    labels = np.zeros(shape, np.uint8)
    with_labels, _ = render_ct(anatomy, shape, scanner, np.random.default_rng(1), labels)
    np.testing.assert_array_equal(plain, with_labels)  # the random stream is untouched
    assert set(np.unique(labels)) == {0, *REGION_LABELS.values()}
    # the calcium spots lie in the heart label: HU excess over 400 there only with calcium
    # (ribs and spine, outside every label, are 450-650 HU)
    none = np.zeros(shape, np.uint8)
    no_ca, _ = render_ct(
        {**anatomy, "calcium_mm3": 0.0}, shape, scanner, np.random.default_rng(1), none
    )
    excess = np.clip(with_labels.astype(np.float64) - 400.0, 0, None)
    excess_none = np.clip(no_ca.astype(np.float64) - 400.0, 0, None)
    assert excess_none[none == HEART].sum() == 0 and excess[labels == HEART].sum() > 500
    # contrast-filled pulmonary arteries are brighter than the lungs around them
    assert with_labels[labels == 3].mean() > with_labels[labels == 2].mean() + 500


def test_region_features_are_radiomics_over_each_label(sim: Path) -> None:
    rows = _rows(sim)
    src = CTSource.from_index(sim / "ct_index.parquet")
    enc = CTRadiomicsEncoder(grid=(2, 2, 2), n_bins=16, regions=REGIONS).fit(rows, src)
    f = enc.encode(rows, src)
    nf = enc.n_features
    assert f.pooled.shape == (rows.height, nf * (1 + len(REGIONS))) and f.present.all()
    # an independent read of row 3's study and label map
    study = select_studies(rows[3:4], src.index)
    vol = load_ct(study["path"][0], enc.preprocessing())
    labels = np.asarray(nib.load(study["mask_path"][0]).dataobj)  # RAS already, as the CT
    st = enc.state()
    for k, label in enumerate(REGIONS.values()):
        _, _, raw = radiomics_features(
            vol.array, grid=(1, 1, 1), hu_window=enc.hu_window, n_bins=16,
            spacing=tuple(vol.spacing), roi=labels == label,
        )  # fmt: skip
        want = (raw - st["region_mean"][k]) / st["region_std"][k]
        got = f.pooled[3, nf * (1 + k) : nf * (2 + k)]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # rebuilt from its JSON config and state: the same columns (regions in label order)
    again = build_encoder("ct_radiomics", **enc.config())
    again.set_state(st)
    np.testing.assert_array_equal(again.encode(rows, src).pooled, f.pooled)
    # without regions: the first columns are unchanged and the config has no regions key
    plain = CTRadiomicsEncoder(grid=(2, 2, 2), n_bins=16).fit(rows, src)
    np.testing.assert_allclose(plain.encode(rows, src).pooled, f.pooled[:, :nf], atol=1e-6)
    assert "regions" not in plain.config()


def test_study_without_label_map_gets_zeros(sim: Path, tmp_path: Path) -> None:
    rows = _rows(sim)
    index = pl.read_parquet(sim / "ct_index.parquet")
    first = rows["subject_id"][0]
    index = index.with_columns(
        pl.when(pl.col("subject_id") == first)
        .then(None)
        .otherwise(pl.col("mask_path"))
        .alias("mask_path")
    )
    src = CTSource(index=index, root=sim)
    enc = CTRadiomicsEncoder(grid=(1, 1, 1), n_bins=16, regions=REGIONS).fit(rows, src)
    f = enc.encode(rows, src)
    nf = enc.n_features
    assert f.present[0] and (f.pooled[0, nf:] == 0).all() and (f.pooled[1, nf:] != 0).any()


def test_bad_label_maps_and_options_are_refused(sim: Path, tmp_path: Path) -> None:
    rows = _rows(sim)
    index = pl.read_parquet(sim / "ct_index.parquet")
    src = CTSource(index=index.drop("mask_path"), root=sim)
    with pytest.raises(ValueError, match="mask_path"):
        CTRadiomicsEncoder(regions=REGIONS).fit(rows, src)
    # a label map in another grid names both files
    bad = tmp_path / "bad_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), bad)
    src = CTSource(index=index.with_columns(pl.lit(str(bad)).alias("mask_path")), root=sim)
    with pytest.raises(ValueError, match=r"bad_seg\.nii\.gz.*differs from its CT"):
        CTRadiomicsEncoder(regions=REGIONS).fit(rows, src)
    with pytest.raises(ValueError, match="resampling or cropping"):
        CTRadiomicsEncoder(regions=REGIONS, preprocessing={"spacing": (2.0, 2.0, 2.0)})
    with pytest.raises(ValueError, match="its own label"):
        CTRadiomicsEncoder(regions={"a": 1, "b": 1})
    with pytest.raises(ValueError, match=">= 1"):
        CTRadiomicsEncoder(regions={"a": 0})

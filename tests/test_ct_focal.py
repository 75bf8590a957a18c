"""Each region's focal excess mass (`ct_radiomics(focal=...)`): a white top-hat's HU mass."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
from scipy.ndimage import gaussian_filter, grey_opening
from scipy.stats import spearmanr

from survfuse.data.ct_index import select_studies
from survfuse.data.imaging import load_ct
from survfuse.encoders.base import CTSource, build_encoder
from survfuse.encoders.ct_radiomics import CTRadiomicsEncoder, feature_names
from survfuse.encoders.ct_regions import (
    check_focal,
    focal_features,
    focal_footprint,
    hyperdensity_features,
)
from survfuse.simulate import simulate

REGIONS = {"heart": 1, "lungs": 2}
CONTRASTS = [150.0, 200.0, 300.0]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # site shift 2: development site B's scanner blurs a 150 mm^3 plaque to a 316 HU peak
    # (benchmarks/calcium_rendered_peak.py), below the 330 HU of the right ventricle's blood
    out = tmp_path_factory.mktemp("focal") / "sim"
    return Path(simulate(out, n=120, seed=11, site_shift=2.0, progress=False))


def test_a_one_voxel_spot_is_its_contrast() -> None:
    # one voxel c = 400 HU above a 45 HU background, 2 x 2 x 3 mm voxels (0.012 mL), a 3-voxel
    # box: the opening is the background everywhere, so the top-hat is c at the spot, 0 elsewhere
    vol = np.full((9, 9, 9), 45.0, np.float32)
    vol[4, 4, 4] = 445.0
    roi = np.ones(vol.shape, bool)
    got = focal_features(vol, roi, (2.0, 2.0, 3.0), [100.0, 300.0, 400.0], size_mm=6.0)
    want = np.log1p([300 * 0.012, 100 * 0.012, 0.0])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    roi[4, 4, 4] = False  # only the ROI's voxels count
    assert focal_features(vol, roi, (2.0, 2.0, 3.0), [100.0], size_mm=6.0)[0] == 0.0
    # an empty ROI: zeros, no error
    assert focal_features(vol, ~np.ones_like(roi), (2.0, 2.0, 3.0), [100.0], 6.0)[0] == 0.0


def test_a_pool_wider_than_the_box_is_removed_whatever_its_hu() -> None:
    # blood at 330 HU in an 8-voxel cube and a plaque whose blurred peak (316 HU) lies below it:
    # a threshold that sees the plaque also counts the whole pool; the top-hat sees the plaque only
    vol = np.full((20, 20, 20), 45.0, np.float32)
    vol[2:10, 2:10, 2:10] = 330.0
    vol[15, 15, 15] = 316.0
    roi = np.ones(vol.shape, bool)
    spacing = (1.0, 1.0, 1.0)
    plaque = (316.0 - 45.0 - 150.0) * 1e-3
    np.testing.assert_allclose(
        focal_features(vol, roi, spacing, [150.0], size_mm=3.0), np.log1p([plaque]), rtol=1e-6
    )
    pool_and_plaque = (512 * 30.0 + 16.0) * 1e-3
    np.testing.assert_allclose(
        hyperdensity_features(vol, roi, spacing, [300.0]), np.log1p([pool_and_plaque]), rtol=1e-6
    )


def test_blur_keeps_most_of_the_focal_mass() -> None:
    # a 2-voxel cube at 1,200 HU blurred to a 489 HU peak: a 500 HU threshold loses all of it,
    # the top-hat (box wider than the blurred spot) keeps most of its excess mass
    vol = np.full((24, 24, 24), 45.0, np.float32)
    vol[11:13, 11:13, 11:13] = 1200.0
    roi = np.ones(vol.shape, bool)
    spacing = (1.0, 1.0, 1.0)
    blurred = gaussian_filter(vol, 0.8, mode="nearest")
    assert hyperdensity_features(blurred, roi, spacing, [500.0])[0] == 0.0
    sharp = np.expm1(focal_features(vol, roi, spacing, [10.0], size_mm=5.0)[0])
    assert sharp == pytest.approx(8 * (1200 - 45 - 10) * 1e-3, rel=1e-6)
    kept = np.expm1(focal_features(blurred, roi, spacing, [10.0], size_mm=5.0)[0])
    assert 0.8 * sharp < kept <= sharp


def test_box_and_contrasts_are_checked() -> None:
    # the odd voxel count nearest size_mm / spacing on each axis
    assert focal_footprint((6.25, 6.25, 6.5), 18.0) == (3, 3, 3)
    assert focal_footprint((0.7, 0.7, 1.0), 18.0) == (25, 25, 19)
    assert focal_footprint((5.0, 5.0, 5.0), 3.0) == (1, 1, 1)
    assert check_focal(None, 18.0) == []
    assert check_focal([150, 200], 18.0) == [150.0, 200.0]
    for bad in ([200, 150], [150, 150], [0.0], [-50.0], [float("nan")]):
        with pytest.raises(ValueError, match="focal"):
            check_focal(bad, 18.0)
    with pytest.raises(ValueError, match="focal_size_mm"):
        check_focal([150.0], 0.0)
    with pytest.raises(ValueError, match="needs regions"):
        CTRadiomicsEncoder(focal=[150.0])
    # a box of one voxel on every axis would give zeros silently: refused with the spacing
    vol = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"focal_size_mm=3 .* \(5.0, 5.0, 5.0\)"):
        focal_features(vol, np.ones(vol.shape, bool), (5.0, 5.0, 5.0), [150.0], size_mm=3.0)
    # thick slices: a box of one voxel along z only is an in-plane top-hat, allowed
    assert focal_footprint((0.7, 0.7, 10.0), 18.0) == (25, 25, 1)


def test_encoder_appends_focal_masses_after_the_hyperdensity(sim: Path) -> None:
    rows = pl.read_parquet(sim / "cohort.parquet").select("subject_id", "prediction_time")[:40]
    src = CTSource.from_index(sim / "ct_index.parquet")
    kw = {"grid": (2, 2, 2), "n_bins": 16, "regions": REGIONS, "hyperdensity": [400.0]}
    enc = CTRadiomicsEncoder(**kw, focal=CONTRASTS).fit(rows, src)  # type: ignore[arg-type]
    f = enc.encode(rows, src)
    nf = len(feature_names(16))
    names = enc.region_feature_names()
    assert names[nf:] == ["hyper_400", "focal_150", "focal_200", "focal_300"]
    assert f.meta["region_feature_names"] == names
    assert f.pooled.shape == (rows.height, nf + len(names) * len(REGIONS))
    # an independent read of row 3's study: the opening over the whole volume (the encoder opens
    # only the heart's bounding box plus a margin), standardised with the training statistics
    study = select_studies(rows[3:4], src.index)
    vol = load_ct(study["path"][0], enc.preprocessing())
    heart = np.asarray(nib.load(study["mask_path"][0]).dataobj) == 1
    box = focal_footprint(vol.spacing, 18.0)
    tophat = (vol.array - grey_opening(vol.array, size=box, mode="nearest"))[heart]
    voxel_ml = float(np.prod(vol.spacing)) / 1000.0
    raw = np.log1p([np.clip(tophat - c, 0, None).sum() * voxel_ml for c in CONTRASTS])
    st = enc.state()
    cols = slice(nf + 1, nf + 4)
    want = (raw - st["region_mean"][0, cols]) / st["region_std"][0, cols]
    np.testing.assert_allclose(f.pooled[3, nf + cols.start : nf + cols.stop], want, atol=1e-4)
    # without the option: the same columns minus the focal ones, and no "focal" key in the config
    plain = CTRadiomicsEncoder(**kw).fit(rows, src)  # type: ignore[arg-type]
    assert "focal" not in plain.config()
    p = plain.encode(rows, src).pooled
    n_plain = nf + 1
    for k in range(len(REGIONS)):
        np.testing.assert_allclose(
            f.pooled[:, nf + k * len(names) : nf + k * len(names) + n_plain],
            p[:, nf + k * n_plain : nf + (k + 1) * n_plain],
            atol=1e-5,
        )
    again = build_encoder("ct_radiomics", **enc.config())
    again.set_state(enc.state())
    np.testing.assert_array_equal(again.encode(rows, src).pooled, f.pooled)


def test_focal_mass_ranks_calcium_where_blur_defeats_the_threshold(sim: Path) -> None:
    # on development site B's blurrier scanner (shift 2) the heart's mass over 400 HU misses the
    # small plaques; the focal mass over 200 HU ranks patients by the simulated calcium volume
    cohort = pl.read_parquet(sim / "cohort.parquet")
    oracle = pl.read_parquet(sim / "oracle.parquet")
    site_b = cohort.filter(pl.col("site") == "B").join(
        oracle.select("subject_id", "latent_calcium_mm3"), on="subject_id"
    )
    assert site_b.height >= 25
    src = CTSource.from_index(sim / "ct_index.parquet")
    rows = site_b.select("subject_id", "prediction_time")
    enc = CTRadiomicsEncoder(regions={"heart": 1}, hyperdensity=[400.0], focal=[200.0])
    raw = enc.raw(rows, src)["regions"][:, 0]
    lat = site_b["latent_calcium_mm3"].to_numpy()
    rho_threshold = spearmanr(raw[:, -2], lat).statistic
    rho_focal = spearmanr(raw[:, -1], lat).statistic
    assert rho_focal > 0.85
    assert rho_focal > rho_threshold + 0.05

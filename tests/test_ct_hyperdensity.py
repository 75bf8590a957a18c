"""Each region's excess HU mass over thresholds (`ct_radiomics(hyperdensity=...)`)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
from scipy.ndimage import gaussian_filter

from survfuse.data.ct_index import select_studies
from survfuse.data.imaging import load_ct
from survfuse.encoders.base import CTSource, build_encoder
from survfuse.encoders.ct_radiomics import CTRadiomicsEncoder, feature_names
from survfuse.encoders.ct_regions import check_hyperdensity, hyperdensity_features
from survfuse.simulate import simulate

REGIONS = {"heart": 1, "lungs": 2}
THRESHOLDS = [400.0, 600.0, 1000.0]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(simulate(tmp_path_factory.mktemp("hyper") / "sim", n=40, seed=7, progress=False))


def test_excess_mass_is_volume_times_contrast() -> None:
    # 7 voxels at 1,200 HU on a 45 HU background, voxels of 2 x 2 x 3 mm = 0.012 mL:
    # m_T = 7 x (1200 - T) x 0.012 HU mL for every T above the background, 0 above 1,200
    vol = np.full((10, 10, 10), 45.0, np.float32)
    vol[2:9, 4, 5] = 1200.0
    roi = np.ones(vol.shape, bool)
    got = hyperdensity_features(vol, roi, (2.0, 2.0, 3.0), [400.0, 1000.0, 1300.0])
    want = np.log1p([7 * 800 * 0.012, 7 * 200 * 0.012, 0.0])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # only the ROI's voxels count
    roi[:, :, :] = False
    roi[2:5, 4, 5] = True
    got = hyperdensity_features(vol, roi, (2.0, 2.0, 3.0), [400.0])
    np.testing.assert_allclose(got, np.log1p([3 * 800 * 0.012]), rtol=1e-6)


def test_excess_mass_is_kept_by_blur_below_the_peak() -> None:
    # why mass and not a voxel count: a scanner's blur spreads a spot over more voxels and lowers
    # its peak, but the excess over a threshold below the blurred voxels keeps the spot's mass
    vol = np.full((24, 24, 24), 45.0, np.float32)
    vol[11:13, 11:13, 11:13] = 1200.0
    roi = np.ones(vol.shape, bool)
    sharp = hyperdensity_features(vol, roi, (1.0, 1.0, 1.0), [45.0])
    blurred = gaussian_filter(vol, 0.8, mode="nearest")
    np.testing.assert_allclose(
        hyperdensity_features(blurred, roi, (1.0, 1.0, 1.0), [45.0]), sharp, rtol=1e-3
    )
    # above the blurred peak (489 HU here) it is gone: thresholds must sit below what a site's
    # scanner leaves of a lesion's peak
    assert hyperdensity_features(vol, roi, (1.0, 1.0, 1.0), [600.0])[0] == pytest.approx(
        np.log1p(8 * 600 * 1e-3)
    )
    assert hyperdensity_features(blurred, roi, (1.0, 1.0, 1.0), [600.0])[0] == 0.0


def test_thresholds_are_checked() -> None:
    assert check_hyperdensity(None, (-1024.0, 3071.0)) == []
    assert check_hyperdensity([400, 600], (-1024.0, 3071.0)) == [400.0, 600.0]
    for bad in ([600, 400], [400, 400], [float("nan")], [3071.0], [-2000.0]):
        with pytest.raises(ValueError, match="hyperdensity"):
            check_hyperdensity(bad, (-1024.0, 3071.0))
    with pytest.raises(ValueError, match="needs regions"):
        CTRadiomicsEncoder(hyperdensity=[400.0])


def test_encoder_appends_the_masses_to_each_region(sim: Path) -> None:
    rows = pl.read_parquet(sim / "cohort.parquet").select("subject_id", "prediction_time")
    src = CTSource.from_index(sim / "ct_index.parquet")
    kw = {"grid": (2, 2, 2), "n_bins": 16, "regions": REGIONS}
    enc = CTRadiomicsEncoder(**kw, hyperdensity=THRESHOLDS).fit(rows, src)  # type: ignore[arg-type]
    f = enc.encode(rows, src)
    nf = len(feature_names(16))
    assert enc.n_features == nf
    nf_region = nf + len(THRESHOLDS)
    assert enc.region_feature_names()[-3:] == ["hyper_400", "hyper_600", "hyper_1000"]
    assert f.meta["region_feature_names"] == enc.region_feature_names()
    assert f.pooled.shape == (rows.height, nf + nf_region * len(REGIONS))
    # an independent read of row 5's study: the heart's masses, standardised with training stats
    study = select_studies(rows[5:6], src.index)
    vol = load_ct(study["path"][0], enc.preprocessing())
    labels = np.asarray(nib.load(study["mask_path"][0]).dataobj)
    heart = vol.array[labels == 1].astype(np.float64)
    voxel_ml = float(np.prod(vol.spacing)) / 1000.0
    raw = np.log1p([np.clip(heart - t, 0, None).sum() * voxel_ml for t in THRESHOLDS])
    st = enc.state()
    want = (raw - st["region_mean"][0, nf:]) / st["region_std"][0, nf:]
    np.testing.assert_allclose(f.pooled[5, nf + nf : nf + nf_region], want, rtol=1e-4, atol=1e-4)
    # the radiomics columns are those of the encoder without hyperdensity
    plain = CTRadiomicsEncoder(**kw).fit(rows, src)  # type: ignore[arg-type]
    p = plain.encode(rows, src).pooled
    np.testing.assert_allclose(f.pooled[:, :nf], p[:, :nf], atol=1e-6)
    for k in range(len(REGIONS)):
        a = nf + k * nf_region
        np.testing.assert_allclose(
            f.pooled[:, a : a + nf], p[:, nf * (1 + k) : nf * (2 + k)], atol=1e-5
        )
    # configs without the option keep their fingerprint (no key); with it, it round-trips
    assert "hyperdensity" not in plain.config()
    again = build_encoder("ct_radiomics", **enc.config())
    again.set_state(enc.state())
    np.testing.assert_array_equal(again.encode(rows, src).pooled, f.pooled)


def test_heart_mass_follows_the_simulated_calcium(sim: Path) -> None:
    # the simulator draws coronary calcium as 1,200 HU spots whose total volume is the latent;
    # within the development sites the heart's excess mass over 400 HU ranks patients by it
    from scipy.stats import spearmanr

    cohort = pl.read_parquet(sim / "cohort.parquet")
    oracle = pl.read_parquet(sim / "oracle.parquet")
    dev = cohort.filter(pl.col("site") != "C").join(
        oracle.select("subject_id", "latent_calcium_mm3"), on="subject_id"
    )
    src = CTSource.from_index(sim / "ct_index.parquet")
    rows = dev.select("subject_id", "prediction_time")
    enc = CTRadiomicsEncoder(regions={"heart": 1}, hyperdensity=[400.0])
    raw = enc.raw(rows, src)["regions"][:, 0, -1]
    assert spearmanr(raw, dev["latent_calcium_mm3"]).statistic > 0.8

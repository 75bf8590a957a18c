"""CT intensity calibration from the lung-peak landmark (`CTPreprocessing.hu_calibration`).

References: the simulator's scanner HU offset (`survfuse.simulate.ct.Scanner.hu_offset`, added to
every in-body voxel of an otherwise identical rendering), and the uncalibrated load.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from scipy.ndimage import binary_erosion

from ct_only_study import ct_only_config
from survfuse.data.hu_calibration import CTCalibrationWarning, lung_peak_landmark
from survfuse.data.imaging import CTPreprocessing, load_ct
from survfuse.encoders import build_encoder
from survfuse.experiment.config import ConfigError
from survfuse.experiment.config_load import parse_config
from survfuse.experiment.executors import get_executor
from survfuse.experiment.rundir import RunDir
from survfuse.experiment.runner import encode_features, prepare_cohort
from survfuse.simulate.ct import Scanner, nifti_gz_bytes, render_ct

ANATOMY = {
    "body_scale": 1.0,
    "age": 62.0,
    "emphysema": 0.08,
    "rv_lv": 1.1,
    "clot": 0.2,
    "calcium_mm3": 60.0,
}
SHAPE = (64, 64, 40)
PLAIN = CTPreprocessing(hu_window=None)
CALIBRATED = CTPreprocessing(hu_window=None, hu_calibration="landmarks")


def _scan(offset: float, seed: int = 3, **scanner: float) -> tuple[np.ndarray, tuple]:
    vol, spacing = render_ct(
        ANATOMY, SHAPE, Scanner(hu_offset=offset, **scanner), np.random.default_rng(seed)
    )
    return vol, spacing


def _write(tmp: Path, name: str, vol: np.ndarray, spacing: tuple) -> Path:
    path = tmp / f"{name}.nii.gz"
    path.write_bytes(nifti_gz_bytes(vol, spacing))
    return path


@pytest.mark.parametrize("offset", [-50.0, -25.0, 16.0, 60.0])
def test_calibration_recovers_the_scanner_offset(tmp_path: Path, offset: float) -> None:
    """Same anatomy and noise, HU scale offset by the scanner: the estimated shift is the offset
    (within a few HU) and the calibrated volumes agree voxel by voxel up to that error."""
    ref_vol, spacing = _scan(0.0)
    off_vol, _ = _scan(offset)
    ref = load_ct(_write(tmp_path, "ref", ref_vol, spacing), CALIBRATED)
    shifted = load_ct(_write(tmp_path, "off", off_vol, spacing), CALIBRATED)
    s_ref, s_off = ref.meta["hu_calibration_shift"], shifted.meta["hu_calibration_shift"]
    assert abs(s_ref) < 3.0  # the simulator puts lung at -850 HU
    assert abs(s_off - offset) < 4.0
    # the rendering differs by the offset exactly (rounded to int16) where nothing was clipped
    body = (ref_vol > -1000) & (off_vol > -1000)
    diff = shifted.array[body] - ref.array[body]
    np.testing.assert_allclose(diff, offset - (s_off - s_ref), atol=1.01)  # int16 rounding
    plain = load_ct(_write(tmp_path, "plain", off_vol, spacing), PLAIN)
    assert "hu_calibration_shift" not in plain.meta
    # before calibration the in-body mean differs by the offset, after by the estimate's error
    gap_before = float(plain.array[body].mean() - ref.array[body].mean())
    gap_after = float(shifted.array[body].mean() - ref.array[body].mean())
    assert abs(gap_before) > abs(offset) - 4.0 and abs(gap_after) < 4.0


def test_padding_stays_at_the_floor_and_is_not_shifted(tmp_path: Path) -> None:
    vol, spacing = _scan(-50.0)
    out = load_ct(_write(tmp_path, "v", vol, spacing), CALIBRATED)
    assert out.meta["hu_calibration_shift"] < -40.0  # tissue moves up ...
    outside = vol == -1024
    assert outside.sum() > 1000
    np.testing.assert_array_equal(out.array[outside], -1024.0)  # ... the masked outside does not
    assert out.array.min() >= -1024.0 and np.isfinite(out.array).all()


def _no_lung(vol: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same body with every lung voxel replaced by soft tissue (an abdomen-like volume)."""
    out = vol.astype(np.float32)
    lung = binary_erosion(out > -1000, iterations=3) & (out < -500)
    out[lung] = 40.0 + 10.0 * np.random.default_rng(seed).standard_normal(int(lung.sum()))
    return np.rint(out).astype(np.int16)


def test_volume_without_lung_falls_back_with_a_warning_naming_the_file(tmp_path: Path) -> None:
    vol, spacing = _scan(16.0)  # (at -50 HU emphysema clips into the outside value)
    path = _write(tmp_path, "abdomen", _no_lung(vol), spacing)
    with pytest.warns(CTCalibrationWarning, match=r"abdomen\.nii\.gz.*no lung"):
        out = load_ct(path, CALIBRATED)
    assert out.meta["hu_calibration_shift"] == 0.0
    np.testing.assert_array_equal(out.array, load_ct(path, PLAIN).array)


@pytest.mark.parametrize(
    ("volume", "reason"),
    [
        (np.full((4, 4, 4), -850.0), "no lung in the field of view"),  # tiny
        (np.full((32, 32, 20), -1024.0), "no voxel above the floor"),  # all padding
        (
            -1000.0 + 20.0 * np.random.default_rng(0).standard_normal((32, 32, 20)),
            "edge",
        ),  # all air
        (40.0 + 10.0 * np.random.default_rng(1).standard_normal((32, 32, 20)), "no lung"),
        (np.where(np.arange(8000).reshape(20, 20, 20) % 7 == 0, np.nan, -850.0), "non-finite"),
    ],
)
def test_untrustworthy_landmarks_give_no_shift_never_nan(volume: np.ndarray, reason: str) -> None:
    mark = lung_peak_landmark(volume.astype(np.float32), -1024.0)
    assert mark.shift is None and reason in mark.reason


def test_all_air_volume_loads_uncalibrated(tmp_path: Path) -> None:
    air = np.rint(-1000.0 + 20.0 * np.random.default_rng(0).standard_normal((32, 32, 20)))
    path = _write(tmp_path, "air", air.astype(np.int16), (10.0, 10.0, 10.0))
    with pytest.warns(CTCalibrationWarning, match="air.nii.gz"):
        out = load_ct(path, CALIBRATED)
    assert out.meta["hu_calibration_shift"] == 0.0 and np.isfinite(out.array).all()


def test_lung_peak_of_a_sampled_large_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    """Volumes above MAX_SAMPLE voxels are sampled (a Fortran-ordered array is not copied)."""
    import survfuse.data.hu_calibration as hc

    vol, _ = _scan(25.0)
    full = lung_peak_landmark(vol.astype(np.float32), -1024.0).shift
    monkeypatch.setattr(hc, "MAX_SAMPLE", vol.size // 3)
    sampled = lung_peak_landmark(np.asfortranarray(vol.astype(np.float32)), -1024.0).shift
    assert full is not None and sampled is not None
    assert abs(full - 25.0) < 4.0 and abs(sampled - full) < 3.0


def test_config_checks_the_option_and_it_changes_the_fingerprint(sim_small: Path) -> None:
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples/tiny.yaml").read_text())
    raw["data"] = {"cohort": str(sim_small / "cohort.parquet")}
    raw["encoders"]["ct"][0].setdefault("params", {})["preprocessing"] = {
        "hu_calibration": "landmark"
    }
    with pytest.raises(ConfigError, match="did you mean 'landmarks'"):
        parse_config(raw)
    with pytest.raises(ValueError, match="landmarks"):
        CTPreprocessing(hu_calibration="lung")
    plain = build_encoder("ct_radiomics")
    cal = build_encoder("ct_radiomics", preprocessing={"hu_calibration": "landmarks"})
    assert cal.preprocessing().hu_calibration == "landmarks"
    assert plain.preprocessing().hu_calibration == "none"
    assert cal.fingerprint() != plain.fingerprint()
    # the default is left out of dumps (configs and store keys written before the option are
    # unchanged); a dump round-trips
    assert "hu_calibration" not in CTPreprocessing().model_dump()
    for prep in (CTPreprocessing(), CALIBRATED):
        assert CTPreprocessing(**prep.model_dump(mode="json")) == prep


def test_outcome_permutation_leaves_calibrated_features_identical(
    sim_small: Path, tmp_path: Path
) -> None:
    """The calibration reads each volume alone: shuffled outcomes, identical features; and the
    features differ from the uncalibrated ones (the option is applied)."""
    prep = {"hu_calibration": "landmarks"}
    folders = []
    for k, (permute, calibration) in enumerate(((False, prep), (True, prep), (False, {}))):
        cfg = ct_only_config(
            sim_small,
            {"name": "unimodal", "modality": "ct"},
            feature_store=str(tmp_path / f"store{k}"),
        )
        enc = cfg.encoders.ct[0]
        enc.params["preprocessing"] = {**enc.params.get("preprocessing", {}), **calibration}
        rd = RunDir(tmp_path / f"run{k}")
        cohort = prepare_cohort(cfg, rd)
        if permute:  # every outcome shuffled across rows (rows, splits and sites kept)
            perm = np.random.default_rng(1).permutation(cohort.height)
            outcome = [c for c in cohort.columns if c.endswith(("_time", "_event"))]
            outcome = [c for c in outcome if c != "prediction_time"] + ["time", "event"]
            cohort = cohort.with_columns(cohort.select(outcome)[perm])
        ex = get_executor("local", workers=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CTCalibrationWarning)  # 32x32x20: some fall back
            index = encode_features(cfg, rd, cohort, ex, progress=False)
        ex.close()
        folders.append(rd.root / index["ct"]["ct_radiomics"])
    for name in ("pooled.npy", "tokens.npy"):
        a, b, plain = (f / name for f in folders)
        assert a.read_bytes() == b.read_bytes(), name
        assert a.read_bytes() != plain.read_bytes(), name
    assert pl.read_parquet(RunDir(tmp_path / "run0").cohort).height > 0

"""Where the simulator's MACE image signal is lost: the CT volume against the radiomic features.

Issue 17 asks whether the gap between MACE models and the oracle is a ceiling of the observed
data or a loss in survfuse. The image part of the MACE log-hazard is the coronary calcium volume,
rendered as 1,200 HU spots on a ring around the heart (`survfuse.simulate.ct`). On the
development sites of a simulated folder this prints, on one held-out half (Harrell's C for MACE):

- `latent`: the calcium latent itself (what the image-only oracle ranks by);
- `heart_roi`: an anatomy-guided measurement from the *rendered volume*: the summed excess over
  400 HU inside the ring where the simulator places calcium (the heart centre and axes scaled by
  the patient's body size, the only latent it uses). No model is fitted; it shows how much of
  the signal the voxels still hold after partial volume, blur and noise;
- `whole_volume`: the same excess summed over the whole volume (what a measurement without
  anatomy sees: ribs, sternum and spine reach 450-650 HU);
- `ct_radiomics`: an elastic-net Cox (scikit-survival coxnet, penalty chosen on a validation
  third of the training half) on the demo's `ct_radiomics` features;
- `ct_radiomics+regions`: the same with per-organ features over the simulator's label maps
  (`ct_radiomics(regions=...)`; folders that have them).

    .venv/bin/python benchmarks/ct_signal_probe.py --data FOLDER [--max-rows 1600]
    .venv/bin/python benchmarks/ct_signal_probe.py --simulate OUT --seed 5 --imbalance 1
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl

from survfuse.data.ct_index import MASK_COLUMN
from survfuse.encoders.base import CTSource
from survfuse.encoders.ct_radiomics import CTRadiomicsEncoder
from survfuse.metrics import concordance_index
from survfuse.simulate import simulate
from survfuse.simulate.ct import REGION_LABELS, _grid

THRESHOLD_HU = 400.0  # above the sternum (450 HU after blur rarely) and trabecular bone


def heart_ring_excess(vol: np.ndarray, spacing: tuple[float, ...], body_scale: float) -> float:
    """Summed HU excess over `THRESHOLD_HU` (x mm^3) in the simulator's calcium ring.

    The ring: 0.6-1.0 of the heart's in-plane axes around its centre, over the z range of the
    spots (`survfuse.simulate.ct.render_ct`); the +-4 mm heart jitter is ignored.
    """
    s = float(body_scale)
    x, y, z = _grid(vol.shape, tuple(float(v) for v in spacing))  # type: ignore[arg-type]
    centre, axes = (-22.0 * s, 30.0 * s, -45.0), (62.0 * s, 52.0 * s)
    rho = np.sqrt(((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2)
    roi = (rho > 0.6) & (rho < 1.0) & (z > centre[2] - 27.0) & (z < centre[2] + 37.0)
    roi = np.broadcast_to(roi, vol.shape)
    return float(np.clip(vol[roi] - THRESHOLD_HU, 0, None).sum() * np.prod(spacing))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def coxnet_c(
    x: np.ndarray, time: np.ndarray, event: np.ndarray, train: np.ndarray, test: np.ndarray
) -> float:
    """Test C of a coxnet whose alpha is chosen on the last third of the training rows."""
    from sksurv.linear_model import CoxnetSurvivalAnalysis
    from sksurv.util import Surv

    mu, sd = x[train].mean(0), x[train].std(0)
    x = (x - mu) / np.where(sd > 0, sd, 1.0)
    idx = np.flatnonzero(train)
    fit, val = idx[: 2 * len(idx) // 3], idx[2 * len(idx) // 3 :]
    best = (-1.0, 0.0)
    for alpha in (0.3, 0.1, 0.03, 0.01, 0.003):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = CoxnetSurvivalAnalysis(l1_ratio=0.5, alphas=[alpha], max_iter=20_000)
            m.fit(x[fit], Surv.from_arrays(event[fit], time[fit]))
        c = concordance_index(time[val], event[val], m.predict(x[val])).estimate
        best = max(best, (c, alpha))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = CoxnetSurvivalAnalysis(l1_ratio=0.5, alphas=[best[1]], max_iter=20_000)
        m.fit(x[train], Surv.from_arrays(event[train], time[train]))
    return float(concordance_index(time[test], event[test], m.predict(x[test])).estimate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, help="a `survfuse simulate` folder")
    ap.add_argument("--simulate", type=Path, help="simulate a folder here first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--imbalance", type=float, default=1.0)
    ap.add_argument("--site-shift", type=float, default=1.0)
    ap.add_argument("--max-rows", type=int, default=1600)
    args = ap.parse_args()
    data = args.data
    if args.simulate is not None:
        data = args.simulate
        if not (data / "dataset.json").exists():
            simulate(
                data, n=args.n, seed=args.seed, imbalance=args.imbalance,
                interaction=0.0, site_shift=args.site_shift, progress=False,
            )  # fmt: skip
    if data is None:
        ap.error("give --data or --simulate")
    oracle = pl.read_parquet(data / "oracle.parquet")
    cohort = pl.read_parquet(data / "cohort.parquet")
    src = CTSource.from_index(data / "ct_index.parquet")
    external = set(json.loads((data / "dataset.json").read_text())["parameters"]["external"])
    df = (
        cohort.filter(~pl.col("site").is_in(sorted(external)))
        .head(args.max_rows)
        .join(oracle.drop("site", "prediction_time"), on="subject_id", maintain_order="left")
    )
    # the study each prediction reads (the latest at or before it: never a follow-up study)
    studies = src.studies(df.select("subject_id", "prediction_time"))
    ring, whole = [], []
    for path, s in zip(studies["path"], df["latent_body_scale"], strict=True):
        img = nib.load(src.root / path)
        vol = np.asarray(img.dataobj, dtype=np.float32)
        sp = tuple(float(v) for v in img.header.get_zooms()[:3])
        ring.append(heart_ring_excess(vol, sp, s))
        whole.append(float(np.clip(vol - THRESHOLD_HU, 0, None).sum() * np.prod(sp)))
    enc = CTRadiomicsEncoder(grid=(2, 2, 2), n_bins=16, pooled="volume+cells")
    rows = df.select("subject_id", "prediction_time")
    feats = enc.fit(rows, src).encode(rows, src)
    # the same with per-organ features from the simulator's label maps (folders written since
    # the simulator writes them: the CT index's mask_path)
    region_feats = None
    if MASK_COLUMN in src.index.columns:
        enc_r = CTRadiomicsEncoder(
            grid=(2, 2, 2), n_bins=16, pooled="volume+cells", regions=REGION_LABELS
        )
        region_feats = enc_r.fit(rows, src).encode(rows, src)
    time = df["mace_time"].to_numpy().astype(np.float64)
    event = df["mace_event"].to_numpy().astype(bool)
    rng = np.random.default_rng(0)
    test = rng.random(df.height) < 0.5
    train = ~test

    def c(risk: np.ndarray) -> float:
        return float(concordance_index(time[test], event[test], risk[test]).estimate)

    lat = df["latent_calcium_mm3"].to_numpy()
    measures = ["latent", "heart_roi", "whole_volume", "ct_radiomics"]
    c_region = []
    if region_feats is not None:
        measures.append("ct_radiomics+regions")
        c_region = [coxnet_c(np.asarray(region_feats.pooled, np.float64), time, event, train, test)]
    table = pl.DataFrame(
        {
            "measure": measures,
            "mace_c_test": [
                c(lat),
                c(np.asarray(ring)),
                c(np.asarray(whole)),
                coxnet_c(np.asarray(feats.pooled, np.float64), time, event, train, test),
                *c_region,
            ],
            "spearman_vs_latent": [
                1.0,
                _spearman(np.asarray(ring), lat),
                _spearman(np.asarray(whole), lat),
                *[float("nan")] * (1 + len(c_region)),
            ],
        }
    )
    print(f"{data}: {df.height} development rows, {int(test.sum())} held out")
    print(table)


if __name__ == "__main__":
    main()

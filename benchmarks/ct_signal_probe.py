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
  (`ct_radiomics(regions=...)`; folders that have them);
- `ct_radiomics+regions+hyperdensity`: the same with each region's excess HU mass over the
  `--hyperdensity` thresholds (`ct_radiomics(hyperdensity=...)`).

With `--external`, the coxnet models are trained on the development training half as before and
also scored on the external site's rows (column `mace_c_external`).

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


def coxnet_risk(
    x: np.ndarray, time: np.ndarray, event: np.ndarray, train: np.ndarray
) -> np.ndarray:
    """Risk [N] of every row from a coxnet whose alpha is chosen on the last third of `train`."""
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
    return np.asarray(m.predict(x), np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, help="a `survfuse simulate` folder")
    ap.add_argument("--simulate", type=Path, help="simulate a folder here first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--imbalance", type=float, default=1.0)
    ap.add_argument("--site-shift", type=float, default=1.0)
    ap.add_argument("--max-rows", type=int, default=1600)
    ap.add_argument("--hyperdensity", default="400,600,1000", help="HU thresholds, comma list")
    ap.add_argument(
        "--focal", default="", help="focal contrasts (HU above the surroundings), comma list"
    )
    ap.add_argument("--focal-size-mm", type=float, default=18.0)
    ap.add_argument("--external", action="store_true", help="also score the external site")
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
    is_ext = pl.col("site").is_in(sorted(external))
    parts = [cohort.filter(~is_ext).head(args.max_rows)]
    if args.external:
        parts.append(cohort.filter(is_ext))
    df = pl.concat(parts).join(
        oracle.drop("site", "prediction_time"), on="subject_id", maintain_order="left"
    )
    ext = df["site"].is_in(sorted(external)).to_numpy()
    # the study each prediction reads (the latest at or before it: never a follow-up study)
    studies = src.studies(df.select("subject_id", "prediction_time"))
    ring, whole = [], []
    for path, s in zip(studies["path"], df["latent_body_scale"], strict=True):
        img = nib.load(src.root / path)
        vol = np.asarray(img.dataobj, dtype=np.float32)
        sp = tuple(float(v) for v in img.header.get_zooms()[:3])
        ring.append(heart_ring_excess(vol, sp, s))
        whole.append(float(np.clip(vol - THRESHOLD_HU, 0, None).sum() * np.prod(sp)))
    rows = df.select("subject_id", "prediction_time")
    fit_rows = rows.filter(pl.Series(~ext))
    kw: dict = {"grid": (2, 2, 2), "n_bins": 16, "pooled": "volume+cells"}
    # with the simulator's label maps (folders written since it writes them: the CT index's
    # mask_path), one encoder with regions and hyperdensity gives all three feature sets: its
    # columns are the plain encoder's, then per region the radiomics and the masses (each
    # standardised on its own, so dropping columns leaves the others as they are)
    models: dict[str, np.ndarray] = {}
    heart_masses: dict[str, np.ndarray] = {}
    if MASK_COLUMN in src.index.columns:
        thresholds = [float(v) for v in args.hyperdensity.split(",")]
        focal = [float(v) for v in args.focal.split(",") if v]
        enc = CTRadiomicsEncoder(
            **kw, regions=REGION_LABELS, hyperdensity=thresholds, focal=focal or None,
            focal_size_mm=args.focal_size_mm,
        )  # fmt: skip
        pooled = np.asarray(enc.fit(fit_rows, src).encode(rows, src).pooled, np.float64)
        names = enc.region_feature_names()
        n_plain = pooled.shape[1] - len(REGION_LABELS) * len(names)
        kind = np.array(["plain"] * n_plain + [n.split("_")[0] for n in names] * len(REGION_LABELS))
        models["ct_radiomics"] = pooled[:, :n_plain]
        models["ct_radiomics+regions"] = pooled[:, ~np.isin(kind, ["hyper", "focal"])]
        models["ct_radiomics+regions+hyperdensity"] = pooled[:, kind != "focal"]
        if focal:
            models["ct_radiomics+regions+hyperdensity+focal"] = pooled
        # the heart's mass columns alone (region order follows the label values: heart first)
        heart_masses = {
            n: pooled[:, n_plain + j]
            for j, n in enumerate(names)
            if n.split("_")[0] in ("hyper", "focal")
        }
    else:
        enc = CTRadiomicsEncoder(**kw)
        models["ct_radiomics"] = np.asarray(enc.fit(fit_rows, src).encode(rows, src).pooled)
    time = df["mace_time"].to_numpy().astype(np.float64)
    event = df["mace_event"].to_numpy().astype(bool)
    rng = np.random.default_rng(0)
    test = (rng.random(df.height) < 0.5) & ~ext
    train = ~test & ~ext

    def c(risk: np.ndarray, rows: np.ndarray) -> float:
        if not rows.any():
            return float("nan")
        return float(concordance_index(time[rows], event[rows], risk[rows]).estimate)

    lat = df["latent_calcium_mm3"].to_numpy()
    risks = {"latent": lat, "heart_roi": np.asarray(ring), "whole_volume": np.asarray(whole)}
    for name, x in models.items():
        risks[name] = coxnet_risk(np.asarray(x, np.float64), time, event, train)
    table = pl.DataFrame(
        {
            "measure": list(risks),
            "mace_c_test": [c(r, test) for r in risks.values()],
            "mace_c_external": [c(r, ext) for r in risks.values()],
            "spearman_vs_latent": [
                _spearman(r[~ext], lat[~ext]) if k in ("heart_roi", "whole_volume") else np.nan
                for k, r in risks.items()
            ],
        }
    )
    print(f"{data}: {int((~ext).sum())} development rows, {int(test.sum())} held out, ")
    print(f"{int(ext.sum())} external rows")
    print(table)
    if heart_masses:
        # how well each heart mass column alone ranks patients by the calcium latent, per site
        sites = df["site"].to_numpy()
        per_site = {
            "heart column": list(heart_masses),
            **{
                f"spearman site {site}": [
                    _spearman(x[sites == site], lat[sites == site]) for x in heart_masses.values()
                ]
                for site in sorted(set(sites))
            },
        }
        print(pl.DataFrame(per_site))


if __name__ == "__main__":
    main()

"""Does the coronary calcium survive each site's scanner? Model-free measures, per site.

The image part of the simulator's MACE log-hazard is the coronary calcium volume (1,200 HU spots
in the heart). For the first `--rows` rows of a `survfuse simulate` folder (all sites, or
`--sites`), this measures on each CT volume, inside the heart label of its `mask_path` (the
simulator's organ mask), with no fitted model:

- `m400`, `m500`: log(1 + summed HU excess over 400 / 500 HU x voxel mL), above contrast-filled
  blood: `ct_radiomics`' heart `hyperdensity` masses (`ct_regions.hyperdensity_features`);
- `tophat_3sd`: the white top-hat (HU minus its 3x3x3 grey opening) above 3 robust noise sds
  (MAD of the median-filter residual), summed x voxel volume: focal bright spots on any
  background;
- `hmax`: the heart's maximum HU;

and prints Harrell's C of each against MACE and its Spearman correlation with the calcium latent,
pooled and within each site. A measure that follows the latent within development sites but not
within the external one shows a loss in the data (the external scanner's blur, voxel size and
noise), not in survfuse (docs/benchmarks.md, "External sites (issue 18), session 7").

    .venv/bin/python benchmarks/calcium_by_site.py FOLDER [--rows 900] [--sites A,B]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
from scipy.ndimage import grey_opening, median_filter
from scipy.stats import spearmanr

from survfuse.encoders.base import CTSource
from survfuse.encoders.ct_regions import hyperdensity_features
from survfuse.metrics import concordance_index
from survfuse.simulate.ct import REGION_LABELS


def measures(vol: np.ndarray, heart: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    """The model-free calcium measures of one volume [X, Y, Z] inside `heart` [X, Y, Z] bool."""
    h = vol[heart]
    voxel_mm3 = float(np.prod(spacing))
    m400, m500 = hyperdensity_features(vol, heart, spacing, [400.0, 500.0])
    tophat = (vol - grey_opening(vol, size=(3, 3, 3)))[heart]
    resid = (vol - median_filter(vol, size=5))[heart]
    noise = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    return {
        "m400": float(m400),
        "m500": float(m500),
        "tophat_3sd": float(np.clip(tophat - 3.0 * noise, 0, None).sum() * voxel_mm3),
        "hmax": float(h.max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="a `survfuse simulate` folder (with organ masks)")
    ap.add_argument("--rows", type=int, default=900)
    ap.add_argument("--sites", default=None, help="comma list of sites (default: all)")
    args = ap.parse_args()
    oracle = pl.read_parquet(args.data / "oracle.parquet")
    cohort = pl.read_parquet(args.data / "cohort.parquet")
    if args.sites:
        cohort = cohort.filter(pl.col("site").is_in(args.sites.split(",")))
    df = cohort.head(args.rows).join(
        oracle.drop("site", "prediction_time"), on="subject_id", maintain_order="left"
    )
    src = CTSource.from_index(args.data / "ct_index.parquet")
    studies = src.studies(df.select("subject_id", "prediction_time"))
    rows = []
    for path, mask in zip(studies["path"], studies["mask_path"], strict=True):
        img = nib.load(src.root / path)
        vol = np.asarray(img.dataobj, np.float32)
        labels = np.asarray(nib.load(src.root / mask).dataobj)
        spacing = tuple(float(v) for v in img.header.get_zooms()[:3])
        rows.append(measures(vol, labels == REGION_LABELS["heart"], spacing))
    table = pl.DataFrame(rows)
    latent = df["latent_calcium_mm3"].to_numpy()
    site = df["site"].to_numpy()
    time = df["mace_time"].to_numpy().astype(np.float64)
    event = df["mace_event"].to_numpy().astype(bool)
    sites = sorted(set(site))
    print(
        f"{args.data.name}: {df.height} rows, per site {[(s, int((site == s).sum())) for s in sites]}"
    )
    out = []
    for name in ["latent", *table.columns]:
        x = latent if name == "latent" else table[name].to_numpy()
        rec = {"measure": name, "mace_c": concordance_index(time, event, x).estimate}
        rec["spearman_all"] = float(spearmanr(x, latent).statistic)
        for s in sites:
            xs = x[site == s]
            # a measure constant within a site (e.g. no voxel above 400 HU) follows nothing
            rec[f"spearman_{s}"] = (
                0.0 if np.ptp(xs) == 0 else float(spearmanr(xs, latent[site == s]).statistic)
            )
        out.append(rec)
    with pl.Config(tbl_rows=20, tbl_cols=20, float_precision=3):
        print(pl.DataFrame(out))


if __name__ == "__main__":
    main()

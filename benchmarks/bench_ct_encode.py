"""CT encoding throughput: volumes/s and peak RSS, on CPU.

Cases (each in its own subprocess so peak RSS is its own):
- `radiomics`: survfuse `radiomics_features` (bincount over voxel labels) beside a straightforward
  per-cell NumPy loop computing the same statistics (the peer; ratio = survfuse speed-up);
- `radiomics_e2e`: the `ct_radiomics` encoder through `FeatureStore`, including NIfTI loading;
- `ctfm`: the CT-FM architecture (MONAI SegResEncoder, init_filters 32, blocks_down
  (1, 2, 2, 4, 4); random weights) forward + token pooling, batch 1.

Sizes: 64x64x40 and 160x160x96. Usage: `python benchmarks/bench_ct_encode.py [--threads 2]`.
The machine may be shared: figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = [(64, 64, 40), (160, 160, 96)]


def _volumes(shape: tuple[int, int, int], n: int, seed: int = 0) -> list[np.ndarray[Any, Any]]:
    """Torso-like HU volumes: air, a body ellipse of soft tissue/fat, two lungs, a spine."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    base = np.full(shape, -1000.0, np.float32)
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    base[body] = 40
    base[body & ((x / 0.85) ** 2 + (y / 0.65) ** 2 > 0.8)] = -100
    for cx in (-0.4, 0.4):
        base[((x - cx) / 0.3) ** 2 + (y / 0.45) ** 2 < 1] = -850
    base[(x**2 + (y + 0.5) ** 2) < 0.01] = 700
    return [base + rng.normal(0, 30, shape).astype(np.float32) for _ in range(n)]


def _naive_radiomics(hu: np.ndarray[Any, Any], grid: tuple[int, int, int]) -> np.ndarray[Any, Any]:
    """The peer: the same statistics per cell with a Python loop over cells."""
    from survfuse.encoders.ct_radiomics import TISSUES

    x = np.clip(hu, -1024, 3071)
    edges = [
        np.linspace(0, s, g + 1).round().astype(int) for s, g in zip(x.shape, grid, strict=True)
    ]
    out = []
    for i in range(grid[0]):
        for j in range(grid[1]):
            for k in range(grid[2]):
                c = x[edges[0][i] : edges[0][i + 1], edges[1][j] : edges[1][j + 1],
                      edges[2][k] : edges[2][k + 1]] / 1000.0  # fmt: skip
                h = np.histogram(c, bins=16, range=(-1.024, 3.071))[0] / c.size
                fr = [((c * 1000 >= lo) & (c * 1000 < hi)).mean() for lo, hi in TISSUES.values()]
                m, sd = c.mean(), c.std()
                zc = (c - m) / (sd + 1e-12)
                pct = np.percentile(c, [10, 25, 50, 75, 90])
                d = [np.abs(np.diff(c, axis=a)).mean() for a in range(3)]
                g = np.sqrt(
                    np.diff(c, axis=0)[:, :-1, :-1] ** 2
                    + np.diff(c, axis=1)[:-1, :, :-1] ** 2
                    + np.diff(c, axis=2)[:-1, :-1, :] ** 2
                )
                out.append(
                    np.concatenate(
                        [
                            h,
                            fr,
                            [m, sd, (zc**3).mean(), (zc**4).mean() - 3],
                            pct,
                            d,
                            [g.mean(), g.std()],
                        ]
                    )
                )
    return np.stack(out)


def _rate(fn: Any, items: list[Any], min_s: float = 2.0) -> float:
    fn(items[0])  # warm-up
    t0, done = time.perf_counter(), 0
    while True:
        for it in items:
            fn(it)
            done += 1
        if time.perf_counter() - t0 > min_s:
            return done / (time.perf_counter() - t0)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case(name: str, shape: tuple[int, int, int], threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    vols = _volumes(shape, 4)
    if name == "radiomics":
        from survfuse.encoders.ct_radiomics import radiomics_features

        ours = _rate(lambda v: radiomics_features(v, grid=(4, 4, 4)), vols)
        peer = _rate(lambda v: _naive_radiomics(v, (4, 4, 4)), vols[:2], min_s=1.0)
        return {"vol_s": ours, "peer_vol_s": peer, "rss_mb": _peak_rss_mb()}
    if name == "radiomics_e2e":
        import datetime as dt

        import nibabel as nib
        import polars as pl

        from survfuse.encoders import CTSource, FeatureStore, build_encoder

        tmp = Path(tempfile.mkdtemp())
        n = 40 if shape[0] <= 64 else 12
        paths = []
        for i in range(n):
            p = tmp / f"ct{i}.nii.gz"
            nib.save(nib.Nifti1Image(vols[i % 4].astype(np.int16), np.eye(4)), str(p))
            paths.append(str(p))
        t0 = dt.datetime(2020, 1, 1)
        src = CTSource(
            pl.DataFrame({"subject_id": range(n), "study_time": [t0] * n, "path": paths})
        )
        coh = pl.DataFrame({"subject_id": range(n), "prediction_time": [t0] * n})
        enc = build_encoder("ct_radiomics").fit(coh[:4], src)
        start = time.perf_counter()
        FeatureStore(tmp / "store").encode(enc, coh, src, chunk_size=16, progress=False)
        return {"vol_s": n / (time.perf_counter() - start), "rss_mb": _peak_rss_mb()}
    if name == "ctfm":
        from survfuse.encoders.ct_monai import PRESETS, _build_network

        p = PRESETS["ct-fm"]
        net = _build_network(p.network, p.network_args).eval()
        k = 3 if shape[0] <= 64 else 1

        def run(v: np.ndarray[Any, Any]) -> None:
            with torch.inference_mode():
                x = torch.from_numpy((np.clip(v, -1024, 2048) + 1024) / 3072)[None, None]
                f = net(x.float())[-1]
                torch.nn.functional.adaptive_avg_pool3d(f, (4, 4, 4))

        return {
            "vol_s": _rate(run, vols[:k], min_s=3.0 if k > 1 else 0.0),
            "rss_mb": _peak_rss_mb(),
        }
    raise ValueError(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case")
    ap.add_argument("--shape")
    args = ap.parse_args()
    if args.case:
        shape = tuple(int(s) for s in args.shape.split("x"))
        print(json.dumps(case(args.case, shape, args.threads)))  # type: ignore[arg-type]
        return
    rows = []
    for name in ("radiomics", "radiomics_e2e", "ctfm"):
        for shape in SIZES:
            s = "x".join(map(str, shape))
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--case",
                    name,
                    "--shape",
                    s,
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((name, s, res))
            print(name, s, res, flush=True)
    print(
        f"\n{'case':<15}{'shape':<13}{'vol/s':>9}{'peer vol/s':>12}{'ratio':>8}{'peak RSS MB':>13}"
    )
    for name, s, r in rows:
        peer = r.get("peer_vol_s")
        ratio = f"{r['vol_s'] / peer:.1f}x" if peer else "-"
        peer_s = f"{peer:.2f}" if peer else "-"
        print(f"{name:<15}{s:<13}{r['vol_s']:>9.2f}{peer_s:>12}{ratio:>8}{r['rss_mb']:>13.0f}")
    print("(radiomics peer: a per-cell NumPy loop computing the same statistics; e2e includes "
          "NIfTI loading and the feature store; ctfm: random weights, batch 1, CPU)")  # fmt: skip


if __name__ == "__main__":
    main()

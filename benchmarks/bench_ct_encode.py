"""CT encoding throughput: volumes/s and peak RSS, on CPU.

Cases (each in its own subprocess so peak RSS is its own):
- `radiomics`: survfuse `radiomics_features` (bincount over voxel labels) beside a straightforward
  per-cell NumPy loop computing the same statistics (the peer; ratio = survfuse speed-up);
- `radiomics_e2e`: the `ct_radiomics` encoder through `FeatureStore`, including NIfTI loading;
- `ctfm`: the CT-FM architecture (MONAI SegResEncoder, init_filters 32, blocks_down
  (1, 2, 2, 4, 4); random weights) forward + token pooling, batch 1.

Sizes: 64x64x40 and 160x160x96. Usage: `python benchmarks/bench_ct_encode.py [--threads 2]`.

`--shape 512,512,300` (comma-separated): clinical-size CT. Synthetic int16 gzip NIfTI volumes
(stored LPS at 0.7 x 0.7 x 1.25 mm); per-volume time (median over `--volumes`, after a warm-up
volume) and peak RSS, each path in its own process: nibabel load alone (the I/O floor),
survfuse's load -> preprocess -> `ct_radiomics` features, and MONAI's LoadImage -> Orientation
-> Spacing -> ScaleIntensityRange; prints the ratios to the floor and to MONAI. `--ref-src DIR`
adds survfuse's path imported from DIR (e.g. `DIR/src` of another commit's worktree) in the same
run, after the others, so a change is timed against its parent under the same load.

`--fm`: the foundation-model presets end to end (`ct_monai` presets `merlin`, `ct-fm`,
`ct-fm-patches`, published pipelines, random weights in the published layout) on one synthetic
512 x 512 x 300 int16 NIfTI torso (0.7 x 0.7 x 1.25 mm, -1024 HU outside a circular field of
view): peak RSS of the encoding process (checkpoint written beforehand by another process), time
to load + preprocess, time of the forward pass, and the model input's shape.
Usage: `python benchmarks/bench_ct_encode.py --fm [--threads 2]`.
The machine may be shared: figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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


def torch_threads(n: int) -> None:
    """Pin torch's intra-op threads (MONAI's Spacing and survfuse's resampling use torch)."""
    import torch

    torch.set_num_threads(n)


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


FM_SHAPE = (512, 512, 300)
FM_SPACING = (0.7, 0.7, 1.25)
FM_PRESETS = ("merlin", "ct-fm-patches", "ct-fm")


def _write_fm_inputs(folder: Path) -> None:
    """The synthetic 512 x 512 x 300 CT (int16 NIfTI) and a random checkpoint per preset."""
    import nibabel as nib
    import torch
    from safetensors.torch import save_file

    from survfuse.encoders.ct_monai import PRESETS, _build_network

    rng = np.random.default_rng(0)
    nx, ny, nz = FM_SHAPE
    x, y = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), indexing="ij")
    plane = np.full((nx, ny), -1000, np.int16)  # air
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    plane[body] = 40
    plane[body & ((x / 0.85) ** 2 + (y / 0.65) ** 2 > 0.8)] = -100  # fat
    for cx in (-0.4, 0.4):
        plane[((x - cx) / 0.3) ** 2 + (y / 0.45) ** 2 < 1] = -850  # lungs
    plane[(x**2 + (y + 0.5) ** 2) < 0.01] = 700  # spine
    plane[x**2 + y**2 > 1] = -1024  # outside the field of view
    vol = np.empty(FM_SHAPE, np.int16)
    for k in range(nz):
        noise = rng.normal(0, 30, (nx, ny)).astype(np.int16)
        vol[:, :, k] = np.where(plane == -1024, plane, plane + noise)
    affine = np.diag([*FM_SPACING, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), str(folder / "ct.nii.gz"))
    for preset in ("merlin", "ct-fm"):
        p = PRESETS[preset]
        with torch.device("meta"):
            net = _build_network(p.network, p.network_args)
        net.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(0)
        state = {}
        for name, t in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                state[name] = torch.zeros_like(t)
            elif name.endswith("running_var"):
                state[name] = torch.empty_like(t).uniform_(0.5, 1.5, generator=gen)
            elif t.ndim > 1:
                std = (2.0 / t[0].numel()) ** 0.5
                state[name] = torch.empty_like(t).normal_(0, std, generator=gen)
            else:
                state[name] = torch.empty_like(t).uniform_(-0.1, 0.1, generator=gen)
        if preset == "merlin":
            torch.save({f"encode_image.{k}": v for k, v in state.items()}, folder / "merlin.pt")
        else:
            save_file(state, str(folder / "model.safetensors"))


def fm_case(preset: str, folder: Path, threads: int) -> dict[str, Any]:
    """Encode the synthetic CT with one FM preset; peak RSS of this process, times."""
    import datetime as dt

    import polars as pl
    import torch

    from survfuse.encoders import CTSource, build_encoder
    from survfuse.encoders.fm_transforms import FMPreprocessing, load_fm

    torch.set_num_threads(threads)
    ckpt = folder / ("merlin.pt" if preset == "merlin" else "model.safetensors")
    enc: Any = build_encoder("ct_monai", preset=preset, checkpoint=str(ckpt), device="cpu")
    enc.network()
    rss_net = _peak_rss_mb()
    start = time.perf_counter()
    vol = load_fm(folder / "ct.nii.gz", FMPreprocessing(pipeline=enc._preset.pipeline))
    t_prep = time.perf_counter() - start
    shape = "x".join(map(str, vol.array.shape))
    del vol
    t0 = dt.datetime(2020, 1, 1)
    src = CTSource(
        pl.DataFrame({"subject_id": [1], "study_time": [t0], "path": [str(folder / "ct.nii.gz")]})
    )
    start = time.perf_counter()
    f = enc.encode(pl.DataFrame({"subject_id": [1], "prediction_time": [t0]}), src)
    t_total = time.perf_counter() - start
    assert f.present.all() and np.isfinite(f.pooled).all()
    use = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "input": shape,
        "prep_s": t_prep,
        "encode_s": t_total,
        "cpu_s": use.ru_utime + use.ru_stime,  # the whole process: load + prep twice + encode
        "rss_mb": _peak_rss_mb(),
        "rss_net_mb": rss_net,
        "tokens": int(f.mask.sum()) if f.mask is not None else 0,
    }


def main_fm(threads: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench_fm_"))
    cmd = [sys.executable, __file__, "--threads", str(threads), "--fm-dir", str(folder)]
    rows = []
    try:
        subprocess.run([*cmd, "--fm-write"], check=True)
        for preset in FM_PRESETS:
            out = subprocess.run(
                [*cmd, "--fm-case", preset], capture_output=True, text=True, check=True
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((preset, res))
            print(preset, res, flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # ~0.9 GB: the CT and two checkpoints
    print(
        f"\n{'preset':<15}{'model input':<15}{'prep s':>8}{'encode s':>10}{'CPU s':>8}"
        f"{'peak RSS MB':>13}{'(net only)':>12}"
    )
    for preset, r in rows:
        print(
            f"{preset:<15}{r['input']:<15}{r['prep_s']:>8.1f}{r['encode_s']:>10.1f}"
            f"{r['cpu_s']:>8.0f}{r['rss_mb']:>13.0f}{r['rss_net_mb']:>12.0f}"
        )
    print(
        f"(512x512x300 int16 NIfTI, {threads} torch threads, CPU; encode = load + published "
        "pipeline + forward + tokens; CPU s = user + system time of that process; peak RSS of "
        "the encoding process)"
    )


# ---------------------------------------------------------------------- clinical-size CT
CLINICAL_CASES = ("nibabel_load", "radiomics", "monai_chain")


def _write_clinical(folder: Path, shape: tuple[int, int, int], n: int) -> list[Path]:
    """`n` synthetic int16 gzip NIfTI torsos of `shape` (0.7 x 0.7 x 1.25 mm; LPS-stored, so
    reorientation to RAS is real work, as for DICOM-converted scans)."""
    import nibabel as nib

    paths = []
    for i in range(n):
        vol = np.clip(_volumes(shape, 1, seed=i)[0], -1024, 3071).astype(np.int16)
        affine = np.diag([-FM_SPACING[0], -FM_SPACING[1], FM_SPACING[2], 1.0])
        paths.append(folder / f"ct{i}.nii.gz")
        nib.save(nib.Nifti1Image(vol, affine), str(paths[-1]))
    return paths


def clinical_case(name: str, paths: list[Path]) -> dict[str, Any]:
    """Per-volume seconds (each volume once, after one warm-up volume) and this process's
    peak RSS for one path: the nibabel load alone (int16 -> float32 HU, the I/O floor),
    survfuse's load -> preprocess -> ct_radiomics features, or MONAI's LoadImage ->
    Orientation -> Spacing -> ScaleIntensityRange chain."""
    if name == "nibabel_load":
        import nibabel as nib

        def run(p: Path) -> None:
            np.asarray(nib.load(str(p)).get_fdata(dtype=np.float32))

    elif name == "radiomics":
        from survfuse.data.imaging import load_ct
        from survfuse.encoders.ct_radiomics import CTRadiomicsEncoder, radiomics_features

        enc = CTRadiomicsEncoder()
        prep = enc.preprocessing()

        def run(p: Path) -> None:
            vol = load_ct(p, prep)
            radiomics_features(
                vol.array, grid=enc.grid, hu_window=enc.hu_window, spacing=tuple(vol.spacing)
            )

    elif name == "monai_chain":
        from monai.transforms import (
            Compose,
            EnsureChannelFirst,
            LoadImage,
            Orientation,
            ScaleIntensityRange,
            Spacing,
        )

        chain = Compose(
            [
                LoadImage(image_only=True),
                EnsureChannelFirst(),
                Orientation(axcodes="RAS"),
                Spacing(pixdim=FM_SPACING, mode="bilinear"),
                ScaleIntensityRange(a_min=-1024, a_max=3071, b_min=0.0, b_max=1.0, clip=True),
            ]
        )

        def run(p: Path) -> None:
            chain(str(p))

    else:
        raise ValueError(name)
    run(paths[0])  # warm-up: imports, numba compilation
    seconds = []
    for p in paths[1:]:
        t0 = time.perf_counter()
        run(p)
        seconds.append(time.perf_counter() - t0)
    return {"s_per_volume": float(np.median(seconds)), "rss_mb": _hwm_mb()}


def _hwm_mb() -> float:
    """Peak resident memory of this process image (VmHWM): unlike ru_maxrss, it does not
    inherit the parent's peak across fork + exec (the parent held the volumes it wrote)."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def main_clinical(
    shape: tuple[int, int, int], n: int, threads: int, ref_src: str | None = None
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench_ct_clinical_"))
    try:
        paths = _write_clinical(folder, shape, n + 1)
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        print(f"{n} + 1 volumes of {shape} int16 gzip NIfTI ({mb:.0f} MB each on disk)")
        res = {}
        cases = [*CLINICAL_CASES, *(["radiomics@ref"] if ref_src else [])]
        for name in cases:
            case_name, _, ref = name.partition("@")
            env = dict(os.environ)
            if ref:
                env["PYTHONPATH"] = str(ref_src)
            cmd = [sys.executable, __file__, "--threads", str(threads), "--clinical-case"]
            out = subprocess.run(
                [*cmd, case_name, *map(str, paths)],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            res[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(name, res[name], os.getloadavg(), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    floor, monai = res["nibabel_load"]["s_per_volume"], res["monai_chain"]["s_per_volume"]
    print(f"\n{'path':<44}{'s / volume':>11}{'x load':>8}{'x MONAI':>9}{'peak RSS MB':>13}")
    labels = {
        "nibabel_load": "nibabel load (I/O floor)",
        "radiomics": "survfuse load -> preprocess -> ct_radiomics",
        "monai_chain": "MONAI Load -> Orientation -> Spacing -> Scale",
        "radiomics@ref": "the same survfuse path, --ref-src",
    }
    for name in res:
        r = res[name]
        print(
            f"{labels[name]:<44}{r['s_per_volume']:>11.2f}{r['s_per_volume'] / floor:>8.2f}"
            f"{r['s_per_volume'] / monai:>9.2f}{r['rss_mb']:>13.0f}"
        )
    print(f"(targets: radiomics <= 1.5x load, <= 1.0x MONAI; {threads} threads; median of {n})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case")
    ap.add_argument("--shape")
    ap.add_argument("--fm", action="store_true", help="the FM presets on a 512x512x300 CT")
    ap.add_argument("--fm-dir")
    ap.add_argument("--fm-write", action="store_true")
    ap.add_argument("--fm-case")
    ap.add_argument("--volumes", type=int, default=3, help="clinical --shape: volumes timed")
    ap.add_argument("--clinical-case")
    ap.add_argument("--ref-src", help="clinical --shape: also time survfuse imported from here")
    ap.add_argument("paths", nargs="*")
    args = ap.parse_args()
    torch_threads(args.threads)
    if args.clinical_case:
        print(json.dumps(clinical_case(args.clinical_case, [Path(p) for p in args.paths])))
        return
    if args.shape and "," in args.shape:
        dims = tuple(int(s) for s in args.shape.split(","))
        main_clinical(dims, args.volumes, args.threads, args.ref_src)  # type: ignore[arg-type]
        return
    if args.fm_write:
        _write_fm_inputs(Path(args.fm_dir))
        return
    if args.fm_case:
        print(json.dumps(fm_case(args.fm_case, Path(args.fm_dir), args.threads)))
        return
    if args.fm:
        main_fm(args.threads)
        return
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

"""MEDS windowing throughput and memory: survfuse `MEDSDataset.iter_windowed` vs a plain polars
query.

Generates a synthetic MEDS dataset (default: 50 million events over 100,000 subjects in 10 shards,
written under /tmp, never into the repository), then windows it for one prediction per subject
(100,000 keys) and prints events/s (input events per second of wall time) and peak RSS. Each
method runs in a fresh subprocess limited to `--threads` polars threads, so its peak RSS is its
own. The peer is the obvious one-shot polars query (scan all shards -> join keys -> filter ->
sort -> collect with the streaming engine), which holds the whole windowed result in memory.

    .venv/bin/python benchmarks/bench_meds.py                      # full size
    .venv/bin/python benchmarks/bench_meds.py --events 2000000 --subjects 4000   # quick

Targets (issue 5): >= 10 million events/s on 2 cores with peak RSS <= 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

US_PER_DAY = 86_400 * 1_000_000


def generate(root: Path, n_events: int, n_subjects: int, n_shards: int, seed: int) -> None:
    """Write `n_shards` MEDS shards (subjects partitioned by id, sorted by subject and time)."""
    import polars as pl

    rng = np.random.default_rng(seed)
    vocab = pl.Series("code", [f"LAB//{i:05d}//mg/dL" for i in range(2000)], dtype=pl.String)
    base_us = int(datetime(2000, 1, 1).timestamp() * 1e6)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    subjects = np.array_split(np.arange(n_subjects, dtype=np.int64), n_shards)
    per_event = n_events / n_subjects
    remaining = n_events
    for k, sids in enumerate(subjects):
        n_k = remaining if k == n_shards - 1 else round(per_event * len(sids))
        remaining -= n_k
        # 2 static events per subject, the rest timed over a 10-year history
        counts = rng.multinomial(n_k - 2 * len(sids), np.full(len(sids), 1 / len(sids)))
        sid_t = np.repeat(sids, counts)
        start = rng.integers(0, 10 * 365, len(sids)) * US_PER_DAY + base_us
        offs = rng.integers(0, 10 * 365 * US_PER_DAY, sid_t.size)
        t = np.repeat(start, counts) + offs
        order = np.lexsort((t, sid_t))
        sid_t, t = sid_t[order], t[order]
        sid_s = np.repeat(sids, 2)
        codes = rng.integers(0, vocab.len(), sid_t.size + sid_s.size)
        values = rng.normal(size=codes.size).astype(np.float32)
        values[rng.random(codes.size) < 0.5] = np.nan
        timed = pl.DataFrame(
            {"subject_id": sid_t, "time": t, "_static": np.zeros(sid_t.size, dtype=bool)}
        )
        static = pl.DataFrame(
            {
                "subject_id": sid_s,
                "time": np.zeros(sid_s.size, dtype=np.int64),
                "_static": np.ones(sid_s.size, dtype=bool),
            }
        )
        df = (
            pl.concat([static, timed])
            .sort("subject_id", "_static", descending=[False, True], maintain_order=True)
            .with_columns(
                pl.when(pl.col("_static"))
                .then(None)
                .otherwise(pl.col("time"))
                .cast(pl.Datetime("us"))
                .alias("time"),
                vocab.gather(codes).alias("code"),
                pl.Series("numeric_value", values).fill_nan(None),
            )
            .drop("_static")
        )
        df.write_parquet(root / "data" / f"{k}.parquet", row_group_size=1_000_000)
        del df, timed, static
    keys_rng = np.random.default_rng(seed + 1)
    pl.DataFrame(
        {
            "subject_id": np.arange(n_subjects, dtype=np.int64),
            "prediction_time": (
                base_us + keys_rng.integers(5 * 365, 15 * 365, n_subjects) * US_PER_DAY
            ),
        }
    ).with_columns(pl.col("prediction_time").cast(pl.Datetime("us"))).write_parquet(
        root / "keys.parquet"
    )
    (root / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": "bench"}))


def run_method(method: str, root: Path, batch_size: int) -> dict[str, float]:
    """Window all keys with one method (in this process); return rows, seconds, peak RSS."""
    import polars as pl

    from survfuse.data.meds import MEDSDataset

    keys = pl.read_parquet(root / "keys.parquet")
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    rows = 0
    n_events = 0
    if method == "survfuse":
        ds = MEDSDataset(root)
        n_events = ds.validate()["n_events"]
        checksum = 0.0
        for frame in ds.iter_windowed(keys, batch_size=batch_size):
            rows += frame.height
            checksum += float(frame["numeric_value"].cast(pl.Float64).sum())
    elif method == "polars_one_shot":
        events = pl.scan_parquet(root / "data" / "*.parquet")
        n_events = int(events.select(pl.len()).collect().item())
        out = (
            events.join(keys.lazy(), on="subject_id")
            .filter(pl.col("time").is_null() | (pl.col("time") <= pl.col("prediction_time")))
            .sort(["subject_id", "prediction_time", "time"], nulls_last=False)
            .collect(engine="streaming")
        )
        rows = out.height
        checksum = float(out["numeric_value"].cast(pl.Float64).sum())
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "rows": rows,
        "checksum": checksum,
        "events": n_events,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_gb": peak_kb / 1024**2,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000_000)
    ap.add_argument("--subjects", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--root", type=Path, default=Path("/tmp/survfuse_bench_meds"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="survfuse,polars_one_shot")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        print(json.dumps(run_method(args._child, args.root, args.batch_size)))
        return

    env = {**os.environ, "POLARS_MAX_THREADS": str(args.threads), "OMP_NUM_THREADS": "1"}
    tag = args.root / f"n{args.events}_s{args.subjects}_k{args.shards}_seed{args.seed}.done"
    if not tag.exists():
        print(f"generating {args.events:,} events / {args.subjects:,} subjects in {args.root} ...")
        t0 = time.perf_counter()
        if args.root.exists():
            for p in sorted(args.root.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
                "import bench_meds as b; b.generate(Path(sys.argv[2]), *map(int, sys.argv[3:]))",
                str(Path(__file__).parent),
                str(args.root),
                str(args.events),
                str(args.subjects),
                str(args.shards),
                str(args.seed),
            ],
            check=True,
            env=env,
        )
        tag.touch()
        print(f"  generated in {time.perf_counter() - t0:.1f} s")

    results = {}
    for method in args.methods.split(","):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--root",
                str(args.root),
                "--batch-size",
                str(args.batch_size),
                "--_child",
                method,
            ],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        )
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])

    ref = results.get("survfuse")
    print(f"load average (1, 5, 15 min): {os.getloadavg()} on {os.cpu_count()} CPUs")
    print(
        f"\nMEDS windowing, {args.subjects:,} predictions, {args.shards} shards, "
        f"POLARS_MAX_THREADS={args.threads} (shared machine: timings are noisy)"
    )
    print(
        f"{'method':<18}{'events':>14}{'rows out':>14}{'seconds':>10}{'Mevents/s':>11}"
        f"{'CPU s':>8}{'Mev/CPU-s':>11}{'peak RSS GB':>13}{'time ratio':>12}"
    )
    for name, r in results.items():
        ratio = r["seconds"] / ref["seconds"] if ref else float("nan")
        print(
            f"{name:<18}{r['events']:>14,}{r['rows']:>14,}{r['seconds']:>10.2f}"
            f"{r['events'] / r['seconds'] / 1e6:>11.2f}{r['cpu_seconds']:>8.1f}"
            f"{r['events'] / r['cpu_seconds'] / 1e6:>11.2f}{r['peak_rss_gb']:>13.2f}{ratio:>12.2f}"
        )
    if ref and "polars_one_shot" in results:
        peer = results["polars_one_shot"]
        same = peer["rows"] == ref["rows"] and abs(peer["checksum"] - ref["checksum"]) <= 1e-6 * (
            1 + abs(ref["checksum"])
        )
        print(f"outputs agree (row count and sum of numeric_value): {same}")


if __name__ == "__main__":
    main()

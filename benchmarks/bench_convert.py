"""INSPECT conversion throughput and memory: `survfuse convert inspect` on a synthetic
INSPECT-sized release.

Generates (under a temp folder, never in the repository) an INSPECT-layout release: the 2025
label files (`study_mapping_*.tsv`, `labels_*.tsv`, `splits_*.tsv` joined on `impression_id`)
for `--studies` CT studies of about 0.84 x as many patients (INSPECT: 23,248 studies, 19,402
patients), and MEDS 0.1 nested shards (`patient_id`, `static_measurements`,
`events[].measurements[]`) with `--measurements` measurements in total (Zipf-distributed codes
over a 65,535-code vocabulary, 20% with a numeric value, 5 measurements per event on average,
about 12% of patients with a `MEDS_DEATH` event). CT files are not generated (`--ct-root` is not
passed), so the run measures the cohort and MEDS work.

The conversion runs in a fresh subprocess (`survfuse convert inspect`); its wall time and peak
RSS (`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`) are printed with the rate in input
measurements per second.

    .venv/bin/python benchmarks/bench_convert.py                       # 23,000 studies, 200M
    .venv/bin/python benchmarks/bench_convert.py --measurements 20000000   # quick

Targets (issue 21): >= 5 million measurements/s with peak RSS <= 4 GB on the 2-core machine.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

US_PER_DAY = 86_400 * 1_000_000
VOCAB = 65_535
_MEAS = pa.struct(
    [
        ("code", pa.dictionary(pa.int32(), pa.string())),
        ("text_value", pa.string()),
        ("numeric_value", pa.float32()),
        ("datetime_value", pa.timestamp("us")),
        ("metadata", pa.null()),
    ]
)


def _zipf_table(rng: np.random.Generator, size: int = 1 << 20) -> np.ndarray:
    """A lookup table whose uniform samples are Zipf(1.1)-distributed code indices."""
    p = 1.0 / np.arange(1, VOCAB) ** 1.1
    counts = np.maximum(1, np.round(p / p.sum() * size)).astype(np.int64)
    return rng.permutation(np.repeat(np.arange(1, VOCAB, dtype=np.int32), counts))


def _list(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def nested_shard(
    rng: np.random.Generator,
    pids: np.ndarray,
    index_us: np.ndarray,
    n_meas: int,
    vocab: pa.Array,
    table: np.ndarray,
) -> pa.Table:
    """One MEDS 0.1 shard: `pids` patients sharing `n_meas` measurements (vectorised)."""
    n_p = pids.size
    n_events_total = max(n_p, n_meas // 5)
    n_ev = rng.multinomial(n_events_total - n_p, np.full(n_p, 1 / n_p)) + 1
    n_m = rng.multinomial(n_meas - n_events_total, np.full(n_events_total, 1 / n_events_total)) + 1
    # event times: a 5-year history before the index CT and up to 3 years after, sorted
    owner = np.repeat(np.arange(n_p), n_ev)
    start = index_us[owner] - 5 * 365 * US_PER_DAY
    t = start + rng.integers(0, 8 * 365 * US_PER_DAY, owner.size)
    t -= t % 60_000_000
    t = t[np.lexsort((t, owner))]
    codes = table[rng.integers(0, table.size, n_meas)]
    dead = rng.random(n_p) < 0.12  # the last measurement of a dying patient is the death
    last_event = np.cumsum(n_ev) - 1
    last_meas = np.cumsum(n_m)[last_event] - 1
    codes[last_meas[dead]] = 0
    has_value = rng.random(n_meas) < 0.2
    values = rng.normal(size=n_meas).astype(np.float32)
    meas = pa.StructArray.from_arrays(
        [
            pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), vocab),
            pa.nulls(n_meas, pa.string()),
            pa.array(values, pa.float32(), mask=~has_value),
            pa.nulls(n_meas, pa.timestamp("us")),
            pa.nulls(n_meas, pa.null()),
        ],
        fields=list(_MEAS),
    )
    m_off = np.concatenate([[0], np.cumsum(n_m)])
    events = pa.StructArray.from_arrays(
        [pa.array(t, pa.timestamp("us")), _list(m_off, meas)], names=["time", "measurements"]
    )
    e_off = np.concatenate([[0], np.cumsum(n_ev)])
    empty = pa.StructArray.from_arrays([pa.array([], f.type) for f in _MEAS], fields=list(_MEAS))
    return pa.table(
        {
            "patient_id": pa.array(pids, pa.int64()),
            "static_measurements": _list(np.zeros(n_p + 1, np.int64), empty),
            "events": _list(e_off, events),
        }
    )


def generate(root: Path, n_studies: int, n_meas: int, n_shards: int, seed: int) -> dict[str, int]:
    """Write an INSPECT-layout release under `root`: labels/ (TSVs) and meds/data/ (shards)."""
    rng = np.random.default_rng(seed)
    n_pat = max(1, round(n_studies * 19_402 / 23_248))
    pids = np.sort(rng.choice(np.arange(10_000, 10_000 + 50 * n_pat), n_pat, replace=False))
    owner = np.concatenate([np.arange(n_pat), rng.integers(0, n_pat, n_studies - n_pat)])
    owner.sort()
    base = np.datetime64("2005-01-01T00:00", "us").astype(np.int64)
    pt = base + rng.integers(0, 15 * 365 * US_PER_DAY, n_studies)
    pt -= pt % 60_000_000
    first_pt = np.full(n_pat, np.iinfo(np.int64).max)
    np.minimum.at(first_pt, owner, pt)
    labels = root / "labels"
    labels.mkdir(parents=True)
    imp = np.arange(1, n_studies + 1) * 7 + 100_000
    when = np.datetime_as_string(pt.astype("datetime64[us]"), unit="s")
    with (labels / "study_mapping_20250611.tsv").open("w") as f:
        f.write("impression_id\tperson_id\timage_id\tprocedure_DATETIME\n")
        for i in range(n_studies):
            f.write(f"{imp[i]}\t{pids[owner[i]]}\t{imp[i]:x}.nii.gz\t{when[i].replace('T', ' ')}\n")
    cols = ["pe_positive_nlp", "1_month_mortality", "6_month_mortality", "12_month_mortality"]
    spell = np.array(["TRUE", "FALSE", "Censored"])
    with (labels / "labels_20250611.tsv").open("w") as f:
        f.write("impression_id\t" + "\t".join(cols) + "\n")
        v = spell[rng.integers(0, 3, (n_studies, len(cols)))]
        for i in range(n_studies):
            f.write(f"{imp[i]}\t" + "\t".join(v[i]) + "\n")
    split_of = np.array(["train", "valid", "test"])[rng.choice(3, n_pat, p=[0.7, 0.1, 0.2])]
    with (labels / "splits_20250611.tsv").open("w") as f:
        f.write("impression_id\tsplit\n")
        for i in range(n_studies):
            f.write(f"{imp[i]}\t{split_of[owner[i]]}\n")
    vocab = pa.array(["MEDS_DEATH"] + [f"SNOMED/{1000 + i}" for i in range(1, VOCAB)])
    table = _zipf_table(rng)
    data = root / "meds" / "data"
    data.mkdir(parents=True)
    per_shard = np.array_split(np.arange(n_pat), n_shards)
    remaining = n_meas
    for k, idx in enumerate(per_shard):
        n_k = remaining if k == n_shards - 1 else round(n_meas * idx.size / n_pat)
        remaining -= n_k
        # write in pieces of ~4M measurements (one row group each) to bound generator memory
        n_pieces = max(1, round(n_k / 4_000_000))
        writer = None
        for j, sub in enumerate(np.array_split(idx, n_pieces)):
            n_j = round(n_k / n_pieces) if j < n_pieces - 1 else n_k - round(n_k / n_pieces) * j
            t = nested_shard(rng, pids[sub], first_pt[sub], n_j, vocab, table)
            if writer is None:
                writer = pq.ParquetWriter(data / f"{k}.parquet", t.schema, compression="zstd")
            writer.write_table(t, row_group_size=t.num_rows)
        assert writer is not None
        writer.close()
    return {"studies": n_studies, "patients": n_pat, "measurements": n_meas}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=23_000)
    ap.add_argument("--measurements", type=int, default=200_000_000)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", type=Path, default=None, help="Folder for the generated data.")
    ap.add_argument("--keep", action="store_true", help="Keep the generated data (prints where).")
    ap.add_argument("--data", type=Path, default=None, help="Reuse a release kept by --keep.")
    args = ap.parse_args()
    tmp = args.data or Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        if args.data is None:
            info = generate(
                tmp / "inspect", args.studies, args.measurements, args.shards, args.seed
            )
            (tmp / "info.json").write_text(json.dumps(info))
        info = json.loads((tmp / "info.json").read_text())
        shutil.rmtree(tmp / "out", ignore_errors=True)
        gen_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in (tmp / "inspect").rglob("*") if p.is_file())
        exe = Path(sys.executable).with_name("survfuse")
        cmd = [
            str(exe),
            "convert",
            "inspect",
            "--cohort",
            str(tmp / "inspect" / "labels"),
            "--meds",
            str(tmp / "inspect" / "meds"),
            "--out",
            str(tmp / "out"),
        ]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        rss_gb = usage.ru_maxrss / 1024**2
        if res.returncode != 0:
            print(res.stdout, res.stderr, file=sys.stderr)
            raise SystemExit(res.returncode)
        counts = json.loads((tmp / "out" / "conversion.json").read_text())
        out_size = sum(p.stat().st_size for p in (tmp / "out").rglob("*") if p.is_file())
        print(
            json.dumps(
                {
                    **info,
                    "generate_s": round(gen_s, 1),
                    "input_gb": round(size / 1e9, 2),
                    "output_gb": round(out_size / 1e9, 2),
                    "convert_wall_s": round(wall, 1),
                    "measurements_per_s": round(info["measurements"] / wall),
                    "peak_rss_gb": round(rss_gb, 2),
                    "convert_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                    "load_avg_1min_before": round(load, 1),
                    "cohort_rows": counts["output"]["cohort_rows"],
                    "meds_rows": counts["meds"]["rows_written"],
                    "cpu_count": os.cpu_count(),
                },
                indent=2,
            )
        )
    finally:
        if args.keep or args.data is not None:
            print(f"data kept in {tmp} (reuse with --data {tmp})", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark the EHR encoders on a synthetic MEDS dataset (default 100k subjects, ~10M events).

Per encoder: fit time (on a training subset), encode wall time for the whole cohort (ehr_counts
also through a `FeatureStore`, chunks written and assembled), windowed
events encoded per second and the peak RSS of a fresh process that does only that (each run is a
spawned subprocess pinned to `--cores` CPUs, POLARS_MAX_THREADS set to match). Peers in the same
table: `MEDSDataset.windowed` alone (the data layer's share of every encoder), and a plain
polars / pandas bag-of-codes count over the same windowed events (what a user would write by
hand; no vocabulary, no numeric features, no look-back windows). CLMBR is measured on a subset:
pretraining tokens/s and encode events/s.

    .venv/bin/python benchmarks/bench_ehr_encode.py                 # 100k subjects, ~10M events
    .venv/bin/python benchmarks/bench_ehr_encode.py --subjects 20000 # quicker
    .venv/bin/python benchmarks/bench_ehr_encode.py --tasks ehr_counts,ehr_counts:store \
        --repeats 3                                   # the FeatureStore overhead alone

The load average is printed before every run (`uptime`). Each encoder run also hashes its output
(sha256 of every array, after the clock stops): the FeatureStore's must equal the direct encode's.
That hash is the first full read of the result, timed apart ("read s"): the direct encode's is
in memory, the store's is memory-mapped from the page cache (a store that wrote around the page
cache, e.g. with direct I/O, would have its readers pay for it here).

`--write-methods` instead measures what writing 756 MB costs by each way a store could write
it, and the first full read after it (each in a fresh process; see `write_method`):

    .venv/bin/python benchmarks/bench_ehr_encode.py --write-methods --repeats 4 --write-dir /tmp

`--sim N` instead compares CLMBR with ehr_counts on the simulator (n = N subjects): validation
perplexity vs the unigram baseline, and the internal-test C-index of a penalised Cox model
(scikit-survival Coxnet) on each encoder's pooled features for the simulated PE-mortality outcome.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import queue
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

US_PER_DAY = 86_400_000_000


# ---------------------------------------------------------------------- synthetic MEDS
def make_meds(root: Path, n_subjects: int, events_per_subject: int, seed: int = 0) -> int:
    """Write a synthetic MEDS dataset (4 shards); return the number of events.

    Codes follow a Zipf law over 20,000 codes; 200 lab codes carry numeric values; each subject
    has visits (days) over ~5 years before its prediction time (one year after the last visit
    for 90% of the events, so ~10% of events fall after prediction_time and must be dropped),
    one static code and MEDS_BIRTH.
    """
    rng = np.random.default_rng(seed)
    (root / "data").mkdir(parents=True, exist_ok=True)
    n_codes, n_labs = 20_000, 200
    names = np.array([f"DX//{i}" for i in range(n_codes)] + [f"LAB//{i}" for i in range(n_labs)])
    base = np.datetime64("2015-01-01T00:00:00", "us").astype(np.int64)
    pt = base + rng.integers(0, 365, n_subjects) * US_PER_DAY + 5 * 365 * US_PER_DAY
    total = 0
    for shard, ids in enumerate(np.array_split(np.arange(n_subjects), 4)):
        counts = rng.poisson(events_per_subject, ids.size).clip(1)
        sid = np.repeat(ids, counts)
        n = sid.size
        # visit days: ~ events_per_subject / 10 visits per subject
        day = rng.integers(0, 6 * 365, n)
        time = pt[sid] - day * US_PER_DAY + (day < 365) * 400 * US_PER_DAY  # some after pt
        lab = rng.random(n) < 0.3
        code = np.where(lab, n_codes + rng.integers(0, n_labs, n), (rng.zipf(1.3, n) - 1) % n_codes)
        value = np.where(lab, rng.normal(100, 20, n), np.nan).astype(np.float32)
        ev = pl.DataFrame(
            {
                "subject_id": sid.astype(np.int64),
                "time": time.astype("datetime64[us]"),
                "code": names[code],
                "numeric_value": value,
            }
        ).with_columns(pl.col("numeric_value").fill_nan(None))
        static = pl.DataFrame(
            {
                "subject_id": ids.astype(np.int64),
                "time": np.full(ids.size, np.datetime64("NaT"), "datetime64[us]"),
                "code": np.where(rng.random(ids.size) < 0.5, "GENDER//F", "GENDER//M"),
                "numeric_value": np.full(ids.size, np.nan, np.float32),
            }
        ).with_columns(pl.col("numeric_value").fill_nan(None))
        birth = static.with_columns(
            (pl.lit(base) - pl.lit(60 * 365 * US_PER_DAY)).cast(pl.Datetime("us")).alias("time"),
            pl.lit("MEDS_BIRTH").alias("code"),
        )
        out = pl.concat([static, birth, ev]).sort("subject_id", "time", nulls_last=False)
        out.write_parquet(root / "data" / f"{shard}.parquet")
        total += out.height
    cohort = pl.DataFrame(
        {
            "subject_id": np.arange(n_subjects, dtype=np.int64),
            "prediction_time": pt.astype("datetime64[us]"),
        }
    )
    cohort.write_parquet(root / "cohort.parquet")
    return total


# ---------------------------------------------------------------------- one measured run
def _digest(f: Any) -> str:
    """sha256 of every array of a ModalityFeatures (name, dtype, shape and bytes)."""
    h = hashlib.sha256()
    for name in ("subject_id", "prediction_time", "pooled", "present", "tokens", "mask"):
        a = getattr(f, name)
        if a is None:
            continue
        a = np.ascontiguousarray(a)
        if a.dtype.kind == "M":  # datetime64: no buffer protocol
            a = a.view(np.int64)
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    if f.token_codes is not None:
        h.update(np.ascontiguousarray(f.token_codes).tobytes())
    return h.hexdigest()


def _timed_digest(f: Any, out: dict[str, Any]) -> None:
    """Hash `f` into out["sha256"]; the wall and CPU seconds of that full read into read_s."""
    t0, c0 = time.perf_counter(), time.process_time()
    out["sha256"] = _digest(f)
    out["read_s"] = time.perf_counter() - t0
    out["read_cpu_s"] = time.process_time() - c0


def uptime() -> str:
    """`uptime`'s line (the load average of this shared machine)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def _configs() -> dict[str, dict[str, Any]]:
    return {
        "ehr_counts": dict(max_codes=512, max_numeric=64),
        "ehr_onehot": dict(max_codes=2048, max_tokens=64, max_codes_per_token=64),
        "ehr_clmbr": dict(
            max_codes=1024,
            d_model=64,
            n_layers=2,
            n_heads=4,
            max_len=256,
            epochs=1,
            batch_size=32,
            progress=False,
            device="cpu",
            num_threads=1,  # 2 torch threads on a shared 2-core machine oversubscribe badly
        ),
    }


def _run(task: str, root: str, n_fit: int, n_encode: int, cores: int, q: Any) -> None:
    os.sched_setaffinity(0, list(range(min(cores, os.cpu_count() or 1))))
    label = task
    task, _, src_dir = task.partition("@")  # "@DIR": import survfuse from DIR (another commit)
    if src_dir:
        sys.path.insert(0, src_dir)
    import torch

    torch.set_num_threads(cores)
    from survfuse.data.meds import MEDSDataset
    from survfuse.encoders import build_encoder

    src = MEDSDataset(root)
    cohort = pl.read_parquet(Path(root) / "cohort.parquet")
    fit_rows, rows = cohort.head(n_fit), cohort.head(n_encode)
    out: dict[str, Any] = {"task": label}
    t0, c0 = time.perf_counter(), time.process_time()
    if task == "windowed":
        n = 0
        for frame in src.iter_windowed(rows, batch_size=4096):
            n += frame.height
        out["events"] = n
    elif task in ("polars", "pandas"):
        n = 0
        for frame in src.iter_windowed(rows, batch_size=4096):
            n += frame.height
            if task == "polars":
                frame.group_by("subject_id", "prediction_time", "code").len()
            else:
                frame.to_pandas().groupby(["subject_id", "prediction_time", "code"]).size()
        out["events"] = n
    else:
        name, _, via = task.partition(":")
        enc = build_encoder(name, **_configs()[name])
        enc.fit(fit_rows, src)
        out["fit_s"] = time.perf_counter() - t0
        if task == "ehr_clmbr":
            out["tokens_per_s"] = enc.history[-1]["tokens_per_s"]  # type: ignore[attr-defined]
        t0, c0 = time.perf_counter(), time.process_time()
        if via == "store":  # through the FeatureStore: chunks written, result assembled
            from survfuse.encoders import FeatureStore

            with tempfile.TemporaryDirectory(prefix="bench_ehr_store_") as d:
                f = FeatureStore(d).encode(enc, rows, src, progress=False)
                # the clock stops before the temporary store is deleted
                out["wall_s"] = time.perf_counter() - t0
                out["cpu_s"] = time.process_time() - c0
                out["rows"] = len(f)
                _timed_digest(f, out)
                del f
            # Why: deleting 770 MB leaves the file system work to do (journal, discard); done
            # here, outside the clock, it does not land in the next run's measurement
            os.sync()
            out["events"] = sum(fr.height for fr in src.iter_windowed(rows, batch_size=4096))
            out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            q.put(out)
            return
        f = enc.encode(rows, src)
        out["wall_s"] = time.perf_counter() - t0
        out["cpu_s"] = time.process_time() - c0
        out["rows"] = len(f)
        _timed_digest(f, out)
        out["events"] = sum(fr.height for fr in src.iter_windowed(rows, batch_size=4096))
    out.setdefault("wall_s", time.perf_counter() - t0)
    out.setdefault("cpu_s", time.process_time() - c0)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    q.put(out)


def measure(task: str, root: Path, n_fit: int, n_encode: int, cores: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    os.environ["POLARS_MAX_THREADS"] = str(cores)
    p = ctx.Process(target=_run, args=(task, str(root), n_fit, n_encode, cores, q))
    p.start()
    while True:  # a child that died (an exception) puts nothing: do not wait forever
        try:
            res: dict[str, Any] = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"{task}: the measuring process died ({p.exitcode})") from None
    p.join()
    return res


def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_ehr_") as tmp:
        root = Path(args.meds or tmp)
        t0 = time.perf_counter()
        if args.meds and (root / "cohort.parquet").exists():  # written by an earlier run
            n_events = sum(
                pl.scan_parquet(f).select(pl.len()).collect().item()
                for f in sorted((root / "data").glob("*.parquet"))
            )
            what = f"read from {root}"
        else:
            n_events = make_meds(root, args.subjects, args.events_per_subject)
            what = f"{time.perf_counter() - t0:.1f} s to write"
        print(
            f"synthetic MEDS: {args.subjects:,} subjects, {n_events:,} events "
            f"({what}); {args.cores} cores; the machine is shared, so timings are noisy"
        )
        print("wall events/s is what a user sees; events per CPU-second is the less load-sensitive")
        rows = []
        tasks = args.tasks.split(",")
        for rep in range(args.repeats):
            for task in tasks:
                load = uptime()
                res = measure(task, root, args.fit_subjects, args.subjects, args.cores)
                rows.append({**res, "repeat": rep, "uptime": load})
                print(load, "|", {k: v for k, v in res.items() if k != "sha256"}, flush=True)
        clmbr = None
        if args.clmbr_subjects:
            clmbr = measure("ehr_clmbr", root, args.clmbr_subjects, args.clmbr_subjects, args.cores)
            print(clmbr, flush=True)
        ref = next((r["wall_s"] for r in rows if r["task"] == "windowed"), float("nan"))
        print(
            f"\n{'run':<26}{'events':>12}{'wall s':>9}{'events/s':>13}{'x windowed':>11}"
            f"{'CPU s':>8}{'ev/CPU-s':>12}{'peak RSS MB':>13}{'fit s':>8}{'read s/CPU':>12}"
        )
        for r in rows + ([clmbr] if clmbr else []):
            eps = r["events"] / r["wall_s"]
            name = r["task"] if r["task"].startswith("ehr") else f"peer: {r['task']}"
            name = name.replace(":store", " (FeatureStore)")
            if "@" in name:  # survfuse imported from another commit's src
                name = f"{name.partition('@')[0]} @{Path(name.partition('@')[2]).parent.name}"
            if r["task"] == "ehr_clmbr":
                name = f"ehr_clmbr ({args.clmbr_subjects:,} subj.)"
            print(
                f"{name:<26}{r['events']:>12,}{r['wall_s']:>9.2f}{eps:>13,.0f}"
                f"{r['wall_s'] / ref:>11.2f}{r['cpu_s']:>8.2f}{r['events'] / r['cpu_s']:>12,.0f}"
                f"{r['peak_rss_mb']:>13.0f}"
                f"{r.get('fit_s', float('nan')):>8.1f}"
                f"{r.get('read_s', float('nan')):>6.2f}/{r.get('read_cpu_s', float('nan')):<5.2f}"
            )
        ratios: dict[str, list[float]] = {}
        cpu_ratios: dict[str, list[float]] = {}
        for rep in range(args.repeats):
            by_task = {r["task"]: r for r in rows if r["repeat"] == rep}
            direct = by_task.get("ehr_counts")
            for task, store in by_task.items():
                if direct is None or not task.startswith("ehr_counts:store"):
                    continue
                same = "byte-identical" if direct["sha256"] == store["sha256"] else "DIFFERENT"
                ratio = direct["wall_s"] / store["wall_s"]
                with_read = (direct["wall_s"] + direct["read_s"]) / (
                    store["wall_s"] + store["read_s"]
                )
                ratios.setdefault(task, []).append(ratio)
                ratios.setdefault(f"{task} (encode + first read)", []).append(with_read)
                cpu_ratios.setdefault(task, []).append(direct["cpu_s"] / store["cpu_s"])
                print(
                    f"\nrepeat {rep}, {task}: FeatureStore / direct ehr_counts events per wall "
                    f"second: {ratio:.2f} (target >= 0.90); per CPU second: "
                    f"{direct['cpu_s'] / store['cpu_s']:.2f}; encode + first full read, wall: "
                    f"{with_read:.2f}; features {same} "
                    f"(sha256 {store['sha256'][:16]}); {store['uptime']}"
                )
                if same != "byte-identical":
                    raise SystemExit("the FeatureStore's features differ from the direct encode's")
        for task, rs in ratios.items():
            print(
                f"{task}: median store / direct wall ratio over {len(rs)} repeats "
                f"{float(np.median(rs)):.2f} (min {min(rs):.2f}, max {max(rs):.2f})"
            )
        for task, rs in cpu_ratios.items():
            print(
                f"{task}: median store / direct CPU-second ratio over {len(rs)} repeats "
                f"{float(np.median(rs)):.2f} (min {min(rs):.2f}, max {max(rs):.2f})"
            )
        if clmbr:
            print(
                f"\nCLMBR pretraining: {clmbr['tokens_per_s']:,.0f} tokens/s (d_model 64, "
                f"2 layers, max_len 256, {args.cores} cores)"
            )


# ---------------------------------------------------------------------- write methods
WRITE_METHODS = ("anon", "mmap", "mmap_random", "pwrite_64k", "pwrite_call", "odirect")


def write_method(method: str, folder: str) -> dict[str, float]:
    """Write a 756 MB float32 matrix (98,304 x 1,924, ~60 non-zeros a row) by `method`, then
    hash it back through `np.load(mmap_mode="r")`; CPU and wall seconds of each part.

    What a store's write costs beside the direct encode's (`anon`: filled in new anonymous
    memory): `mmap` fills a memory map of the file (session 6), `mmap_random` the same with
    `MADV_RANDOM` (the page cache then takes single pages), `pwrite_64k` / `pwrite_call` fill a
    reused anonymous buffer of 32,768 rows and `pwrite` it in 64 kB pieces / one piece, and
    `odirect` writes that buffer with `O_DIRECT` (around the page cache).
    """
    import mmap

    np_core = getattr(np, "_core", np)
    np_core.multiarray._set_madvise_hugepage(False)  # as ehr_vocab.output_array
    n, w, b = 98_304, 1_924, 32_768
    cols = np.random.default_rng(0).integers(0, w, (4096, 60))

    def fill(a: Any, lo: int) -> None:
        rows = np.arange(a.shape[0])
        a[rows[:, None], cols[(rows + lo) % 4096]] = 1.0

    path = Path(folder) / f"write_{method}_{os.getpid()}.npy"
    header = np.lib.format.magic(1, 0) + (4086).to_bytes(2, "little")
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {w}), }}"
    header += (text + " " * (4096 - 11 - len(text)) + "\n").encode()  # data at 4096: O_DIRECT
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "anon":
        a: Any = np.zeros((n, w), np.float32)
        for lo in range(0, n, b):
            fill(a[lo : lo + b], lo)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(fd, header, 0)
        os.posix_fallocate(fd, 0, 4096 + n * w * 4)
        if method.startswith("mmap"):
            m = np.memmap(path, np.float32, "r+", offset=4096, shape=(n, w))
            if method == "mmap_random":
                m._mmap.madvise(mmap.MADV_RANDOM)  # type: ignore[attr-defined]
            for lo in range(0, n, b):
                fill(m[lo : lo + b], lo)
            del m
        else:
            out = os.open(path, os.O_WRONLY | os.O_DIRECT) if method == "odirect" else fd
            piece = 1 << 16 if method == "pwrite_64k" else 1 << 40
            raw = mmap.mmap(-1, b * w * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            buf = np.frombuffer(raw, np.float32).reshape(b, w)
            for lo in range(0, n, b):
                if lo:
                    buf[...] = 0
                fill(buf, lo)
                view, pos, done = memoryview(raw), 4096 + lo * w * 4, 0
                while done < len(view):
                    done += os.pwrite(out, view[done : done + piece], pos + done)
                del view
            if out != fd:
                os.close(out)
        os.close(fd)
        a = np.load(path, mmap_mode="r")
    write = (time.perf_counter() - t0, time.process_time() - c0)
    t0, c0 = time.perf_counter(), time.process_time()
    hashlib.sha256(np.ascontiguousarray(a).data).hexdigest()
    read = (time.perf_counter() - t0, time.process_time() - c0)
    del a
    path.unlink(missing_ok=True)
    return {"write_s": write[0], "write_cpu_s": write[1], "read_s": read[0], "read_cpu_s": read[1]}


def write_methods(args: argparse.Namespace) -> None:
    """Run each `WRITE_METHODS` entry in a fresh process, `--repeats` interleaved rounds."""
    folder = Path(args.write_dir or tempfile.gettempdir())
    print(f"756 MB written to {folder} ({uptime()})")
    print(f"{'method':<13}{'write s':>9}{'CPU s':>8}{'first read s':>14}{'CPU s':>8}")
    for _ in range(args.repeats):
        for method in WRITE_METHODS:
            out = subprocess.run(
                [sys.executable, __file__, "--write-method", method, "--write-dir", str(folder)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            r = {k: float(v) for k, v in (kv.split("=") for kv in out.split())}
            print(
                f"{method:<13}{r['write_s']:>9.2f}{r['write_cpu_s']:>8.2f}"
                f"{r['read_s']:>14.2f}{r['read_cpu_s']:>8.2f}",
                flush=True,
            )
            os.sync()  # the deleted file's blocks freed before the next method runs
    print(uptime())


# ---------------------------------------------------------------------- simulator comparison
def sim_compare(args: argparse.Namespace) -> None:
    import warnings

    from sksurv.linear_model import CoxnetSurvivalAnalysis
    from sksurv.metrics import concordance_index_censored
    from sksurv.util import Surv

    from survfuse.data.meds import MEDSDataset
    from survfuse.data.splits import attach_splits, make_splits
    from survfuse.encoders.ehr_clmbr import EHRCLMBREncoder
    from survfuse.encoders.ehr_counts import EHRCountsEncoder
    from survfuse.simulate import simulate

    with tempfile.TemporaryDirectory(prefix="bench_ehr_sim_") as tmp:
        root = simulate(Path(tmp), n=args.sim, shape=(16, 16, 8), seed=0, progress=False)
        src = MEDSDataset(root / "meds")
        cohort = pl.read_parquet(root / "cohort.parquet")
        cohort = attach_splits(cohort, make_splits(cohort, external_sites=["C"], seed=0))
        train = cohort.filter(pl.col("split") == "train")
        test = cohort.filter(pl.col("split") == "internal_test")
        t0 = time.perf_counter()
        clmbr = EHRCLMBREncoder(
            epochs=args.epochs,
            d_model=64,
            n_layers=2,
            n_heads=4,
            max_len=256,
            lr=3e-3,
            device="auto",
            num_threads=1,
            progress=True,
        ).fit(train, src)
        print(f"CLMBR pretraining {time.perf_counter() - t0:.0f} s")
        for h in clmbr.history:
            print({k: round(v, 3) for k, v in h.items()})
        counts = EHRCountsEncoder().fit(train, src)

        def c_index(enc: Any, alpha: float) -> float:
            x_tr = enc.encode(train, src).pooled.astype(float)
            x_te = enc.encode(test, src).pooled.astype(float)
            keep = x_tr.std(0) > 0
            mu, sd = x_tr[:, keep].mean(0), x_tr[:, keep].std(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = CoxnetSurvivalAnalysis(
                    l1_ratio=0.01, alphas=np.geomspace(1.0, alpha, 10), max_iter=100_000
                ).fit(
                    np.clip((x_tr[:, keep] - mu) / sd, -5, 5),
                    Surv.from_arrays(train["event"].to_numpy(), train["time"].to_numpy()),
                )
            risk = model.predict(np.clip((x_te[:, keep] - mu) / sd, -5, 5))
            return float(
                concordance_index_censored(test["event"].to_numpy(), test["time"].to_numpy(), risk)[
                    0
                ]
            )

        last = clmbr.history[-1]
        print(f"\nsimulator n={args.sim}: train {train.height}, internal test {test.height}")
        print(
            f"validation perplexity {last['val_perplexity']:.1f} vs unigram "
            f"{last['unigram_perplexity']:.1f}; held-out test perplexity "
            f"{clmbr.validation_perplexity(test, src):.1f}"
        )
        print(f"{'alpha':>8}{'C ehr_clmbr':>14}{'C ehr_counts':>14}{'diff':>8}")
        for alpha in (0.03, 0.1, 0.3):
            a, b = c_index(clmbr, alpha), c_index(counts, alpha)
            print(f"{alpha:>8}{a:>14.3f}{b:>14.3f}{a - b:>8.3f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--subjects", type=int, default=100_000)
    ap.add_argument("--events-per-subject", type=int, default=100)
    ap.add_argument("--fit-subjects", type=int, default=10_000)
    ap.add_argument("--clmbr-subjects", type=int, default=2_000, help="0: no CLMBR run")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument(
        "--tasks",
        default="windowed,polars,pandas,ehr_counts,ehr_onehot,ehr_counts:store",
        help="runs, in order (ehr_counts:store = through a FeatureStore; TASK@DIR imports "
        "survfuse from DIR, e.g. a worktree's src of the commit to compare with)",
    )
    ap.add_argument(
        "--meds", default="", help="MEDS folder to reuse (written there when it has no cohort)"
    )
    ap.add_argument("--repeats", type=int, default=1, help="rounds of --tasks (interleaved)")
    ap.add_argument("--sim", type=int, default=0, help="simulator comparison with n subjects")
    ap.add_argument("--epochs", type=int, default=8, help="CLMBR epochs for --sim")
    ap.add_argument(
        "--write-methods",
        action="store_true",
        help="instead: what writing 756 MB to a file costs by each method a store could use "
        "(write_method), --repeats rounds, then the first full read",
    )
    ap.add_argument("--write-method", default="", help=argparse.SUPPRESS)
    ap.add_argument("--write-dir", default="", help="folder for --write-methods' file")
    args = ap.parse_args(argv)
    if args.write_method:  # one measured method, in this fresh process
        r = write_method(args.write_method, args.write_dir or tempfile.gettempdir())
        print(" ".join(f"{k}={v:.4f}" for k, v in r.items()))
    elif args.write_methods:
        write_methods(args)
    elif args.sim:
        sim_compare(args)
    else:
        bench(args)


if __name__ == "__main__":
    sys.exit(main())

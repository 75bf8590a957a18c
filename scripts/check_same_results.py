"""Check that a change left results unchanged: run one study with the code of a base revision
and with the working tree, on the same simulated data, and compare the outputs byte for byte.

    python scripts/check_same_results.py                       # examples/tiny.yaml vs HEAD
    python scripts/check_same_results.py --base e3fd46b --config examples/demo.yaml \
        --n 3000 --shape 64,64,40                              # the demo study

Compared: every cell's `predictions.parquet` (what training produced) and `metrics.parquet`
(what evaluation produced), byte for byte. Training curves hold wall-clock seconds and are not
compared. Exit status 0 when everything is identical, 1 otherwise. The base revision is checked
out into a temporary git worktree; both runs use this interpreter (same packages).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "-"


def _run(src: Path, config: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "survfuse.cli", "run", str(config), "--out", str(out)]
    cmd += ["--no-report", "--no-progress"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode not in (0, 3):
        sys.exit(f"run with {src} failed ({res.returncode}):\n{res.stderr[-3000:]}")


def _outputs(run: Path) -> dict[str, str]:
    files = {"metrics.parquet": _digest(run / "metrics.parquet")}
    for cell in sorted((run / "cells").iterdir()):
        if cell.is_dir() and not cell.name.startswith("."):
            files[f"cells/{cell.name}/predictions.parquet"] = _digest(cell / "predictions.parquet")
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD", help="git revision to compare against")
    ap.add_argument("--config", default=str(REPO / "examples" / "tiny.yaml"))
    ap.add_argument("--n", type=int, default=300, help="simulated patients")
    ap.add_argument("--shape", default="32,32,20", help="simulated CT shape X,Y,Z")
    ap.add_argument("--seed", type=int, default=0, help="simulation seed")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="survfuse-same-"))
    base_tree = tmp / "base"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.base],
        check=True,
        capture_output=True,
    )
    try:
        sys.path.insert(0, str(REPO / "src"))
        from survfuse.simulate import simulate

        shape = tuple(int(v) for v in args.shape.split(","))
        data = simulate(tmp / "data", n=args.n, shape=shape, seed=args.seed, progress=False)
        raw = yaml.safe_load(Path(args.config).read_text())
        raw["data"] = {
            "cohort": str(data / "cohort.parquet"),
            "ct_index": str(data / "ct_index.parquet"),
            "meds_root": str(data / "meds"),
        }
        raw.pop("feature_store", None)
        config = tmp / "study.yaml"
        config.write_text(yaml.safe_dump(raw))
        _run(base_tree / "src", config, tmp / "run_base")
        _run(REPO / "src", config, tmp / "run_new")
        base, new = _outputs(tmp / "run_base"), _outputs(tmp / "run_new")
        differ = 0
        for name in sorted(set(base) | set(new)):
            a, b = base.get(name, "-"), new.get(name, "-")
            same = a == b and a != "-"
            differ += not same
            print(f"{'same' if same else 'DIFFERENT':9s} {a} {b} {name}")
        print(f"{len(base)} outputs compared with {args.base}: {differ} different")
        return 1 if differ else 0
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)],
            check=False,
            capture_output=True,
        )
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")


if __name__ == "__main__":
    sys.exit(main())

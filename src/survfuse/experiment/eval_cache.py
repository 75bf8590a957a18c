"""The evaluation cache: `RUN_DIR/eval_cache/<digest>.npz`, one file per model x task x split.

A model's statistics on a task x split (points, resampled statistics, IJ influences,
calibration tests; `evaluate.score_group`) depend only on its own predictions, the outcomes of
that split, the training outcomes (IPCW) and the evaluation settings: the resamples are drawn
from `evaluation.seed`, the task and the split, not from the other models. So the key is a
SHA-256 of exactly those inputs plus `SCORING_VERSION`, and re-evaluating an unchanged run reads
every statistic back instead of resampling (a changed cell re-scores only its model). Files are
written atomically; entries no evaluation used are removed (`prune`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CACHE_DIR", "SCORING_VERSION", "EvalCache", "group_digest", "model_digest"]

CACHE_DIR = "eval_cache"
# Bump when what a cached entry holds, or how it is computed, changes.
SCORING_VERSION = "2026.1"


def _update(h: Any, *arrays: Any) -> None:
    for a in arrays:
        arr = np.ascontiguousarray(a)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())


def group_digest(g: Any) -> str:
    """Digest of one task x split's outcomes, subjects and evaluation settings."""
    h = hashlib.sha256()
    meta = {
        "version": SCORING_VERSION,
        "task": g.task,
        "split": g.split,
        "metrics": list(g.metrics),
        "horizons": [float(x) for x in g.horizons],
        "cal_horizon": float(g.cal_horizon),
        "cal_bins": int(g.cal_bins),
        "n_boot": int(g.n_boot),
        "seed": int(g.seed),
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    _update(h, g.time, g.event, g.subject_id, g.train_time, g.train_event, g.times)
    return h.hexdigest()


def model_digest(group: str, m: Any) -> str:
    """Digest of one model's predictions (every seed) within a group (`group_digest`)."""
    h = hashlib.sha256(group.encode())
    h.update(json.dumps({"model": m.model, "seeds": list(m.seeds)}).encode())
    _update(h, m.risk, m.surv)
    return h.hexdigest()


def _key_str(key: tuple[str, float | None]) -> str:
    return json.dumps([key[0], key[1]])


def _key_tuple(s: str) -> tuple[str, float | None]:
    name, h = json.loads(s)
    return str(name), (None if h is None else float(h))


class EvalCache:
    """Per-model statistics on disk (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / f"{digest[:32]}.npz"

    def load(self, digest: str) -> dict[str, Any] | None:
        """{"point", "boot", "infl", "p_cal"} of one model, or None (missing or unreadable)."""
        path = self.path(digest)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("digest") != digest:
                    return None
                keys = [_key_tuple(k) for k in meta["keys"]]
                return {
                    "point": {k: float(v) for k, v in zip(keys, meta["point"], strict=True)},
                    "boot": {k: np.array(z[f"boot{i}"]) for i, k in enumerate(keys)},
                    "infl": {
                        k: (np.array(z[f"infl{i}"]) if f"infl{i}" in z.files else None)
                        for i, k in enumerate(keys)
                    },
                    "p_cal": {float(h): float(p) for h, p in meta["p_cal"]},
                }
        except (OSError, ValueError, KeyError):
            return None

    def save(self, digest: str, entry: dict[str, Any]) -> Path:
        """Write one model's entry atomically (temp file in the folder, then rename)."""
        keys = list(entry["point"])
        arrays: dict[str, Any] = {}
        for i, k in enumerate(keys):
            arrays[f"boot{i}"] = np.asarray(entry["boot"][k], dtype=np.float64)
            u = entry["infl"].get(k)
            if u is not None:
                arrays[f"infl{i}"] = np.asarray(u, dtype=np.float64)
        meta = {
            "digest": digest,
            "version": SCORING_VERSION,
            "keys": [_key_str(k) for k in keys],
            "point": [float(entry["point"][k]) for k in keys],
            "p_cal": [[float(h), float(p)] for h, p in entry.get("p_cal", {}).items()],
        }
        arrays["meta"] = np.array(json.dumps(meta))
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path = self.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
        return path

    def prune(self, keep: set[str]) -> int:
        """Remove entries whose digest is not in `keep` (and stale temp files); returns count."""
        if not self.root.exists():
            return 0
        names = {self.path(d).name for d in keep}
        removed = 0
        for f in self.root.iterdir():
            if f.is_file() and f.name not in names:
                f.unlink(missing_ok=True)
                removed += 1
        return removed

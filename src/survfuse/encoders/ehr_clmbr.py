"""`ehr_clmbr`: a CLMBR-style causal transformer pretrained on training-split timelines.

Timeline of a prediction: its windowed events (static first, then by time) as token ids of a
training `CodeVocab` (numeric values binned by training quantiles), the last `max_len` kept.
The model embeds ids (+ a time-aware embedding of [log1p(d), sin/cos(2 pi d / P), static] with
d = days since the first event of the timeline when `position="time"`, or rotary position
embeddings on the event index when `position="rotary"`), runs `n_layers` pre-norm causal
self-attention blocks with key padding masks and predicts the next token:

    L_clmbr = -1/|S| sum_{(b,i) in S} log softmax(W h_{b,i})[x_{b,i+1}]

Validation perplexity = exp(L_clmbr on held-out training subjects); the unigram baseline is
exp(-mean log p(x)) with p the add-one smoothed training token frequencies.

Optional MOTOR-style task (`motor_weight > 0`): for each position i and each of the
`motor_codes` most frequent tokens c, the time to the next occurrence of c is modelled as
piecewise exponential with log-hazards eta_{i,p,c} = (U h_i)_{p,c} on pieces p of
`MOTOR_PIECES` (days); with T = min(time to next c, time to the end of the timeline) and
delta = 1 when c occurs:

    L_motor = mean_{i,c} [ sum_p exp(eta_{i,p,c}) * exposure_p(T) - delta * eta_{i,p(T),c} ]

Representation of a prediction = hidden state of its last event (at or before
`prediction_time`): `pooled` [N, d_model]; `tokens` [N, T, d_model] = hidden states of the last
`max_tokens` events (chronological, padding at the end), `mask` [N, T].
Pretraining shows a rich progress bar, writes safetensors checkpoints to `checkpoint_dir`
after every epoch and resumes from them; `history` holds per-epoch loss and perplexities.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn

from survfuse.device import resolve_device
from survfuse.encoders.base import hash_arrays, hash_config, register_encoder
from survfuse.encoders.ehr_common import EHREncoder, cohort_features, fit_cohort_vocab
from survfuse.encoders.ehr_onehot import TIME_DIM, time_features
from survfuse.encoders.ehr_vocab import CodeVocab, EventBatch, KeyIndex, iter_event_batches
from survfuse.features import ModalityFeatures
from survfuse.registry import look_up_option

__all__ = [
    "MOTOR_PIECES",
    "CLMBRModel",
    "EHRCLMBREncoder",
    "Timeline",
    "motor_targets",
    "unigram_perplexity",
]

MOTOR_PIECES = (0.0, 1.0, 7.0, 30.0, 90.0, 365.0, 1095.0, math.inf)  # piece edges, days
POSITIONS = ("rotary", "time")


# ---------------------------------------------------------------------- timelines
class Timeline:
    """One event sequence: `ids` [L] int64, `days` [L] float64 days since its first timed
    event (0 for static events), `static` [L] bool."""

    __slots__ = ("days", "ids", "static")

    def __init__(
        self, ids: NDArray[np.int64], days: NDArray[np.float64], static: NDArray[np.bool_]
    ):
        self.ids, self.days, self.static = ids, days, static

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def tail(self, n: int) -> Timeline:
        """The last n events, days re-based on the first timed event kept."""
        ids, static = self.ids[-n:], self.static[-n:]
        t = self.days[-n:]
        timed = t[~static]
        base = timed.min() if timed.size else 0.0
        return Timeline(ids, np.where(static, 0.0, t - base), static)


def timelines_of(batch: EventBatch, ids: NDArray[np.int32]) -> dict[int, Timeline]:
    """Split a batch (events contiguous per key, in time order) into per-key timelines."""
    out: dict[int, Timeline] = {}
    if len(batch) == 0:
        return out
    # MEDS gives no order among events at the same time: sort them by token id so a timeline
    # does not depend on how the shards happen to be ordered
    order = np.lexsort((ids, batch.time_us, batch.key))
    ids = ids[order]
    batch = EventBatch(
        key=batch.key[order],
        subject_id=batch.subject_id[order],
        days_before=batch.days_before[order],
        day_index=batch.day_index[order],
        code=batch.code,
        value=batch.value[order],
        time_us=batch.time_us[order],
    )
    starts = np.flatnonzero(np.r_[True, batch.key[1:] != batch.key[:-1]])
    ends = np.r_[starts[1:], len(batch)]
    static = batch.time_us == np.iinfo(np.int64).min
    t_days = np.where(static, np.nan, batch.time_us / 86_400_000_000)
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        st = static[a:b]
        t = t_days[a:b]
        base = np.nanmin(t) if (~st).any() else 0.0
        out[int(batch.key[a])] = Timeline(
            ids[a:b].astype(np.int64), np.where(st, 0.0, t - base), st
        )
    return out


def _pad(timelines: list[Timeline], pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-padded ids [B, L] (pad = pad_id), time feats [B, L, 8], mask [B, L], days [B, L]."""
    length = max(len(t) for t in timelines)
    b = len(timelines)
    ids = np.full((b, length), pad_id, np.int64)
    feats = np.zeros((b, length, TIME_DIM), np.float32)
    mask = np.zeros((b, length), bool)
    days = np.zeros((b, length), np.float64)
    for i, t in enumerate(timelines):
        n = len(t)
        ids[i, :n] = t.ids
        feats[i, :n] = time_features(t.days, t.static)
        mask[i, :n] = True
        days[i, :n] = t.days
    return (
        torch.from_numpy(ids),
        torch.from_numpy(feats),
        torch.from_numpy(mask),
        torch.from_numpy(days),
    )


# ---------------------------------------------------------------------- model
def _rotary(x: Tensor, positions: Tensor) -> Tensor:
    """Rotary position embedding of x [B, H, L, Dh] (Dh even) at integer positions [L]."""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-torch.arange(half, device=x.device, dtype=x.dtype) / half)
    ang = positions.to(x.dtype)[:, None] * freq[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int, dropout: float, rotary: bool) -> None:
        super().__init__()
        self.heads, self.rotary, self.dropout = heads, rotary, dropout
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.rotary:
            pos = torch.arange(length, device=x.device)
            q, k = _rotary(q, pos), _rotary(k, pos)
        a = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, length, d)))
        return x + self.drop(self.ff(self.norm2(x)))


class CLMBRModel(nn.Module):
    """Causal transformer over token ids: `forward(ids [B,L], time_feats [B,L,8], mask [B,L])`
    -> hidden states [B, L, d_model] (final LayerNorm applied)."""

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        position: str,
        motor_codes: int = 0,
    ) -> None:
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model {d_model} must split into n_heads {n_heads} even parts")
        self.vocab_size = vocab_size
        self.position = position
        self.embed = nn.Embedding(vocab_size + 1, d_model, padding_idx=vocab_size)
        self.time_proj = nn.Linear(TIME_DIM, d_model)
        self.blocks = nn.ModuleList(
            _Block(d_model, n_heads, d_ff, dropout, position == "rotary") for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.motor_codes = motor_codes
        n_pieces = len(MOTOR_PIECES) - 1
        self.motor = nn.Linear(d_model, n_pieces * motor_codes) if motor_codes else None

    def forward(self, ids: Tensor, time_feats: Tensor, mask: Tensor) -> Tensor:
        x = self.embed(ids)
        # the static flag always enters; the time features only for the time-aware position
        tf = time_feats if self.position == "time" else time_feats * (time_feats[..., -1:] > 0)
        x = x + self.time_proj(tf)
        if not bool((mask[:, 1:] <= mask[:, :-1]).all()):
            raise ValueError("CLMBRModel expects right-padded timelines (mask True then False)")
        # With right padding the causal mask is also the key padding mask for every real
        # query (its keys are earlier, hence real); pad rows are never read. This keeps the
        # fused is_causal attention kernel instead of a slow explicit [B, 1, L, L] mask.
        x = x * mask[..., None]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)  # type: ignore[no-any-return]


def next_code_loss(model: CLMBRModel, h: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, int]:
    """Summed next-token NLL over positions whose next token is real, and their count."""
    valid = mask[:, :-1] & mask[:, 1:]
    logits = model.head(h[:, :-1][valid])
    nll = F.cross_entropy(logits, ids[:, 1:][valid], reduction="sum")
    return nll, int(valid.sum())


def motor_targets(
    ids: NDArray[np.int64], days: NDArray[np.float64], mask: NDArray[np.bool_], n_codes: int
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Time to the next occurrence of each code 1..n_codes after each position.

    Returns `t` [B, L, C] days (time to the end of the timeline when censored) and `event`
    [B, L, C] bool (True when the code occurs later in the timeline).
    """
    b, length = ids.shape
    last = np.where(mask, days, -np.inf).max(axis=1)
    nxt = np.full((b, n_codes), np.inf)
    out = np.empty((b, length, n_codes))
    rows = np.arange(b)
    for i in range(length - 1, -1, -1):
        out[:, i] = nxt
        c = ids[:, i]
        hit = mask[:, i] & (c >= 1) & (c <= n_codes)
        nxt[rows[hit], c[hit] - 1] = days[hit, i]
    event = np.isfinite(out)
    t = np.where(event, out, last[:, None, None]) - days[:, :, None]
    return np.maximum(t, 0.0), event


def motor_loss(model: CLMBRModel, h: Tensor, ids: Tensor, mask: Tensor, days: Tensor) -> Tensor:
    """Mean piecewise-exponential NLL of time-to-next-code (see module docstring)."""
    assert model.motor is not None
    c = model.motor_codes
    t, ev = motor_targets(ids.cpu().numpy(), days.cpu().numpy(), mask.cpu().numpy(), c)
    real = mask.cpu().numpy()
    t_r = torch.as_tensor(t[real], dtype=h.dtype, device=h.device)  # [n, C]
    e_r = torch.as_tensor(ev[real], device=h.device)
    eta = model.motor(h[mask]).view(-1, len(MOTOR_PIECES) - 1, c)  # [n, P, C]
    lo = torch.tensor(MOTOR_PIECES[:-1], dtype=h.dtype, device=h.device)
    hi = torch.tensor(MOTOR_PIECES[1:], dtype=h.dtype, device=h.device)
    exposure = (t_r[:, None, :] - lo[None, :, None]).clamp(min=0)
    exposure = torch.minimum(exposure, (hi - lo)[None, :, None]) / 365.25  # years
    in_piece = (t_r[:, None, :] >= lo[None, :, None]) & (t_r[:, None, :] < hi[None, :, None])
    nll = (eta.exp() * exposure).sum(1) - (e_r[:, None, :] & in_piece).to(h.dtype).mul(eta).sum(1)
    return nll.mean()


def unigram_perplexity(
    train_ids: list[NDArray[np.int64]], val_ids: list[NDArray[np.int64]], vocab_size: int
) -> float:
    """exp(-mean log p(x)) over validation *next* tokens, p = add-one smoothed train frequency."""
    counts = np.ones(vocab_size)
    for a in train_ids:
        counts += np.bincount(a[1:], minlength=vocab_size)
    logp = np.log(counts / counts.sum())
    tot, n = 0.0, 0
    for a in val_ids:
        tot -= float(logp[a[1:]].sum())
        n += max(len(a) - 1, 0)
    return float(math.exp(tot / max(n, 1)))


# ---------------------------------------------------------------------- encoder
@register_encoder("ehr_clmbr")
class EHRCLMBREncoder(EHREncoder):
    """CLMBR-style pretrained causal transformer (see module docstring).

    Config: vocabulary `max_codes` (1024), `n_bins` (5), `min_values` (20), `lookback_days`
    (None); timelines `max_len` (256 events); model `d_model` (64), `n_layers` (2), `n_heads`
    (4), `d_ff` (4 d_model), `dropout` (0.1), `position` ("rotary" | "time"); pretraining
    `epochs` (10), `batch_size` (32), `lr` (1e-3), `weight_decay` (0.01), `val_frac` (0.1),
    `motor_weight` (0 = off), `motor_codes` (32), `seed` (0); output `max_tokens` (32);
    runtime (not hashed: they do not change results) `device` ("auto"), `checkpoint_dir`,
    `progress`, `num_threads` (torch CPU threads while fitting / encoding; None = torch's
    setting; 1 avoids oversubscription on a busy machine).
    """

    _RUNTIME = ("device", "checkpoint_dir", "progress", "num_threads")

    def __init__(
        self,
        *,
        max_codes: int = 1024,
        n_bins: int = 5,
        min_values: int = 20,
        lookback_days: float | None = None,
        max_len: int = 256,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.1,
        position: str = "rotary",
        epochs: int = 10,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        val_frac: float = 0.1,
        motor_weight: float = 0.0,
        motor_codes: int = 32,
        seed: int = 0,
        max_tokens: int = 32,
        encode_batch_size: int = 128,
        device: str = "auto",
        checkpoint_dir: str | None = None,
        progress: bool = True,
        num_threads: int | None = None,
    ) -> None:
        position = look_up_option(position, POSITIONS, kind="position")
        if max_len < 2 or max_tokens < 1:
            raise ValueError("max_len must be >= 2 and max_tokens >= 1")
        super().__init__(
            max_codes=max_codes,
            n_bins=n_bins,
            min_values=min_values,
            lookback_days=lookback_days,
            max_len=max_len,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            d_ff=d_ff or 4 * d_model,
            dropout=dropout,
            position=position,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            val_frac=val_frac,
            motor_weight=motor_weight,
            motor_codes=motor_codes,
            seed=seed,
            max_tokens=max_tokens,
            encode_batch_size=encode_batch_size,
            device=device,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
            num_threads=num_threads,
        )
        self.vocab: CodeVocab | None = None
        self.model: CLMBRModel | None = None
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ config / state
    def config(self) -> dict[str, Any]:
        """Hyper-parameters that define the features (runtime options are left out)."""
        cfg = super().config()
        return {k: v for k, v in cfg.items() if k not in self._RUNTIME}

    def _build_model(self, vocab_size: int) -> CLMBRModel:
        c = self._config
        return CLMBRModel(
            vocab_size,
            d_model=c["d_model"],
            n_layers=c["n_layers"],
            n_heads=c["n_heads"],
            d_ff=c["d_ff"],
            dropout=c["dropout"],
            position=c["position"],
            motor_codes=min(c["motor_codes"], vocab_size - 1) if c["motor_weight"] > 0 else 0,
        )

    def state(self) -> dict[str, NDArray[Any]]:
        if self.vocab is None or self.model is None:
            return {}
        weights = {
            f"model.{k}": v.detach().cpu().numpy() for k, v in self.model.state_dict().items()
        }
        return {**self.vocab.state(), **weights}

    def set_state(self, state: Mapping[str, NDArray[Any]]) -> None:
        self.vocab = CodeVocab.from_state(state)
        self.model = self._build_model(self.vocab.size)
        weights = {
            k[6:]: torch.from_numpy(np.array(v)) for k, v in state.items() if k.startswith("model.")
        }
        self.model.load_state_dict(weights)
        self.model.eval()

    @property
    def device(self) -> torch.device:
        return resolve_device(self._config["device"])

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        n = self._config["num_threads"]
        before = torch.get_num_threads()
        if n:
            torch.set_num_threads(int(n))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    # ------------------------------------------------------------------ timelines
    def _timelines(self, cohort: pl.DataFrame, source: Any) -> tuple[KeyIndex, dict[int, Timeline]]:
        assert self.vocab is not None
        index = KeyIndex.from_cohort(cohort)
        out: dict[int, Timeline] = {}
        for batch in iter_event_batches(source, index, lookback_days=self._config["lookback_days"]):
            out.update(timelines_of(batch, self.vocab.transform(batch.code, batch.value)))
        return index, out

    # ------------------------------------------------------------------ pretraining
    def fit(self, cohort: pl.DataFrame, source: Any) -> EHRCLMBREncoder:
        """Fit the vocabulary and pretrain on the training rows' timelines (one per subject:
        its latest prediction_time, cut into `max_len` pieces from the end)."""
        c = self._config
        self.vocab = fit_cohort_vocab(
            cohort,
            source,
            lookback_days=c["lookback_days"],
            max_codes=c["max_codes"],
            n_bins=c["n_bins"],
            min_values=c["min_values"],
        )
        latest = (
            cohort.select(
                pl.col("subject_id").cast(pl.Int64),
                pl.col("prediction_time").cast(pl.Datetime("us")),
            )
            .group_by("subject_id")
            .agg(pl.col("prediction_time").max())
            .sort("subject_id")
        )
        index, tls = self._timelines(latest, source)
        subjects = index.keys["subject_id"].to_numpy()
        rng = np.random.default_rng(c["seed"])
        n_val = round(c["val_frac"] * len(subjects)) if len(subjects) > 1 else 0
        n_val = min(
            max(n_val, 1 if c["val_frac"] > 0 and len(subjects) > 1 else 0), len(subjects) - 1
        )
        val_keys = set(rng.permutation(len(subjects))[:n_val].tolist())
        train: list[Timeline] = []
        val: list[Timeline] = []
        for k in sorted(tls):
            t = tls[k]
            pieces: list[Timeline] = []
            end = len(t)
            while end >= 2:
                start = max(0, end - c["max_len"])
                pieces.append(
                    Timeline(t.ids[start:end], t.days[start:end], t.static[start:end]).tail(
                        end - start
                    )
                )
                end = start
            (val if k in val_keys else train).extend(pieces)
        if not train:
            raise ValueError("ehr_clmbr: no training timeline with >= 2 events to pretrain on")
        self.history = []
        with self._threads():
            self._pretrain(train, val)
        self.fitted = True
        return self

    def _checkpoint_key(self) -> str:
        assert self.vocab is not None
        # `epochs` is left out so a finished run can be resumed to train for more epochs
        cfg = {k: v for k, v in self.config().items() if k != "epochs"}
        return hash_config({"config": cfg, "vocab": hash_arrays(self.vocab.state())})

    def _pretrain(self, train: list[Timeline], val: list[Timeline]) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        c = self._config
        assert self.vocab is not None
        dev = self.device
        v = self.vocab.size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c["seed"])
            model = self._build_model(v).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])
        unigram = unigram_perplexity([t.ids for t in train], [t.ids for t in val], v)
        start_epoch = self._resume(model, opt)
        n_batches = math.ceil(len(train) / c["batch_size"])
        progress = Progress(
            TextColumn("[bold]ehr_clmbr[/] epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TextColumn("val ppl {task.fields[ppl]} (unigram {task.fields[uni]:.1f})"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not c["progress"],
        )
        with progress:
            task = progress.add_task(
                "pretrain",
                total=n_batches * (c["epochs"] - start_epoch),
                epoch=start_epoch + 1,
                loss=float("nan"),
                tps=0.0,
                ppl="-",
                uni=unigram,
            )
            for epoch in range(start_epoch, c["epochs"]):
                model.train()
                order = np.random.default_rng([c["seed"], epoch]).permutation(len(train))
                t0, n_tok, tot = time.perf_counter(), 0, 0.0
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(c["seed"] * 100_003 + epoch)
                    for bi in range(n_batches):
                        batch = [
                            train[i]
                            for i in order[bi * c["batch_size"] : (bi + 1) * c["batch_size"]]
                        ]
                        loss, k = self._loss(model, batch, dev)
                        opt.zero_grad()
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                        opt.step()
                        n_tok += k
                        tot += float(loss.detach()) * k
                        progress.update(
                            task,
                            advance=1,
                            epoch=epoch + 1,
                            loss=float(loss.detach()),
                            tps=n_tok / max(time.perf_counter() - t0, 1e-9),
                        )
                secs = time.perf_counter() - t0
                ppl = self._perplexity(model, val, dev) if val else float("nan")
                self.history.append(
                    {
                        "epoch": epoch + 1,
                        "train_loss": tot / max(n_tok, 1),
                        "val_perplexity": ppl,
                        "unigram_perplexity": unigram,
                        "tokens_per_s": n_tok / max(secs, 1e-9),
                    }
                )
                progress.update(task, ppl=f"{ppl:.1f}")
                self._save_checkpoint(model, opt, epoch + 1)
        model.eval()
        self.model = model.cpu()

    def _loss(
        self, model: CLMBRModel, batch: list[Timeline], dev: torch.device
    ) -> tuple[Tensor, int]:
        assert self.vocab is not None
        ids, feats, mask, days = _pad(batch, self.vocab.size)
        ids, feats, mask = ids.to(dev), feats.to(dev), mask.to(dev)
        h = model(ids, feats, mask)
        nll, k = next_code_loss(model, h, ids, mask)
        loss = nll / max(k, 1)
        w = self._config["motor_weight"]
        if w > 0 and model.motor is not None:
            loss = loss + w * motor_loss(model, h, ids, mask, days.to(dev))
        return loss, k

    @torch.no_grad()
    def _perplexity(self, model: CLMBRModel, timelines: list[Timeline], dev: torch.device) -> float:
        """exp(mean next-token NLL) over `timelines`."""
        assert self.vocab is not None
        model.eval()
        tot, n = 0.0, 0
        bs = self._config["encode_batch_size"]
        for i in range(0, len(timelines), bs):
            ids, feats, mask, _ = _pad(timelines[i : i + bs], self.vocab.size)
            ids, feats, mask = ids.to(dev), feats.to(dev), mask.to(dev)
            nll, k = next_code_loss(model, model(ids, feats, mask), ids, mask)
            tot += float(nll)
            n += k
        return float(math.exp(tot / max(n, 1)))

    def validation_perplexity(self, cohort: pl.DataFrame, source: Any) -> float:
        """Perplexity of the fitted model on `cohort`'s timelines (last `max_len` events)."""
        self.check_fitted()
        assert self.model is not None
        _, tls = self._timelines(cohort, source)
        seqs = [t.tail(self._config["max_len"]) for t in tls.values() if len(t) >= 2]
        return self._perplexity(self.model.to(self.device), seqs, self.device)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: CLMBRModel, opt: torch.optim.Optimizer, epoch: int) -> None:
        from safetensors.torch import save_file

        d = self._config["checkpoint_dir"]
        if d is None:
            return
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()
        }
        for i, st in opt.state_dict()["state"].items():
            for name, val in st.items():
                tensors[f"optim.{i}.{name}"] = torch.as_tensor(val).detach().cpu().contiguous()
        tmp = d / ".checkpoint.tmp.safetensors"
        save_file(tensors, str(tmp))
        tmp.replace(d / "checkpoint.safetensors")
        info = {"epoch": epoch, "key": self._checkpoint_key(), "history": self.history}
        (d / ".trainer.tmp.json").write_text(json.dumps(info, indent=2))
        (d / ".trainer.tmp.json").replace(d / "trainer.json")

    def _resume(self, model: CLMBRModel, opt: torch.optim.Optimizer) -> int:
        """Load the checkpoint in `checkpoint_dir` when it matches config + vocabulary."""
        from safetensors.torch import load_file

        d = self._config["checkpoint_dir"]
        if d is None or not (Path(d) / "trainer.json").exists():
            return 0
        info = json.loads((Path(d) / "trainer.json").read_text())
        if info.get("key") != self._checkpoint_key() or info["epoch"] > self._config["epochs"]:
            return 0  # another model / vocabulary, or trained past `epochs`: start over
        tensors = load_file(str(Path(d) / "checkpoint.safetensors"))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        sd = opt.state_dict()
        state: dict[int, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        sd["state"] = state
        opt.load_state_dict(sd)
        self.history = list(info.get("history", []))
        return int(info["epoch"])

    # ------------------------------------------------------------------ encode
    def encode(self, cohort: pl.DataFrame, source: Any) -> ModalityFeatures:
        with self._threads(), torch.no_grad():
            return self._encode(cohort, source)

    def _encode(self, cohort: pl.DataFrame, source: Any) -> ModalityFeatures:
        self.check_fitted()
        assert self.vocab is not None and self.model is not None
        c = self._config
        dev = self.device
        model = self.model.to(dev).eval()
        index, tls = self._timelines(cohort, source)
        n, d, t_max = index.n_keys, c["d_model"], c["max_tokens"]
        pooled = np.zeros((n, d), np.float32)
        tokens = np.zeros((n, t_max, d), np.float32)
        mask = np.zeros((n, t_max), bool)
        present = np.zeros(n, bool)
        keys = sorted(tls, key=lambda k: (len(tls[k]), k))  # similar lengths batch together
        bs = c["encode_batch_size"]
        for i in range(0, len(keys), bs):
            chunk = keys[i : i + bs]
            seqs = [tls[k].tail(c["max_len"]) for k in chunk]
            ids, feats, m, _ = _pad(seqs, self.vocab.size)
            h = model(ids.to(dev), feats.to(dev), m.to(dev)).float().cpu().numpy()
            for j, k in enumerate(chunk):
                ln = len(seqs[j])
                take = min(ln, t_max)
                pooled[k] = h[j, ln - 1]
                tokens[k, :take] = h[j, ln - take : ln]
                mask[k, :take] = True
                present[k] = True
        self.model = model.cpu()
        return cohort_features(
            cohort,
            index,
            pooled=pooled,
            present=present,
            tokens=tokens,
            mask=mask,
            meta={"encoder": self.name, "history": self.history},
        )

"""`ehr_clmbr`: a CLMBR-style causal transformer pretrained on training-split timelines.

Timeline of a prediction: its windowed events (static first, then by time) as token ids of a
training `CodeVocab` (numeric values binned by training quantiles), the last `max_len` kept.
The model (`survfuse.encoders.clmbr_model`) embeds ids (+ a time-aware embedding of
[log1p(d), sin/cos(2 pi d / P), static] with d = days since the first event of the timeline
when `position="time"`, or rotary position embeddings on the event index when
`position="rotary"`), runs `n_layers` pre-norm causal self-attention blocks with key padding
masks and predicts the next token:

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
from numpy.typing import NDArray
from torch import Tensor

from survfuse.device import resolve_device
from survfuse.encoders.base import hash_arrays, hash_config, register_encoder
from survfuse.encoders.clmbr_model import (
    POSITIONS,
    CLMBRModel,
    Timeline,
    motor_loss,
    next_code_loss,
    pad_timelines,
    timelines_of,
    unigram_perplexity,
)
from survfuse.encoders.ehr_common import EHREncoder, cohort_features, fit_cohort_vocab
from survfuse.encoders.ehr_vocab import CodeVocab, KeyIndex, iter_event_batches
from survfuse.features import ModalityFeatures
from survfuse.progress import progress_bar
from survfuse.registry import look_up_option

__all__ = ["EHRCLMBREncoder"]


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
        """Fit the vocabulary and pretrain on the training rows' timelines.

        One timeline per subject: its latest prediction_time, cut into `max_len` pieces from the
        end.
        """
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
        progress = progress_bar(
            "[bold]ehr_clmbr[/] epoch {task.fields[epoch]}",
            stats=(
                "loss {task.fields[loss]:.3f}",
                "{task.fields[tps]:,.0f} tok/s",
                "val ppl {task.fields[ppl]} (unigram {task.fields[uni]:.1f})",
            ),
            enabled=c["progress"],
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
        ids, feats, mask, days = pad_timelines(batch, self.vocab.size)
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
            ids, feats, mask, _ = pad_timelines(timelines[i : i + bs], self.vocab.size)
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
            ids, feats, m, _ = pad_timelines(seqs, self.vocab.size)
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

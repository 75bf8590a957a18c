"""Per-modality ("branch") supervision, early stopping and dropping for fused models.

Why: trained jointly, a fused model's modalities learn at different speeds (the "modality
competition" of multimodal learning; Peng et al., CVPR 2022; Du et al., ICML 2023). A
high-dimensional one-hot EHR reaches its best validation C-index within a few full-batch epochs
and then overfits while a CT branch is still learning, so early stopping on the fused C-index
stops with the CT branch half-trained.

`BranchStopper` gives every modality m of a fused strategy
- a linear Cox probe g_m on the strategy's modality representation r_m
  (`FusionOutput.modality_repr`, [N, d_m]) whose partial likelihood is added to the training
  loss with weight `loss_weight` (deep supervision: each branch must be a standalone risk model);
- its own early stopping: the validation C-index of g_m(r_m) is computed every epoch; the
  encoder-side parameters of m are snapshotted at its best epoch and, after `patience` epochs in
  which neither the branch nor the fused model improved, restored to that snapshot and frozen.
  The rest of the model keeps training. The fused model's early stopping alone decides when
  training ends (the estimator's `patience` epochs without a better fused validation C, counted
  again from a freeze or a drop): a branch still unfrozen then simply keeps its trained weights. Waiting for
  every branch to freeze kept training 20 or more epochs past the fused best epoch, whose
  weights are the ones restored (docs/benchmarks.md, issue 25).

Dropping (`drop_alpha`, default 0.05): a frozen pure-noise modality still hurts, because its
frozen representation was fitted to the training risk sets and the fusion layers keep weighting
it. A branch becomes a drop candidate once it is frozen or its best validation C has not risen by
`DROP_MIN_DELTA` for `patience` epochs (a branch still learning is not judged), and is at chance:
z = (C - 0.5) / SE <= z_{1-alpha}, SE the infinitesimal-jackknife standard error of Harrell's C.
A candidate is dropped (frozen and, from then on, masked as missing for every patient, in
training and prediction) only when
1. another branch is above chance (a modality is never dropped when no other carries signal);
2. an independent check does not find signal in it (`BranchStopping(signal=...)`, by default
   `survfuse.fusion.signal.linear_signal`: an elastic-net Cox on the modality's own pooled
   features, penalty cross-validated on the training rows, tested once on validation). The probe
   judges the fused model's representation mid-training; on cohorts it was not tuned on it
   called informative modalities "chance" (benchmarks/fusion_generalisation.py in
   docs/benchmarks.md);
3. masking it raises the fused validation C by at least `DROP_MIN_GAIN`: a probe at chance does
   not prove the fusion layers make no use of a modality, and the margin keeps a comparison with
   no real difference, retried every epoch, from passing by noise.
The fused model's early stopping then restarts, so the weights kept are ones trained without the
dropped modality.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from survfuse.metrics import concordance_index
from survfuse.metrics.result import NoComparablePairError
from survfuse.survival.losses import cox_partial_nll
from survfuse.training.callbacks import Callback
from survfuse.training.state import TrainState

__all__ = [
    "DROP_MIN_DELTA",
    "DROP_MIN_GAIN",
    "BranchStopper",
    "BranchStopping",
    "check_drop_alpha",
    "probe_scores",
]

# a branch whose best validation C has not risen by this much for `patience` epochs is no longer
# learning, and may be tested for chance level (see the module docstring)
DROP_MIN_DELTA = 0.01
# a chance-level branch is dropped only if masking it raises the fused validation C this much
DROP_MIN_GAIN = 0.005


def check_drop_alpha(value: float | None, name: str = "drop_alpha") -> None:
    """`value` must be None (never drop) or a level in (0, 1)."""
    if value is not None and not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1) or be None, got {value}")


class BranchStopper:
    """Probe heads, snapshots and freezing for the branches of one training run.

    `params[m]` are modality m's encoder-side parameters; probes are created at the first
    `loss` call (when the representation sizes are known) and live on the representations'
    device. State per branch: best validation C (and its standard error), epochs without
    improvement, frozen and dropped flags. `drop_alpha=None` never drops a branch.
    """

    def __init__(
        self,
        params: Mapping[str, list[nn.Parameter]],
        *,
        patience: int,
        loss_weight: float,
        drop_alpha: float | None = 0.05,
    ) -> None:
        check_drop_alpha(drop_alpha)
        self.params = {m: list(ps) for m, ps in params.items()}
        self.patience = int(patience)
        self.loss_weight = float(loss_weight)
        self.drop_alpha = drop_alpha
        self.probes: nn.ModuleDict | None = None
        self.best: dict[str, float] = {m: -math.inf for m in self.params}
        self.best_se: dict[str, float] = {m: math.nan for m in self.params}
        # chance-test readiness: best C at the last rise of >= DROP_MIN_DELTA, epochs since
        self.rise_ref: dict[str, float] = {m: -math.inf for m in self.params}
        self.flat: dict[str, int] = {m: 0 for m in self.params}
        self.dropped: dict[str, int] = {}  # modality -> epoch at which it was dropped
        self.best_epoch: dict[str, int | None] = {m: None for m in self.params}
        self.bad: dict[str, int] = {m: 0 for m in self.params}
        self.snapshots: dict[str, list[Tensor]] = {}
        self.frozen: dict[str, int] = {}  # modality -> epoch at which it was frozen

    @property
    def all_frozen(self) -> bool:
        return len(self.frozen) == len(self.params)

    def probe_parameters(self, reprs: Mapping[str, Tensor]) -> list[nn.Parameter]:
        """Create the probes (once) for representations `reprs` and return their parameters."""
        if self.probes is None:
            first = next(iter(reprs.values()))
            self.probes = nn.ModuleDict(
                {m: nn.Linear(r.shape[-1], 1) for m, r in reprs.items() if m in self.params}
            ).to(device=first.device, dtype=first.dtype)
        return list(self.probes.parameters())

    def probe_risk(self, modality: str, r: Tensor) -> Tensor:
        assert self.probes is not None
        out: Tensor = self.probes[modality](r)[:, 0]
        return out

    def loss(
        self, reprs: Mapping[str, Tensor], present: Mapping[str, Tensor], t: Tensor, e: Tensor
    ) -> Tensor | None:
        """loss_weight * sum_m CoxNLL(g_m(r_m)) over the rows with m present (None if empty).

        Frozen branches are skipped (their representation no longer changes).
        """
        if self.loss_weight <= 0 or self.probes is None:
            return None
        parts = []
        for m, r in reprs.items():
            if m not in self.params or m in self.frozen:
                continue
            rows = present[m]
            if int(rows.sum()) >= 2 and bool(e[rows].any()):
                parts.append(cox_partial_nll(t[rows], e[rows], self.probe_risk(m, r[rows])))
        return self.loss_weight * torch.stack(parts).sum() if parts else None

    def update(
        self,
        epoch: int,
        scores: Mapping[str, float],
        *,
        fused_improved: bool = False,
        std_errors: Mapping[str, float] | None = None,
    ) -> list[str]:
        """Record validation C per branch; snapshot improvements, freeze stalled branches.

        A branch's stall counter only advances on epochs where the fused model did not improve
        either: while the fused validation C-index still rises, a branch whose probe dips is
        being reshaped for the fusion, not overfitting (on METABRIC, freezing the clinical
        branch at its early probe peak cost late fusion 0.04 test C).
        `std_errors[m]`: the standard error of `scores[m]` (for the chance test of `drop`).
        Returns the modalities frozen at this epoch.
        """
        newly: list[str] = []
        for m, c in scores.items():
            if m in self.frozen or m not in self.params:
                continue
            score = c if math.isfinite(c) else -math.inf
            if math.isfinite(c):  # an epoch without a score is no evidence of chance level
                if c >= self.rise_ref[m] + DROP_MIN_DELTA:
                    self.rise_ref[m], self.flat[m] = c, 0
                else:
                    self.flat[m] += 1
            if score > self.best[m] + 1e-6 or self.best_epoch[m] is None:
                self.best[m] = score
                self.best_se[m] = (std_errors or {}).get(m, math.nan)
                self.best_epoch[m] = epoch
                self.bad[m] = 0
                self.snapshots[m] = [p.detach().clone() for p in self.params[m]]
            elif not fused_improved:
                self.bad[m] += 1
                if self.bad[m] >= self.patience:
                    self._freeze(m, epoch)
                    newly.append(m)
        return newly

    def above_chance(self, modality: str) -> bool:
        """Return whether the branch's best validation C exceeds 0.5 at one-sided `drop_alpha`.

        (C - 0.5) / SE > z_{1 - alpha} (without a standard error: C > 0.5).
        """
        c, se = self.best[modality], self.best_se[modality]
        if not math.isfinite(c):
            return False
        if self.drop_alpha is None or not (math.isfinite(se) and se > 0):
            return c > 0.5
        return (c - 0.5) / se > NormalDist().inv_cdf(1.0 - self.drop_alpha)

    def drop_candidates(self) -> list[str]:
        """Branches at chance level while another (not dropped) branch is above it.

        A branch is a candidate once it is frozen or its best C has not risen by
        `DROP_MIN_DELTA` for `patience` scored epochs (a branch still learning is not judged);
        the estimator drops a candidate only if masking it raises the fused validation C-index
        by `DROP_MIN_GAIN` (`drop`).
        """
        if self.drop_alpha is None:
            return []
        live = [m for m in self.params if m not in self.dropped]
        signal = [m for m in live if self.above_chance(m)]
        return [
            m
            for m in live
            if (m in self.frozen or self.flat[m] >= self.patience)
            and m not in signal
            and any(o != m for o in signal)
        ]

    def drop(self, modality: str, epoch: int) -> None:
        """Mark `modality` dropped (restored to its best snapshot and frozen if it was not)."""
        if modality not in self.frozen:
            self._freeze(modality, epoch)
        self.dropped[modality] = epoch

    def _freeze(self, modality: str, epoch: int) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params[modality], self.snapshots[modality], strict=True):
                p.copy_(saved)
                p.requires_grad_(False)
                p.grad = None
        self.frozen[modality] = epoch

    def release(self) -> None:
        """Make every branch trainable again (after training: a fitted model is a plain module)."""
        for ps in self.params.values():
            for p in ps:
                p.requires_grad_(True)

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        return {
            m: {
                "best_val_c": self.best[m],
                "best_epoch": self.best_epoch[m],
                "frozen_at": self.frozen.get(m),
                "dropped_at": self.dropped.get(m),
            }
            for m in self.params
        }


def probe_scores(
    stopper: BranchStopper,
    reprs: Mapping[str, Tensor],
    present: Mapping[str, Tensor],
    time: NDArray[np.float64],
    event: NDArray[np.bool_],
) -> dict[str, tuple[float, float]]:
    """Return (Harrell's C, its standard error) of each branch's probe.

    Computed on the rows where that modality is present; (NaN, NaN) when it has no comparable pair
    there (NaN counts as no gain).
    """
    out: dict[str, tuple[float, float]] = {}
    if stopper.probes is None:
        return out
    with torch.no_grad():
        for m, r in reprs.items():
            if m not in stopper.params:
                continue
            out[m] = (math.nan, math.nan)
            rows = present[m].cpu().numpy()
            if int(rows.sum()) < 2:
                continue
            risk = stopper.probe_risk(m, r).cpu().numpy().astype(np.float64)
            try:
                res = concordance_index(time[rows], event[rows], risk[rows])
            except NoComparablePairError:
                continue
            out[m] = (res.estimate, res.std_error)
    return out


class BranchStopping(Callback):
    """The training-loop side of `BranchStopper`.

    Adds the probes' loss, scores the probes on validation, freezes stalled branches and drops
    chance-level ones (see the module docstring).

    `val_time`, `val_event`: the validation outcomes; `c_without(m)`: the fused validation C
    with modality m also masked; `dropped`: the estimator's list of dropped modalities (appended
    to here, and read by the estimator when it builds batches); `lr`: the probes' learning rate.
    `state.val_payload` must be `(reprs, present)` of the validation rows. `signal(m)`, when
    given, is an independent check that modality m carries signal on its own
    (`survfuse.fusion.signal.linear_signal`): a modality it finds above chance is never dropped.
    It never holds training back (`ready_to_stop` is always true): a freeze or a drop restarts
    the fused model's early stopping instead.
    """

    def __init__(
        self,
        stopper: BranchStopper,
        *,
        lr: float,
        val_time: NDArray[np.float64],
        val_event: NDArray[np.bool_],
        c_without: Callable[[str], float],
        dropped: list[str],
        signal: Callable[[str], bool | None] | None = None,
    ) -> None:
        self.stopper = stopper
        self.lr = float(lr)
        self.val_time, self.val_event = val_time, val_event
        self.c_without = c_without
        self.dropped = dropped
        self.signal = signal
        self._signal: dict[str, bool | None] = {}
        self.opt: torch.optim.Optimizer | None = None

    def extra_loss(
        self, state: TrainState, output: Any, batch: Any, time: Tensor, event: Tensor
    ) -> Tensor | None:
        if state.stage != "survival":
            return None
        if self.opt is None:  # the probes' sizes are known once a representation exists
            self.opt = torch.optim.AdamW(
                self.stopper.probe_parameters(output.modality_repr), lr=self.lr
            )
        present = {m: batch[m]["present"] for m in output.modality_repr}
        loss = self.stopper.loss(output.modality_repr, present, time, event)
        self.opt.zero_grad(set_to_none=True)
        return loss

    def after_step(self, state: TrainState) -> None:
        if self.opt is not None and state.stage == "survival":
            self.opt.step()

    def on_validation(self, state: TrainState) -> None:
        if state.stage != "survival":
            return
        reprs, present = state.val_payload
        scored = probe_scores(self.stopper, reprs, present, self.val_time, self.val_event)
        branch_c = {m: c_se[0] for m, c_se in scored.items()}
        for m, bc in branch_c.items():
            state.record[f"val_c_index_{m}"] = bc
        se = {m: c_se[1] for m, c_se in scored.items()}
        for m in self.stopper.update(
            state.epoch, branch_c, fused_improved=state.improved, std_errors=se
        ):
            state.record[f"frozen_{m}"] = True
            state.froze = True
        for m in self.stopper.drop_candidates():
            if self.signal is not None:
                if m not in self._signal:  # judged once: the data do not change
                    self._signal[m] = self.signal(m)
                    state.record[f"signal_{m}"] = self._signal[m]
                if self._signal[m]:
                    continue  # carries signal on its own: never dropped
            # drop only if the fused model is better without it (see the module docstring)
            without = self.c_without(m)
            state.record[f"val_c_index_without_{m}"] = without
            if math.isfinite(state.val_c) and without >= state.val_c + DROP_MIN_GAIN:
                self.stopper.drop(m, state.epoch)
                state.record[f"dropped_{m}"] = state.record[f"frozen_{m}"] = True
                self.dropped.append(m)
                state.dropped, state.val_c = True, without

    def on_fit_end(self, state: TrainState) -> None:
        self.stopper.release()

"""Survival heads: `nn.Module`s mapping fused features to a survival output.

Interface of every head (registered in `survfuse.registry.HEADS`):
`__init__(in_features, **kwargs)`, `prepare(time, event)` (once, training outcomes),
`forward(x [N, in]) -> out [N, K]`, `risk(out) -> [N]` (higher = worse),
`loss(out, time, event) -> scalar`, `fit_baseline(out, time, event)` (after training, on the
training set), `survival(out, times) -> [N, len(times)]` in [0, 1], non-increasing in time.

Save/load: `head.config()` returns the JSON-serialisable kwargs that recreate the head
(`HEADS.get(name)(**config)`); all fitted state (cut points, baseline hazard) lives in buffers,
so `head.load_state_dict(state)` (e.g. from safetensors) restores it. Buffers whose size is only
known after fitting (the Cox baseline) are resized on load.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor, nn

from survfuse.interop import check_survival
from survfuse.registry import HEADS, look_up_option
from survfuse.survival.baseline import breslow_baseline
from survfuse.survival.losses import (
    TIES,
    bin_times,
    cox_partial_nll,
    discrete_time_nll,
    time_bin_cuts,
)
from survfuse.survival.recalibration import risk_scale

__all__ = ["CoxHead", "DiscreteTimeHead", "SurvivalHead"]


def _np(x: Tensor | ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


class SurvivalHead(nn.Module, abc.ABC):
    """The interface every head implements (typed here; see the module docstring).

    Also shared plumbing: buffers that may change size are resized when a state_dict is loaded.
    """

    _resizable: tuple[str, ...] = ()
    #: buffer -> value it takes when a saved state predates it
    _defaults: ClassVar[dict[str, float]] = {}

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable kwargs that recreate the head (fitted state is in the state_dict)."""

    @abc.abstractmethod
    def prepare(self, time: ArrayLike, event: ArrayLike) -> None:
        """Once before training, with the training outcomes (e.g. time-bin cut points)."""

    @abc.abstractmethod
    def risk(self, out: Tensor) -> Tensor:
        """[N] risk (higher = worse) from the head output `out` [N, K]."""

    @abc.abstractmethod
    def loss(self, out: Tensor, time: Tensor, event: Tensor) -> Tensor:
        """Scalar training loss of `out` [N, K] given (time, event)."""

    @abc.abstractmethod
    def fit_baseline(
        self, out: Tensor, time: Tensor | ArrayLike, event: Tensor | ArrayLike
    ) -> None:
        """After training, on the training set's outputs (e.g. the Breslow baseline hazard)."""

    @abc.abstractmethod
    def survival(self, out: Tensor, times: ArrayLike) -> Tensor:
        """S(t) [N, len(times)] in [0, 1], non-increasing in t."""

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name, value in self._defaults.items():  # buffers added after a model was saved
            cur = getattr(self, name)
            state_dict.setdefault(prefix + name, torch.full_like(cur, value))
        for name in self._resizable:
            key = prefix + name
            if key in state_dict:
                cur = getattr(self, name)
                setattr(self, name, torch.empty_like(state_dict[key], device=cur.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


@HEADS.register("cox")
class CoxHead(SurvivalHead):
    """Linear layer -> log relative hazard [N, 1]; Cox partial likelihood; Breslow curves.

    Fitted buffers: `baseline_time` [M], `baseline_cumhaz` [M] (H0 at the centred risk) and
    `risk_offset` (the mean training risk the baseline is centred on), `baseline_fitted`, and
    `risk_scale` s: risk = s * linear(x), 1 while training; after training `FusionSurvivalModel`
    may set it to the calibration slope on the validation split (`validation_slope`), which keeps
    every ranking and rescales the spread of the predicted survival curves.

    Parameters
    ----------
    in_features : int
        Width D of the input [N, D].
    ties : {"efron", "breslow"}
        Tie handling of the loss and of the baseline estimator.
    bias : bool
        Give the linear layer a bias (unidentifiable in a Cox model; default False).
    """

    _resizable = ("baseline_time", "baseline_cumhaz")
    # models saved before the scale existed predict with scale 1
    _defaults: ClassVar[dict[str, float]] = {"risk_scale": 1.0}
    baseline_time: Tensor
    baseline_cumhaz: Tensor
    risk_offset: Tensor
    baseline_fitted: Tensor
    risk_scale: Tensor

    def __init__(self, in_features: int, *, ties: str = "efron", bias: bool = False) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.ties = look_up_option(ties, TIES, kind="ties")
        self.bias = bool(bias)
        self.linear = nn.Linear(self.in_features, 1, bias=self.bias)
        self.register_buffer("baseline_time", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("baseline_cumhaz", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("risk_offset", torch.zeros((), dtype=torch.float64))
        self.register_buffer("baseline_fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("risk_scale", torch.ones((), dtype=torch.float64))

    def config(self) -> dict[str, Any]:
        """JSON-serialisable kwargs that recreate this head (fitted state is in the state_dict)."""
        return {"in_features": self.in_features, "ties": self.ties, "bias": self.bias}

    def prepare(self, time: ArrayLike, event: ArrayLike) -> None:
        """Validate the training outcomes; a Cox head needs nothing else before training."""
        _, e = check_survival(time, event)
        if not e.any():
            raise ValueError("CoxHead.prepare: the training set has no observed event")

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.linear(x)
        return out

    def risk(self, out: Tensor) -> Tensor:
        # x * 1.0 is exact: training (scale 1) is bit-identical to an unscaled head
        return out[:, 0] * self.risk_scale.to(out.dtype)

    def loss(self, out: Tensor, time: Tensor, event: Tensor) -> Tensor:
        """Mean-over-events Cox NLL (`cox_partial_nll`); 0 on a batch without events."""
        return cox_partial_nll(time, event, self.risk(out), ties=self.ties, reduction="mean")

    def fit_baseline(
        self, out: Tensor, time: Tensor | ArrayLike, event: Tensor | ArrayLike
    ) -> None:
        """Breslow (Efron-adjusted for ties="efron") baseline on the training set's outputs."""
        r = _np(self.risk(out)).astype(np.float64)
        offset = float(r.mean())
        step = breslow_baseline(_np(time), _np(event), r - offset, ties=self.ties)
        dev = self.baseline_time.device
        self.baseline_time = torch.as_tensor(step.x, dtype=torch.float64, device=dev)
        self.baseline_cumhaz = torch.as_tensor(step.y, dtype=torch.float64, device=dev)
        self.risk_offset = torch.tensor(offset, dtype=torch.float64, device=dev)
        self.baseline_fitted = torch.tensor(True, device=dev)

    def fit_scale(
        self, out: Tensor, time: Tensor | ArrayLike, event: Tensor | ArrayLike
    ) -> float | None:
        """Set `risk_scale` to the calibration slope of outputs [N, 1]; return it (None: 1).

        The outputs are of a labelled sample the model was not trained on (validation);
        `survival.recalibration.risk_scale`. Call before `fit_baseline`, which then uses it.
        """
        self.risk_scale.fill_(1.0)
        s = risk_scale(_np(time), _np(event), _np(self.risk(out)))
        if s is not None:
            self.risk_scale.fill_(s)
        return s

    def cumulative_baseline_hazard(self, times: ArrayLike) -> Tensor:
        """H0(t) (for the centred risk) at `times` [T]."""
        if not bool(self.baseline_fitted):
            raise RuntimeError("CoxHead: call fit_baseline(out, time, event) before survival()")
        t = torch.as_tensor(np.asarray(times, dtype=np.float64), device=self.baseline_time.device)
        k = torch.searchsorted(self.baseline_time, t.reshape(-1), right=True) - 1
        padded = torch.cat([self.baseline_cumhaz.new_zeros(1), self.baseline_cumhaz])
        return padded[k + 1]

    def survival(self, out: Tensor, times: ArrayLike) -> Tensor:
        """S(t | x) = exp(-H0(t) exp(r - offset)) [N, T], in float64, computed in log space."""
        h0 = self.cumulative_baseline_hazard(times).to(out.device)
        r = self.risk(out).detach().to(torch.float64) - self.risk_offset.to(out.device)
        # exp(log H0 + r) avoids 0 * inf when H0 = 0 and r is large
        log_cum = torch.log(h0).unsqueeze(0) + r.unsqueeze(1)
        return torch.exp(-torch.exp(log_cum)).clamp(0.0, 1.0)


@HEADS.register("discrete")
class DiscreteTimeHead(SurvivalHead):
    """Linear layer -> per-bin hazard logits [N, n_bins]; logistic-hazard NLL (MCAT/SurvPath).

    `prepare` cuts the time axis at the training event-time quantiles (`time_bin_cuts`), stored
    in the buffer `cuts` [n_bins - 1]. risk = -sum_k S_k with S_k = prod_{m<=k} (1 - h_m).

    Parameters
    ----------
    in_features : int
        Width D of the input [N, D].
    n_bins : int
        Number of time bins (>= 1; default 4, as MCAT).
    """

    cuts: Tensor
    prepared: Tensor

    def __init__(self, in_features: int, *, n_bins: int = 4) -> None:
        super().__init__()
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.in_features = int(in_features)
        self.n_bins = int(n_bins)
        self.linear = nn.Linear(self.in_features, self.n_bins)
        self.register_buffer("cuts", torch.zeros(self.n_bins - 1, dtype=torch.float64))
        self.register_buffer("prepared", torch.zeros((), dtype=torch.bool))

    def config(self) -> dict[str, Any]:
        """JSON-serialisable kwargs that recreate this head (fitted state is in the state_dict)."""
        return {"in_features": self.in_features, "n_bins": self.n_bins}

    def prepare(self, time: ArrayLike, event: ArrayLike) -> None:
        """Cut points at the training event-time quantiles."""
        cuts = time_bin_cuts(_np(time), _np(event), self.n_bins)
        self.cuts = torch.as_tensor(cuts, dtype=torch.float64, device=self.cuts.device)
        self.prepared = torch.tensor(True, device=self.cuts.device)

    def _check_prepared(self) -> None:
        if not bool(self.prepared):
            raise RuntimeError(
                "DiscreteTimeHead: call prepare(time, event) on the training outcomes first"
            )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.linear(x)
        return out

    def hazards(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out)

    def bin_survival(self, out: Tensor) -> Tensor:
        """S_k = prod_{m<=k} (1 - h_m) [N, n_bins], via cumsum of logsigmoid(-logit)."""
        return torch.exp(torch.cumsum(nn.functional.logsigmoid(-out), 1))

    def risk(self, out: Tensor) -> Tensor:
        return -self.bin_survival(out).sum(1)

    def time_bins(self, time: Tensor | ArrayLike) -> Tensor:
        self._check_prepared()
        t = (
            time.detach().to(torch.float64)
            if isinstance(time, Tensor)
            else torch.as_tensor(np.asarray(time, dtype=np.float64))
        )
        return torch.searchsorted(self.cuts.to(t.device), t.reshape(-1).contiguous(), right=True)

    def loss(self, out: Tensor, time: Tensor, event: Tensor) -> Tensor:
        self._check_prepared()
        b = self.time_bins(time).to(out.device)
        return discrete_time_nll(b, event, out, reduction="mean")

    def fit_baseline(
        self, out: Tensor, time: Tensor | ArrayLike, event: Tensor | ArrayLike
    ) -> None:
        """Nothing to fit after training: the bin hazards are the model. Checks prepare ran."""
        self._check_prepared()
        check_survival(_np(time), _np(event))

    def survival(self, out: Tensor, times: ArrayLike) -> Tensor:
        """Return S(t) [N, T] float64 at `times`: S_{j-1} for t in bin j = [c_{j-1}, c_j).

        S_{-1} = 1: surviving a bin means reaching its end, the convention of the loss.
        """
        self._check_prepared()
        t = np.asarray(times, dtype=np.float64).reshape(-1)
        idx = torch.as_tensor(bin_times(t, self.cuts.cpu().numpy()), device=out.device)
        s = self.bin_survival(out.detach()).to(torch.float64)
        padded = torch.cat([s.new_ones(s.shape[0], 1), s], 1)
        return padded[:, idx].clamp(0.0, 1.0)

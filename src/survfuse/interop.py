"""The project's single survival-data convention and conversions to peer libraries.

Convention (everywhere in survfuse):
- `time`: float64 days from prediction time to event or censoring, finite, >= 0;
- `event`: bool, True = event observed (never a censoring indicator);
- `risk`: float, higher = worse (shorter survival);
- argument order `(time, event, risk)`: truth first, then prediction.

All conversions to and from scikit-survival, lifelines and pycox live in this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "SurvivalData",
    "check_risk",
    "check_survival",
    "check_time_grid",
    "from_lifelines",
    "from_pycox",
    "from_sksurv",
    "survival_from_y",
    "to_lifelines",
    "to_pycox",
    "to_sksurv",
]


def _first_bad(mask: NDArray[np.bool_]) -> int:
    return int(np.flatnonzero(mask)[0])


def _as_1d(x: ArrayLike, name: str) -> NDArray[Any]:
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise ValueError(f"{name} must be a 1-d array, got a scalar")
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {arr.shape}")
    return arr


def _finite_1d(x: ArrayLike, name: str) -> NDArray[np.float64]:
    """1-d numeric (not bool) array of finite values, as float64."""
    raw = _as_1d(x, name)
    if raw.dtype == bool or not np.issubdtype(raw.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {raw.dtype}")
    out = raw.astype(np.float64)
    bad = ~np.isfinite(out)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"{name} must be finite; {name}[{i}] = {out[i]}")
    return out


def _check_time(time: ArrayLike, name: str = "time") -> NDArray[np.float64]:
    t = _finite_1d(time, name)
    neg = t < 0
    if neg.any():
        i = _first_bad(neg)
        raise ValueError(f"{name} must be >= 0; {name}[{i}] = {t[i]}")
    return t


def _check_event(event: ArrayLike, name: str = "event") -> NDArray[np.bool_]:
    raw = _as_1d(event, name)
    if raw.dtype == bool:
        return raw.astype(bool)
    if not np.issubdtype(raw.dtype, np.number):
        raise ValueError(f"{name} must be bool or 0/1, got dtype {raw.dtype}")
    vals = raw.astype(np.float64)
    bad = ~((vals == 0) | (vals == 1))
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"{name} must be 0/1 (True = observed); {name}[{i}] = {raw[i]}")
    return vals == 1


def check_time_grid(times: ArrayLike, *, nonnegative: bool = False) -> NDArray[np.float64]:
    """Check evaluation times [K] and return them as float64.

    They must be non-empty, 1-d, finite (and >= 0 when `nonnegative`) and strictly increasing.
    """
    tt = np.atleast_1d(np.asarray(times, dtype=np.float64))
    if tt.ndim != 1 or tt.shape[0] == 0:
        raise ValueError(f"times must be a non-empty 1-d array, got shape {tt.shape}")
    bad = ~np.isfinite(tt)
    if nonnegative:
        bad |= tt < 0
    if bad.any():
        i = _first_bad(bad)
        what = "finite and >= 0" if nonnegative else "finite"
        raise ValueError(f"times must be {what}; times[{i}] = {tt[i]}")
    dec = np.diff(tt) <= 0
    if dec.any():
        i = _first_bad(dec) + 1
        raise ValueError(f"times must be strictly increasing; times[{i}] = {tt[i]}")
    return tt


def check_risk(risk: ArrayLike, n: int | None = None, name: str = "risk") -> NDArray[np.float64]:
    """Validate a risk vector (finite floats, optional expected length)."""
    r = _finite_1d(risk, name)
    if n is not None and r.shape[0] != n:
        raise ValueError(f"length mismatch: {name} has {r.shape[0]} values, time has {n}")
    return r


def check_survival(
    time: ArrayLike, event: ArrayLike, *, allow_empty: bool = False
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Validate and normalise `(time, event)`: float64 days >= 0 and bool (True = observed).

    Raises ValueError naming the first offending index for NaN/inf/negative time, non-binary
    event, length mismatch, or empty input.
    """
    t = _check_time(time)
    e = _check_event(event)
    if t.shape[0] != e.shape[0]:
        raise ValueError(f"length mismatch: time has {t.shape[0]} values, event has {e.shape[0]}")
    if t.shape[0] == 0 and not allow_empty:
        raise ValueError("empty survival data: time and event have no values")
    return t, e


@dataclass(frozen=True)
class SurvivalData:
    """Validated survival outcomes in the survfuse convention.

    Attributes: `time` [N] float64 days >= 0, `event` [N] bool (True = observed).
    """

    time: NDArray[np.float64]
    event: NDArray[np.bool_]

    def __init__(self, time: ArrayLike, event: ArrayLike) -> None:
        t, e = check_survival(time, event)
        object.__setattr__(self, "time", t)
        object.__setattr__(self, "event", e)

    def __len__(self) -> int:
        return int(self.time.shape[0])

    @property
    def n_events(self) -> int:
        return int(self.event.sum())

    def to_sksurv(self) -> NDArray[Any]:
        return to_sksurv(self.time, self.event)

    def to_lifelines(self) -> pd.DataFrame:
        return to_lifelines(self.time, self.event)

    def to_pycox(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        return to_pycox(self.time, self.event)


# ----------------------------------------------------------------------------- scikit-survival
def to_sksurv(time: ArrayLike, event: ArrayLike) -> NDArray[Any]:
    """Structured array with fields `("event", bool), ("time", float64)`, as `sksurv.util.Surv`."""
    t, e = check_survival(time, event)
    out = np.empty(t.shape[0], dtype=[("event", bool), ("time", np.float64)])
    out["event"] = e
    out["time"] = t
    return out


def from_sksurv(y: NDArray[Any]) -> SurvivalData:
    """Read a scikit-survival structured array.

    Two fields, the event indicator first and the time second, whatever their names
    (`sksurv.util.Surv.from_arrays(event, time, name_event=..., name_time=...)`).
    """
    names = getattr(getattr(y, "dtype", None), "names", None)
    if not names or len(names) != 2:
        got = f"dtype {y.dtype}, shape {y.shape}" if hasattr(y, "dtype") else type(y).__name__
        raise ValueError(
            "y must be a structured array with two fields (event, time), as "
            f"sksurv.util.Surv.from_arrays makes; got {got}"
        )
    if np.asarray(y[names[1]]).dtype == bool and np.asarray(y[names[0]]).dtype != bool:
        raise ValueError(
            f"y's fields are ({names[0]!r}, {names[1]!r}): the event (bool) field must come "
            "first and the time second, as in scikit-survival"
        )
    return SurvivalData(time=y[names[1]], event=y[names[0]])


def survival_from_y(
    y: ArrayLike, event: ArrayLike | None = None
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Return `(time, event)` from an estimator's target.

    `y` is a scikit-survival structured array (when `event` is None) or `y` = time with a separate
    `event` (the survfuse argument order).
    """
    if y is None:
        raise ValueError(
            "this estimator requires y to be passed, but the target y is None: pass a structured "
            "(event, time) array or time and event"
        )
    if event is None:
        data = from_sksurv(np.asarray(y))
        return data.time, data.event
    return check_survival(y, event)


# ----------------------------------------------------------------------------- lifelines
def to_lifelines(
    time: ArrayLike,
    event: ArrayLike,
    covariates: Any = None,
    *,
    duration_col: str = "time",
    event_col: str = "event",
) -> pd.DataFrame:
    """DataFrame for lifelines (`CoxPHFitter.fit(df, duration_col, event_col)`), events as 0/1."""
    import pandas as pd

    t, e = check_survival(time, event)
    df = pd.DataFrame(covariates).reset_index(drop=True) if covariates is not None else None
    base = pd.DataFrame({duration_col: t, event_col: e.astype(np.int64)})
    if df is None:
        return base
    if len(df) != len(base):
        raise ValueError(f"length mismatch: covariates have {len(df)} rows, time has {len(base)}")
    return pd.concat([df, base], axis=1)


def from_lifelines(
    df: pd.DataFrame, *, duration_col: str = "time", event_col: str = "event"
) -> SurvivalData:
    """Read durations and 0/1 events from a lifelines-style DataFrame."""
    for col in (duration_col, event_col):
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in DataFrame (columns: {list(df.columns)})")
    return SurvivalData(time=df[duration_col].to_numpy(), event=df[event_col].to_numpy())


# ----------------------------------------------------------------------------- pycox
def to_pycox(time: ArrayLike, event: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Return the pycox target `(durations, events)`, both float arrays (events 1.0 = observed)."""
    t, e = check_survival(time, event)
    return t.copy(), e.astype(np.float64)


def from_pycox(target: tuple[ArrayLike, ArrayLike]) -> SurvivalData:
    """Read a pycox `(durations, events)` tuple."""
    durations, events = target
    return SurvivalData(time=durations, event=events)

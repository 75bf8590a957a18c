"""Reading a study config: YAML -> validated `ExperimentConfig`, with one-line errors.

`load_config(path)` parses the YAML, resolves relative data paths against the config's folder,
validates with pydantic (every problem one line naming the key, with a did-you-mean suggestion)
and checks that the data exist and agree with the config (sites, tasks, encoder parameters),
all before any work starts.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from survfuse.data.cohort import DEFAULT_SITE, task_columns
from survfuse.experiment.config import ConfigError, EncoderChoice, ExperimentConfig
from survfuse.features import MODALITIES
from survfuse.registry import ENCODERS, suggest

__all__ = [
    "check_inputs",
    "cohort_tasks",
    "encoder_from_choice",
    "format_validation_error",
    "load_config",
    "parse_config",
]


# ----------------------------------------------------------------------------- errors
def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Return the pydantic model class reached by following `loc` field names from `model`."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _inner_model(arg)
            if found is not None:
                return found
    return None


def _loc_str(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def format_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line for the first error: `<key path>: <problem>; did you mean ...` (+ how many more)."""
    errors = exc.errors()
    first = errors[0]
    loc = tuple(first["loc"])
    if first["type"] == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        valid = list(parent.model_fields) if parent else []
        key = str(loc[-1])
        msg = f"{_loc_str(loc)}: unknown key {key!r}{suggest(key, valid)}"
        if valid:
            msg += f" (valid: {', '.join(valid)})"
    else:
        text = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "missing":
            text = "required key is missing"
        msg = f"{_loc_str(loc)}: {text}" if loc else text
        if first["type"] not in ("missing", "value_error") and "input" in first:
            msg += f" (got {first['input']!r})"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return " ".join(msg.split())


# ----------------------------------------------------------------------------- loading
def _resolve(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def parse_config(
    raw: dict[str, Any], *, base: Path | None = None, source: str = "config"
) -> ExperimentConfig:
    """Validate a config dict; relative data paths resolve against `base` (default: cwd)."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(raw).__name__}"
        )
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc, ExperimentConfig)}") from None
    except ValueError as exc:  # look-ups raised outside pydantic's wrapping
        raise ConfigError(f"{source}: {' '.join(str(exc).split())}") from None
    base = (base or Path.cwd()).resolve()
    data = cfg.data
    resolved = data.model_copy(
        update={
            "cohort": _resolve(data.cohort, base),
            "ct_index": _resolve(data.ct_index, base),
            "ct_root": _resolve(data.ct_root, base),
            "meds_root": _resolve(data.meds_root, base),
        }
    )
    return cfg.model_copy(
        update={"data": resolved, "feature_store": _resolve(cfg.feature_store, base)}
    )


def load_config(
    path: str | Path, *, overrides: dict[str, Any] | None = None, check: bool = True
) -> ExperimentConfig:
    """Read, validate and (with `check`) check the inputs of a YAML experiment config.

    `overrides` is deep-merged into the YAML before validation (e.g. the demo's data paths).
    Raises `ConfigError` (one line) for every problem, before any work starts.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if overrides:
        raw = _deep_merge(raw, overrides) if isinstance(raw, dict) else raw
    cfg = parse_config(raw, base=path.resolve().parent, source=str(path))
    if check:
        check_inputs(cfg, source=str(path))
    return cfg


def check_inputs(cfg: ExperimentConfig, *, source: str = "config") -> None:
    """Check that the data exist and agree with the config (cheap: reads the cohort's columns)."""
    import polars as pl

    d = cfg.data
    for key in ("cohort", "ct_index", "ct_root", "meds_root"):
        p = getattr(d, key)
        if p is not None and not Path(p).exists():
            raise ConfigError(f"{source}: data.{key}: file not found: {p}")
    try:
        if d.cohort.suffix == ".csv":
            head = pl.read_csv(d.cohort, n_rows=0)
            columns = head.columns
            sites = pl.read_csv(d.cohort, columns=["site"])["site"] if "site" in columns else None
        else:
            columns = list(pl.read_parquet_schema(d.cohort))
            sites = (
                pl.read_parquet(d.cohort, columns=["site"])["site"] if "site" in columns else None
            )
    except Exception as exc:
        raise ConfigError(f"{source}: data.cohort: cannot read {d.cohort}: {exc}") from None
    if sites is None:  # a single-site cohort (load_cohort assigns the default site)
        sites = pl.Series("site", [DEFAULT_SITE])
    present = sorted(str(s) for s in sites.unique().drop_nulls().to_list())
    for site in cfg.splits.external_sites:
        if site not in present:
            raise ConfigError(
                f"{source}: splits.external_sites: site {site!r} is not in the cohort"
                f"{suggest(site, present)} (sites: {', '.join(present)})"
            )
    if set(cfg.splits.external_sites) >= set(present):
        raise ConfigError(f"{source}: splits.external_sites: every site is external; none left")
    col = cfg.splits.column
    if col is not None and col not in columns:
        raise ConfigError(
            f"{source}: splits.column: column {col!r} is not in the cohort{suggest(col, columns)}"
        )
    tasks = cohort_tasks(columns)
    for task in cfg.tasks:
        if task not in tasks:
            raise ConfigError(
                f"{source}: tasks: task {task!r} is not in the cohort{suggest(task, tasks)}"
                f" (tasks: {', '.join(tasks)})"
            )
    for modality in MODALITIES:
        for choice in getattr(cfg.encoders, modality):
            encoder_from_choice(choice, source=source, where=f"encoders.{modality}")


def cohort_tasks(columns: list[str]) -> list[str]:
    """Tasks a cohort table defines: `default` (time/event) and every `<task>_time/_event` pair."""
    return list(task_columns(list(columns)))


def encoder_from_choice(
    choice: EncoderChoice, *, source: str = "config", where: str = "encoders"
) -> Any:
    """Instantiate an encoder from its choice; bad parameters become a ConfigError."""
    cls = ENCODERS.get(choice.name)
    try:
        return cls(**choice.params)
    except TypeError as exc:
        raise ConfigError(
            f"{source}: {where} {choice.key!r}: bad params: {' '.join(str(exc).split())}"
        ) from None
    except ValueError as exc:
        raise ConfigError(
            f"{source}: {where} {choice.key!r}: {' '.join(str(exc).split())}"
        ) from None

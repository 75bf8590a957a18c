"""The experiment config: one YAML file describing a whole study, validated by pydantic.

Every model forbids unknown keys; a bad key or value becomes a one-line `ConfigError` naming the
key (`strategies[2].name`) and suggesting the closest valid spelling. Reading a YAML file,
resolving its paths and checking its data: `survfuse.experiment.config_load`.

Layout (see `examples/demo.yaml`)::

    name: demo
    data: {cohort: ..., ct_index: ..., meds_root: ...}
    tasks: [pe_mortality, mace]
    splits: {external_sites: [C], val_frac: 0.15, test_frac: 0.15, seed: 0}
    encoders: {ct: [{name: ct_radiomics, params: {...}}], ehr: [{name: ehr_onehot}, ...]}
    strategies: [{name: unimodal, label: unimodal_ct, params: {modality: ct}}, {name: late}, ...]
    heads: [cox]
    training: {max_epochs: 30, lr: 0.001, ...}
    seeds: [0, 1, 2]
    evaluation: {metrics: [...], horizons: [365], bootstrap: 1000, reference: best_unimodal}
    executor: local
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from survfuse.data.hu_calibration import HU_CALIBRATIONS
from survfuse.features import MODALITIES, Modality
from survfuse.features_harmonise import HarmoniseConfig
from survfuse.fusion.params import STRATEGY_OPTIONS, check_params
from survfuse.paths import check_name
from survfuse.registry import ENCODERS, FUSIONS, HEADS, all_registries, look_up_option, suggest
from survfuse.training.options import TrainingOptions

__all__ = [
    "COMPARED_METRICS",
    "EXECUTORS",
    "METRICS",
    "ConfigError",
    "DataConfig",
    "EncoderChoice",
    "EncodersConfig",
    "EvaluationConfig",
    "ExperimentConfig",
    "FamilyConfig",
    "RayConfig",
    "SplitConfig",
    "StrategyChoice",
    "TrainingConfig",
]

# Scalar metrics the evaluation knows how to compute (per task x split x model).
METRICS = ("harrell_c", "uno_c", "td_auc", "ibs", "calibration")
# Metrics compared against the reference (paired differences and tests).
COMPARED_METRICS = ("harrell_c", "uno_c", "td_auc", "ibs")
EXECUTORS = ("local", "ray")


class ConfigError(ValueError):
    """A config problem, as one line naming the key (and a did-you-mean suggestion)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _label(value: str | None, what: str) -> str | None:
    return None if value is None else check_name(value, what)


class DataConfig(_Strict):
    """Input files. Relative paths resolve against the config file's folder."""

    cohort: Path
    ct_index: Path | None = None
    ct_root: Path | None = None  # folder the CT index paths are relative to (default: its folder)
    meds_root: Path | None = None
    # strftime pattern of a CSV cohort's prediction_time, e.g. "%d/%m/%Y" (default: ISO 8601 only)
    date_format: str | None = None


class SplitConfig(_Strict):
    """Per-subject splits.

    External sites form `external_test`; the rest is split by fractions, or, with `column`, taken
    from that cohort column (a predefined split such as INSPECT's `inspect_split`: values train /
    validation / internal_test, one per subject; subjects of `external_sites` still form
    external_test).
    """

    external_sites: list[str] = Field(default_factory=list)
    column: str | None = None
    val_frac: float = Field(default=0.15, gt=0.0, lt=1.0)
    test_frac: float = Field(default=0.15, gt=0.0, lt=1.0)
    seed: int = 0
    stratify: Literal["event"] | None = "event"

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.val_frac + self.test_frac >= 1.0:
            raise ValueError(
                f"val_frac + test_frac = {self.val_frac + self.test_frac:g} leaves no training data"
            )
        return self


class EncoderChoice(_Strict):
    """One encoder of one modality: a registered name, an optional label and its parameters."""

    name: str
    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:

        all_registries()
        return look_up_option(v, ENCODERS.list(), kind="encoder")

    @field_validator("label")
    @classmethod
    def _lab(cls, v: str | None) -> str | None:
        return _label(v, "encoder label")

    @model_validator(mode="after")
    def _hu_calibration(self) -> EncoderChoice:
        # a CT encoder's `params.preprocessing.hu_calibration` (none | landmarks) is checked when
        # the config is read, not after the cohort is prepared
        prep = self.params.get("preprocessing")
        if isinstance(prep, dict) and "hu_calibration" in prep:
            look_up_option(
                str(prep["hu_calibration"]), HU_CALIBRATIONS, kind="preprocessing.hu_calibration"
            )
        return self

    @property
    def key(self) -> str:
        return self.label or self.name


class EncodersConfig(_Strict):
    """The YAML `encoders:` section: the CT and EHR encoders to run, each label used once."""

    ct: list[EncoderChoice] = Field(default_factory=list)
    ehr: list[EncoderChoice] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> EncodersConfig:
        for modality in MODALITIES:
            keys = [e.key for e in getattr(self, modality)]
            dup = {k for k in keys if keys.count(k) > 1}
            if dup:
                raise ValueError(
                    f"encoders.{modality}: label {sorted(dup)[0]!r} used twice; give each a label"
                )
        return self


class TrainingConfig(TrainingOptions):
    """The YAML `training:` section.

    `survfuse.training.TrainingOptions` (one set of fields, defaults and checks, shared with the
    estimator) plus the survival head's parameters.
    """

    head_params: dict[str, Any] = Field(default_factory=dict)

    def options(self) -> TrainingOptions:
        """Return the training options alone (what `FusionSurvivalModel.from_options` takes)."""
        return TrainingOptions(**self.model_dump(exclude={"head_params"}))


class StrategyChoice(_Strict):
    """A fusion strategy: registered name, label, its parameters and training overrides.

    `modality` restricts a strategy to one modality (the unimodal baselines); it is passed to
    the strategy as `strategy_params["modality"]`.
    """

    name: str
    label: str | None = None
    modality: Modality | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:

        all_registries()
        return look_up_option(v, FUSIONS.list(), kind="fusion strategy")

    @field_validator("label")
    @classmethod
    def _lab(cls, v: str | None) -> str | None:
        return _label(v, "strategy label")

    @field_validator("training")
    @classmethod
    def _overrides(cls, v: dict[str, Any]) -> dict[str, Any]:
        fields = list(TrainingConfig.model_fields)
        for key in v:
            if key not in fields:
                raise ValueError(f"unknown training key {key!r}{suggest(key, fields)}")
        return v

    @model_validator(mode="after")
    def _unimodal(self) -> StrategyChoice:
        if self.name == "unimodal" and self.modality is None:
            raise ValueError("strategy 'unimodal' needs `modality: ct` or `modality: ehr`")

        check_params(
            self.params,
            FUSIONS.get(self.name),
            kind=f"{self.name} strategy parameter",
            extra=STRATEGY_OPTIONS,
        )
        return self

    @property
    def key(self) -> str:
        if self.label:
            return self.label
        return f"{self.name}_{self.modality}" if self.modality else self.name

    @property
    def modalities(self) -> tuple[str, ...]:
        return (self.modality,) if self.modality else MODALITIES

    def resolved_params(self) -> dict[str, Any]:
        params = dict(self.params)
        if self.modality is not None:
            params["modality"] = self.modality
        return params


TestSplit = Literal["internal_test", "external_test"]
_TEST_SPLITS: tuple[TestSplit, ...] = ("internal_test", "external_test")


class FamilyConfig(_Strict):
    """The pre-specified comparison family Holm adjusts together, study-wide.

    These metrics of the compared models (`fused`: two-modality models; `all`: every non-reference
    model) against the reference on these test splits. Validation is never in it (the reference is
    chosen there).
    """

    metrics: list[str] = Field(default_factory=lambda: ["harrell_c"])
    splits: list[TestSplit] = Field(default_factory=lambda: list(_TEST_SPLITS))
    models: Literal["fused", "all"] = "fused"

    @field_validator("metrics")
    @classmethod
    def _compared(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("family.metrics must name at least one compared metric")
        return [look_up_option(m, COMPARED_METRICS, kind="compared metric") for m in v]


class EvaluationConfig(_Strict):
    """What is scored on validation, internal and external test, and how the CIs are made."""

    metrics: list[str] = Field(default_factory=lambda: list(METRICS))
    horizons: list[float] = Field(default_factory=lambda: [365.0])
    calibration_horizon: float | None = None  # default: the first horizon
    calibration_bins: int = Field(default=10, ge=2)
    ibs_points: int = Field(
        default=10, ge=2
    )  # IBS integrates over this many times up to the last horizon
    bootstrap: int = Field(default=1000, ge=0)
    alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    reference: str = "best_unimodal"  # or a strategy label
    selection_split: Literal["validation"] = "validation"
    seed: int = 0
    family: FamilyConfig = Field(default_factory=lambda: FamilyConfig())

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        out = [look_up_option(m, METRICS, kind="metric") for m in v]
        if "harrell_c" not in out:
            out.insert(0, "harrell_c")  # the reference model is chosen on Harrell's C
        return out

    @field_validator("horizons")
    @classmethod
    def _horizons(cls, v: list[float]) -> list[float]:
        if not v or any(h <= 0 for h in v):
            raise ValueError("horizons must be a non-empty list of positive days")
        return sorted(set(float(h) for h in v))

    @property
    def cal_horizon(self) -> float:
        return float(self.calibration_horizon or self.horizons[0])

    def survival_times(self) -> list[float]:
        """Return the times at which every cell stores survival: horizons, IBS grid, calibration."""
        last = max(self.horizons)
        grid = [last * (i + 1) / self.ibs_points for i in range(self.ibs_points)]
        return sorted(set([*self.horizons, *(round(t, 6) for t in grid), self.cal_horizon]))


class RayResources(_Strict):
    """Ray resources of the cells of one strategy (None: the `ray` section's value)."""

    num_cpus: float | None = Field(default=None, gt=0.0)
    num_gpus: float | None = Field(default=None, ge=0.0)


class RayConfig(_Strict):
    """Options of the Ray executor (the local executor ignores them); see docs/ray.md.

    Each cell is a Ray task requesting `num_cpus` / `num_gpus` (overridden per strategy label
    in `strategies`); a cell whose worker dies is re-run up to `max_retries` times, then recorded
    as failed. Encoders of `encode_modalities` run in `encode_actors` Ray Data actors, each
    requesting `encode_num_cpus` / `encode_num_gpus`. Bootstrap resamples are scored in Ray
    tasks of at least `bootstrap_block` resamples (only as many as keep the cluster busy).
    """

    num_cpus: float | None = Field(default=None, gt=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    strategies: dict[str, RayResources] = Field(default_factory=dict)
    max_retries: int = Field(default=2, ge=0)
    encode_modalities: tuple[Modality, ...] = ("ct",)
    encode_actors: int = Field(default=2, ge=1)
    encode_num_cpus: float = Field(default=1.0, gt=0.0)
    encode_num_gpus: float = Field(default=0.0, ge=0.0)
    bootstrap_block: int = Field(default=256, ge=1)

    def resources(self, strategy: str, threads: int) -> dict[str, float]:
        """`num_cpus` / `num_gpus` of a cell of `strategy` training with `threads` threads."""
        own = self.strategies.get(strategy) or RayResources()
        cpus = own.num_cpus if own.num_cpus is not None else self.num_cpus
        gpus = own.num_gpus if own.num_gpus is not None else self.num_gpus
        # Why training.threads by default: a cell runs that many torch threads, so that is
        # what it occupies; asking for less oversubscribes the node.
        return {"num_cpus": float(cpus if cpus is not None else threads), "num_gpus": float(gpus)}


class ExperimentConfig(_Strict):
    """A whole study; see the module docstring for the YAML layout."""

    name: str = "experiment"
    data: DataConfig
    tasks: list[str] = Field(default_factory=lambda: ["default"])
    splits: SplitConfig = Field(default_factory=lambda: SplitConfig())
    encoders: EncodersConfig
    strategies: list[StrategyChoice]
    heads: list[str] = Field(default_factory=lambda: ["cox"])
    training: TrainingConfig = Field(default_factory=lambda: TrainingConfig())
    seeds: list[int] = Field(default_factory=lambda: [0])
    evaluation: EvaluationConfig = Field(default_factory=lambda: EvaluationConfig())
    # Per-site harmonisation of encoder outputs (survfuse.features_harmonise); it reads every
    # site's unlabelled features, the external sites' too (transductive when not "none").
    harmonise: HarmoniseConfig = Field(default_factory=lambda: HarmoniseConfig())
    executor: str = "local"
    workers: int = Field(default=1, ge=1)  # local executor: cells trained in parallel processes
    # FeatureStore folder; default RUN_DIR/features/store. Share one between runs (or configs)
    # so each encoder encodes a cohort once. Relative paths resolve against the config's folder.
    feature_store: Path | None = None
    ray_address: str | None = None
    ray: RayConfig = Field(default_factory=lambda: RayConfig())

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: list[str]) -> list[str]:

        all_registries()
        if not v:
            raise ValueError("heads must name at least one head")
        return [look_up_option(h, HEADS.list(), kind="head") for h in v]

    @field_validator("executor")
    @classmethod
    def _executor(cls, v: str) -> str:
        return look_up_option(v, EXECUTORS, kind="executor")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError("seeds must be a non-empty list of distinct integers")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("tasks must be a non-empty list of distinct task names")
        return [check_name(t, "task name") for t in v]  # a task names cell folders

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "name")  # the default run folder is runs/<name>

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if not self.strategies:
            raise ValueError("strategies: list at least one strategy")
        keys = [s.key for s in self.strategies]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise ValueError(f"strategies: label {sorted(dup)[0]!r} used twice; add `label:`")
        for s in self.strategies:
            for m in s.modalities:
                if not getattr(self.encoders, m):
                    raise ValueError(
                        f"strategy {s.key!r} uses the {m} modality but encoders.{m} is empty"
                    )
            try:
                TrainingConfig.model_validate({**self.training.model_dump(), **s.training})
            except ValidationError as exc:
                err = exc.errors()[0]
                raise ValueError(
                    f"strategy {s.key!r}: training.{err['loc'][0]}: {err['msg']}"
                ) from None
        for key in self.ray.strategies:
            look_up_option(key, keys, kind="strategy label in ray.strategies")
        if self.encoders.ct and self.data.ct_index is None:
            raise ValueError("data.ct_index is required when encoders.ct is not empty")
        if self.encoders.ehr and self.data.meds_root is None:
            raise ValueError("data.meds_root is required when encoders.ehr is not empty")
        ref = self.evaluation.reference
        if ref != "best_unimodal":
            look_up_option(ref, ["best_unimodal", *keys], kind="evaluation.reference")
        elif not any(s.modality for s in self.strategies):
            raise ValueError(
                "evaluation.reference is 'best_unimodal' but no strategy has `modality:`"
            )
        return self

    def training_for(self, strategy: StrategyChoice) -> TrainingConfig:
        return TrainingConfig.model_validate({**self.training.model_dump(), **strategy.training})

    def strategy(self, key: str) -> StrategyChoice:
        keys = [s.key for s in self.strategies]
        return self.strategies[keys.index(look_up_option(key, keys, kind="strategy"))]

    def encoder(self, modality: str, key: str) -> EncoderChoice:
        choices: list[EncoderChoice] = getattr(self.encoders, modality)
        keys = [c.key for c in choices]
        return choices[keys.index(look_up_option(key, keys, kind=f"{modality} encoder"))]

    def dump(self) -> str:
        """Return the resolved config as YAML (absolute paths, defaults filled in)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

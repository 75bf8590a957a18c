"""`run_demo`: simulate the default cohort and run `examples/demo.yaml` on it.

The simulated data go to `OUT/data` (reused when already there), the run to `OUT/run`; the
report is written by the caller (`survfuse demo` calls `survfuse.report.html.build_report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import survfuse
from survfuse.experiment.config import ConfigError, ExperimentConfig
from survfuse.experiment.config_load import load_config
from survfuse.experiment.runner import run_experiment
from survfuse.simulate import simulate

__all__ = ["default_demo_config", "demo_config", "run_demo"]


def default_demo_config() -> Path:
    """Return the shipped `examples/demo.yaml` (the repository's, for an editable install)."""
    candidates = [
        Path(survfuse.__file__).resolve().parents[2] / "examples" / "demo.yaml",
        Path.cwd() / "examples" / "demo.yaml",
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(
        "examples/demo.yaml not found next to the package or in the current folder; "
        "pass --config PATH"
    )


def demo_config(data_dir: Path, config: Path | None = None) -> ExperimentConfig:
    """Return the demo config with its data paths pointed at a simulated dataset folder."""
    overrides = {
        "data": {
            "cohort": str(data_dir / "cohort.parquet"),
            "ct_index": str(data_dir / "ct_index.parquet"),
            "meds_root": str(data_dir / "meds"),
        }
    }
    return load_config(config or default_demo_config(), overrides=overrides)


def run_demo(
    out: str | Path,
    *,
    n: int = 3000,
    seed: int = 0,
    config: Path | None = None,
    progress: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """Simulate (unless already done) and run the demo study.

    Returns {"run": RunResult, "data": Path}.
    """
    out = Path(out).resolve()
    data_dir = out / "data"
    if not (data_dir / "dataset.json").exists() or not (data_dir / "cohort.parquet").exists():
        if console is not None:
            console.print(
                f"[bold]simulating[/bold] {n} patients (sites A, B; external C) -> {data_dir}"
            )
        simulate(
            data_dir, n=n, sites=("A", "B", "C"), external=("C",), seed=seed, progress=progress
        )
    cfg = demo_config(data_dir, config)
    result = run_experiment(cfg, out / "run", progress=progress, console=console)
    return {"run": result, "data": data_dir}

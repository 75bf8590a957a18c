"""The `survfuse` command line. Sits on top of the library; the library never imports it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer

from survfuse import __version__
from survfuse.cli_help import (
    CleanHelpCommand,
    CleanHelpGroup,
    CTFeatures,
    Executor,
    RecalibrationMethod,
)

app = typer.Typer(
    name="survfuse",
    help="Multimodal CT + EHR time-to-event prediction: simulate, encode, fuse, evaluate, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=CleanHelpGroup,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"survfuse {__version__}")
        raise typer.Exit()


_STATE = {"debug": False}
#: Exit status when a run finished but some cells failed (0: all done; 2: bad input).
EXIT_FAILED_CELLS = 3


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show the full traceback of an error instead of one line."
    ),
) -> None:
    """survfuse: fusion of CT and EHR representations for survival prediction."""
    _STATE["debug"] = debug


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a bad environment, not a bug in survfuse: shown as one line.

    ValueError covers config, cohort, MEDS, path-name and data-quality errors (all subclass it);
    OSError covers missing files, permissions, a full disk and `--out` being a file.
    """
    import polars.exceptions
    import yaml
    from safetensors import SafetensorError

    from survfuse.data.imaging import CTLoadError
    from survfuse.experiment.lock import RunLockedError

    return (
        ValueError,
        OSError,
        RunLockedError,
        CTLoadError,
        SafetensorError,
        yaml.YAMLError,
        polars.exceptions.PolarsError,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError) and not isinstance(exc, ValueError):
        text = f"{type(exc).__name__}: {text}"
    return text


F = TypeVar("F", bound=Callable[..., Any])


def _errors(fn: F) -> F:
    """Exit 2 with an `error: ...` line on expected errors (`--debug` re-raises); bugs propagate."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except _expected_errors() as exc:
            if _STATE["debug"]:
                raise
            text = _describe(exc)
            if type(exc) in (ValueError, TypeError):  # not one of our named errors: may be a bug
                text += " (rerun with --debug for the traceback)"
            _fail(text)

    return wrapper  # type: ignore[return-value]


@app.command("info", cls=CleanHelpCommand)
@_errors
def info() -> None:
    """Print the registered encoders, fusion strategies and heads, one line each."""
    from survfuse.registry import all_registries

    for kind, registry in all_registries().items():
        typer.echo(f"{kind}:")
        width = max((len(n) for n in registry.list()), default=0)
        for name in registry.list():
            line = f"  {name:<{width}}  {registry.describe(name)}".rstrip()
            typer.echo(line if len(line) <= 100 else line[:99] + "…")


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error and exit with status `code` (2: bad input), without a traceback."""
    text = " ".join(str(message).split())
    if len(text) > 1000:  # one line a terminal can show; --debug has the rest
        text = text[:997] + "..."
    typer.echo(f"error: {text}", err=True)
    raise typer.Exit(code=code)


def _exit_if_failed(failed: list[Any], run_dir: Path, allow_failed: bool) -> None:
    """Exit 3 naming the failed cells (a script must see that a run is incomplete)."""
    if not failed or allow_failed:
        return
    ids = sorted(r.cell_id for r in failed)
    shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    _fail(
        f"{len(ids)} cell(s) failed: {shown} (reasons in {Path(run_dir) / 'cells'}/<cell>/"
        "status.json; rerun to retry them, or pass --allow-failed to exit 0)",
        code=EXIT_FAILED_CELLS,
    )


def _print_summary(run_dir: Path) -> None:
    import polars as pl

    from survfuse.report.terminal import summary_lines

    metrics = pl.read_parquet(Path(run_dir) / "metrics.parquet")
    typer.echo("\n".join(summary_lines(metrics)))


@app.command("simulate", cls=CleanHelpCommand)
@_errors
def simulate_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to write the dataset to."),
    n: int = typer.Option(3000, "--n", help="Number of patients."),
    sites: str = typer.Option("A,B,C", "--sites", help="Comma-separated site names."),
    external: str = typer.Option("C", "--external", help="Comma-separated external sites."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same arguments = same files)."),
    imbalance: float = typer.Option(0.5, "--imbalance", help="Image share of the signal, 0..1."),
    interaction: float = typer.Option(0.3, "--interaction", help="Image x EHR coefficient."),
    site_shift: float = typer.Option(1.0, "--site-shift", help="Between-site differences."),
    censoring: float = typer.Option(0.6, "--censoring", help="Target censored fraction."),
    shape: str = typer.Option("64,64,40", "--shape", help="CT volume shape X,Y,Z."),
    workers: int = typer.Option(None, "--workers", help="Rendering processes (default: 2)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
) -> None:
    """Write a simulated multi-site CT + EHR cohort (NIfTI + MEDS + cohort + oracle)."""
    from survfuse.simulate import simulate

    def names(text: str) -> tuple[str, ...]:
        return tuple(s.strip() for s in text.split(",") if s.strip())

    try:
        dims = [int(v) for v in shape.split(",")]
    except ValueError:
        _fail(f"simulate: --shape needs integers X,Y,Z, got {shape!r}")
    path = simulate(
        out, n=n, sites=names(sites), external=names(external), seed=seed,
        imbalance=imbalance, interaction=interaction, site_shift=site_shift,
        censoring=censoring, shape=dims, progress=progress, workers=workers,
    )  # fmt: skip
    typer.echo(f"wrote {path}")


@app.command("run", cls=CleanHelpCommand)
@_errors
def run(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Experiment config (YAML)."),
    out: Path = typer.Option(None, "--out", help="Run folder (default: runs/<config name>)."),
    executor: Executor | None = typer.Option(
        None, "--executor", help="Where cells run (default: the config's executor, else local)."
    ),
    ray_address: str = typer.Option(
        None, "--ray-address", help="Ray cluster (implies --executor ray; default: the config's)."
    ),
    workers: int = typer.Option(
        None,
        "--workers",
        help="Local executor: parallel cell processes (default: the config's workers, else 1).",
    ),
    report: bool = typer.Option(True, "--report/--no-report", help="Write the report too."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    allow_failed: bool = typer.Option(
        False, "--allow-failed", help="Exit 0 even when some cells failed (default: exit 3)."
    ),
) -> None:
    """Run (or resume) an experiment grid: encode, train every cell, evaluate.

    Exit status 0: every cell finished; 3: some failed (named on stderr); 2: bad input, run in use.
    """
    from rich.console import Console

    from survfuse.experiment.config_load import load_config
    from survfuse.experiment.runner import run_experiment

    overrides: dict[str, object] = {}
    if ray_address and executor not in (None, "ray"):
        _fail(f"--ray-address {ray_address} needs --executor ray (got --executor {executor})")
    if ray_address:
        executor = "ray"  # an address only means something to the Ray executor
    if executor:
        overrides["executor"] = executor
    if ray_address:
        overrides["ray_address"] = ray_address
    if workers:
        overrides["workers"] = workers
    cfg = load_config(config, overrides=overrides)
    run_dir = out or Path("runs") / cfg.name
    console = Console(stderr=True)
    result = run_experiment(cfg, run_dir, progress=progress, console=console)
    if report:
        from survfuse.report.html import build_report

        html_path, _ = build_report(run_dir)
        typer.echo(f"report: {html_path}")
    _print_summary(run_dir)
    typer.echo(f"run folder: {Path(run_dir).resolve()} ({len(result.failed)} failed cells)")
    _exit_if_failed(result.failed, Path(run_dir), allow_failed)


@app.command("report", cls=CleanHelpCommand)
@_errors
def report_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A run folder."),
) -> None:
    """Write report.html and summary.md for a finished run."""
    from survfuse.experiment.imbalance_eval import ensure_imbalance
    from survfuse.report.html import build_report

    ensure_imbalance(run_dir)  # a run from an older survfuse may lack the analysis
    html_path, md_path = build_report(run_dir)
    typer.echo(f"report: {html_path}\nsummary: {md_path}")


@app.command("predict", cls=CleanHelpCommand)
@_errors
def predict(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A finished run folder."),
    cell: str = typer.Option(..., "--cell", help="Cell id (a folder under RUN_DIR/cells)."),
    cohort: Path = typer.Option(
        ..., "--cohort", help="New cohort (parquet or CSV): subject_id, prediction_time."
    ),
    ct_index: Path = typer.Option(
        None, "--ct-index", help="CT index of the new patients (default: the run's CT index)."
    ),
    meds_root: Path = typer.Option(
        None, "--meds-root", help="MEDS root of the new patients (default: the run's MEDS root)."
    ),
    date_format: str = typer.Option(
        None,
        "--date-format",
        help="strftime format of a CSV cohort's prediction_time, e.g. %d/%m/%Y "
        "(default: ISO 8601 only).",
    ),
    out: Path = typer.Option(
        None,
        "--out",
        help="Output parquet (default: RUN_DIR/predictions/<cell>__<cohort>.parquet).",
    ),
) -> None:
    """Risks and survival curves for new patients with a trained cell's encoders and model.

    Output columns: subject_id, prediction_time; risk (the model's risk score, higher = worse;
    NaN for a patient with no data in any modality the model uses); surv_<t>, the predicted
    probability of no event by day t, at the run's survival times (NaN likewise); has_ct /
    has_ehr, whether the patient has a CT study at or before prediction_time / EHR events up
    to it (one column per modality the model uses). Patients without data are named on stderr.
    """
    from survfuse.experiment.predict import missing_data_warning, predict_cohort

    df, path = predict_cohort(
        run_dir, cell, cohort, ct_index=ct_index, meds_root=meds_root, out=out,
        date_format=date_format,
    )  # fmt: skip
    warning = missing_data_warning(df)
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"{df.height} predictions -> {path}")


@app.command("recalibrate", cls=CleanHelpCommand)
@_errors
def recalibrate(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A finished run folder."),
    cohort: Path = typer.Option(
        ...,
        "--cohort",
        help="Labelled sample of the new site (parquet or CSV): subject_id, prediction_time and "
        "each task's outcome columns.",
    ),
    out: Path = typer.Option(
        None, "--out", help="Output folder (default: RUN_DIR/recalibrated/<cohort name>)."
    ),
    method: RecalibrationMethod = typer.Option(
        "baseline", "--method", help="Refit the baseline hazard only, or the slope too."
    ),
) -> None:
    """Recalibrate every finished cell on a new site's labelled sample (run metrics untouched)."""
    from survfuse.experiment.recalibrate import recalibrate_run

    folder = recalibrate_run(run_dir, cohort, out, method=method)
    typer.echo(f"recalibrated: {folder}")


@app.command("demo", cls=CleanHelpCommand)
@_errors
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Output folder."),
    n: int = typer.Option(3000, "--n", help="Simulated patients."),
    seed: int = typer.Option(0, "--seed", help="Simulation seed."),
    config: Path = typer.Option(None, "--config", help="Config (default: examples/demo.yaml)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    allow_failed: bool = typer.Option(
        False, "--allow-failed", help="Exit 0 even when some cells failed (default: exit 3)."
    ),
) -> None:
    """Simulate 3,000 patients (sites A, B; external C), run examples/demo.yaml, write the report."""
    from rich.console import Console

    from survfuse.experiment.demo import run_demo
    from survfuse.report.html import build_report

    res = run_demo(
        out, n=n, seed=seed, config=config, progress=progress, console=Console(stderr=True)
    )
    report, summary = build_report(res["run"].run_dir)
    _print_summary(res["run"].run_dir)
    typer.echo(f"report: {report}\nsummary: {summary}")
    _exit_if_failed(res["run"].failed, res["run"].run_dir, allow_failed)


def _csv(text: str | None, cast: Callable[[str], Any] = str) -> list[Any] | None:
    """Comma-separated option values (None when the option was not given)."""
    return None if not text else [cast(v.strip()) for v in text.split(",") if v.strip()]


@app.command("sweep-imbalance", cls=CleanHelpCommand)
@_errors
def sweep_imbalance(
    out: Path = typer.Option(..., "--out", help="Output folder (rerun to resume)."),
    imbalance: str = typer.Option("0,0.25,0.5,0.75,1", "--imbalance", help="Image shares w."),
    site_shift: str = typer.Option("1", "--site-shift", help="Site shifts (comma-separated)."),
    seeds: int = typer.Option(1, "--seeds", help="Training seeds per cell."),
    n: int = typer.Option(1500, "--n", help="Simulated patients per setting."),
    sim_seed: int = typer.Option(0, "--sim-seed", help="First simulation seed."),
    replicates: int = typer.Option(
        1, "--replicates", help="Independent simulated cohorts per setting (gains pooled)."
    ),
    shape: str = typer.Option("32,32,20", "--shape", help="CT volume shape X,Y,Z."),
    config: Path = typer.Option(None, "--config", help="Base config (default: demo.yaml)."),
    strategies: str = typer.Option(
        None, "--strategies", help="Strategy keys to keep, comma-separated (default: all)."
    ),
    ehr_encoders: str = typer.Option(
        None, "--ehr-encoders", help="EHR encoder keys to keep, comma-separated (default: all)."
    ),
    tasks: str = typer.Option(
        None, "--tasks", help="Tasks to keep, comma-separated (default: all)."
    ),
    bootstrap: int = typer.Option(200, "--bootstrap", help="Bootstrap resamples."),
    max_epochs: int = typer.Option(
        None, "--max-epochs", help="Training epochs (default: the config's)."
    ),
    rebalance: bool = typer.Option(False, "--rebalance", help="Add OGM-GE variants."),
    ct_features: CTFeatures = typer.Option(
        "cells",
        "--ct-features",
        help="CT representation: cells = radiomics of the volume and of a 2x2x2 grid of cells; "
        "config = the config's CT encoders.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Gain of each fusion strategy over the best unimodal baseline against the imbalance."""
    from rich.console import Console

    from survfuse.experiment.sweep import run_sweep
    from survfuse.report.sweep import write_sweep_report

    dims = _csv(shape, int) or []
    if len(dims) != 3:
        raise ValueError(f"--shape needs three sizes X,Y,Z, got {shape!r}")
    res = run_sweep(
        out,
        imbalance=_csv(imbalance, float) or [],
        site_shift=_csv(site_shift, float) or [],
        seeds=seeds,
        n=n,
        sim_seed=sim_seed,
        replicates=replicates,
        shape=(dims[0], dims[1], dims[2]),
        config=config,
        strategies=_csv(strategies),
        ehr_encoders=_csv(ehr_encoders),
        tasks=_csv(tasks),
        bootstrap=bootstrap,
        max_epochs=max_epochs,
        rebalance=rebalance,
        ct_features=ct_features,
        progress=progress,
        console=Console(stderr=True),
    )
    figures, summary = write_sweep_report(res)
    typer.echo(summary.read_text())
    typer.echo(f"table: {res.out / 'sweep.csv'}\nfigure: {', '.join(map(str, figures))}")


convert_app = typer.Typer(
    help="Convert a real cohort's release into survfuse's inputs (cohort, CT index, flat MEDS).",
    no_args_is_help=True,
    cls=CleanHelpGroup,
)
app.add_typer(convert_app, name="convert")


@convert_app.command("inspect", cls=CleanHelpCommand)
@_errors
def convert_inspect_cmd(
    cohort: Path = typer.Option(
        ..., "--cohort", help="Master CSV, or the folder with study_mapping_*, labels_*, splits_*."
    ),
    meds: Path = typer.Option(..., "--meds", help="MEDS root (nested MEDS 0.1 / 0.2, or flat)."),
    out: Path = typer.Option(..., "--out", help="Output folder (replaces only a conversion)."),
    ct_root: Path = typer.Option(
        None, "--ct-root", help="Folder with CTPA/<image_id> (default: none, no CT index)."
    ),
    site: str = typer.Option("inspect", "--site", help="Site name of every row."),
    death_code: list[str] = typer.Option(
        None,
        "--death-code",
        help="MEDS death code, repeatable; a trailing / matches a prefix "
        "(default: MEDS_DEATH, SNOMED/419620001, Condition Type/OMOP4822053).",
    ),
    time_format: str = typer.Option(
        None, "--time-format", help="strftime format of the CT times (default: ISO 8601 only)."
    ),
    time_fallback: str = typer.Option(
        None,
        "--time-fallback",
        help="Column used when the CT time is empty, e.g. note_DATETIME (default: none).",
    ),
    id_column: str = typer.Option(
        None, "--id-column", help="Person id column (default: detected from the header)."
    ),
    time_column: str = typer.Option(
        None, "--time-column", help="CT time column (default: detected from the header)."
    ),
) -> None:
    """Convert an INSPECT release: cohort.parquet, ct_index.parquet, meds/, conversion report."""
    from survfuse.convert import DEFAULT_DEATH_CODES, convert_inspect

    res = convert_inspect(
        cohort, meds, out, ct_root=ct_root, site=site,
        death_codes=tuple(death_code) if death_code else DEFAULT_DEATH_CODES,
        time_format=time_format, time_fallback=time_fallback,
        id_column=id_column, time_column=time_column,
    )  # fmt: skip
    o, oc = res.counts["output"], res.counts["outcomes"]
    ct = "" if o["ct_index_rows"] is None else f", {o['ct_index_rows']:,} CT studies"
    typer.echo(
        f"cohort: {o['cohort_rows']:,} rows, {o['cohort_subjects']:,} subjects "
        f"({oc['rows_event']:,} deaths){ct}; MEDS: {o['meds_rows']:,} rows; "
        f"label mismatches: {o['label_mismatch_rows']:,}"
    )
    typer.echo(f"wrote {res.out}\nreport: {res.report}")


def main() -> None:
    """Run the `survfuse` command."""
    app()


if __name__ == "__main__":
    main()

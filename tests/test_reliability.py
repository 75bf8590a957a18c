"""Reliability of `survfuse run` and friends with bad inputs and faults.

Each test is one way a new user's run went wrong before: a name that wrote outside the run
folder, two runs in one folder, failed cells with exit 0, tracebacks for bad data, data problems
that passed silently, temp debris and raw HTML in summary.md.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from survfuse.cli import app
from survfuse.experiment.lock import LOCK_NAME, RunLock, RunLockedError
from survfuse.experiment.rundir import RunDir
from survfuse.paths import UnsafePathError, check_name, inside

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"


def _config(data: Path, folder: Path, **changes: object) -> Path:
    """A two-cell study (CT-only and EHR-only, 2 epochs, 5 resamples) on a simulated folder."""
    raw = yaml.safe_load(TINY.read_text())
    raw["data"] = {
        "cohort": str(data / "cohort.parquet"),
        "ct_index": str(data / "ct_index.parquet"),
        "meds_root": str(data / "meds"),
    }
    raw["strategies"] = [
        {"name": "unimodal", "modality": "ct"},
        {"name": "unimodal", "modality": "ehr"},
    ]
    raw["training"].update(max_epochs=2, patience=2)
    raw["evaluation"].update(bootstrap=5, metrics=["harrell_c", "calibration"])
    raw.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _invoke(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def _one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err[-2000:]
    assert lines and lines[-1].startswith("error: "), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1
    for needle in needles:
        assert needle in lines[-1], lines[-1]


@pytest.fixture()
def data_copy(sim_small: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the small simulated cohort."""
    return Path(shutil.copytree(sim_small, tmp_path / "data"))


# --------------------------------------------------------------------------- names and paths
def test_names_that_become_paths_are_checked() -> None:
    assert check_name("pe_mortality", "task name") == "pe_mortality"
    for bad in ("../../escaped_task", "a/b", ".hidden", "", "x y", "/etc"):
        with pytest.raises(UnsafePathError, match="task name"):
            check_name(bad, "task name")
    with pytest.raises(UnsafePathError, match="outside"):
        inside("/tmp/run", "../elsewhere", "cell folder")
    with pytest.raises(UnsafePathError):
        RunDir("/tmp/run").cell("pe.late.ct.none.cox.s0/../../../x")
    assert RunDir("/tmp/run").cell("pe.late.none.ehr.cox.s0").name == "pe.late.none.ehr.cox.s0"


def test_task_name_cannot_write_outside_the_run_folder(data_copy: Path, tmp_path: Path) -> None:
    task = "../../escaped_task"
    cohort = pl.read_parquet(data_copy / "cohort.parquet")
    cohort.with_columns(
        pl.col("pe_mortality_time").alias(f"{task}_time"),
        pl.col("pe_mortality_event").alias(f"{task}_event"),
    ).write_parquet(data_copy / "cohort.parquet")
    out = tmp_path / "a" / "b" / "run"
    sentinel = tmp_path / "a" / "escaped_task"  # where the cells would have gone
    (sentinel / "keep").mkdir(parents=True)
    cfg = _config(data_copy, tmp_path / "cfg", tasks=[task])
    code, _, err = _invoke("run", str(cfg), "--out", str(out), "--no-progress")
    _one_line_error(code, err, "tasks", "escaped_task", "letters, digits")
    assert (sentinel / "keep").is_dir() and not out.exists()


def test_config_name_cannot_escape_runs(data_copy: Path, tmp_path: Path) -> None:
    cfg = _config(data_copy, tmp_path / "cfg", name="../../outside")
    code, _, err = _invoke("run", str(cfg), "--no-progress")
    _one_line_error(code, err, "name", "outside")


# --------------------------------------------------------------------------- the run lock
def test_a_held_run_folder_is_refused_with_the_owner_pid(data_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _config(data_copy, tmp_path / "cfg")
    with RunLock(out):
        code, _, err = _invoke("run", str(cfg), "--out", str(out), "--no-progress")
    _one_line_error(code, err, "in use by PID", str(os.getpid()))
    assert not (out / "cells").exists()  # nothing of the held run was touched


def test_lock_of_a_killed_process_is_stale_and_taken_over(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from survfuse.experiment.lock import RunLock\n"
        f"RunLock({str(tmp_path)!r}).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"in use by PID {proc.pid}"):
            RunLock(tmp_path).acquire()
        os.kill(proc.pid, signal.SIGKILL)  # a crash: no cleanup runs
        proc.wait(10)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid
        with RunLock(tmp_path) as lock:
            assert lock.stale is not None and lock.stale["pid"] == proc.pid
            with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
                RunLock(tmp_path).acquire()
        assert (tmp_path / LOCK_NAME).read_text() == ""  # released cleanly: nothing stale
        with RunLock(tmp_path) as again:
            assert again.stale is None
    finally:
        proc.kill()
        proc.wait(10)


# --------------------------------------------------------------------------- a full bad-data run
def _write_volume(path: Path, arr: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(arr.astype(np.float32), np.diag([1.5, 1.5, 2.5, 1.0])), str(path))


@pytest.fixture(scope="module")
def bad_run(sim_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A run over data with every silent problem: a missing, a truncated and a non-CT file, a
    single-slice volume, a volume with a NaN voxel, a subject without EHR, and a site name with
    HTML in it. One CT-only
    cell fails on purpose (exit 3), then the rerun with --allow-failed finishes the grid."""
    tmp = tmp_path_factory.mktemp("bad")
    data = Path(shutil.copytree(sim_small, tmp / "data"))
    # the index study of each subject (the one a prediction uses; priors and follow-ups exist)
    index = pl.read_parquet(data / "ct_index.parquet").filter(
        pl.col("path").str.ends_with("_index.nii.gz")
    )
    paths = {int(s): data / p for s, p in zip(index["subject_id"], index["path"], strict=True)}
    sids = sorted(paths)
    missing, truncated, not_ct, one_slice, no_ehr, nan_ct = sids[:6]
    paths[missing].unlink()
    blob = paths[truncated].read_bytes()
    paths[truncated].write_bytes(blob[: len(blob) // 3])
    rng = np.random.default_rng(0)
    _write_volume(paths[not_ct], rng.uniform(100, 900, (32, 32, 20)))  # MR-like, no air
    _write_volume(paths[one_slice], rng.normal(0, 400, (64, 64, 1)))
    vol = np.asarray(nib.load(str(paths[nan_ct])).dataobj, dtype=np.float32)
    vol[3, 4, 5] = np.nan
    _write_volume(paths[nan_ct], vol)
    for shard in (data / "meds" / "data").glob("*.parquet"):
        pl.read_parquet(shard).filter(pl.col("subject_id") != no_ehr).write_parquet(shard)
    cohort = pl.read_parquet(data / "cohort.parquet")
    cohort.with_columns(
        pl.when(pl.col("site") == "A")
        .then(pl.lit("A<b>&co"))
        .otherwise(pl.col("site"))
        .alias("site")
    ).write_parquet(data / "cohort.parquet")

    cfg = _config(data, tmp / "cfg")
    out = tmp / "run"
    # One cell fails (its training raises): the run must say so with exit status 3.
    from survfuse.experiment import cell as cell_mod

    real = cell_mod._train_and_predict

    def flaky(spec, rd, folder):  # type: ignore[no-untyped-def]
        if spec.strategy == "unimodal_ct":
            raise RuntimeError("injected failure")
        return real(spec, rd, folder)

    mp = pytest.MonkeyPatch()
    mp.setattr(cell_mod, "_train_and_predict", flaky)
    try:
        first = CliRunner().invoke(
            app, ["--debug", "run", str(cfg), "--out", str(out), "--no-progress"]
        )
    finally:
        mp.undo()
    # Debris of an interrupted run: a cell temp folder, a store chunk and a report temp file.
    (out / "cells" / ".pe_mortality.x.tmp-deadbeef").mkdir(parents=True)
    store_tmp = next((out / "features" / "store").iterdir()) / ".chunk.tmp-deadbeef"
    store_tmp.mkdir()
    (out / ".report.html.tmp-deadbeef").write_text("partial")
    second = CliRunner().invoke(app, ["run", str(cfg), "--out", str(out), "--no-progress"])
    return {
        "out": out,
        "first": first,
        "second": second,
        "subjects": dict(
            missing=missing,
            truncated=truncated,
            not_ct=not_ct,
            one_slice=one_slice,
            no_ehr=no_ehr,
            nan_ct=nan_ct,
        ),
        "store_tmp": store_tmp,
    }


def test_failed_cells_exit_3_naming_them(bad_run: dict[str, object]) -> None:
    first = bad_run["first"]
    assert first.exit_code == 3, first.output[-2000:]  # type: ignore[attr-defined]
    last = first.stderr.strip().splitlines()[-1]  # type: ignore[attr-defined]
    assert last.startswith("error: 1 cell(s) failed: pe_mortality.unimodal_ct.")
    assert "--allow-failed" in last
    second = bad_run["second"]  # the rerun retries the failed cell and finishes
    assert second.exit_code == 0, second.output[-3000:]  # type: ignore[attr-defined]


def test_allow_failed_exits_0(
    data_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from survfuse.experiment import cell as cell_mod

    def boom(spec, rd, folder):  # type: ignore[no-untyped-def]
        raise RuntimeError("injected failure")

    monkeypatch.setattr(cell_mod, "_train_and_predict", boom)
    cfg = _config(data_copy, tmp_path / "cfg", strategies=[{"name": "unimodal", "modality": "ehr"}])
    args = ["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", "--no-report"]
    res = CliRunner().invoke(app, [*args, "--allow-failed"])
    assert res.exit_code == 0, res.output[-2000:]


def test_data_manifest_reports_every_problem(bad_run: dict[str, object]) -> None:
    out = Path(str(bad_run["out"]))
    subjects: dict[str, int] = bad_run["subjects"]  # type: ignore[assignment]
    man = pl.read_parquet(out / "data_manifest.parquet")
    assert {"subject_id", "prediction_time", "site", "split", "modality", "encoder", "status",
            "reason"} <= set(man.columns)  # fmt: skip
    ct = {r["subject_id"]: r for r in man.filter(pl.col("modality") == "ct").iter_rows(named=True)}
    ehr = {
        r["subject_id"]: r for r in man.filter(pl.col("modality") == "ehr").iter_rows(named=True)
    }
    assert ct[subjects["missing"]]["status"] == "failed"
    assert "file not found" in ct[subjects["missing"]]["reason"]
    assert ct[subjects["truncated"]]["status"] == "failed"
    assert "unreadable" in ct[subjects["truncated"]]["reason"]
    assert "implausible HU" in ct[subjects["not_ct"]]["reason"]
    assert "too few slices" in ct[subjects["one_slice"]]["reason"]
    assert "NaN or infinite" in ct[subjects["nan_ct"]]["reason"]
    assert ehr[subjects["no_ehr"]]["status"] == "missing"
    assert "no EHR events" in ehr[subjects["no_ehr"]]["reason"]
    assert ct[subjects["no_ehr"]]["status"] == "present"
    n = pl.read_parquet(out / "data" / "cohort.parquet").height
    assert man.height == 2 * n  # one row per cohort row x modality (one encoder each)
    # ... and the console said so, once per modality
    err = bad_run["second"].stderr  # type: ignore[attr-defined]
    assert "data ct (ct_radiomics):" in err and "5 failed" in err and "too few slices" in err
    assert "data ehr (ehr_onehot):" in err and "1 missing" in err


def test_report_has_a_data_section_and_summary_escapes_html(bad_run: dict[str, object]) -> None:
    out = Path(str(bad_run["out"]))
    page = (out / "report.html").read_text()
    assert '">Data</h2>' in page and "too few slices" in page
    md = (out / "summary.md").read_text()
    assert "## Data" in md
    assert "A&lt;b&gt;&amp;co" in md and "<b>" not in md


def test_debris_is_removed_on_the_next_run(bad_run: dict[str, object]) -> None:
    out = Path(str(bad_run["out"]))
    assert not list(out.rglob("*.tmp-*")), list(out.rglob("*.tmp-*"))
    assert not Path(str(bad_run["store_tmp"])).exists()
    assert "removed 3 temp" in bad_run["second"].stderr  # type: ignore[attr-defined]
    assert (out / LOCK_NAME).read_text() == ""  # the lock was released


# --------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (lambda df: pl.concat([df, df.head(1)]), ["duplicate (subject_id, prediction_time)"]),
        (lambda df: df.with_columns(pl.lit(-1.0).alias("pe_mortality_time")), ["negative"]),
        (
            lambda df: df.with_columns(
                pl.when(pl.int_range(pl.len()) == 3)
                .then(float("nan"))
                .otherwise(pl.col("pe_mortality_time"))
                .alias("pe_mortality_time")
            ),
            ["'pe_mortality_time'", "NaN"],
        ),
        (lambda df: df.with_columns(pl.lit(2).alias("pe_mortality_event")), ["0/1", "got 2"]),
        (lambda df: df.with_columns(pl.lit("p-17").alias("subject_id")), ["'subject_id'"]),
    ],
    ids=["duplicate", "negative_time", "nan_time", "event_2", "non_integer_id"],
)
def test_cohort_errors_are_one_line(data_copy: Path, tmp_path: Path, change, needles) -> None:  # type: ignore[no-untyped-def]
    path = data_copy / "cohort.parquet"
    change(pl.read_parquet(path)).write_parquet(path)
    cfg = _config(data_copy, tmp_path / "cfg")
    code, _, err = _invoke("run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress")
    _one_line_error(code, err, str(path), *needles)


def test_meds_problems_are_one_line_errors_naming_the_file(data_copy: Path, tmp_path: Path) -> None:
    shard = next((data_copy / "meds" / "data").glob("*.parquet"))
    cfg = _config(data_copy, tmp_path / "cfg")
    run = ["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]
    events = pl.read_parquet(shard)
    # null codes: EHR validation C fell to chance without a word before
    events.with_columns(
        pl.when(pl.int_range(pl.len()) % 7 == 0).then(None).otherwise(pl.col("code")).alias("code")
    ).write_parquet(shard)
    code, _, err = _invoke(*run)
    _one_line_error(code, err, str(shard), "'code'", "null")
    # NaN / inf values
    events.with_columns(
        pl.when(pl.int_range(pl.len()) == 5)
        .then(float("inf"))
        .otherwise(pl.col("numeric_value"))
        .alias("numeric_value")
    ).write_parquet(shard)
    code, _, err = _invoke(*run)
    _one_line_error(code, err, str(shard), "numeric_value", "infinite", "subject")
    # a 0-byte shard
    shard.write_bytes(b"")
    code, _, err = _invoke(*run)
    _one_line_error(code, err, str(shard))


def test_out_that_is_a_file_is_a_one_line_error(data_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.write_text("not a folder")
    code, _, err = _invoke("run", str(_config(data_copy, tmp_path / "cfg")), "--out", str(out))
    _one_line_error(code, err, str(out))


def test_read_only_and_full_disk_are_one_line_errors(
    data_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import survfuse.experiment.lock as lock_mod
    import survfuse.experiment.rundir as rundir_mod

    cfg = _config(data_copy, tmp_path / "cfg")
    out = tmp_path / "run"

    # A read-only folder (simulated: the tests may run as root, who may write anywhere).
    def read_only(*args: object, **kwargs: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", str(out / LOCK_NAME))

    with monkeypatch.context() as m:
        m.setattr(lock_mod.os, "open", read_only)
        code, _, err = _invoke("run", str(cfg), "--out", str(out), "--no-progress")
    _one_line_error(code, err, "ermission denied", str(out))

    # A full disk while writing the run's files: one line, and no temp file left behind.
    real_write = Path.write_text

    def full(self: Path, *args: object, **kwargs: object) -> int:
        if ".tmp-" in self.name and self.parent == out:
            real_write(self, "partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(rundir_mod.Path, "write_text", full)
        code, _, err = _invoke("run", str(cfg), "--out", str(out), "--no-progress")
    _one_line_error(code, err, "No space left on device")
    assert not list(out.glob(".*.tmp-*"))


def test_debug_shows_the_traceback(data_copy: Path, tmp_path: Path) -> None:
    cfg = _config(data_copy, tmp_path / "cfg", tasks=["../x"])
    res = CliRunner().invoke(app, ["--debug", "run", str(cfg), "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and res.exception is not None  # raised, not turned into a line


def test_predict_on_tampered_run_folders_is_a_one_line_error(
    bad_run: dict[str, object], tmp_path: Path, sim_small: Path
) -> None:
    import pickle

    out = Path(str(bad_run["out"]))
    cell = next(p.name for p in (out / "cells").iterdir() if ".unimodal_ehr." in p.name)
    keys = pl.read_parquet(sim_small / "cohort.parquet").select("subject_id", "prediction_time")
    keys.head(5).write_parquet(tmp_path / "new.parquet")
    args = ["--cohort", str(tmp_path / "new.parquet"), "--meds-root", str(sim_small / "meds")]

    pickled = Path(shutil.copytree(out, tmp_path / "pickled"))
    weights = pickled / "cells" / cell / "model" / "model.safetensors"
    weights.write_bytes(pickle.dumps({"w": np.zeros(3)}))
    code, _, err = _invoke("predict", str(pickled), "--cell", cell, *args)
    _one_line_error(code, err, str(weights), "not a valid safetensors file")

    tagged = Path(shutil.copytree(out, tmp_path / "tagged"))
    (tagged / "config.yaml").write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    code, _, err = _invoke("predict", str(tagged), "--cell", cell, *args)
    _one_line_error(code, err, str(tagged / "config.yaml"), "not a survfuse config")


def test_every_command_shares_the_error_path() -> None:
    code, _, err = _invoke("report", "/nonexistent/run")
    _one_line_error(code, err, "/nonexistent/run")
    code, _, err = _invoke("run", "/nonexistent/study.yaml")
    _one_line_error(code, err, "config file not found")


def test_cli_errors_are_one_line_in_a_real_process(tmp_path: Path) -> None:
    """The console script itself (not CliRunner): stderr is exactly one line, exit 2."""
    res = subprocess.run(
        [sys.executable, "-m", "survfuse.cli", "report", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: ")

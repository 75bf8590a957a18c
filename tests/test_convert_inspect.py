"""`survfuse convert inspect` on a miniature INSPECT release: counts, outputs, errors, and a tiny
study run on the converted folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from survfuse.cli import app
from survfuse.convert import ConversionError, convert_inspect
from survfuse.data.cohort import load_cohort
from survfuse.data.ct_index import load_ct_index
from survfuse.data.meds import MEDSDataset
from test_convert_miniature import LABELS, MEDS01, build_miniature

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("inspect_raw")
    return root, build_miniature(root)


@pytest.fixture(scope="module")
def converted(mini: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, _ = mini
    out = tmp_path_factory.mktemp("conv") / "inspect"
    code, _, err = _invoke(
        "convert", "inspect", "--cohort", str(root / "labels"), "--ct-root", str(root),
        "--meds", str(root / "meds"), "--out", str(out), "--site", "stanford",
    )  # fmt: skip
    assert code == 0, err
    return out


def _invoke(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def _one_line_error(code: int, err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_conversion_counts(converted: Path, mini: tuple[Path, dict[str, Any]]) -> None:
    _, exp = mini
    c = json.loads((converted / "conversion.json").read_text())
    co = c["cohort"]
    assert co["rows_in"] == exp["rows_in"]
    assert co["no_labels_row_dropped"] == exp["no_labels_row_dropped"]
    assert co["null_time_dropped"] == exp["null_time_dropped"]
    assert co["duplicate_keys_dropped"] == exp["duplicate_keys_dropped"]
    assert co["rows_out"] == c["output"]["cohort_rows"] == exp["rows_out"]
    assert co["subjects"] == exp["subjects"]
    assert c["meds"]["patients"] == exp["meds_patients"]
    assert c["meds"]["subjects_not_in_cohort"] == 1
    assert c["meds"]["nan"] == exp["nan"]
    assert c["outcomes"]["death_events"] == exp["deaths"]
    assert c["outcomes"]["rows_death_at_or_before_prediction"] == exp["death_before_rows"]
    for label, n in exp["mismatches"].items():
        assert c["crosscheck"][label]["mismatches"] == n, (label, c["crosscheck"][label])
    assert c["crosscheck"]["1_month_mortality"]["true_without_death"] == 1
    assert c["ct"]["found"] == exp["ct_found"] and c["ct"]["not_found"] == exp["ct_not_found"]
    assert c["output"]["ct_index_rows"] == exp["ct_found"]
    # the report shows the same numbers
    md = (converted / "conversion_report.md").read_text()
    assert (
        f"| studies without a CT time (`procedure_DATETIME`): dropped | {exp['null_time_dropped']} |"
        in md
    )
    assert f"| **cohort rows** | {exp['rows_out']} |" in md
    assert "| `1_month_mortality` | 30 |" in md


def test_converted_files_follow_survfuse_conventions(
    converted: Path, mini: tuple[Path, dict[str, Any]]
) -> None:
    _, exp = mini
    cohort = load_cohort(converted / "cohort.parquet")
    df = cohort.df
    assert df.schema["subject_id"] == pl.Int64 and df.schema["prediction_time"] == pl.Datetime("us")
    assert df.schema["time"] == pl.Float64 and df.schema["event"] == pl.Boolean
    assert "pe_mortality" in cohort.tasks
    assert (df["time"] >= 0).all() and df["site"].unique().to_list() == ["stanford"]
    assert set(df["inspect_split"].unique()) == {"train", "validation", "internal_test"}
    assert set(LABELS) <= set(df.columns)
    assert set(df["1_month_mortality"].drop_nulls().unique()) <= {"True", "False", "Censored"}
    # one split per subject, and the MEDS metadata carries it in MEDS names
    assert (
        df.group_by("subject_id").agg(pl.col("inspect_split").n_unique())["inspect_split"].max()
        == 1
    )
    splits = pl.read_parquet(converted / "meds" / "metadata" / "subject_splits.parquet")
    assert set(splits["split"]) == {"train", "tuning", "held_out"}
    assert splits.height == exp["subjects"]
    # derived times agree with the truth the miniature was built from
    truth = {s["impression_id"]: s for s in exp["studies"]}
    for r in df.iter_rows(named=True):
        s = truth[int(r["impression_id"])]
        dies = s["death"] is not None and s["death"] > r["prediction_time"]
        end = s["death"] if dies else s["last"]
        assert r["pe_mortality_event"] == r["event"] == dies
        assert r["pe_mortality_time"] == pytest.approx(
            (end - r["prediction_time"]).total_seconds() / 86400
        )
    ct = load_ct_index(converted / "ct_index.parquet")
    assert ct.height == exp["ct_found"] and all(Path(p).is_file() for p in ct["path"])
    meds = MEDSDataset(converted / "meds")
    info = meds.validate(deep=True)
    assert info["strict_meds"] and info["n_subjects"] == exp["meds_patients"]
    assert json.loads((converted / "meds" / "metadata" / "dataset.json").read_text())["etl_name"]
    codes = pl.read_parquet(converted / "meds" / "metadata" / "codes.parquet")
    assert "MEDS_DEATH" in codes["code"].to_list()
    mism = pl.read_parquet(converted / "label_crosscheck.parquet")
    assert mism.height == 1 and mism["released"][0] == "True" and mism["derived"][0] != "True"


def test_master_file_layout_gives_the_same_cohort(converted: Path, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    exp = build_miniature(root, layout="master")
    res = convert_inspect(
        root / "cohort_0.2.0_master_file_anon.csv", root / "meds", tmp_path / "out",
        ct_root=root, site="stanford",
    )  # fmt: skip
    assert res.counts["inputs"]["layout"] == "master-file"
    assert res.counts["cohort"]["rows_out"] == exp["rows_out"]
    a = pl.read_parquet(res.cohort).drop(LABELS)
    b = pl.read_parquet(converted / "cohort.parquet").drop(LABELS)
    assert a.equals(b)


def test_time_fallback_keeps_rows_and_counts_them(
    mini: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, exp = mini
    res = convert_inspect(
        root / "labels", root / "meds", tmp_path / "out", time_fallback="note_DATETIME"
    )
    co = res.counts["cohort"]
    # one of the two studies without a CT time has a report time, the other nothing
    assert co["null_time_dropped"] == 1 and co["time_from_fallback"] == 1
    assert co["rows_out"] == exp["rows_out"] + 1
    assert res.ct_index is None  # no --ct-root: EHR only


def test_out_folder_is_only_replaced_when_it_is_a_conversion(
    mini: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, _ = mini
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert_inspect(root / "labels", root / "meds", other)
    assert (other / "keep.txt").read_text() == "mine"
    out = tmp_path / "out"
    convert_inspect(root / "labels", root / "meds", out)
    convert_inspect(root / "labels", root / "meds", out)  # a rerun replaces its own output
    assert (out / "cohort.parquet").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp debris


# --------------------------------------------------------------------------- bad inputs


def _copy(mini: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    shutil.copytree(mini[0] / "labels", root / "labels")
    shutil.copytree(mini[0] / "meds", root / "meds")
    return root


def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, count))


def _convert(root: Path, tmp_path: Path, *extra: str) -> tuple[int, str, str]:
    return _invoke(
        "convert", "inspect", "--cohort", str(root / "labels"), "--meds", str(root / "meds"),
        "--out", str(tmp_path / "out"), *extra,
    )  # fmt: skip


def test_missing_column_is_one_line_naming_file_and_column(mini: Any, tmp_path: Path) -> None:
    root = _copy(mini, tmp_path)
    _edit(root / "labels" / "study_mapping_20250611.tsv", "procedure_DATETIME", "proc_time")
    code, _, err = _convert(root, tmp_path)
    _one_line_error(code, err, "study_mapping_20250611.tsv", "missing column 'procedure_DATETIME'")


def test_unknown_label_spelling_names_file_row_column(mini: Any, tmp_path: Path) -> None:
    root = _copy(mini, tmp_path)
    path = root / "labels" / "labels_20250611.tsv"
    lines = path.read_text().splitlines()
    cells = lines[3].split("\t")
    cells[2] = "maybe"  # 1_month_mortality of data row 3
    lines[3] = "\t".join(cells)
    path.write_text("\n".join(lines) + "\n")
    code, _, err = _convert(root, tmp_path)
    _one_line_error(
        code, err, "labels_20250611.tsv", "row 3 (line 4)", "'1_month_mortality'", "'maybe'"
    )


def test_subject_in_two_splits_names_file_row_column(mini: Any, tmp_path: Path) -> None:
    root = _copy(mini, tmp_path)
    path = root / "labels" / "splits_20250611.tsv"
    lines = path.read_text().splitlines()
    # subject 1000 has two studies (rows 1 and 2): move the second one to another split
    assert lines[1].split("\t")[1] == lines[2].split("\t")[1] == "train"
    lines[2] = lines[2].split("\t")[0] + "\ttest"
    path.write_text("\n".join(lines) + "\n")
    code, _, err = _convert(root, tmp_path)
    _one_line_error(code, err, "splits_20250611.tsv", "row 2 (line 3)", "'split'", "subject 1000")


def test_day_first_dates_are_never_guessed(mini: Any, tmp_path: Path) -> None:
    root = _copy(mini, tmp_path)
    path = root / "labels" / "study_mapping_20250611.tsv"
    lines = path.read_text().splitlines()
    cells = lines[5].split("\t")
    y, m, rest = cells[3][:4], cells[3][5:7], cells[3][8:]
    cells[3] = f"{rest[:2]}/{m}/{y}{rest[2:]}"  # dd/mm/yyyy HH:MM:SS
    lines[5] = "\t".join(cells)
    path.write_text("\n".join(lines) + "\n")
    code, _, err = _convert(root, tmp_path)
    _one_line_error(
        code,
        err,
        "study_mapping_20250611.tsv",
        "row 5 (line 6)",
        "'procedure_DATETIME'",
        "ISO 8601",
    )


def test_nested_meds_bad_timestamp_names_shard_row_column(mini: Any, tmp_path: Path) -> None:
    root = _copy(mini, tmp_path)
    shard = root / "meds" / "data" / "1.parquet"
    rows = pq.read_table(shard).to_pylist()
    rows[2]["events"][1]["time"] = None  # MEDS 0.1 events need a time
    pq.write_table(pa.Table.from_pylist(rows, schema=MEDS01), shard)
    code, _, err = _convert(root, tmp_path)
    pid = rows[2]["patient_id"]
    _one_line_error(code, err, "1.parquet", "row 3", f"patient {pid}", "'events.time'")


def test_no_death_events_is_a_clear_error(mini: Any, tmp_path: Path) -> None:
    root = _copy(mini, tmp_path)
    code, _, err = _convert(root, tmp_path, "--death-code", "SNOMED/0000")
    line = _one_line_error(code, err, "no death events", "SNOMED/0000", "--death-code")
    assert "pe_mortality" in line
    assert not (tmp_path / "out").exists()  # nothing half-written


# --------------------------------------------------------------------------- a study on it


def test_a_tiny_study_runs_on_the_converted_folder(converted: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(TINY.read_text())
    raw["name"] = "inspect_mini"
    raw["data"] = {
        "cohort": str(converted / "cohort.parquet"),
        "ct_index": str(converted / "ct_index.parquet"),
        "meds_root": str(converted / "meds"),
    }
    raw["tasks"] = ["pe_mortality"]
    # the release's own split, not a new one (splits.column)
    raw["splits"] = {"external_sites": [], "column": "inspect_split"}
    raw["encoders"]["ct"][0]["params"] = {"grid": [2, 2, 2], "n_bins": 8}
    raw["strategies"] = [
        {"name": "unimodal", "modality": "ct"},
        {"name": "unimodal", "modality": "ehr"},
    ]
    raw["training"].update(max_epochs=2, patience=2)
    raw["evaluation"].update(bootstrap=5, metrics=["harrell_c"], horizons=[180])
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    code, out, err = _invoke(
        "run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", "--no-report"
    )
    assert code == 0, (out + err)[-3000:]
    manifest = pl.read_parquet(tmp_path / "run" / "data_manifest.parquet")
    ct = manifest.filter(pl.col("modality") == "ct")
    assert ct.filter(pl.col("status") == "present").height == ct.height - 1  # the missing file
    metrics = pl.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert metrics.height > 0
    run_cohort = pl.read_parquet(tmp_path / "run" / "data" / "cohort.parquet")
    assert run_cohort["split"].to_list() == run_cohort["inspect_split"].to_list()


def test_ct_root_without_image_id_column_is_an_error(mini: Any, tmp_path: Path) -> None:
    root = _copy(mini, tmp_path)
    _edit(root / "labels" / "study_mapping_20250611.tsv", "\timage_id\t", "\timage\t")
    code, _, err = _convert(root, tmp_path, "--ct-root", str(mini[0]))
    _one_line_error(code, err, "study_mapping_20250611.tsv", "missing column 'image_id'")

"""Experiment config: validation, did-you-mean errors, input checks, grid expansion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from survfuse.experiment.config import ConfigError
from survfuse.experiment.config_load import load_config, parse_config
from survfuse.experiment.grid import expand_grid

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
DEMO = ROOT / "examples" / "demo.yaml"


def _data(sim: Path) -> dict[str, str]:
    return {
        "cohort": str(sim / "cohort.parquet"),
        "ct_index": str(sim / "ct_index.parquet"),
        "meds_root": str(sim / "meds"),
    }


def _write(tmp_path: Path, sim: Path, edit: Any = None) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["data"] = _data(sim)
    if edit is not None:
        edit(raw)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _error(tmp_path: Path, sim: Path, edit: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, sim, edit))
    msg = str(exc.value)
    assert "\n" not in msg  # one line
    return msg


def test_shipped_configs_validate(sim_small: Path) -> None:
    for path in (TINY, DEMO):
        cfg = load_config(path, overrides={"data": _data(sim_small)})
        assert cfg.strategies and cfg.encoders.ct and cfg.encoders.ehr
    demo = load_config(DEMO, overrides={"data": _data(sim_small)})
    # The demo: both tasks, ct_radiomics, ehr_onehot + ehr_clmbr, all strategies, 3 seeds.
    assert set(demo.tasks) == {"pe_mortality", "mace"}
    assert [c.name for c in demo.encoders.ct] == ["ct_radiomics"]
    assert sorted(c.name for c in demo.encoders.ehr) == ["ehr_clmbr", "ehr_onehot"]
    from survfuse.registry import FUSIONS

    assert {s.name for s in demo.strategies} == set(FUSIONS.list())
    assert len(demo.seeds) == 3 and demo.evaluation.bootstrap == 1000


def test_dump_round_trips(tmp_path: Path, sim_small: Path) -> None:
    cfg = load_config(_write(tmp_path, sim_small))
    again = parse_config(yaml.safe_load(cfg.dump()), base=tmp_path)
    assert again == cfg
    assert Path(again.data.cohort).is_absolute()


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, sim_small: Path) -> None:
    def rel(raw: dict[str, Any]) -> None:
        raw["data"]["cohort"] = "cohort_link.parquet"

    (tmp_path / "cohort_link.parquet").symlink_to(sim_small / "cohort.parquet")
    cfg = load_config(_write(tmp_path, sim_small, rel))
    assert cfg.data.cohort == (tmp_path / "cohort_link.parquet").resolve()


def test_misspelt_strategy(tmp_path: Path, sim_small: Path) -> None:
    msg = _error(tmp_path, sim_small, lambda r: r["strategies"][3].update(name="lat"))
    assert "strategies[3].name" in msg
    assert "unknown fusion strategy 'lat'; did you mean 'late'?" in msg


def test_unknown_key_suggests_the_closest(tmp_path: Path, sim_small: Path) -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["evaluation"]["bootstap"] = raw["evaluation"].pop("bootstrap")

    msg = _error(tmp_path, sim_small, edit)
    assert "evaluation.bootstap: unknown key 'bootstap'; did you mean 'bootstrap'?" in msg


def test_missing_file(tmp_path: Path, sim_small: Path) -> None:
    msg = _error(tmp_path, sim_small, lambda r: r["data"].update(meds_root=str(tmp_path / "nope")))
    assert "data.meds_root: file not found" in msg and "nope" in msg


def test_external_site_absent_from_cohort(tmp_path: Path, sim_small: Path) -> None:
    msg = _error(tmp_path, sim_small, lambda r: r["splits"].update(external_sites=["D"]))
    assert "splits.external_sites: site 'D' is not in the cohort" in msg
    assert "sites: A, B, C" in msg


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda r: r["splits"].update(val_frac=1.5), "splits.val_frac"),
        (lambda r: r["evaluation"].update(metrics=["harel_c"]), "did you mean 'harrell_c'?"),
        (lambda r: r.update(tasks=["pe_mortalty"]), "did you mean 'pe_mortality'?"),
        (lambda r: r.update(heads=["coxx"]), "did you mean 'cox'?"),
        (lambda r: r["training"].update(max_epoch=3), "did you mean 'max_epochs'?"),
        (
            lambda r: r["strategies"][3].update(params={"hiden": 8}),
            "unknown late strategy parameter 'hiden'; did you mean 'hidden'?",
        ),
        (
            lambda r: r["encoders"]["ehr"][0].update(name="ehr_onehott"),
            "did you mean 'ehr_onehot'?",
        ),
        (
            lambda r: r["encoders"]["ct"][0].update(params={"gird": [2, 2, 2]}),
            "encoders.ct 'ct_radiomics': bad params",
        ),
        (lambda r: r["strategies"][0].pop("modality"), "needs `modality: ct`"),
        (lambda r: r.update(executor="rey"), "did you mean 'ray'?"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, sim_small: Path, edit: Any, expected: str) -> None:
    assert expected in _error(tmp_path, sim_small, edit)


def test_cli_rejects_bad_config_before_any_work(tmp_path: Path, sim_small: Path) -> None:
    path = _write(tmp_path, sim_small, lambda r: r["strategies"][3].update(name="lat"))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "survfuse.cli", "run", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "did you mean 'late'?" in lines[0]
    assert not out.exists()  # nothing was written: the error came before any work


def test_grid_expansion(tmp_path: Path, sim_small: Path) -> None:
    def two_ehr(raw: dict[str, Any]) -> None:
        raw["encoders"]["ehr"].append({"name": "ehr_counts"})
        raw["seeds"] = [0, 1]
        raw["tasks"] = ["pe_mortality", "mace"]

    cfg = load_config(_write(tmp_path, sim_small, two_ehr))
    feats = {
        "ct": {"ct_radiomics": "features/ct"},
        "ehr": {"ehr_onehot": "features/a", "ehr_counts": "features/b"},
    }
    cells = expand_grid(cfg, feats)
    # Per task and seed: unimodal_ct x 1 CT encoder, unimodal_ehr x 2 EHR encoders, and the five
    # fused strategies x 1 x 2 encoder pairs: 1 + 2 + 5 * 2 = 13.
    assert len(cells) == 2 * 2 * 13
    assert len({c.cell_id for c in cells}) == len(cells)
    assert [c.cell_id for c in cells] == [c.cell_id for c in expand_grid(cfg, feats)]
    uni_ct = [c for c in cells if c.strategy == "unimodal_ct"]
    assert all(c.ehr_encoder is None and set(c.features) == {"ct"} for c in uni_ct)
    assert all(c.strategy_params["modality"] == "ct" for c in uni_ct)
    assert "pe_mortality.late.ct_radiomics.ehr_counts.cox.s1" in {c.cell_id for c in cells}

    # Changing one strategy's hyper-parameter changes the digest of its cells only.
    def lr(raw: dict[str, Any]) -> None:
        two_ehr(raw)
        raw["strategies"][3]["training"] = {"lr": 0.01}

    cfg2 = load_config(_write(tmp_path, sim_small, lr))
    d1 = {c.cell_id: c.digest() for c in cells}
    d2 = {c.cell_id: c.digest() for c in expand_grid(cfg2, feats)}
    changed = {k for k in d1 if d1[k] != d2[k]}
    assert changed and all(".late." in k for k in changed)
    assert len(changed) == 2 * 2 * 2


def test_cli_ray_address_with_local_executor_is_an_error(tmp_path: Path, sim_small: Path) -> None:
    from typer.testing import CliRunner

    from survfuse.cli import app

    path = _write(tmp_path, sim_small, lambda r: None)
    out = tmp_path / "run"
    args = ["run", str(path), "--out", str(out), "--executor", "local"]
    result = CliRunner().invoke(app, [*args, "--ray-address", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "--ray-address 127.0.0.1:1 needs --executor ray" in result.output
    assert not out.exists()

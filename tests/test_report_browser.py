"""The report as a reader sees it: a two-task run rendered in headless Chromium (slow).

Every figure must be drawn (decoded by the browser, not blank: ink and coloured data pixels),
fit the page column, and every section must render to a screenshot that is not empty. Set
SURVFUSE_REPORT_SHOTS=DIR to keep the screenshots for looking at them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import yaml

from survfuse.experiment.config_load import load_config
from survfuse.experiment.runner import run_experiment
from survfuse.report.html import build_report

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {
    "forest plot",
    "Kaplan-Meier by risk group",
    "calibration",
    "td-AUC and Brier over time",
    "training curves",
    "Shapley contributions",
}
SECTIONS = {
    "Cohort",
    "Risk groups",
    "Calibration",
    "Performance over time",
    "Training curves",
    "Glossary",
}


def _render_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "render_report", ROOT / "scripts" / "render_report.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def two_task_run(sim_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    raw["data"] = {
        "cohort": str(sim_small / "cohort.parquet"),
        "ct_index": str(sim_small / "ct_index.parquet"),
        "meds_root": str(sim_small / "meds"),
    }
    raw["tasks"] = ["pe_mortality", "mace"]
    raw["strategies"] = [
        s for s in raw["strategies"] if s["name"] in ("unimodal", "late", "concat")
    ]
    raw["training"]["max_epochs"] = 8
    folder = tmp_path_factory.mktemp("two_task")
    cfg = folder / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = folder / "run"
    run_experiment(load_config(cfg), out, progress=False)
    build_report(out)
    return out


@pytest.mark.slow
def test_every_figure_and_section_renders_in_chromium(two_task_run: Path, tmp_path: Path) -> None:
    render = _render_module()
    try:
        render.browser()
    except FileNotFoundError:
        pytest.fail("headless Chromium not found: apt-get install -y chromium")
    out = tmp_path / "shots"
    probe = render.render(two_task_run / "report.html", out)
    images = {im["alt"]: im for im in probe["images"]}
    assert FIGURES <= set(images), set(images)
    for im in probe["images"]:
        assert im["width"] > 300 and im["height"] > 150, im  # decoded by the browser
        assert im["shown_width"] <= 1040, im  # fits the page column
        assert im["ink"] > 0.02, im  # axes, text and data, not a blank canvas
        assert im["colour"] > 0.003, im  # data drawn in colour (curves, bands, bars)
    assert probe["page_width"] <= 1100  # no sideways scrolling in an 1100 px window
    titles = [s["title"] for s in probe["sections"]]
    assert SECTIONS <= set(titles)
    # task order: the main table's everywhere
    html = (two_task_run / "report.html").read_text()
    assert html.index("pe_mortality") < html.index("mace")
    from PIL import Image

    for sec in probe["sections"]:
        shot = np.asarray(Image.open(out / sec["screenshot"]).convert("L"), dtype=np.float64)
        assert shot.shape[1] == 1100
        assert (shot < 200).mean() > 0.005, sec["title"]  # the section drew something
    keep = os.environ.get("SURVFUSE_REPORT_SHOTS")
    if keep:
        shutil.copytree(out, keep, dirs_exist_ok=True)

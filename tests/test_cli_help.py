"""`--help` of every command: no `<bool>` for flags, choices listed, every default stated;
`survfuse info` describes each component; unknown names suggest at most 5 candidates."""

from __future__ import annotations

import inspect
import re
from typing import Any, get_args

import pytest
import typer.main
from typer.testing import CliRunner

from survfuse.cli import app
from survfuse.cli_help import CTFeatures, Executor, RecalibrationMethod
from survfuse.registry import MAX_CANDIDATES, Registry, UnknownNameError, look_up_option

WIDE = {"COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1"}


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = [(path, group)]
    for name, sub in getattr(group, "commands", {}).items():
        out += _commands(sub, (*path, name))
    return out


COMMANDS = _commands(typer.main.get_command(app))


def _help(path: tuple[str, ...]) -> str:
    res = CliRunner().invoke(app, [*path, "--help"], env=WIDE)
    assert res.exit_code == 0, res.output
    return res.output


def test_every_command_is_reached() -> None:
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"", "run", "predict", "recalibrate", "info", "demo", "convert inspect"} <= names


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "root")
def test_help_has_no_bool_placeholder_and_states_defaults(path: tuple[str, ...]) -> None:
    text = _help(path)
    assert "<bool>" not in text
    assert "--help" in text
    cmd = dict(COMMANDS)[path]
    for param in cmd.params:
        if getattr(param, "is_flag", False) or param.required or param.param_type_name != "option":
            continue
        # typer prints `[default: X]` for a real default; a None default must say what happens
        if param.default is None:
            assert "default" in (param.help or "").lower(), f"{' '.join(path)} {param.opts[0]}"
        else:
            assert f"[default: {param.default}]" in " ".join(text.split()), param.opts[0]


def test_enumerated_options_list_their_choices() -> None:
    assert "<local|ray>" in _help(("run",))
    assert "<cells|config>" in _help(("sweep-imbalance",))
    assert "<baseline|baseline+slope>" in _help(("recalibrate",))
    bad = CliRunner().invoke(app, ["run", "x.yaml", "--executor", "rai"], env=WIDE)
    assert bad.exit_code == 2 and "'local'" in bad.output and "'ray'" in bad.output


def test_executor_choices_match_the_config() -> None:
    from survfuse.experiment.config import EXECUTORS

    assert get_args(Executor) == tuple(EXECUTORS)
    from survfuse.survival.recalibration import RECALIBRATION_METHODS

    assert set(get_args(CTFeatures)) == {"cells", "config"}
    assert get_args(RecalibrationMethod) == tuple(RECALIBRATION_METHODS)


def test_predict_help_documents_defaults_and_output_columns() -> None:
    text = " ".join(_help(("predict",)).replace("│", " ").split())
    assert "(default: the run's CT index)" in text
    assert "(default: the run's MEDS root)" in text
    for column in ("subject_id", "prediction_time", "risk", "surv_<t>", "has_ct", "has_ehr"):
        assert column in text
    assert "NaN" in text


def test_info_describes_every_component() -> None:
    from survfuse.registry import all_registries

    res = CliRunner().invoke(app, ["info"], env=WIDE)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert all(len(line) <= 100 for line in lines)
    for kind, registry in all_registries().items():
        assert f"{kind}:" in lines
        for name in registry.list():
            line = next(ln for ln in lines if re.match(rf"  {re.escape(name)}\s{{2,}}\S", ln))
            desc = line.split(None, 1)[1].rstrip("…")
            raw = inspect.getdoc(registry.get(name)).splitlines()[0]
            # the docstring's first line, less any "(see the module docstring)" pointer
            assert len(desc) > 10 and raw.startswith(desc[:25]), (name, raw)
            assert "module docstring" not in desc
    assert "Cox partial likelihood" in res.output


def _quoted(message: str, names: list[str]) -> list[str]:
    return [n for n in names if f"'{n}'" in message or re.search(rf"\b{re.escape(n)}\b", message)]


def test_registry_suggests_at_most_five_of_many() -> None:
    reg: Registry[int] = Registry("encoder")
    names = [f"ehr_model_{i:02d}" for i in range(40)]
    for i, n in enumerate(names):
        reg.add(n, i)
    with pytest.raises(UnknownNameError) as exc:
        reg.get("ehr_model_1")
    msg = str(exc.value)
    shown = _quoted(msg, names)
    assert 1 <= len(shown) <= 2 * MAX_CANDIDATES  # suggestions + closest, each capped at 5
    assert msg.split("(")[0].count("'ehr_model_") <= 1 + MAX_CANDIDATES
    assert "40 known" in msg
    assert len(msg) < 400


def test_small_registry_lists_every_name() -> None:
    with pytest.raises(ValueError) as exc:
        look_up_option("brslow", ["efron", "breslow"], kind="ties")
    assert "did you mean 'breslow'?" in str(exc.value)
    assert "valid: breslow, efron" in str(exc.value)


def test_misspelt_cell_id_does_not_dump_all_ids() -> None:
    # ids shaped like a real run's: task.strategy.encoders.head.seed (108 of them)
    ids = [
        f"{task}.{strategy}.ct_radiomics+{ehr}.cox.s{seed}"
        for task in ("pe_mortality", "mace")
        for strategy in (
            "concat",
            "late",
            "contrastive",
            "cross_attention",
            "co_attention",
            "linear",
        )
        for ehr in ("ehr_onehot", "ehr_clmbr", "ehr_counts")
        for seed in range(3)
    ]
    assert len(ids) == 108
    wanted = "mace.late.ct_radiomics+ehr_clmbr.cox.s1"
    with pytest.raises(UnknownNameError) as exc:
        look_up_option(wanted.replace("late", "lat"), ids, kind="cell", where="RUN/cells")
    msg = str(exc.value)
    assert len(_quoted(msg, ids)) <= 2 * MAX_CANDIDATES
    assert f"did you mean {wanted!r}?" in msg
    assert "108 valid" in msg and "all: RUN/cells" in msg
    assert len(msg) < 700

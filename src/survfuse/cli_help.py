"""What the `survfuse` command's `--help` needs from typer.

The choices of its enumerated options and command classes that show on/off flags without a
value type. Imports only typer, so `survfuse --help` stays fast.
"""

from __future__ import annotations

from typing import Any, Literal

from typer.core import TyperCommand, TyperGroup

__all__ = ["CTFeatures", "CleanHelpCommand", "CleanHelpGroup", "Executor", "RecalibrationMethod"]

#: `--executor` choices; a test holds them equal to `experiment.config.EXECUTORS` (importing
#: that here would make `--help` wait seconds for torch).
Executor = Literal["local", "ray"]
#: `sweep-imbalance --ct-features` choices (see `experiment.sweep`).
CTFeatures = Literal["cells", "config"]
#: `recalibrate --method` choices (see `survival.recalibration`).
RecalibrationMethod = Literal["baseline", "baseline+slope"]


def _untyped_flags(params: list[Any]) -> list[Any]:
    # typer labels an on/off flag `<bool>` as if it took a value; an empty metavar drops the label
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class CleanHelpCommand(TyperCommand):
    """A command whose `--help` shows no value type for on/off flags."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


class CleanHelpGroup(TyperGroup):
    """A command group whose `--help` shows no value type for on/off flags."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))

"""The `survfuse` command line. Sits on top of the library; the library never imports it."""

from __future__ import annotations

import typer

from survfuse import __version__

app = typer.Typer(
    name="survfuse",
    help="Multimodal CT + EHR time-to-event prediction: simulate, encode, fuse, evaluate, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"survfuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """survfuse: fusion of CT and EHR representations for survival prediction."""


@app.command("info")
def info() -> None:
    """Print the registered encoders, fusion strategies and heads."""
    from survfuse.registry import all_registries

    for name, registry in all_registries().items():
        typer.echo(f"{name}: {', '.join(registry.list()) or '-'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

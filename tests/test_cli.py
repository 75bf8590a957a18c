import subprocess
import sys

from typer.testing import CliRunner

from survfuse import __version__
from survfuse.cli import app


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"survfuse {__version__}"


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "info" in result.stdout


def test_console_script_installed():
    out = subprocess.run(
        [sys.executable, "-m", "survfuse.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and __version__ in out.stdout

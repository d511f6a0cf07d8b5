"""`mtk` run in-process as a user runs it, for the tests: exit code checked, no traceback shown."""

from __future__ import annotations

from typer.testing import CliRunner

from stages.main import app

runner = CliRunner()


def run(*args: str, code: int = 0) -> str:
    """The output of ``mtk ARGS`` on one line (wrapping undone), after checking its exit code."""
    result = runner.invoke(app, list(args))
    output = " ".join(result.output.split())
    assert result.exit_code == code, output
    assert "Traceback" not in result.output
    return output

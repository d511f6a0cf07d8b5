"""``docs/cli.md``: the CLI reference, generated from the Typer app by Typer's own docs generator
(``typer.cli.get_docs_for_click``, what ``python -m typer stages.main utils docs --name mtk`` runs),
byte for byte what that command writes. ``python -m stages.docs`` rewrites it; tests/unit/test_cli_docs.py fails
while the committed file differs. The output does not depend on the terminal's width."""

from __future__ import annotations

import sys
from pathlib import Path

COMMAND = "python -m stages.docs"
OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def render() -> str:
    """The text of docs/cli.md for the commands and options as they are now."""
    import typer
    from typer.cli import get_docs_for_click
    from typer.core import MARKUP_MODE_KEY

    from .main import app

    command = typer.main.get_command(app)
    context = typer.Context(command, obj={MARKUP_MODE_KEY: app.rich_markup_mode})
    return get_docs_for_click(obj=command, ctx=context, name="mtk").strip() + "\n"


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT
    output.write_text(render(), encoding="utf-8")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()

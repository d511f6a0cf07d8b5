"""docs/cli.md is the CLI as it is: regenerated in-process by Typer's docs generator and compared."""

from __future__ import annotations

import difflib

from stages.docs import COMMAND, OUTPUT, render


def test_docs_cli_md_is_the_generated_reference():
    expected = render()
    committed = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else ""
    if committed != expected:
        diff = "".join(
            list(
                difflib.unified_diff(
                    committed.splitlines(keepends=True),
                    expected.splitlines(keepends=True),
                    "docs/cli.md (committed)",
                    "docs/cli.md (generated)",
                )
            )[:40]
        )
        raise AssertionError(f"docs/cli.md is out of date: regenerate it with `{COMMAND}`\n{diff}")


def test_the_reference_does_not_depend_on_the_terminal_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    narrow = render()
    monkeypatch.setenv("COLUMNS", "250")
    assert render() == narrow

"""Presentation helpers shared by the stages: one console, one way to report a user error."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, NoReturn

import typer
from rich.console import Console, ConsoleDimensions

UNBOUNDED = 100_000  # columns, when output goes to a file or a pipe


class _Console(Console):
    """As wide as the terminal; unbounded when output goes to a file or a pipe (logs, Slurm, CI), so
    that a table row or a log record stays on one line there, whatever the width of the job's shell."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(UNBOUNDED, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


console = _Console()
err_console = _Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Report a user error (bad input, bad option) without a traceback and exit."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def show_warnings_plainly() -> None:
    """mtk's own warnings (a rebuilt cache, ...) as one ``warning:`` line each, not Python's
    ``file:line: Category`` form with its source line; other libraries' warnings stay as they are."""
    import warnings

    from rich.markup import escape

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        if category.__module__.startswith("mtk."):
            err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def reports_file_errors(command: Callable) -> Callable:
    """The command with file-system errors (read-only, no permission, disk full, a file where a folder
    should be) reported as one line naming the path and the cause, instead of a traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except OSError as err:
            paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
            cause = err.strerror
            if isinstance(err, FileExistsError) and os.path.isfile(err.filename):
                cause = "a file is in the way, where a folder is needed"
            fail(f"{paths}: {cause}" if paths and cause else str(err))

    return run

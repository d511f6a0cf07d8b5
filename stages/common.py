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


def remember(kind: str, path: str | os.PathLike, stage: str, **record: Any) -> None:
    """Record a stage's output in the workspace (``mtk.workspace.record``; rank 0 only). A workspace
    that cannot be written is a warning: the output is there and describes itself."""
    from rich.markup import escape

    from mtk import workspace

    if os.environ.get("RANK", "0") != "0":
        return
    try:
        workspace.record(kind, path, stage, **record)
    except (workspace.WorkspaceError, OSError) as err:
        err_console.print(
            f"[yellow]warning:[/] not recorded in the workspace: {escape(str(err))}", soft_wrap=True
        )


def inherited(
    kind: str,
    option: str,
    remedy: str,
    fits: Callable[[Any], bool] | None = None,
    what: str | None = None,
    value: Callable[[Any, str], str] | None = None,
) -> Any:
    """The workspace's most recent ``kind`` output that ``fits`` (a ``mtk.workspace.Record``) for a
    left-out ``option``, said out loud in one line (``value(record, path)``: what is taken from it;
    default its path). Ends the command with ``remedy`` (what to give or run instead) when there is
    none, or when it was deleted or moved (never used silently)."""
    from mtk import workspace

    what = what or kind
    try:
        found = workspace.latest(kind, fits)
    except workspace.WorkspaceError as err:
        fail(str(err))
    if found is None:
        fail(
            f"{option} is not given, and this workspace ({workspace.root()}) has no {what} to take: {remedy}"
        )
    gone = workspace.missing(found)
    if gone:
        fail(f"{option} is not given, and the workspace's last {what}, {found.path} ({found.stage}), is gone: "
             f"{gone}. {remedy[0].upper()}{remedy[1:]}")  # fmt: skip
    where = found.path if found.facts.get(workspace.NAMED) else workspace.shown(workspace.location(found))
    changed = workspace.stale(found)
    note = f"; stale: {', '.join(changed)} changed since" if changed else ""
    where = value(found, where) if value else where
    said(f"{option.lstrip('-')}: {where} (last {found.stage}; {option} to choose{note})")
    return found


def said(line: str) -> None:
    """One line of what a command took by default; once per job (rank 0 under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        console.print(line, highlight=False, soft_wrap=True)


def last_run(families: tuple[str, ...], remedy: str) -> Any:
    """The run directory of the workspace's most recent run of one of ``families``, for a left-out
    ``--load``, said out loud (``inherited``)."""
    from mtk.workspace import location

    found = inherited("run", "--load", remedy, fits=lambda record: record.facts.get("family") in families,
                      what=f"{' or '.join(families)} run")  # fmt: skip
    return location(found)

"""What the three scripts share: turning user mistakes into one-line errors and exit codes.

Use both: `@click.command(cls=Command)` makes Click's own usage errors (a bad option value, an
unknown option) one line; `@friendly_errors` does the same for everything the command raises.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from gpt.errors import UserError
from gpt.store import quiet_client_retries


class Command(click.Command):
    """A Click command whose usage errors are one line, `error: ...`, like every other error (exit 2)."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            click.echo(f"error: {exc.format_message()} (see --help)", err=True)
            sys.exit(exc.exit_code)


def one_line(text: str, limit: int = 300) -> str:
    """The first line of a message, cut to `limit` characters: library errors can run to pages."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a Click command body: UserError -> 'error: ...' and its exit code; no traceback unless --debug."""

    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        quiet_client_retries()
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines about creating tables
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            if debug:
                raise
            click.echo(f"error: {one_line(str(exc), 1000)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug or an environment failure: one line, and how to see more
            if debug:
                raise
            click.echo(
                f"error: {type(exc).__name__}: {one_line(str(exc))} (run again with --debug for the traceback)",
                err=True,
            )
            sys.exit(1)

    return click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")(wrapper)

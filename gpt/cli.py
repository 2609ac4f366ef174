"""What the three scripts share: turning user mistakes into one-line errors and exit codes."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from gpt.errors import UserError
from gpt.tracking import quiet_client_retries


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a Click command body: UserError -> 'error: ...' and exit 2; no traceback unless --debug."""

    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        quiet_client_retries()
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines about creating tables
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug or an environment failure: one line, and how to see more
            if debug:
                raise
            click.echo(f"error: {type(exc).__name__}: {exc} (run again with --debug for the traceback)", err=True)
            sys.exit(1)

    return click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")(wrapper)

"""What the three scripts share: their common options, and user mistakes turned into one-line errors.

Use both: `@click.command(cls=Command)` makes Click's own usage errors (a bad option value, an
unknown option) one line; `@friendly_errors` does the same for everything the command raises, after
checking the environment variables (gpt.env). This module imports nothing heavy, so that `--help`
and a mistake in the options answer at once; the scripts import torch and MLflow only to do the work.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from gpt import env
from gpt.errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class FiniteFloat(click.FloatRange):
    """A number option that must be finite (NaN and infinities are refused, as Click's FloatRange lets
    NaN through every bound) and, optionally, within a range: FloatRange's min, max, min_open, max_open."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The value as a float; a usage error (exit 2) for text, NaN, infinities and values out of range."""
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class UserPath(click.Path):
    """click.Path with `~` expanded as a shell expands it (a quoted `~` or `--opt=~/x` arrives unexpanded),
    so that every path option reads `~` and relative paths the same way: home, and the working directory."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The expanded path, checked by click.Path (a file where a folder is wanted, and so on)."""
        if isinstance(value, str):
            value = os.path.expanduser(value)
        return super().convert(value, param, ctx)


# The options of the same name in train.py, generate.py and ablate.py, defined once.
tracking_uri_option = click.option(
    "--tracking-uri",
    help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db: mlruns/ in the "
    "working directory); a sqlite:/// path may start with ~ or be relative to the working directory.",
)
tokenizer_file_option = click.option(
    "--tokenizer-file",
    type=UserPath(dir_okay=False),
    help="Local GPT-2 ranks file, for use offline (default $GPT_TIKTOKEN_FILE, else download once).",
)


def creatable_folder(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback: a folder option (--cache-dir, --out-dir, --log-dir) that names a folder we can write in
    or can create (gpt.env.check_folder), else a usage error, so that it fails before any work starts."""
    if value is not None:
        name = max(param.opts, key=len)  # the long name, as check_folder names its source
        try:
            env.check_folder(Path(value), name)
        except UserError as exc:  # Click names the option already
            raise click.BadParameter(str(exc).replace(f" set by {name}", "", 1)) from None
    return value


cache_dir_option = click.option(
    "--cache-dir",
    type=UserPath(file_okay=False),
    callback=creatable_folder,
    help="Downloads, cleaned texts and token caches (default $GPT_CACHE_DIR, else ~/.cache/gpt-mlflow).",
)
device_option = click.option(
    "--device", type=click.Choice(["auto", "cuda", "mps", "cpu"]), help="Where to run (default auto)."
)


@contextlib.contextmanager
def one_line_usage() -> Iterator[None]:
    """Click's usage errors raised in the block as one line, `error: ...`, like every other error; exit 2."""
    try:
        yield
    except click.UsageError as exc:
        click.echo(f"error: {exc.format_message()} (see --help)", err=True)
        sys.exit(exc.exit_code)


class Command(click.Command):
    """A Click command whose usage errors are one line, `error: ...`, like every other error (exit 2)."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        """Click's context, or a one-line usage error and exit 2."""
        with one_line_usage():
            return super().make_context(info_name, args, parent, **extra)


class Group(click.Group):
    """A Click group (ablate.py) whose subcommands are Commands, and whose own usage errors (an unknown
    subcommand) are one line too."""

    command_class = Command

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        """Click's context, or a one-line usage error and exit 2."""
        with one_line_usage():
            return super().make_context(info_name, args, parent, **extra)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[Any, Any, list[str]]:
        """(name, subcommand, remaining args), or a one-line usage error and exit 2."""
        with one_line_usage():
            return super().resolve_command(ctx, args)


def one_line(text: str, limit: int = 300) -> str:
    """The first line of a message, cut to `limit` characters: library errors can run to pages."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a Click command body after checking the environment: UserError -> 'error: ...' and its exit
    code; Ctrl-C -> exit 130; anything else -> one line and exit 1. --debug shows tracebacks instead."""

    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        env.quiet_mlflow_client()
        try:
            env.check()
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
            if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:  # only a name the user gave runs so long
                click.echo(f"error: {exc.strerror}: {one_line(str(exc.filename), 1000)}", err=True)
                sys.exit(UserError.exit_code)
            click.echo(
                f"error: {type(exc).__name__}: {one_line(str(exc))} (run again with --debug for the traceback)",
                err=True,
            )
            sys.exit(1)

    return click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")(wrapper)

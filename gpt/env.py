"""The environment variables the tool reads, read and checked in one place, before any work starts.

- MLFLOW_TRACKING_URI: the tracking store when --tracking-uri is not given (default sqlite:///mlruns/mlflow.db)
- GPT_TIKTOKEN_FILE: a local GPT-2 ranks file (offline) when --tokenizer-file is not given (default: download once)
- GPT_CACHE_DIR: downloads, cleaned texts and token caches when --cache-dir is not given (~/.cache/gpt-mlflow)
- GPT_GUTENBERG_URL: where gutenberg:<id> is downloaded from, with {id} for the book number (a mirror)
- GPT_TRACKING_TIMEOUT: seconds a finished run waits for a slow or absent tracking server (default 120)
- MLFLOW_ALLOW_FILE_STORE: true accepts MLflow's retired plain-folder store

`check()` validates every one of them, so a bad value fails at start-up (exit 2) rather than after
hours of training. This module imports nothing heavy: the scripts call it before torch or MLflow load.
"""

from __future__ import annotations

import errno
import math
import os
import urllib.parse
from pathlib import Path

from gpt.errors import UserError, check_file, what_is

TRACKING_URI = "MLFLOW_TRACKING_URI"
TIKTOKEN_FILE = "GPT_TIKTOKEN_FILE"
CACHE_DIR = "GPT_CACHE_DIR"
GUTENBERG_URL = "GPT_GUTENBERG_URL"
TRACKING_TIMEOUT = "GPT_TRACKING_TIMEOUT"
ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"

DEFAULT_GUTENBERG_URL = "https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt"
DEFAULT_TRACKING_TIMEOUT = 120.0  # seconds


def _get(name: str) -> str | None:
    """The variable's value with surrounding spaces removed; None when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value or None


def tracking_uri() -> str | None:
    """$MLFLOW_TRACKING_URI, or None."""
    return _get(TRACKING_URI)


def tiktoken_file() -> str | None:
    """$GPT_TIKTOKEN_FILE (a local GPT-2 ranks file), or None."""
    return _get(TIKTOKEN_FILE)


def cache_dir() -> Path:
    """Where downloads, cleaned texts and token caches go: $GPT_CACHE_DIR, else ~/.cache/gpt-mlflow."""
    value = _get(CACHE_DIR)
    return Path(value).expanduser().absolute() if value else Path.home() / ".cache" / "gpt-mlflow"


def gutenberg_url() -> str:
    """The download address of gutenberg:<id> books, with {id} where the book number goes."""
    return _get(GUTENBERG_URL) or DEFAULT_GUTENBERG_URL


def tracking_timeout() -> float:
    """Seconds a finished run waits for its tracking data to be delivered ($GPT_TRACKING_TIMEOUT).

    Raises UserError for a value that is not a finite number of seconds, 0 or more.
    """
    text = _get(TRACKING_TIMEOUT)
    if text is None:
        return DEFAULT_TRACKING_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{TRACKING_TIMEOUT} must be a number of seconds (0 or more), got {text!r}")
    return value


def allow_file_store() -> bool:
    """Whether MLflow's retired plain-folder store is accepted ($MLFLOW_ALLOW_FILE_STORE=true)."""
    return (_get(ALLOW_FILE_STORE) or "").lower() == "true"


def check() -> None:
    """Validate every variable above; raise UserError naming the first bad one."""
    tracking_timeout()
    url = gutenberg_url()
    if "{id}" not in url:
        raise UserError(f"{GUTENBERG_URL} must contain {{id}} where the book number goes, got {url!r}")
    if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):  # urllib's "unknown url type"
        raise UserError(f"{GUTENBERG_URL} must be an http://, https:// or file:// address, got {url!r}")
    ranks = tiktoken_file()
    if ranks is not None:
        missing = f"{TIKTOKEN_FILE} names no file: {ranks} (a gpt2.tiktoken ranks file)"
        check_file(Path(ranks).expanduser(), f"{TIKTOKEN_FILE}:", missing)
    folder = _get(CACHE_DIR)
    if folder is not None:
        check_folder(Path(folder).expanduser(), CACHE_DIR)


def check_folder(path: Path, source: str) -> Path:
    """path, if it is a folder we can write in or can be created as one; UserError naming `source` (the option
    or variable that set it) otherwise: a file, device, pipe or broken symbolic link at the path or above it,
    a read-only or virtual file system (/proc), no permission.
    Folders created to find out are removed again: bad input elsewhere must leave nothing behind."""
    # mkdir's own errors say 'File exists' for /dev/null and 'Not a directory' for file.txt/sub: name the obstacle
    try:
        blocker = next((folder for folder in (path, *path.parents) if folder.exists() or folder.is_symlink()), None)
        if blocker is not None and not blocker.is_dir():
            raise UserError(
                f"cannot create the folder {path} set by {source}: {'it' if blocker == path else blocker} is "
                f"{what_is(blocker)}; give a folder that exists or can be created"
            )
        missing = [folder for folder in (path, *path.parents) if not folder.exists()]
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only or virtual file system, a name too long
        raise UserError(
            f"cannot create the folder {path} set by {source}: {_refusal(exc, 'folders')}; "
            "give a folder that exists or can be created"
        ) from None
    writable = os.access(path, os.W_OK | os.X_OK)  # asked before the folders made to find out are gone
    for folder in missing:  # deepest first
        folder.rmdir()
    if not writable:
        raise UserError(f"cannot write in the folder {path} set by {source}: no permission; give a folder of yours")
    return path


def _refusal(exc: OSError, what: str) -> str:
    """Why creating `what` ("files", "folders") failed. ENOENT once the folder above exists (made with
    parents=True, or checked) means a virtual file system such as /proc: 'No such file or directory' would mislead."""
    return f"the file system there takes no new {what}" if exc.errno == errno.ENOENT else exc.strerror or str(exc)


def check_output_file(path: Path, source: str) -> Path:
    """path, if a file can be written there: a regular file (to be replaced) or nothing yet, in a folder that
    exists or can be created (check_folder). UserError naming `source` otherwise: writing to a device or pipe
    would throw the text away or hang, a broken symbolic link would create a file elsewhere, and a folder
    may refuse new files (/proc). A file created to find out is removed again."""
    if (path.is_symlink() and not path.exists()) or (path.exists() and not path.is_file()):
        raise UserError(f"{source} {path} is {what_is(path)}; give a regular file or a new file's path")
    check_folder(path.parent, source)
    if path.parent.is_dir() and not path.exists():  # a folder can hold no new file: /proc, a full quota...
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except OSError as exc:
            raise UserError(
                f"cannot create the file {path} set by {source}: {_refusal(exc, 'files')}; give a path in a "
                "folder that takes new files"
            ) from None
        path.unlink()
    elif path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"cannot write the file {path} set by {source}: no permission; give a file of yours")
    return path


def quiet_mlflow_client() -> None:
    """Settings for MLflow's client, made before it loads.

    MLflow retries a dead server for minutes per call; our own sender retries instead. Its own run
    links open the GenAI view; ours open the model-training view.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not its INFO lines about creating tables

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

import math
import os
import urllib.parse
from pathlib import Path

from gpt.errors import UserError, check_file

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
    """path, if it is a folder or can be created as one; UserError naming `source` (the option or variable
    that set it) otherwise (a parent that is a file, a read-only or virtual file system, no permission).
    Folders created to find out are removed again: bad input elsewhere must leave nothing behind."""
    try:
        missing = [folder for folder in (path, *path.parents) if not folder.exists()]
        if path.exists() and not path.is_dir():  # mkdir would say only "File exists"
            raise UserError(f"{path} set by {source} is not a folder")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on the way, a read-only or virtual file system, a name too long
        raise UserError(f"cannot create the folder {path} set by {source}: {exc.strerror or exc}") from None
    for folder in missing:  # deepest first
        folder.rmdir()
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

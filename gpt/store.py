"""Where runs go: tracking URIs, the MLflow client, experiments, file locks and retries.

The default store is SQLite beside the project (sqlite:///mlruns/mlflow.db); $MLFLOW_TRACKING_URI or
--tracking-uri (a team's `mlflow server`) takes over. Every check here runs before a run is created,
so an unusable store fails in seconds with one line.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import requests
import sqlalchemy.exc
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gpt import env
from gpt.errors import UserError, check_file

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs and stores are then not guarded
    fcntl = None  # type: ignore[assignment]

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
PARAM_LIMIT = 6000  # MLflow's maximum length of a param value
SQLITE_MAGIC = b"SQLite format 3\x00"
# MLflow error codes that mean "try again later"; a locked SQLite file arrives as TEMPORARILY_UNAVAILABLE
TRANSIENT_CODES = {
    "TEMPORARILY_UNAVAILABLE",
    "SERVICE_UNDER_MAINTENANCE",
    "RESOURCE_EXHAUSTED",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
}
_OUTAGE = re.compile(
    r"database is locked|database table is locked|connection refused|connection reset|connection aborted|"
    r"max retries exceeded|timed out|remote end closed|broken pipe|error code 50[234]\b",
    re.IGNORECASE,
)
T = TypeVar("T")


class TrackingUnavailable(UserError):
    """The tracking store kept failing: what it is missing stays in a local spool, to replay later."""

    exit_code = 4


def resolve_tracking_uri(cli_uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store under ./mlruns.

    A SQLite URI comes back absolute (`~` expanded, a relative path taken from the working directory),
    so that MLflow, the artifacts, the spool and every message name the same file.
    """
    return absolute_uri(cli_uri or env.tracking_uri() or DEFAULT_TRACKING_URI)


def default_store_note(cli_uri: str | None) -> str:
    """Where an unknown run or a missing store was looked for, when neither --tracking-uri nor
    $MLFLOW_TRACKING_URI chose the store: the default depends on the working directory."""
    if cli_uri or env.tracking_uri():
        return ""
    return " (the default store, mlruns/ in the working directory; run from the folder you trained in)"


def absolute_uri(uri: str) -> str:
    """A SQLite URI that no longer depends on the current directory (others are returned as they are)."""
    path = sqlite_path(uri)
    return f"sqlite:///{path}" if path is not None else uri


def is_remote(uri: str) -> bool:
    """Whether the tracking URI is an HTTP(S) server."""
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def check_tracking_uri(uri: str, timeout: float = 5.0, *, write: bool = True, ask_server: bool = True) -> bool:
    """Fail within seconds, before anything is read, trained or created, when the store cannot be used.

    The one check of a store for every script. write: the caller creates runs, and a new SQLite store with its
    folders: the place must take them. Otherwise the caller only reads, and nothing may be created or changed.
    ask_server: False leaves an http(s) server unasked (a Slurm script's nodes may reach one this machine cannot).

    Returns whether there is a store to read: False for a SQLite file that is missing or empty (a writer
    creates the store there; a reader has nothing to read, see require_store), True otherwise.
    Raises UserError for an unreachable or refusing server, an unknown scheme, MLflow's retired file store,
    an in-memory SQLite store, and a SQLite path that cannot be a store (see _check_sqlite_file).
    """
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        if ask_server:
            _check_server(uri, timeout)
    elif scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            _refuse_sqlite_uri(uri)
        return _check_sqlite_file(uri, path, write)
    elif scheme in ("", "file"):
        if not env.allow_file_store():
            raise UserError(
                f"tracking URI {uri!r} is a plain folder (MLflow's retired file store); "
                f"use {DEFAULT_TRACKING_URI} or an http:// server"
            )
    elif scheme not in ("postgresql", "mysql", "mssql", "databricks") and "+" not in scheme:
        raise UserError(f"tracking URI {uri!r}: unknown scheme {scheme!r}; use sqlite:///... or http://...")
    return True


def require_store(uri: str, fix: str, timeout: float = 5.0) -> None:
    """For commands that only read a store: check_tracking_uri, and a UserError when a SQLite store is missing
    or empty, "no MLflow store at <file><fix>" (fix: what to do, with its own leading punctuation).

    MLflow would create (or fill an empty file with) a new store just to find nothing in it, so a reader
    stops here instead. Raises UserError as check_tracking_uri does for a store that cannot be used.
    """
    if check_tracking_uri(uri, timeout, write=False):
        return
    path = sqlite_path(uri)
    empty = " (an empty file)" if path is not None and path.exists() else ""
    raise UserError(f"no MLflow store at {path}{empty}{fix}")


def _refuse_sqlite_uri(uri: str) -> NoReturn:
    """A sqlite: URI that names no file: SQLAlchemy keeps sqlite://, sqlite:/// and sqlite:///:memory: in memory,
    so a run would go into a store that vanishes with the process, and a reader would find nothing."""
    tail = uri[len("sqlite:") :].lstrip("/")
    if tail in ("", ":memory:"):
        raise UserError(
            f"tracking store {uri!r} is an in-memory SQLite database, gone when the process ends: runs need a store "
            f"on disk; give sqlite:///PATH to a database file (e.g. {DEFAULT_TRACKING_URI}) or an http:// server"
        )
    raise UserError(f"tracking store {uri!r} names no database file; give sqlite:///PATH, e.g. {DEFAULT_TRACKING_URI}")


def _check_server(uri: str, timeout: float) -> None:
    """/health (no sign-in needed), then one signed-in read, so that wrong credentials fail here, not mid-run.

    The read goes through MLflow's own request helper with MLflow's own credentials (MLFLOW_TRACKING_USERNAME
    and MLFLOW_TRACKING_PASSWORD or ~/.mlflow/credentials, as `mlflow server --app-name basic-auth`
    wants; MLFLOW_TRACKING_TOKEN; TLS settings), exactly what the client will send.
    """
    from mlflow.utils.credentials import get_default_host_creds, read_mlflow_creds
    from mlflow.utils.rest_utils import http_request

    unreachable = f"tracking server {uri} is not reachable ({{}}); start it or choose another --tracking-uri"
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
        answer = http_request(
            get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
            max_retries=0, timeout=timeout, raise_on_status=False, params={"max_results": 1},
        )  # fmt: skip
    except (urllib.error.URLError, TimeoutError, OSError, requests.RequestException) as exc:
        raise UserError(unreachable.format(getattr(exc, "reason", exc))) from None
    if answer.status_code in (401, 403):  # other answers are left to the MLflow client
        user = read_mlflow_creds().username
        who = f"user {user!r} and its password" if user else "no credentials"
        raise UserError(
            f"tracking server {uri} refused {who} (HTTP {answer.status_code}); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD to an account of that server"
        )


def _check_sqlite_file(uri: str, path: Path, write: bool) -> bool:
    """Whether `path` holds a SQLite database (False: missing or empty); UserError when it cannot be the store.

    Refused: a folder, device, pipe or socket (MLflow waits on a pipe for minutes and fails late on a
    device, leaving a lock file beside it); a file that is not SQLite; and, for a writer, a file or a
    folder that cannot be written or created. The check creates nothing that stays.
    """
    where = f"tracking store {uri}:"
    if path.exists():
        want = f"a database file in it, e.g. sqlite:///{path}/mlflow.db" if path.is_dir() else "a database file"
        check_file(path, where, want=want)
        try:
            with open(path, "rb") as handle:
                head = handle.read(len(SQLITE_MAGIC))
        except OSError as exc:
            raise UserError(f"{where} cannot read {path} ({exc.strerror})") from None
        if head and head != SQLITE_MAGIC:
            instead = "an MLflow store's file or a new path" if write else "an MLflow store's file"
            raise UserError(f"{where} {path} is not a SQLite database; give {instead}")
        if write and not os.access(path, os.W_OK):
            raise UserError(f"{where} {path} is read-only; make it writable or give another store")
        if write:
            _check_folder(f"{where} cannot write the store {path}, as SQLite keeps its journal beside it:", path.parent)
        return bool(head)
    if write:
        ancestor = path.parent  # created when the store is opened
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        _check_folder(f"{where} cannot create {path}:", ancestor)
    return False


def _check_folder(cannot: str, folder: Path) -> None:
    """UserError (starting with `cannot`) unless `folder` takes new entries: a new store's folders and file,
    or SQLite's journal.

    Only trying tells: root passes every access check, yet /proc refuses to make anything. The probe
    folder is removed at once.
    """
    if not folder.is_dir():
        raise UserError(f"{cannot} {folder} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".store-check-", dir=folder))
    except OSError as exc:
        raise UserError(
            f"{cannot} {folder} takes no new files ({exc.strerror}); give a path in a writable folder"
        ) from None


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: a locked SQLite file, a server that is down, restarting or overloaded."""
    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_CODES or bool(_OUTAGE.search(str(exc)))
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlite3.OperationalError)):
        return "locked" in str(exc).lower() or "busy" in str(exc).lower()
    # artifact uploads go through requests directly; a missing file or a denied folder is not transient
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


def with_retries(call: Callable[[], T], attempts: int = 8, first_wait: float = 0.2) -> T:
    """Run a tracking call, retrying transient failures with exponential back-off."""
    wait = first_wait
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            time.sleep(wait)
            wait = min(wait * 2, 10.0)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive advisory lock on `path` for the block; yields False if non-blocking and taken."""
    if fcntl is None:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def run_lock(folder: Path, run_id: str) -> Iterator[None]:
    """Only one process at a time may train or replay a run (on this machine)."""
    with file_lock(folder / "lock", blocking=False) as taken:
        if not taken:
            raise UserError(
                f"run {run_id} is in use by another process on this machine ({folder / 'lock'} is locked); "
                "wait for it to end or stop it first"
            )
        yield


def open_client(uri: str) -> MlflowClient:
    """A client whose store is ready to use.

    MLflow creates a new SQLite store's tables on first use without a lock, so two trainings that
    start together on a new file both run the migrations, and one fails. They take turns here.
    """
    path = sqlite_path(uri)
    if path is None:
        return MlflowClient(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(f".{path.name}.lock")):
        return MlflowClient(uri)  # MLflow opens (and migrates) the store right here


def sqlite_path(tracking_uri: str) -> Path | None:
    """The file of a SQLite store as an absolute path, or None for other stores (and in-memory SQLite).

    The one place a sqlite:/// URI is taken apart: every reader of the store's location goes through it.
    Symbolic links are followed (a moved store may be linked to). Raises UserError for a loop of links.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///") :]
    if not path or path == ":memory:":
        return None
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError for a loop, later ones OSError
        raise UserError(f"tracking store {tracking_uri}: {path} cannot be followed ({exc})") from None


def sqlite_folder(tracking_uri: str) -> Path | None:
    """The folder holding a SQLite store's file, or None for other stores."""
    path = sqlite_path(tracking_uri)
    return path.parent if path else None


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Beside a SQLite file, artifacts go next to it (MLflow's default is relative to the cwd)."""
    folder = sqlite_folder(tracking_uri)
    if folder is None:
        return None  # a server or database store knows its own artifact root
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (folder / "artifacts" / slug).as_uri()


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id, created if needed and tagged to open in the UI's model-training view.

    Raises UserError for a deleted experiment.
    """
    experiment = with_retries(lambda: client.get_experiment_by_name(name))
    if experiment is None:
        location = artifact_location(client.tracking_uri, name)
        try:
            experiment_id = with_retries(lambda: client.create_experiment(name, artifact_location=location))
        except MlflowException:  # another process created it between our two calls
            experiment_id = with_retries(lambda: client.get_experiment_by_name(name)).experiment_id
    else:
        if experiment.lifecycle_stage == "deleted":
            raise UserError(f"experiment {name!r} is deleted; restore it in MLflow or choose another --experiment")
        experiment_id = experiment.experiment_id
        if experiment.tags.get(EXPERIMENT_KIND_TAG[0]) == EXPERIMENT_KIND_TAG[1]:
            return experiment_id
    # MLflow 3 opens an experiment on its GenAI pages unless it is marked as model training.
    try:
        with_retries(lambda: client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND_TAG))
    except MlflowException:  # two processes tagging a new experiment at once: one insert loses
        tags = with_retries(lambda: client.get_experiment(experiment_id)).tags
        if tags.get(EXPERIMENT_KIND_TAG[0]) != EXPERIMENT_KIND_TAG[1]:
            raise
    return experiment_id


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder behind a run's artifact URI when it is on this machine, else None."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(artifact_uri)
    return None


def ui_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A link that opens the run in the UI's model-training view."""
    base = tracking_uri.rstrip("/") if is_remote(tracking_uri) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def flatten_params(params: dict[str, Any]) -> list[Param]:
    """MLflow Params, values cut to MLflow's 6,000-character limit."""
    return [Param(key, str(value)[:PARAM_LIMIT]) for key, value in params.items()]

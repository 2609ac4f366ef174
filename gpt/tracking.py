"""MLflow: where runs go, and a tracker that never stalls or loses a training run.

Every metric batch, param set, tag and artifact is first appended (and fsynced) to a spool file in
the run's local folder, then delivered by a background thread. Training never waits on the network:
a tracking server that goes away mid-run only delays delivery, and a run that dies leaves a spool
that `python train.py --replay DIR` sends.
Delivery is idempotent: MLflow drops a metric point identical to one it holds (key, step, value,
timestamp), params may be sent again with the same value and artifacts overwrite, so an item whose
acknowledgement was lost is simply sent again.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import requests
import sqlalchemy.exc
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gpt.errors import UserError
from gpt.plots import loss_curve

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs and stores are then not guarded
    fcntl = None  # type: ignore[assignment]

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
PARAM_LIMIT = 6000  # MLflow's maximum length of a param value
CLOSE_TIMEOUT_ENV = "GPT_TRACKING_TIMEOUT"  # seconds a finished run waits for its tracking data to be delivered
DEFAULT_CLOSE_TIMEOUT = 120.0
CLOSING_RETRY_S = 2.0  # once a run has ended, how often delivery is retried while close() waits
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
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store under ./mlruns."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def absolute_uri(uri: str) -> str:
    """A SQLite URI that no longer depends on the current directory (others are returned as they are)."""
    path = sqlite_path(uri)
    return f"sqlite:///{path}" if path is not None and not uri.endswith(":memory:") else uri


def is_remote(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def quiet_client_retries() -> None:
    """MLflow retries a dead server for minutes per call; our own sender retries instead."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow prints its own run links when a run ends; ours open the UI's model-training view
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail within seconds, before any training, when the store cannot be used."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                response.read()
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(
                f"tracking server {uri} is not reachable ({reason}); start it or choose another --tracking-uri"
            ) from None
    elif scheme == "sqlite":
        path = uri.split(":///", 1)[-1]
        if path and path != ":memory:":
            _check_sqlite_file(uri, Path(path).expanduser())
    elif scheme in ("", "file"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise UserError(
                f"tracking URI {uri!r} is a plain folder (MLflow's retired file store); "
                f"use {DEFAULT_TRACKING_URI} or an http:// server"
            )
    elif scheme not in ("postgresql", "mysql", "mssql", "databricks") and "+" not in scheme:
        raise UserError(f"tracking URI {uri!r}: unknown scheme {scheme!r}; use sqlite:///... or http://...")


def _check_sqlite_file(uri: str, path: Path) -> None:
    if path.is_dir():
        raise UserError(f"tracking store {uri}: {path} is a folder; name the database file, e.g. {path}/mlflow.db")
    if path.is_file():
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
        if head and head != SQLITE_MAGIC:
            raise UserError(f"tracking store {uri}: {path} is not a SQLite database")
        return
    ancestor = path.parent  # created when the store is opened: a check writes nothing
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"tracking store {uri}: cannot create {path} ({ancestor} is not a writable folder)")


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
    """The file of a SQLite store, or None for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///") :]).expanduser().resolve()


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
    return [Param(key, str(value)[:PARAM_LIMIT]) for key, value in params.items()]


def close_timeout() -> float:
    """$GPT_TRACKING_TIMEOUT, else DEFAULT_CLOSE_TIMEOUT seconds."""
    text = os.environ.get(CLOSE_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_CLOSE_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise UserError(f"{CLOSE_TIMEOUT_ENV} must be a number of seconds (0 or more), got {text!r}")
    return value


class Spool:
    """An append-only journal of tracking calls, numbered by `seq`, plus the last seq delivered."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.journal = folder / "spool.jsonl"
        self.delivered_file = folder / "spool.delivered"
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._repair()
        self.last_seq = max((item["seq"] for item in self.items()), default=0)

    def _repair(self) -> None:
        """Cut a line torn by a crash mid-append, so that later appends start a line of their own."""
        if not self.journal.is_file():
            return
        data = self.journal.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with open(self.journal, "r+b") as handle:
                handle.truncate(keep)
                os.fsync(handle.fileno())

    def add(self, item: dict[str, Any]) -> dict[str, Any]:
        """Number the item, append it durably, and return it numbered."""
        with self._lock:
            item = {"seq": self.last_seq + 1, **item}
            line = json.dumps(item) + "\n"
            with open(self.journal, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            self.last_seq += 1
        return item

    def items(self) -> list[dict[str, Any]]:
        if not self.journal.is_file():
            return []
        items = []
        for line in self.journal.read_text(encoding="utf-8").splitlines():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError:  # only a damaged disk gets here: keep what can be read
                continue
        return items

    def pending(self) -> list[dict[str, Any]]:
        delivered = self.delivered()
        return [item for item in self.items() if item["seq"] > delivered]

    def delivered(self) -> int:
        try:
            return int(self.delivered_file.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def mark_delivered(self, seq: int) -> None:
        partial = self.delivered_file.with_suffix(".tmp")
        partial.write_text(str(seq))
        os.replace(partial, self.delivered_file)

    def last_steps(self, keys: Iterable[str]) -> dict[str, int]:
        """The highest step spooled for each metric key (0 when none)."""
        last = dict.fromkeys(keys, 0)
        for item in self.items():
            if item["kind"] == "metrics":
                for key, _, step, _ in item["points"]:
                    if key in last:
                        last[key] = max(last[key], step)
        return last


def deliver(client: MlflowClient, run_id: str, item: dict[str, Any], local_dir: Path) -> None:
    """Send one spooled item to MLflow (raises on failure; the caller retries)."""
    kind = item["kind"]
    if kind == "metrics":
        metrics = [Metric(k, v, ts, step) for k, v, step, ts in item["points"]]
        for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics per call
            client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)
    elif kind == "params":
        params = flatten_params(item["params"])
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100], synchronous=True)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in item["tags"].items()], synchronous=True)
    elif kind == "artifact":
        if Path(item["path"]).exists():  # a file removed by hand, or already sent and cleared, is skipped
            client.log_artifact(run_id, item["path"], item.get("artifact_path"))
    elif kind == "plot":  # drawn here, off the training thread, from the latest history
        history_file = local_dir / "history.json"
        if history_file.is_file():
            history = json.loads(history_file.read_text(encoding="utf-8"))
            with tempfile.TemporaryDirectory() as folder:
                path = loss_curve(history, Path(folder) / item["file"], title=item.get("title", ""))
                client.log_artifact(run_id, str(path), item["artifact_path"])
    elif kind == "end":
        client.set_terminated(run_id, item["status"])
    else:
        raise ValueError(f"unknown spool item {kind!r}")


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


class Tracker:
    """A run's tracking: spool to disk first, deliver in the background, never block training."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        local_dir: Path,
        retry_wait: float = 1.0,
        warn: Callable[[str], None] = _warn,
    ):
        self.client, self.run_id, self.local_dir = client, run_id, local_dir
        self.spool = Spool(local_dir)
        self._outbox = local_dir / "outbox"
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._retry_wait, self._warn = retry_wait, warn
        self._closing = threading.Event()
        self._abandoned = threading.Event()
        self._closed = False
        self.last_error: str | None = None
        for item in self.spool.pending():  # left by an earlier process of this run
            if item["kind"] != "end":  # that process ended the run; this one is continuing it
                self._queue.put(item)
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    # -- what training calls; each returns at once

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.log_points([(key, float(value), step, now) for key, value in values.items()])

    def log_points(self, points: list[tuple[str, float, int, int]]) -> None:
        """(key, value, step, timestamp_ms) tuples, sent as one batch."""
        if points:
            self._put({"kind": "metrics", "points": points})

    def log_params(self, params: dict[str, Any]) -> None:
        self._put({"kind": "params", "params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_file(self, path: Path, artifact_path: str | None, snapshot: bool = True) -> None:
        """Upload a file. With snapshot, a copy is queued so later rewrites of `path` don't race."""
        if snapshot:
            target = self._staged(path.name)
            shutil.copy2(path, target)
            path = target
        self._put({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        target = self._staged(Path(artifact_file).name)
        target.write_text(text, encoding="utf-8")
        folder = str(Path(artifact_file).parent)
        self._put({"kind": "artifact", "path": str(target), "artifact_path": None if folder == "." else folder})

    def log_loss_curve(self, history: list[dict], title: str) -> None:
        """The plot is drawn by the sender from history.json: the spool stays small however long the run."""
        target = self.local_dir / "history.json"
        partial = target.with_suffix(".tmp")
        partial.write_text(json.dumps(history), encoding="utf-8")
        os.replace(partial, target)
        self._put({"kind": "plot", "file": "loss_curve.png", "artifact_path": "plots", "title": title})

    def pending(self) -> int:
        return self.spool.last_seq - self.spool.delivered()

    def close(
        self, status: str = "FINISHED", timeout: float | None = None, notify: Callable[[str], None] = _warn
    ) -> bool:
        """End the run and wait up to `timeout` s (default: close_timeout()) for delivery.

        Returns True when everything was delivered; False leaves a spool for `train.py --replay`.
        """
        timeout = close_timeout() if timeout is None else timeout
        if not self._closed:
            self._closed = True
            self._put({"kind": "end", "status": status})
            self._queue.put(None)
            self._closing.set()  # the sender stops backing off and retries every CLOSING_RETRY_S
        deadline = time.monotonic() + timeout
        self._thread.join(min(timeout, CLOSING_RETRY_S))
        if self._thread.is_alive() and deadline > time.monotonic():
            reason = f" (last error: {self.last_error})" if self.last_error else ""
            notify(
                f"waiting up to {timeout:.0f} s for the tracking server to take {self.pending()} "
                f"pending items{reason}; Ctrl-C stops waiting"
            )
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandoned.set()  # the spool keeps the rest; don't retry in the background for ever
        return not self._thread.is_alive() and self.pending() == 0

    # -- the sender thread

    def _staged(self, name: str) -> Path:
        """A fresh outbox folder per file: a later file of the same name can't overwrite one being sent."""
        folder = self._outbox / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder / name

    def _put(self, item: dict[str, Any]) -> None:
        self._queue.put(self.spool.add(item))

    def _send_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or not self._send(item):
                return
            self.spool.mark_delivered(item["seq"])
            clear_staged(item, self.local_dir)

    def _send(self, item: dict[str, Any]) -> bool:
        """Deliver one item, retrying while the store is down; False once close() gave up waiting."""
        wait = self._retry_wait
        while not self._abandoned.is_set():
            try:
                deliver(self.client, self.run_id, item, self.local_dir)
                self.last_error = None
                return True
            except Exception as exc:  # keep training alive whatever the server answers
                self.last_error = _one_line(exc)
                if not is_transient(exc):  # it would fail the same way forever: report it, keep the rest
                    self._warn(f"warning: MLflow refused a {item['kind']} item of run {self.run_id}: {self.last_error}")
                    return True
                if self._closing.is_set():
                    self._abandoned.wait(min(wait, CLOSING_RETRY_S))
                else:
                    self._closing.wait(wait)  # close() cuts a long back-off short
                wait = min(wait * 2, 30.0)
        return False


def clear_staged(item: dict[str, Any], local_dir: Path) -> None:
    """Remove a delivered artifact's outbox copy (files logged in place are left alone)."""
    staged = Path(item.get("path", ""))
    if item["kind"] == "artifact" and staged.parent.parent == local_dir / "outbox":
        shutil.rmtree(staged.parent, ignore_errors=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def replay(local_dir: Path, tracking_uri: str | None = None) -> tuple[str, int, str | None]:
    """Deliver what a run's spool still holds, and end the run if its process died without ending it.

    Returns (run_id, items sent, status set or None). The tracking URI defaults to the run's own.
    """
    meta_file = local_dir / "run.json"
    if not local_dir.is_dir():
        raise UserError(f"--replay {local_dir}: no such folder (give the folder a failed run named)")
    if not meta_file.is_file():
        raise UserError(f"{local_dir} holds no run spool (run.json is missing)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        run_id = meta["run_id"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{meta_file} is not a run file of this tool") from None
    uri = tracking_uri or meta.get("tracking_uri") or resolve_tracking_uri()
    check_tracking_uri(uri)
    with run_lock(local_dir, run_id):
        spool = Spool(local_dir)
        items = spool.items()
        if not items:
            raise UserError(f"{local_dir}: the spool is empty; there is nothing to replay")
        if items[-1]["kind"] != "end":  # the process died mid-run: the run failed
            spool.add({"kind": "end", "status": "FAILED"})
        pending = spool.pending()
        client = open_client(uri)
        status = None
        for item in pending:
            last = item["seq"] == spool.last_seq
            if item["kind"] != "end" or last:  # an end followed by more items was undone by a resume
                _replay_one(client, run_id, item, local_dir)
                status = item["status"] if item["kind"] == "end" else status
            spool.mark_delivered(item["seq"])
            clear_staged(item, local_dir)
    return run_id, len(pending), status


def _replay_one(client: MlflowClient, run_id: str, item: dict[str, Any], local_dir: Path) -> None:
    try:
        with_retries(lambda: deliver(client, run_id, item, local_dir), attempts=5)
    except Exception as exc:
        if is_transient(exc):
            raise TrackingUnavailable(
                f"the tracking store failed while replaying item {item['seq']} ({_one_line(exc)}); "
                "what was sent is remembered: run the same command again later"
            ) from None
        _warn(f"warning: MLflow refused a {item['kind']} item of run {run_id}: {_one_line(exc)}")

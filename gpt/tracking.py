"""MLflow: where runs go, and a tracker that never stalls or loses a training run.

Every metric batch, tag and artifact is first appended to a spool file in the run's local folder,
then delivered by a background thread. Training never waits on HTTP: a tracking server that goes
away mid-run only delays delivery, and a run that dies leaves a spool that `train.py replay` sends.
Delivery is idempotent: MLflow drops a metric point identical to one it holds (key, step, value,
timestamp), so a point whose acknowledgement was lost can be re-sent safely.
"""

from __future__ import annotations

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
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy.exc
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gpt.errors import UserError
from gpt.plots import loss_curve

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
PARAM_LIMIT = 6000  # MLflow's maximum length of a param value
T = TypeVar("T")


def resolve_tracking_uri(cli_uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the embedded SQLite store under ./mlruns."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def is_remote(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def quiet_client_retries() -> None:
    """MLflow retries a dead server for minutes per call; our own sender retries instead."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


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
            try:
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"tracking store {uri}: cannot create its folder ({exc.strerror})") from None
    elif scheme in ("", "file"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise UserError(
                f"tracking URI {uri!r} is a plain folder (MLflow's retired file store); "
                f"use {DEFAULT_TRACKING_URI} or an http:// server"
            )
    elif scheme not in ("postgresql", "mysql", "mssql", "databricks") and "+" not in scheme:
        raise UserError(f"tracking URI {uri!r}: unknown scheme {scheme!r}; use sqlite:///... or http://...")


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: a locked SQLite file, a server that is down or restarting."""
    text = str(exc).lower()
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlite3.OperationalError)):
        return "locked" in text or "busy" in text
    if isinstance(exc, MlflowException):
        return any(s in text for s in ("locked", "connection", "max retries", "timed out", "503", "502", "504"))
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


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


def sqlite_folder(tracking_uri: str) -> Path | None:
    """The folder holding a SQLite store's file, or None for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///") :]).expanduser().resolve().parent


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
            experiment_id = client.get_experiment_by_name(name).experiment_id
    else:
        if experiment.lifecycle_stage == "deleted":
            raise UserError(f"experiment {name!r} is deleted; restore it in MLflow or choose another --experiment")
        experiment_id = experiment.experiment_id
    # MLflow 3 opens an experiment on its GenAI pages unless it is marked as model training.
    with_retries(lambda: client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND_TAG))
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


class Spool:
    """An append-only journal of tracking calls plus the count already delivered."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.journal = folder / "spool.jsonl"
        self.delivered_file = folder / "spool.delivered"
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, item: dict[str, Any]) -> None:
        line = json.dumps(item) + "\n"
        with self._lock, open(self.journal, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def items(self) -> list[dict[str, Any]]:
        if not self.journal.is_file():
            return []
        items = []
        for line in self.journal.read_text(encoding="utf-8").splitlines():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a crash mid-write: nothing after it was acked
                break
        return items

    def delivered(self) -> int:
        try:
            return int(self.delivered_file.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def mark_delivered(self, count: int) -> None:
        partial = self.delivered_file.with_suffix(".tmp")
        partial.write_text(str(count))
        os.replace(partial, self.delivered_file)


def deliver(client: MlflowClient, run_id: str, item: dict[str, Any]) -> None:
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
        if Path(item["path"]).exists():  # a snapshot removed by hand is skipped, not retried forever
            client.log_artifact(run_id, item["path"], item.get("artifact_path"))
    elif kind == "plot":  # drawn here, off the training thread; the history travels in the spool
        with tempfile.TemporaryDirectory() as folder:
            path = loss_curve(item["history"], Path(folder) / item["file"], title=item.get("title", ""))
            client.log_artifact(run_id, str(path), item["artifact_path"])
    elif kind == "end":
        client.set_terminated(run_id, item["status"])
    else:
        raise ValueError(f"unknown spool item {kind!r}")


class Tracker:
    """A run's tracking: spool to disk first, deliver in the background, never block training."""

    def __init__(self, client: MlflowClient, run_id: str, local_dir: Path, retry_wait: float = 1.0):
        self.client, self.run_id, self.local_dir = client, run_id, local_dir
        self.spool = Spool(local_dir)
        self._sequence = len(self.spool.items())
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._retry_wait = retry_wait
        self._snapshots = local_dir / "artifacts"
        self.last_error: str | None = None
        for item in self.spool.items()[self.spool.delivered() :]:  # left over from an earlier process
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
            target = self._snapshots / (artifact_path or "") / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            path = target
        self._put({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        target = self._snapshots / artifact_file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        folder = str(Path(artifact_file).parent)
        self._put({"kind": "artifact", "path": str(target), "artifact_path": None if folder == "." else folder})

    def log_loss_curve(self, history: list[dict], title: str) -> None:
        item = {"kind": "plot", "history": history, "file": "loss_curve.png", "artifact_path": "plots"}
        self._put({**item, "title": title})

    def pending(self) -> int:
        return self._sequence - self.spool.delivered()

    def close(self, status: str = "FINISHED", timeout: float = 120.0) -> bool:
        """Queue the run's end and wait up to `timeout` s for delivery; False leaves a spool to replay."""
        self._put({"kind": "end", "status": status})
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive() and self.pending() == 0

    # -- the sender thread

    def _put(self, item: dict[str, Any]) -> None:
        self._sequence += 1
        item = {"seq": self._sequence, **item}
        self.spool.append(item)
        self._queue.put(item)

    def _send_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            wait = self._retry_wait
            while True:
                try:
                    deliver(self.client, self.run_id, item)
                    self.last_error = None
                    break
                except Exception as exc:  # keep training alive whatever the server answers
                    self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                    if not is_transient(exc):  # it would fail the same way forever: report it, keep the rest
                        print(f"warning: MLflow refused a {item['kind']} item: {self.last_error}", file=sys.stderr)
                        break
                    time.sleep(wait)
                    wait = min(wait * 2, 30.0)
            self.spool.mark_delivered(item["seq"])


def replay(local_dir: Path, tracking_uri: str) -> int:
    """Deliver what a dead run's spool still holds; returns the number of items sent."""
    spool = Spool(local_dir)
    meta_file = local_dir / "run.json"
    if not meta_file.is_file():
        raise UserError(f"{local_dir} holds no run spool (run.json is missing)")
    run_id = json.loads(meta_file.read_text())["run_id"]
    client = MlflowClient(tracking_uri)
    items = spool.items()
    start = spool.delivered()
    for item in items[start:]:
        with_retries(lambda item=item: deliver(client, run_id, item), attempts=5)
        spool.mark_delivered(item["seq"])
    if not any(item["kind"] == "end" for item in items):
        with_retries(lambda: client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED)))
    return len(items) - start

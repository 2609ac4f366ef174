"""A tracker that never stalls or loses a training run.

Every metric batch, param set, tag and artifact is first appended (and fsynced) to a spool file in
the run's local folder, then delivered by a background thread. Training never waits on the network:
a tracking server that goes away mid-run only delays delivery, and a run that dies leaves a spool
that `python train.py --replay DIR` sends.
Delivery is idempotent: MLflow drops a metric point identical to one it holds (key, step, value,
timestamp), params may be sent again with the same value and artifacts overwrite, so an item whose
acknowledgement was lost is simply sent again.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from gpt import env
from gpt.delivery import deliver_datasets, deliver_model
from gpt.errors import UserError
from gpt.plots import loss_curve
from gpt.runs import check_run_store
from gpt.store import (
    TrackingUnavailable,
    check_tracking_uri,
    flatten_params,
    is_transient,
    open_client,
    resolve_tracking_uri,
    run_lock,
    sqlite_path,
    with_retries,
)

CLOSING_RETRY_S = 2.0  # once a run has ended, how often delivery is retried while close() waits


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
        """Every readable spooled item, in order (lines a damaged disk garbled are skipped)."""
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
        """The spooled items not delivered yet."""
        delivered = self.delivered()
        return [item for item in self.items() if item["seq"] > delivered]

    def delivered(self) -> int:
        """The seq of the last item delivered (0: none)."""
        try:
            return int(self.delivered_file.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def mark_delivered(self, seq: int) -> None:
        """Record (atomically) that every item up to seq was delivered."""
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
    elif kind == "datasets":
        deliver_datasets(client, run_id, item["inputs"])
    elif kind == "model":  # an MLflow Model folder: logged (and registered) step by step, resumably
        deliver_model(client, run_id, item, local_dir)
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
        self.before_close: list[Callable[[], None]] = []  # producers to stop before the run ends (system metrics)
        self.last_error: str | None = None
        for item in self.spool.pending():  # left by an earlier process of this run
            if item["kind"] != "end":  # that process ended the run; this one is continuing it
                self._queue.put(item)
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    # -- what training calls; each returns at once

    def log_points(self, points: list[tuple[str, float, int, int]]) -> None:
        """(key, value, step, timestamp_ms) tuples, sent as one batch."""
        if points:
            self._put({"kind": "metrics", "points": points})

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Run tags, values as strings (the run's description: gpt.run_summary; a resume's new plan: gpt.job)."""
        self._put({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_params(self, params: dict[str, Any]) -> None:
        """Params, values as strings (MLflow's params are write-once)."""
        self._put({"kind": "params", "params": {k: str(v) for k, v in params.items()}})

    def log_file(self, path: Path, artifact_path: str | None, snapshot: bool = True) -> None:
        """Upload a file. With snapshot, a copy is queued so later rewrites of `path` don't race."""
        if snapshot:
            target = self._staged(path.name)
            shutil.copy2(path, target)
            path = target
        self._put({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact, e.g. samples/epoch_001.txt (staged in the outbox, then uploaded)."""
        target = self._staged(Path(artifact_file).name)
        target.write_text(text, encoding="utf-8")
        folder = str(Path(artifact_file).parent)
        self._put({"kind": "artifact", "path": str(target), "artifact_path": None if folder == "." else folder})

    def log_datasets(self, records: list[dict[str, Any]]) -> None:
        """Dataset inputs as gpt.datasets.dataset_records() makes them."""
        if records:
            self._put({"kind": "datasets", "inputs": records})

    def log_model(self, folder: Path, register_as: str | None, step: int) -> None:
        """An MLflow Model folder (in staging_path()) to log as the run's model at `step`, and to register."""
        self._put({"kind": "model", "path": str(folder), "register": register_as, "step": step})

    def staging_path(self, name: str) -> Path:
        """A fresh path in the run's outbox for a file or folder to spool; it is removed once delivered."""
        return self._staged(name)

    def log_loss_curve(self, history: list[dict], title: str) -> None:
        """The plot is drawn by the sender from history.json: the spool stays small however long the run."""
        target = self.local_dir / "history.json"
        partial = target.with_suffix(".tmp")
        partial.write_text(json.dumps(history), encoding="utf-8")
        os.replace(partial, target)
        self._put({"kind": "plot", "file": "loss_curve.png", "artifact_path": "plots", "title": title})

    def pending(self) -> int:
        """Items spooled but not delivered yet."""
        return self.spool.last_seq - self.spool.delivered()

    def close(
        self, status: str = "FINISHED", timeout: float | None = None, notify: Callable[[str], None] = _warn
    ) -> bool:
        """End the run and wait up to `timeout` s (default: $GPT_TRACKING_TIMEOUT, gpt.env) for delivery.

        Returns True when everything was delivered; False leaves a spool for `train.py --replay`.
        """
        timeout = env.tracking_timeout() if timeout is None else timeout
        if not self._closed:
            self._closed = True
            for stop in self.before_close:
                stop()
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
    """Remove a delivered artifact's or model's outbox copy (files logged in place are left alone)."""
    staged = Path(item.get("path", ""))
    if item["kind"] in ("artifact", "model") and staged.parent.parent == local_dir / "outbox":
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
    with run_lock(local_dir, run_id):
        uri = replay_store(local_dir, tracking_uri, meta.get("tracking_uri"))
        check_tracking_uri(uri)
        if sqlite_path(uri) is not None:  # the run must be there, and its artifacts where MLflow recorded them
            check_run_store(run_id, uri, "replaying")
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


def replay_store(local_dir: Path, tracking_uri: str | None, recorded: str | None) -> str:
    """The store a spool is replayed into: --tracking-uri, else the run's own (recorded), else the default.

    Replay never creates a store: a SQLite store must exist. When the run's own is gone and a store of
    that name sits above the spool (a spool lives in <store folder>/local/<run_id>), the store moved
    with its spool, and that one is used. Raises UserError naming the missing store.
    """
    uri = resolve_tracking_uri(tracking_uri or recorded)
    store = sqlite_path(uri)
    if store is None or store.is_file():
        return uri
    moved = local_dir.resolve().parent.parent / store.name
    if tracking_uri is None and moved.is_file():
        return f"sqlite:///{moved}"
    raise UserError(
        f"no MLflow store at {store}: --replay sends a run's spool to the store that holds the run; "
        "pass that store's --tracking-uri"
    )


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

"""A tracker that never stalls or loses a training run.

Every metric batch, param set, tag and artifact is first appended (and fsynced) to a spool file in
the run's local folder, then delivered by a background thread. Training never waits on the network:
a tracking server that goes away mid-run only delays delivery, and a run that dies leaves a spool
that `python train.py --replay DIR` sends.
Delivery is idempotent: MLflow drops a metric point identical to one it holds (key, step, value,
timestamp), params may be sent again with the same value and artifacts overwrite, so an item whose
acknowledgement was lost is simply sent again.

Disks fail too. A store whose disk is full or read-only is retried like a server that is down (the
cause reported once, in one line); a spool whose own disk refuses a write raises gpt.errors.DiskFault
in the training thread, which stops training. Lines of the spool a damaged disk garbled are skipped
and counted; everything readable is delivered once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from gpt import env
from gpt.delivery import deliver_datasets, deliver_model
from gpt.errors import DiskFault, UserError, disk_fault, writing
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
    """An append-only journal of tracking calls, numbered by `seq`, plus the last seq delivered.

    Lines a damaged disk garbled (invalid UTF-8, broken JSON) are skipped and counted in `unreadable`;
    everything readable is kept. A full or read-only disk raises gpt.errors.DiskFault naming the file.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.journal = folder / "spool.jsonl"
        self.delivered_file = folder / "spool.delivered"
        with writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.unreadable = 0  # lines of the journal that could not be read, at the last items()
        self._repair()
        self.last_seq = max((item["seq"] for item in self.items()), default=0)
        self._delivered = 0  # what this process delivered, even when the disk refused to record it

    def _repair(self) -> None:
        """Cut a line torn by a crash mid-append, so that later appends start a line of their own."""
        if not self.journal.is_file():
            return
        data = self.journal.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with writing(self.journal), open(self.journal, "r+b") as handle:
                handle.truncate(keep)
                os.fsync(handle.fileno())

    def add(self, item: dict[str, Any]) -> dict[str, Any]:
        """Number the item, append it durably, and return it numbered (DiskFault: the disk refused it)."""
        with self._lock:
            item = {"seq": self.last_seq + 1, **item}
            line = json.dumps(item) + "\n"
            with writing(self.journal), open(self.journal, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            self.last_seq += 1
        return item

    def items(self) -> list[dict[str, Any]]:
        """Every readable spooled item, in order; unreadable lines are skipped and counted in `unreadable`."""
        if not self.journal.is_file():
            return []
        items, unreadable = [], 0
        for line in self.journal.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)  # bytes: invalid UTF-8 raises UnicodeDecodeError, a ValueError
            except ValueError:
                item = None
            if isinstance(item, dict) and isinstance(item.get("seq"), int) and isinstance(item.get("kind"), str):
                items.append(item)
            else:
                unreadable += 1
        self.unreadable = unreadable
        return items

    def pending(self) -> list[dict[str, Any]]:
        """The spooled items not delivered yet."""
        delivered = self.delivered()
        return [item for item in self.items() if item["seq"] > delivered]

    def delivered(self) -> int:
        """The seq of the last item delivered (0: none)."""
        try:
            recorded = int(self.delivered_file.read_text().strip() or 0)
        except (OSError, ValueError):
            recorded = 0
        return max(recorded, self._delivered)

    def mark_delivered(self, seq: int) -> None:
        """Record (atomically) that every item up to seq was delivered.

        Raises DiskFault when the disk refuses the record; this process still counts the items as
        delivered, and a later replay sends them again, which MLflow takes as a no-op.
        """
        self._delivered = max(self._delivered, seq)
        partial = self.delivered_file.with_suffix(".tmp")
        with writing(self.delivered_file):
            partial.write_text(str(seq))
            os.replace(partial, self.delivered_file)

    def last_steps(self, keys: Iterable[str]) -> dict[str, int]:
        """The highest step spooled for each metric key (0 when none)."""
        last = dict.fromkeys(keys, 0)
        for key, step, _ in self.points(last):
            last[key] = max(last[key], step)
        return last

    def points(self, keys: Iterable[str]) -> set[tuple[str, int, float]]:
        """(key, step, value) of every spooled point of these metric keys."""
        keys = set(keys)
        return {
            (key, step, value)
            for item in self.items()
            if item["kind"] == "metrics"
            for key, value, step, _ in item["points"]
            if key in keys
        }


Sender = Callable[[MlflowClient, str, dict[str, Any], Path], None]


def _send_metrics(client: MlflowClient, run_id: str, item: dict[str, Any], local_dir: Path) -> None:
    metrics = [Metric(k, v, ts, step) for k, v, step, ts in item["points"]]
    for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics per call
        client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)


def _send_params(client: MlflowClient, run_id: str, item: dict[str, Any], local_dir: Path) -> None:
    params = flatten_params(item["params"])
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100], synchronous=True)


def _send_tags(client: MlflowClient, run_id: str, item: dict[str, Any], local_dir: Path) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in item["tags"].items()], synchronous=True)


def _send_artifact(client: MlflowClient, run_id: str, item: dict[str, Any], local_dir: Path) -> None:
    if Path(item["path"]).exists():  # a file removed by hand, or already sent and cleared, is skipped
        client.log_artifact(run_id, item["path"], item.get("artifact_path"))


def _send_plot(client: MlflowClient, run_id: str, item: dict[str, Any], local_dir: Path) -> None:
    """Drawn here, off the training thread, from the latest history."""
    history_file = local_dir / "history.json"
    if history_file.is_file():
        history = json.loads(history_file.read_text(encoding="utf-8"))
        with tempfile.TemporaryDirectory() as folder:
            path = loss_curve(history, Path(folder) / item["file"], title=item.get("title", ""))
            client.log_artifact(run_id, str(path), item["artifact_path"])


def _send_status(client: MlflowClient, run_id: str, item: dict[str, Any], local_dir: Path) -> None:
    """A process took the run up again (a resume): RUNNING until its own end comes."""
    client.update_run(run_id, status=item["status"])


def _send_datasets(client: MlflowClient, run_id: str, item: dict[str, Any], local_dir: Path) -> None:
    deliver_datasets(client, run_id, item["inputs"])


def _send_model(client: MlflowClient, run_id: str, item: dict[str, Any], local_dir: Path) -> None:
    """An MLflow Model folder: logged (and registered) step by step, resumably (gpt.delivery)."""
    deliver_model(client, run_id, item, local_dir)


def _send_end(client: MlflowClient, run_id: str, item: dict[str, Any], local_dir: Path) -> None:
    client.set_terminated(run_id, item["status"])


# How each kind of spooled item reaches MLflow. A new kind is a function above and a line here.
SENDERS: dict[str, Sender] = {
    "metrics": _send_metrics,
    "params": _send_params,
    "tags": _send_tags,
    "artifact": _send_artifact,
    "plot": _send_plot,
    "datasets": _send_datasets,
    "model": _send_model,
    "status": _send_status,
    "end": _send_end,
}


def deliver(client: MlflowClient, run_id: str, item: dict[str, Any], local_dir: Path) -> None:
    """Send one spooled item to MLflow (raises on failure; the caller retries)."""
    sender = SENDERS.get(item["kind"])
    if sender is None:
        raise ValueError(f"unknown spool item {item['kind']!r}")
    sender(client, run_id, item, local_dir)


_STORE_FULL = re.compile(r"database or disk is full", re.IGNORECASE)
_STORE_READ_ONLY = re.compile(r"readonly database|read-only database", re.IGNORECASE)


def store_fault(exc: BaseException, store: str) -> DiskFault | None:
    """Whether the store refused a write because a disk is full or read-only (worth retrying once the
    user makes room), as one line naming the cause; None for any other failure.

    A local store reports its own disk as an OSError (artifacts) or a SQLite error (runs and metrics).
    """
    fault = disk_fault(exc, store)
    if fault is not None:
        return fault
    text = str(exc)
    if _STORE_FULL.search(text):
        return DiskFault(f"disk full: the tracking store {store} cannot grow (database or disk is full)", store)
    if _STORE_READ_ONLY.search(text):
        return DiskFault(f"read-only: the tracking store {store} cannot be written (read-only database)", store)
    return None


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


class Tracker:
    """A run's tracking: spool to disk first, deliver in the background, never block training.

    The sender thread never dies: a store that is down, full or read-only is retried (each cause
    reported once, in one line) while the items wait in the spool; an item the store refuses for good
    is reported and skipped. Training's own calls raise gpt.errors.DiskFault when the spool's disk
    refuses a write: the caller stops training (gpt.tracked_run).
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        local_dir: Path,
        retry_wait: float = 1.0,
        warn: Callable[[str], None] = _warn,
    ):
        """Reads $GPT_TRACKING_TIMEOUT now, so that close() cannot fail on it after training."""
        self.client, self.run_id, self.local_dir = client, run_id, local_dir
        self.timeout = env.tracking_timeout()
        uri = getattr(client, "tracking_uri", None)
        uri = uri if isinstance(uri, str) else "the tracking store"
        self.store = str(sqlite_path(uri) or uri)  # named in messages about a full or read-only store
        # the sender reports the store's failures in one line; MLflow would log each with a traceback
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        self._retry_wait, self._warn = retry_wait, warn
        self._reported: set[str] = set()
        self.spool = Spool(local_dir)
        self._outbox = local_dir / "outbox"
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._closing = threading.Event()
        self._abandoned = threading.Event()
        self._closed = False
        self.before_close: list[Callable[[], None]] = []  # producers to stop before the run ends (system metrics)
        self.end_unspooled = self._end_sent = False  # close() could not spool the end: it is sent from memory
        self.last_error: str | None = None
        pending = self.spool.pending()
        if self.spool.unreadable:
            self.report(
                f"warning: {lines(self.spool.unreadable, 'unreadable line')} of {self.spool.journal} "
                "skipped (damaged on disk); everything else is delivered"
            )
        for item in pending:  # left by an earlier process of this run
            if item["kind"] != "end":  # that process ended the run; this one is continuing it
                self._queue.put(item)
        if self.spool.last_seq:  # an earlier process spooled this run: a replay must know a new one took over
            self._put({"kind": "status", "status": "RUNNING"})
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    # -- what training calls; each returns at once (or raises DiskFault when the spool cannot be written)

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
            with writing(target):
                shutil.copy2(path, target)
            path = target
        self._put({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact, e.g. samples/epoch_001.txt (staged in the outbox, then uploaded)."""
        target = self._staged(Path(artifact_file).name)
        with writing(target):
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
        with writing(target):
            partial.write_text(json.dumps(history), encoding="utf-8")
            os.replace(partial, target)
        self._put({"kind": "plot", "file": "loss_curve.png", "artifact_path": "plots", "title": title})

    def pending(self) -> int:
        """Items spooled but not delivered yet (and an end close() could not spool, until it is sent)."""
        return self.spool.last_seq - self.spool.delivered() + (self.end_unspooled and not self._end_sent)

    def report(self, line: str) -> None:
        """Warn once per distinct line: a store that stays full must not print a line per retry."""
        if line not in self._reported:
            self._reported.add(line)
            self._warn(line)

    def close(
        self, status: str = "FINISHED", timeout: float | None = None, notify: Callable[[str], None] = _warn
    ) -> bool:
        """End the run and wait up to `timeout` s (default: $GPT_TRACKING_TIMEOUT, gpt.env) for delivery.

        Returns True when everything was delivered; False leaves a spool for `train.py --replay`. When the
        spool's disk refuses the end itself, the end is sent from memory all the same.
        """
        timeout = self.timeout if timeout is None else timeout
        if not self._closed:
            self._closed = True
            for stop in self.before_close:  # producers that spool a last item (system metrics, description)
                try:
                    stop()
                except DiskFault as fault:
                    notify(f"warning: the run's last readings could not be spooled ({fault})")
            end = {"kind": "end", "status": status}
            try:
                self._put(end)
            except DiskFault as fault:
                notify(f"warning: the run's end could not be spooled ({fault}); it is sent directly")
                self.end_unspooled = True
                self._queue.put({"seq": 0, **end})
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
        with writing(folder):
            folder.mkdir(parents=True)
        return folder / name

    def _put(self, item: dict[str, Any]) -> None:
        self._queue.put(self.spool.add(item))

    def _send_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or not self._send(item):
                return
            self._end_sent = self._end_sent or not item["seq"]
            try:
                if item["seq"]:
                    self.spool.mark_delivered(item["seq"])
                clear_staged(item, self.local_dir)
            except DiskFault as fault:  # delivered all the same: a replay would only send it again
                self.report(f"warning: cannot record what was delivered ({fault}); delivery goes on")
            except Exception as exc:  # the thread must live on: the spool still holds everything
                self.report(f"warning: after delivering item {item['seq']}: {_one_line(exc)}")

    def _send(self, item: dict[str, Any]) -> bool:
        """Deliver one item, retrying while the store is down, full or read-only; False once close() gave up."""
        wait = self._retry_wait
        while not self._abandoned.is_set():
            try:
                deliver(self.client, self.run_id, item, self.local_dir)
                self.last_error = None
                return True
            except Exception as exc:  # keep training alive whatever the server answers
                fault = store_fault(exc, self.store)
                self.last_error = str(fault) if fault else _one_line(exc)
                if fault is not None:  # a full or read-only disk: keep the item until the user makes room
                    self.report(
                        f"warning: run {self.run_id}'s tracking waits in its spool: {fault}; delivery is retried"
                    )
                elif not is_transient(exc):  # it would fail the same way forever: report it, keep the rest
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


def lines(count: int, what: str) -> str:
    """'1 unreadable line', '2 unreadable lines'."""
    return f"{count} {what}{'' if count == 1 else 's'}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


class Ending(NamedTuple):
    """How to end a run whose last process died without ending it: its final status and the metric
    points (key, value, step, timestamp_ms) it still lacks (a completed run's summary)."""

    status: str
    points: list[tuple[str, float, int, int]] = []


class Replayed(NamedTuple):
    """What a replay did: the run, the items it sent, the status it set (None: the run was ended
    already) and the spool lines it could not read."""

    run_id: str
    sent: int
    status: str | None
    unreadable: int = 0


def write_run_record(local_dir: Path, record: dict[str, Any]) -> None:
    """Write a run's run.json atomically: run_id and tracking_uri (what a replay needs), and what else
    the job records (config, data: what a restart needs)."""
    target = local_dir / "run.json"
    partial = target.with_suffix(".tmp")
    with writing(target):
        local_dir.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(record), encoding="utf-8")
        os.replace(partial, target)


def run_meta(local_dir: Path) -> tuple[str, str | None, dict[str, Any]]:
    """(run id, tracking URI or None, the whole record) of a run's local folder (its run.json)."""
    meta_file = local_dir / "run.json"
    if not os.path.isdir(local_dir):  # False, not an error, for a name too long
        what = "is not a folder" if os.path.lexists(local_dir) else "no such folder"
        raise UserError(f"--replay {local_dir}: {what} (give the folder a failed run named)")
    if not meta_file.is_file():
        raise UserError(f"{local_dir} holds no run spool (run.json is missing)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        return meta["run_id"], meta.get("tracking_uri"), meta
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{meta_file} is not a run file of this tool") from None


def replay(
    local_dir: Path,
    tracking_uri: str | None = None,
    ending: Callable[[MlflowClient, str], Ending] | None = None,
    always_end: bool = False,
) -> Replayed:
    """Deliver what a run's spool still holds, and end the run if its process died without ending it.

    ending(client, run_id): how such a run ends (default FAILED); with always_end the run ends that
    way even when its spool ended it already (a completed run that --resume finishes). The tracking
    URI defaults to the run's own. Unreadable spool lines are skipped and counted.
    """
    run_id, own_uri, _ = run_meta(local_dir)
    with run_lock(local_dir, run_id):
        uri = replay_store(local_dir, tracking_uri, own_uri)
        check_tracking_uri(uri)
        if sqlite_path(uri) is not None:  # the run must be there, and its artifacts where MLflow recorded them
            check_run_store(run_id, uri, "replaying")
        spool = Spool(local_dir)
        items = spool.items()
        client = open_client(uri)
        if always_end or not items or items[-1]["kind"] != "end":  # the process died mid-run
            end = ending(client, run_id) if ending else Ending("FAILED")
            if end.points:
                spool.add({"kind": "metrics", "points": end.points})
            spool.add({"kind": "end", "status": end.status})
        pending = spool.pending()
        status = None
        for item in pending:
            last = item["seq"] == spool.last_seq
            if item["kind"] != "end" or last:  # an end followed by more items was undone by a resume
                _replay_one(client, run_id, item, local_dir, uri)
                status = item["status"] if item["kind"] == "end" else status
            spool.mark_delivered(item["seq"])
            clear_staged(item, local_dir)
    return Replayed(run_id, len(pending), status, spool.unreadable)


def replay_store(local_dir: Path, tracking_uri: str | None, recorded: str | None) -> str:
    """The store a spool is replayed into: --tracking-uri, else the run's own (recorded), else the default.

    Replay never creates a store: a SQLite store must exist. When the run's own is gone and a store of
    that name sits above the spool (a spool lives in <store folder>/local/<run_id>), the store moved
    with its spool, and that one is used. Raises UserError naming the missing store.
    """
    uri = resolve_tracking_uri(tracking_uri or recorded)
    store = sqlite_path(uri)
    if store is None or check_tracking_uri(uri, write=False):  # also names a folder, pipe or device there
        return uri
    moved = local_dir.resolve().parent.parent / store.name
    if tracking_uri is None and moved.is_file():
        return f"sqlite:///{moved}"
    raise UserError(
        f"no MLflow store at {store}: --replay sends a run's spool to the store that holds the run; "
        "pass that store's --tracking-uri"
    )


def _replay_one(client: MlflowClient, run_id: str, item: dict[str, Any], local_dir: Path, uri: str) -> None:
    try:
        with_retries(lambda: deliver(client, run_id, item, local_dir), attempts=5)
    except Exception as exc:
        fault = store_fault(exc, str(sqlite_path(uri) or uri))
        if is_transient(exc) or fault is not None:
            raise TrackingUnavailable(
                f"the tracking store failed while replaying item {item['seq']} ({fault or _one_line(exc)}); "
                "what was sent is remembered: run the same command again later"
            ) from None
        _warn(f"warning: MLflow refused a {item['kind']} item of run {run_id}: {_one_line(exc)}")

"""MLflow's system metrics (CPU, memory, disk, network, GPU), sampled on a thread and sent through the spool.

MLflow's SystemMetricsMonitor gathers the readings (its CPU, disk and network monitors, and the NVIDIA
or AMD GPU monitor when nvidia-ml-py or pyrsmi is installed) under the names the UI's System
metrics tab charts: `system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes`,
`system/gpu_0_utilization_percentage`... Its own thread, though, logs straight to the server and
stops for good at the first failed request. Here only its monitors are used: this thread takes a
reading every interval and hands it to the run's Tracker, so the readings are spooled like every
other metric, never block training and survive a tracking outage.

Steps count readings from 0 (a resumed run continues after the last one in its spool).
$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL (seconds) and $MLFLOW_SYSTEM_METRICS_NODE_ID work as in MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING

from gpt.errors import DiskFault

if TYPE_CHECKING:
    from gpt.tracking import Tracker

SAMPLING_INTERVAL_S = 10.0
PREFIX = "system/"


class SystemMetrics:
    """Readings of MLflow's system monitors every `interval_s`, spooled by `tracker`; stop() ends them."""

    def __init__(self, tracker: Tracker, interval_s: float = SAMPLING_INTERVAL_S):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # MLflow logs at INFO which GPU library it could not find; that is no news on a CPU machine
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self.tracker = tracker
        # constructed for its monitors and settings only; its own thread (start()) is never started
        # (its batch logger opens a client: on the run's own store, never MLflow's default ./mlflow.db)
        uri = tracker.client.tracking_uri
        self.monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=interval_s, tracking_uri=uri)
        self.prefix = PREFIX + (f"{self.monitor.node_id}/" if self.monitor.node_id else "")
        self.step = self.first_step = next_step(tracker)
        self.last_reading = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)
        self._thread.start()

    def _clear(self) -> None:
        for monitor in self.monitor.monitors:
            monitor.clear_metrics()

    def _run(self) -> None:
        """Readings until stop(), then a last one (skipped within a second of the previous: psutil's CPU
        share over a few clock ticks is 0 or 100 %), so that even a run shorter than the interval has one."""
        # psutil keeps the CPU counters of cpu_percent() per thread, and its first answer is always 0 %
        with contextlib.suppress(Exception):  # a monitor that fails here fails in sample(), which says so
            self.monitor.collect_metrics()
            self._clear()
        self.last_reading = time.monotonic()
        while not self._stop.wait(float(self.monitor.sampling_interval)):
            self.sample()
        if self.step == self.first_step or time.monotonic() - self.last_reading >= 1.0:
            self.sample()

    def sample(self) -> None:
        """Take one reading and spool it (a reading that fails is skipped: monitoring never stops training)."""
        try:
            self.monitor.collect_metrics()
            values = self.monitor.aggregate_metrics()
            self._clear()
        except Exception as exc:  # a GPU that vanished, a psutil error: skip this reading
            logging.getLogger(__name__).warning("system metrics reading failed: %s", exc)
            return
        now = int(time.time() * 1000)
        points = [(self.prefix + key, float(value), self.step, now) for key, value in values.items()]
        try:
            self.tracker.log_points(points)
        except DiskFault as fault:  # the spool's disk is full or read-only: training stops at its own next write
            self.tracker.report(f"warning: system metrics are not spooled ({fault})")
            return
        self.step += 1
        self.last_reading = time.monotonic()

    def stop(self) -> None:
        """End the readings (the thread spools its last one first)."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()


def next_step(tracker: Tracker) -> int:
    """The step after the last system reading in the run's spool (0 for a new run)."""
    steps = [
        step
        for item in tracker.spool.items()
        if item["kind"] == "metrics"
        for key, _, step, _ in item["points"]
        if key.startswith(PREFIX)
    ]
    return max(steps) + 1 if steps else 0


def start(tracker: Tracker, enabled: bool) -> SystemMetrics | None:
    """Start sampling for the run (when `enabled`, train.system_metrics); the tracker stops it at close()."""
    if not enabled:
        return None
    monitor = SystemMetrics(tracker)
    tracker.before_close.append(monitor.stop)
    return monitor

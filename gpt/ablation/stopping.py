"""Ctrl-C and SIGTERM during a grid: running cells checkpoint and end KILLED, no new cell starts.

In the grid's own process a cell trains under gpt.signals.StopOnSignal, which takes the signal while
the cell trains; GridStop takes it at any other moment. Worker processes live in their own process
groups, so a terminal's Ctrl-C reaches the grid's process only, and GridStop forwards each signal to
every worker once: a worker's training gets exactly one signal per key press (the first stops after
the step with a checkpoint, a second exits at once, as in train.py), and a `kill` of the grid's
process stops the workers too. Whatever process a signal reaches sets its `requested()` flag, which
run_cell checks before it claims or trains a cell.

A grid process killed outright (SIGKILL, the OOM killer) forwards nothing: each worker watches for its
parent's death (watch_parent) and then stops as if it got SIGTERM (its cell ends KILLED with a
checkpoint, and a re-run goes on from it) and exits once no cell is training, instead of training on
as an orphan and then waiting forever for work from a dead parent.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from gpt.signals import _notice as notice  # writes from a signal handler

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested = 0  # the first signal's number in this process, 0 until one arrives
_training = threading.Event()  # set while this process runs a cell (in_cell)
PARENT_POLL_S = 1.0


def requested() -> int:
    """The number of the signal that asked this process to stop (0: none)."""
    return _requested


def request(number: int) -> None:
    """Ask this process to stop, as if the signal `number` had arrived (a cell that ended KILLED)."""
    global _requested
    _requested = _requested or number


class GridStop:
    """Signal handlers of the grid's process while it runs cells (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.count = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> GridStop:
        global _requested
        _requested = 0  # a grid run earlier in this process (tests) must not stop this one
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._handle) for number in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: object) -> None:
        self.count += 1
        request(number)
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, number)
            except ProcessLookupError:
                pass
        if self.count == 1:
            notice(
                "\nstopping the grid: running cells stop after their step with a checkpoint and end KILLED, no new "
                "cell starts; press Ctrl-C again to stop at once\n"
            )
        else:
            raise KeyboardInterrupt


def worker_signals() -> None:
    """In a worker process: leave the terminal's process group, and turn a signal between cells into a stop request.

    While the worker trains a cell, StopOnSignal replaces this handler and stops the training itself.
    """
    os.setpgid(0, 0)
    for number in SIGNALS:
        signal.signal(number, lambda number, frame: request(number))
    watch_parent()


@contextmanager
def in_cell() -> Iterator[None]:
    """Mark this process as running a cell (watch_parent waits for it to end before exiting)."""
    _training.set()
    try:
        yield
    finally:
        _training.clear()


def run_in_cell(function: Callable[..., Any], *args: Any) -> Any:
    """function(*args) inside in_cell(): what a worker process runs for each cell."""
    with in_cell():
        return function(*args)


def watch_parent(poll_s: float = PARENT_POLL_S) -> None:
    """In a worker: once the grid's process is gone (re-parented worker), SIGTERM this process (the cell
    stops after its step with a checkpoint and ends KILLED) and exit when no cell is training."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(poll_s)  # the cell's own stop starts before the check below
        while _training.is_set():
            time.sleep(poll_s)
        os._exit(128 + signal.SIGTERM)  # the executor's queues belong to the dead parent: nothing to clean up

    threading.Thread(target=watch, name="grid-parent-watch", daemon=True).start()

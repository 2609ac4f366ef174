"""Ctrl-C and SIGTERM during training: stop after the current step, checkpoint, end the run KILLED.

A second signal exits at once (`forced`): whatever it interrupts, a checkpoint being written included,
is abandoned (the previous checkpoint stays whole, see gpt.checkpoint.save) and the run ends KILLED
with nothing more written. A signal that comes after the last training step (the final validation,
the final checkpoint) lets the run finish: there is nothing left to stop, and it says so.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Any

from gpt.trainer import Trainer

# Under torchrun a terminal's Ctrl-C (or a scheduler's signal to the job) reaches every rank, and torchrun
# forwards its own copy a moment later: a second signal this soon is the same request, not a second one.
FORWARDED_WITHIN_S = 5.0


def _notice(text: str) -> None:
    """Write from a signal handler: print() could re-enter a write the handler interrupted."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class StopOnSignal:
    """First Ctrl-C/SIGTERM asks the trainer to stop after the current step; a second exits at once.

    With `immediate` (set once training is over and only delivery is left) the first signal exits.
    Python runs signal handlers in the main thread only: in another thread (an ablation worker)
    this does nothing, and whoever runs the thread stops its trainer with `trainer.stop_requested`.
    """

    def __init__(self, trainer: Trainer):
        self.trainer, self.signal_number, self.immediate = trainer, 0, False
        self.forced = 0  # the exit code of a second signal, which exits at once (0: none came)
        self.last_signal = -math.inf
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    @property
    def exit_code(self) -> int:
        """128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + (self.signal_number or signal.SIGINT)  # a stop asked for in code counts as Ctrl-C

    def _handle(self, number: int, frame: object) -> None:
        now = time.monotonic()
        if self.trainer.ranks.active and now - self.last_signal < FORWARDED_WITHIN_S:
            return
        self.last_signal = now
        if self.signal_number or self.immediate:
            self.forced = 128 + number  # set first: torch turns the exit raised in a write into a RuntimeError
            raise SystemExit(128 + number)
        self.signal_number = number
        self.trainer.stop_requested = True
        if self.trainer.ranks.is_main:  # under torchrun every rank gets the signal; one line is enough
            _notice(f"\n{self.stop_notice()}; press Ctrl-C again to exit at once\n")

    @property
    def steps_left(self) -> bool:
        """Whether a training step is still to come (not so during the final validation and checkpoint)."""
        t = self.trainer
        return t.state.step < t.steps_per_epoch * t.cfg.train.epochs

    def stop_notice(self) -> str:
        """What the first signal does, as the user should read it."""
        if self.steps_left:
            return "stopping after this step to save a checkpoint"
        return "the last step is done: finishing the run (validation, checkpoint) rather than stopping it"

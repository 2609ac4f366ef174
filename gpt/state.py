"""Where a training run stands: the trainer's whole position, saved in every checkpoint.

A checkpoint taken between any two steps holds this state and the random generators' states, so a
resumed run sees the same batches and draws the same dropout masks, and its losses equal those of a
run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from gpt.errors import UserError


@dataclass
class TrainState:
    """The position of a training run. Epochs are 1-based when counted as done; losses are in nats."""

    epoch: int = 0  # finished epochs
    batch_in_epoch: int = 0  # batches of epoch+1 already done (non-zero only mid-epoch)
    step: int = 0  # optimizer steps so far
    tokens_seen: int = 0  # training target tokens so far
    wall_seconds: float = 0.0  # training + validation time so far, across resumes
    best_val_loss: float = math.inf
    best_epoch: int = 0
    epoch_losses: list[float] = field(default_factory=list)  # losses of the batches done this epoch (mid-epoch)
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch metrics, for plots

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what a weights_only checkpoint can hold)."""
        return dataclasses.asdict(self)  # a deep copy: a checkpoint must not change as training goes on

    @classmethod
    def from_dict(cls, values: Any, source: str) -> TrainState:
        """The state a checkpoint holds; raises UserError (naming `source`) for one of another version."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(values, dict):
            raise UserError(f"{source}: the training state is a {type(values).__name__}, not a mapping")
        missing, unknown = [n for n in names if n not in values], sorted(set(values) - set(names))
        if missing or unknown:
            raise UserError(
                f"{source}: the training state is not from this version of the tool "
                f"(missing {', '.join(missing) or 'nothing'}; unknown {', '.join(unknown) or 'nothing'})"
            )
        return cls(**values)

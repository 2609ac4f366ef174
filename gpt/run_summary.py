"""A run's summary at its end: best_val_loss and best_epoch metrics, and a one-line description.

The runs table sorts on the metrics; the description is MLflow's run note (tag mlflow.note.content),
which the run page shows as its Description, e.g.
  L2-H2-E32-ctx32-s32: 1.7M parameters (6.6 MB fp32); the_verdict (5,145 tokens: 4,631 train, 514 val);
  2 epochs; best val loss 6.123 (epoch 2), final 6.200
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpt.config import Config
    from gpt.data import Corpus
    from gpt.tracking import Tracker
    from gpt.trainer import TrainState

BEST_VAL_LOSS, BEST_EPOCH = "best_val_loss", "best_epoch"
NOTE_TAG = "mlflow.note.content"  # mlflow.utils.mlflow_tags.MLFLOW_RUN_NOTE


def final_val_loss(state: TrainState) -> float | None:
    """The last validation loss of the run's history, or None when it never validated."""
    return next((row["val_loss"] for row in reversed(state.history) if row.get("val_loss") is not None), None)


def describe_run(title: str, cfg: Config, n_params: int, corpus: Corpus, state: TrainState) -> str:
    """The one-line description: model size, data, epochs, best and final validation loss (nats)."""
    names = [Path(info["path"]).stem for info in corpus.files]
    more = ", ..." if len(names) > 3 else ""
    data = names[0] if len(names) == 1 else f"{len(names)} files ({', '.join(names[:3])}{more})"
    tokens = len(corpus.train) + len(corpus.val)
    planned = cfg.train.epochs
    epochs = f"{state.epoch} epochs" if state.epoch >= planned else f"{state.epoch} of {planned} epochs"
    parts = [
        f"{title}: {n_params / 1e6:,.1f}M parameters ({n_params * 4 / 2**20:,.1f} MB fp32)",
        f"{data} ({tokens:,} tokens: {len(corpus.train):,} train, {len(corpus.val):,} val)",
        epochs,
    ]
    final = final_val_loss(state)
    if state.best_epoch and math.isfinite(state.best_val_loss):
        parts.append(f"best val loss {state.best_val_loss:.4f} (epoch {state.best_epoch}), final {final:.4f}")
    return "; ".join(parts)


def log_summary(tracker: Tracker, title: str, cfg: Config, n_params: int, corpus: Corpus, state: TrainState) -> None:
    """Spool the run's description and, once it has validated, best_val_loss and best_epoch at its last epoch."""
    tracker.set_tags({NOTE_TAG: describe_run(title, cfg, n_params, corpus, state)})
    if state.best_epoch and math.isfinite(state.best_val_loss):
        tracker.log_metrics({BEST_VAL_LOSS: state.best_val_loss, BEST_EPOCH: state.best_epoch}, state.epoch)

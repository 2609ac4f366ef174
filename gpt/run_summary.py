"""A run's one-line description, spooled as it ends: MLflow's run note (tag mlflow.note.content).

The run page shows it as the run's Description, e.g.
  L2-H2-E32-ctx32-s32: 1.7M parameters (6.6 MB fp32); the_verdict (5,145 tokens: 4,631 train, 514 val);
  2 epochs; best val loss 6.1234 (epoch 2), final 6.2001
(best_val_loss and best_epoch, the metrics the runs table sorts on, are gpt.tracked_run's.)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from gpt.tracked_run import final_val_loss

if TYPE_CHECKING:
    from gpt.config import Config
    from gpt.data import Corpus
    from gpt.tracking import Tracker
    from gpt.trainer import Trainer

NOTE_TAG = "mlflow.note.content"  # mlflow.utils.mlflow_tags.MLFLOW_RUN_NOTE


def describe_run(title: str, cfg: Config, n_params: int, corpus: Corpus, trainer: Trainer) -> str:
    """The one-line description: model size, data, epochs, best and final validation loss (nats)."""
    state = trainer.state
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
    final = final_val_loss(trainer)
    if state.best_epoch and math.isfinite(state.best_val_loss) and final is not None:
        parts.append(f"best val loss {state.best_val_loss:.4f} (epoch {state.best_epoch}), final {final:.4f}")
    return "; ".join(parts)


def log_description(tracker: Tracker, title: str, cfg: Config, n_params: int, corpus: Corpus, trainer: Trainer) -> None:
    """Spool the run's description (as it stands when called: at the end of the run)."""
    tracker.set_tags({NOTE_TAG: describe_run(title, cfg, n_params, corpus, trainer)})

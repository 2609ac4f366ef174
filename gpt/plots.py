"""The loss curve of one run, as in the reference implementation's plot: train and validation loss against epoch."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; also safe to call from a background thread with the OO API
from matplotlib.figure import Figure  # noqa: E402

from gpt import metrics  # noqa: E402


def loss_curve(history: list[dict], path: Path, title: str = "") -> Path:
    """Draw train and validation loss (nats) against epoch to `path` (a PNG); history rows hold epoch,
    train_loss and val_loss (None where not validated)."""
    figure = Figure(figsize=(6, 4), dpi=100)
    axis = figure.add_subplot()
    epochs = [row["epoch"] for row in history]
    axis.plot(epochs, [row[metrics.TRAIN_LOSS] for row in history], label="Training loss")
    val = [(row["epoch"], row[metrics.VAL_LOSS]) for row in history if row.get(metrics.VAL_LOSS) is not None]
    if val:
        axis.plot([e for e, _ in val], [v for _, v in val], linestyle="-.", label="Validation loss")
    axis.set_xlabel("Epochs")
    axis.set_ylabel("Loss")
    axis.set_title(title)
    axis.legend(loc="upper right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path

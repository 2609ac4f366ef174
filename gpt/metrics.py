"""The names of the metrics a training run logs to MLflow: the one list every reader and writer uses.

Per-epoch metrics are logged with step = epoch (1-based); per-step ones with step = optimizer step.
Losses are mean cross-entropies in nats per token. To add a per-epoch metric: name it here, add it
to EPOCH_METRICS, and compute it in gpt.trainer.EpochMetrics.as_metrics; the reporter logs it and
the ablation analysis reads it back.
"""

from __future__ import annotations

# per epoch (step = epoch)
TRAIN_LOSS = "train_loss"  # mean training loss over the epoch's steps (nats)
VAL_LOSS = "val_loss"  # mean loss over every validation window (nats)
VAL_PPL = "val_ppl"  # exp(val_loss)
TOKENS_SEEN = "tokens_seen"  # training target tokens so far (tokens)
EPOCH_SECONDS = "epoch_seconds"  # this epoch's training + validation time (s)
WALL_SECONDS = "wall_seconds"  # training + validation time so far, across resumes (s)
TOKENS_PER_SECOND = "tokens_per_second"  # this epoch's training tokens / epoch_seconds

EPOCH_METRICS = (TRAIN_LOSS, VAL_LOSS, VAL_PPL, TOKENS_SEEN, EPOCH_SECONDS, WALL_SECONDS, TOKENS_PER_SECOND)

# per optimizer step (step = global step), every train.log_every_steps steps and at each epoch's end
TRAIN_LOSS_STEP = "train_loss_step"

# once per run, at its end (step = the best epoch), so that MLflow's runs table sorts on them
BEST_VAL_LOSS = "best_val_loss"
BEST_EPOCH = "best_epoch"

# at each write of last.pt (step = the epoch it holds)
CHECKPOINT_SECONDS = "checkpoint_seconds"  # how long writing last.pt (and a held best.pt) took (s)
CHECKPOINT_INTERVAL_S = "checkpoint_interval_s"  # the time between writes the policy asks for now (s)

# the metrics whose last logged step says how far a run has logged (epochs, then steps)
PROGRESS = (TRAIN_LOSS, TRAIN_LOSS_STEP)

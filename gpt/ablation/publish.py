"""The report's per-run numbers logged onto each child run, so MLflow's own views can sort and compare the grid.

MLflow's runs table sorts on metrics, and its compare view (parallel coordinates) plots params
against metrics. So each child run of the grid gets the report-time metrics below, and params
factor.<key> = its level label (the config param of a relative stride holds tokens, not '0.5x') and
non_embedding_params. Runs reused from another grid are left as they are: their numbers belong to
the grid that trained them. A metric logged again (the report re-run) adds a point; MLflow shows the last.
"""

from __future__ import annotations

import math
import time

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from gpt.ablation.analysis import Analysis
from gpt.store import with_retries

# metric name on the run -> column of the run table. The prefix puts the report's numbers in a section of
# their own on a run's charts page (MLflow groups charts by the part before '/'), after the loss curves.
PREFIX = "summary/"
RUN_METRICS = {
    PREFIX + "val_loss_at_matched_tokens": "val_at_tokens",
    PREFIX + "val_loss_at_matched_flops": "val_at_flops",
    PREFIX + "val_loss_at_common_epoch": "val_at_epoch",
    PREFIX + "final_val_loss": "final_val_loss",
    PREFIX + "tokens_to_target": "tokens_to_target",
    PREFIX + "flops_to_target": "flops_to_target",
    "best_val_loss": "best_val_loss",  # logged by the training run itself (issue 12); older runs get it here
    "best_epoch": "best_epoch",
}
SELF_LOGGED = ("best_val_loss", "best_epoch")


def publish_run_metrics(analysis: Analysis, tracking_uri: str | None = None) -> None:
    """Log RUN_METRICS and the factor params onto every finished child run that this grid trained."""
    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    own = {r.run_id: r for r in analysis.grid.runs if not r.reused_from}
    for _, row in analysis.runs.iterrows():
        run = own.get(row["run_id"])
        if run is None:
            continue
        logged = with_retries(lambda run=run: client.get_run(run.run_id)).data.metrics
        metrics = [
            Metric(name, float(row[column]), now, 0)
            for name, column in RUN_METRICS.items()
            if math.isfinite(float(row[column])) and not (name in SELF_LOGGED and name in logged)
        ]
        wanted = {f"factor.{key}": str(label) for key, label in run.levels.items()}
        if math.isfinite(row["non_embedding_params"]):
            wanted["non_embedding_params"] = str(int(row["non_embedding_params"]))
        params = [Param(key, value) for key, value in wanted.items() if key not in run.params]  # params are write-once
        with_retries(lambda run=run, m=metrics, p=params: client.log_batch(run.run_id, metrics=m, params=p))

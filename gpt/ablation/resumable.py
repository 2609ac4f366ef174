"""Cells stopped by Ctrl-C go on from their checkpoint when the grid runs again, in the same run.

A cell whose latest run ended KILLED (the grid was stopped, gpt.ablation.stopping) saved a
checkpoint; running the grid again resumes that run exactly as `train.py --resume <run id>` would,
instead of training the cell from scratch in a new run. The resumed run takes the new claim's token
and the new worker's host and pid (gpt.ablation.claims reads them), so the claim that covers it is
the latest. A KILLED run without a usable checkpoint is left as it is and the cell starts afresh.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from gpt.ablation.claims import CLAIM_TAG, CellState
from gpt.errors import UserError
from gpt.resume import Resumption, resume_options
from gpt.store import with_retries

HANDED_OVER = (CLAIM_TAG, "ablation.host", "ablation.pid")


def killed_run(client: MlflowClient, state: CellState, tracking_uri: str, cache_dir: Path) -> Resumption | None:
    """The checkpoint of the cell's latest run if that run was stopped (KILLED) and can go on, else None."""
    if state.status != "FAILED" or not state.run_id:
        return None
    if with_retries(lambda: client.get_run(state.run_id)).info.status != "KILLED":
        return None
    try:
        return resume_options(state.run_id, tracking_uri, cache_dir, [])
    except UserError:  # no checkpoint was written, or it does not load: train the cell afresh
        return None


def hand_over(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    """Give the resumed run the new claim's token and the worker that now trains it."""
    for key in HANDED_OVER:
        with_retries(lambda key=key: client.set_tag(run_id, key, tags[key]))

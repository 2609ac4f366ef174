"""What makes a training run a first-class MLflow run, beside its params, metrics and artifacts.

One call when the run opens hooks everything on the TrackedRun, all of it through the run's spool:
- the texts as dataset inputs (gpt.datasets; a new run's, a resumed one has them);
- MLflow's system metrics every 10 s (gpt.system_metrics; train.system_metrics), stopped when the
  tracker closes;
- the run's one-line description (gpt.run_summary), spooled when the tracker closes, however it ends;
- the best model as an MLflow Model (gpt.logged_model) once a run finishes, unless --no-log-model,
  and registered with --register-model NAME.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpt import system_metrics
from gpt.datasets import log_datasets
from gpt.logged_model import spool_model
from gpt.run_summary import log_description

if TYPE_CHECKING:
    import tiktoken

    from gpt.job import JobOptions, Prepared
    from gpt.tracked_run import TrackedRun


def make_native(
    tracked: TrackedRun, prepared: Prepared, options: JobOptions, encoding: tiktoken.Encoding, new_run: bool
) -> None:
    """Hook datasets, system metrics, description and model onto an open run (after tracked.watch())."""
    tracker, cfg, trainer = tracked.tracker, prepared.cfg, tracked.trainer
    if new_run:
        log_datasets(tracker, prepared.corpus, options.cache_dir)
    system_metrics.start(tracker, cfg.train.system_metrics)
    title = tracked.reporter.title
    tracker.before_close.append(
        lambda: log_description(tracker, title, cfg, prepared.n_params, prepared.corpus, trainer)
    )
    if options.log_model:
        folder, register_as, echo = tracked.checkpoint_folder, options.register_model, options.echo
        tracked.on_finish.append(lambda: spool_model(tracker, folder, encoding, register_as, echo))

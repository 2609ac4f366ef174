"""Train a GPT on your text files and track the run in MLflow.

python train.py --config configs/tiny.yaml --data book.txt
python train.py --config configs/gpt2-128.yaml --data 'books/*.txt' --set model.n_layers=6
python train.py --resume <run_id>                  # continue a killed run from its last checkpoint
python train.py --resume <run_id> --epochs 20      # or train a finished one longer
python train.py --replay mlruns/local/<run_id>     # send what a run could not deliver to its server
python train.py ... --register-model my-gpt        # also register the run's model (models:/my-gpt/<version>)
python train.py --log-model <run_id>               # log a run's best checkpoint as its MLflow Model now
torchrun --nproc_per_node=4 train.py --config ...  # data-parallel over 4 GPUs; train.batch_size is the global batch

Exit codes: 0 done, 1 unexpected error, 2 bad input, 3 non-finite loss, 4 tracking left undelivered
(replay it), 5 disk full or read-only (make room, then resume it), 130/143 stopped by Ctrl-C/SIGTERM
(resume it); the README's "What to do when" says more. Under torchrun these are rank 0's; torchrun
itself exits 1 for any of them, and rank 0's `status:` line says why.
Environment variables: see gpt/env.py (all checked before anything runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from gpt import config as config_module
from gpt import env
from gpt.cli import (
    CONTEXT,
    Command,
    UserPath,
    cache_dir_option,
    device_option,
    friendly_errors,
    tokenizer_file_option,
    tracking_uri_option,
)
from gpt.errors import UserError
from gpt.logged_model import check_registered_name

if TYPE_CHECKING:
    from gpt.job import JobOptions
    from gpt.resume import Resumption
    from gpt.tracked_run import JobResult


@click.command(cls=Command, context_settings=CONTEXT)
@click.option(
    "--config", "config_path", type=UserPath(dir_okay=False), help="YAML config (default: the built-in reference)."
)
@click.option("--data", multiple=True, help="Text file, glob or gutenberg:<id>; repeatable. Sets data.files.")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. model.n_layers=4."
)
@click.option("--epochs", type=int, help="Shortcut for --set train.epochs=N.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), help="Shortcut for --set train.seed=N.")
@device_option
@click.option("--experiment", help="MLflow experiment name (default gpt).")
@click.option("--run-name", help="MLflow run name (default like L12-H12-E768-ctx128-s128).")
@tracking_uri_option
@tokenizer_file_option
@cache_dir_option
@click.option("--dry-run", is_flag=True, help="Check everything and print sizes; train nothing, create no run.")
@click.option(
    "--resume",
    metavar="RUN_ID|CHECKPOINT",
    help="Continue a run from its last checkpoint, with its own config and data (--epochs, --device may change).",
)
@click.option(
    "--replay",
    "replay_dir",
    type=UserPath(file_okay=False),
    help="Send the tracking data a run left undelivered (its folder, as the run's message named it).",
)
@click.option("--no-log-model", is_flag=True, help="Do not log the best model as an MLflow Model at the end.")
@click.option("--register-model", metavar="NAME", help="Register the run's logged model as a new version of NAME.")
@click.option(
    "--log-model",
    "log_model_run",
    metavar="RUN_ID",
    help="Log an existing run's best checkpoint as its MLflow Model (and --register-model it); trains nothing.",
)
@friendly_errors
def main(config_path, data, overrides, epochs, seed, device, experiment, run_name, tracking_uri, tokenizer_file,
         cache_dir, dry_run, resume, replay_dir, no_log_model, register_model, log_model_run) -> None:  # fmt: skip
    """Train a GPT language model on text files, with every run tracked in MLflow.

    Under torchrun every process trains its share of each batch; rank 0 tracks and checkpoints.
    """
    check_model_options(no_log_model, register_model, log_model_run)
    if log_model_run:
        conflicts = {"--config": config_path, "--data": data, "--resume": resume, "--replay": replay_dir}
        _refuse("--log-model logs a trained run's model and trains nothing", conflicts)
        _log_model(log_model_run, tracking_uri, tokenizer_file, register_model)
        return
    if replay_dir:
        conflicts = {"--resume": resume, "--config": config_path, "--data": data, "--set": overrides}
        _refuse("--replay sends a run's spool and trains nothing", conflicts)
        _replay(Path(replay_dir), tracking_uri)
        return
    shortcuts = [f"train.epochs={epochs}"] * (epochs is not None) + [f"train.seed={seed}"] * (seed is not None)
    shortcuts += [f"train.device={device}"] * (device is not None)
    if resume:
        conflicts = {"--config": config_path, "--data": data, "--run-name": run_name, "--experiment": experiment}
        _refuse("--resume continues a run with its own config, data and name", conflicts)
    else:
        cfg = config_module.load(config_path, [*overrides, *shortcuts])  # a typo fails here, before torch loads
        if data:
            cfg.data.files = list(data)

    from gpt import distributed  # the heavy imports (torch, MLflow) come once the options are known to be sound
    from gpt.job import JobOptions

    ranks = distributed.from_environment()
    options = JobOptions(
        experiment="gpt" if experiment is None else experiment,
        run_name=run_name,
        tracking_uri=tracking_uri,
        cache_dir=Path(cache_dir).expanduser() if cache_dir else env.cache_dir(),
        tokenizer_file=tokenizer_file or env.tiktoken_file(),
        progress=ranks.is_main,
        echo=click.echo if ranks.is_main else _silent,
        ranks=ranks,
        log_model=not no_log_model,
        register_model=register_model,
    )
    if resume:
        _train(options, dry_run, resume=resume, overrides=[*overrides, *shortcuts])
    else:
        _train(options, dry_run, cfg=cfg)


def _refuse(what: str, conflicts: dict[str, object]) -> None:
    """UserError when any of the options that make no sense with `what` is given."""
    given = [name for name, value in conflicts.items() if value]
    if given:
        raise UserError(f"{what}; drop {', '.join(given)}")


def check_model_options(no_log_model: bool, register_model: str | None, log_model_run: str | None) -> None:
    """--register-model NAME must be a valid name, and --no-log-model goes with neither model option."""
    check_registered_name(register_model)
    if no_log_model and (register_model or log_model_run):
        raise UserError("--no-log-model logs no model, so there is nothing to register or log: drop one of them")


def _log_model(run_id: str, tracking_uri: str | None, tokenizer_file: str | None, name: str | None) -> None:
    """--log-model: log a trained run's best checkpoint as its MLflow Model (and register it)."""
    from gpt.logged_model import log_run_model
    from gpt.store import resolve_tracking_uri
    from gpt.tokenizer import get_encoding

    encoding = get_encoding(tokenizer_file or env.tiktoken_file())
    done = log_run_model(run_id, resolve_tracking_uri(tracking_uri), encoding, name)
    registered = f"; registered as models:/{name}/{done['version']}" if name else ""
    click.echo(f"logged the model of run {run_id}: models:/{done['model_id']}{registered}")


def _replay(folder: Path, tracking_uri: str | None) -> None:
    """--replay: send a run's spool (one process: a spool belongs to one run)."""
    from gpt import distributed
    from gpt.resume import replay_run
    from gpt.tracking import lines

    if distributed.from_environment().active:
        raise UserError("--replay sends a run's spool and trains nothing; run it without torchrun")
    replayed = replay_run(folder, tracking_uri)
    skipped = f" ({lines(replayed.unreadable, 'unreadable line')} skipped)" if replayed.unreadable else ""
    ended = f"; the run is now {replayed.status}" if replayed.status else ""
    click.echo(f"replayed {replayed.sent} spooled items of run {replayed.run_id}{skipped}{ended}")


def _train(
    options: JobOptions,
    dry_run: bool,
    cfg: config_module.Config | None = None,
    resume: str | None = None,
    overrides: list[str] | None = None,
) -> None:
    """Check everything (data, tokenizer, store, checkpoint), print the sizes, train, print the outcome."""
    from gpt.job import describe, prepare, train
    from gpt.resume import resume_options
    from gpt.store import check_tracking_uri, resolve_tracking_uri

    payload = run_id = None
    if resume:
        resumption = resume_options(resume, options.tracking_uri, options.cache_dir, overrides or [])
        cfg, payload, run_id = resumption.cfg, resumption.payload, resumption.run_id
        options.tracking_uri = resumption.tracking_uri
        if resumption.complete and not dry_run:  # nothing to train: end the run FINISHED
            _finish(resumption, options)
            return
    else:
        options.tracking_uri = resolve_tracking_uri(options.tracking_uri)
    check_tracking_uri(options.tracking_uri)  # before the data are read: an unusable store fails at once
    prepared = prepare(cfg, options, payload)
    for line in describe(prepared):
        options.echo(line)
    if payload is not None:
        options.echo(resumption.describe())
    if dry_run:
        options.echo("dry run: configuration and data are valid; no run was created or changed")
        return
    result = train(cfg, options, prepared, resume_payload=payload, resume_run_id=run_id)
    if options.ranks.is_main:  # rank 0 reports the run
        _print_result(result, options.tracking_uri)
    raise SystemExit(result.exit_code)


def _finish(resumption: Resumption, options: JobOptions) -> None:
    """--resume of a run whose checkpoint completed its epochs: deliver its spool and end it FINISHED."""
    from gpt.resume import finish_complete

    if not options.ranks.is_main:  # rank 0 ends the run; there is nothing to train together
        return
    replayed = finish_complete(resumption, options.cache_dir)
    epochs = resumption.cfg.train.epochs
    click.echo(
        f"status: {replayed.status}: run {replayed.run_id} already trained its {epochs} epochs; nothing to "
        f"train (add --epochs N to train it longer)"
    )
    click.echo(f"run_id: {replayed.run_id}")


def _print_result(result: JobResult, tracking_uri: str) -> None:
    """The run's outcome; the last line is `run_id: <id>` for shell scripts."""
    from gpt.store import ui_link

    click.echo(f"status: {result.status}" + (f": {result.message}" if result.message else ""))  # ends copyable
    if result.final_val_loss is not None:
        click.echo(f"final val loss: {result.final_val_loss:.4f}")
    if result.best_epoch:
        click.echo(f"best val loss: {result.best_val_loss:.4f} (epoch {result.best_epoch})")
    click.echo(f"browse: {ui_link(tracking_uri, result.experiment_id, result.run_id)}")
    click.echo(f"run_id: {result.run_id}")


def _silent(message: str) -> None:
    """The echo of ranks other than 0: one line per run, not one per process."""


if __name__ == "__main__":
    main()

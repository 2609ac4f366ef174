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
(replay it), 130/143 stopped by Ctrl-C/SIGTERM (resume it). Under torchrun these are rank 0's; torchrun
itself exits 1 for any of them, and rank 0's `status:` line says which.
$GPT_TRACKING_TIMEOUT: seconds a finished run waits for a slow or absent tracking server (default 120).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from gpt import config as config_module
from gpt import distributed
from gpt.cli import Command, friendly_errors
from gpt.errors import UserError
from gpt.job import JobOptions, describe, prepare, train
from gpt.logged_model import check_registered_name, log_run_model
from gpt.resume import resume_options
from gpt.store import check_tracking_uri, resolve_tracking_uri, ui_link
from gpt.text import default_cache_dir
from gpt.tokenizer import get_encoding
from gpt.tracking import replay


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config (default: built-in seed).")
@click.option("--data", multiple=True, help="Text file, glob or gutenberg:<id>; repeatable. Sets data.files.")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. model.n_layers=4."
)
@click.option("--epochs", type=int, help="Shortcut for --set train.epochs=N.")
@click.option("--seed", type=int, help="Shortcut for --set train.seed=N.")
@click.option("--device", type=click.Choice(["auto", "cuda", "mps", "cpu"]), help="Where to train (default auto).")
@click.option("--experiment", help="MLflow experiment name (default gpt).")
@click.option("--run-name", help="MLflow run name (default like L12-H12-E768-ctx128-s128).")
@click.option(
    "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)."
)
@click.option(
    "--tokenizer-file", type=click.Path(dir_okay=False), help="Local GPT-2 ranks file (or $GPT_TIKTOKEN_FILE)."
)
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Downloads and token caches (or $GPT_CACHE_DIR).")
@click.option("--dry-run", is_flag=True, help="Check everything and print sizes; train nothing, create no run.")
@click.option(
    "--resume",
    metavar="RUN_ID|CHECKPOINT",
    help="Continue a run from its last checkpoint, with its own config and data (--epochs, --device may change).",
)
@click.option(
    "--replay",
    "replay_dir",
    type=click.Path(file_okay=False),
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
def main(
    config_path,
    data,
    overrides,
    epochs,
    seed,
    device,
    experiment,
    run_name,
    tracking_uri,
    tokenizer_file,
    cache_dir,
    dry_run,
    resume,
    replay_dir,
    no_log_model,
    register_model,
    log_model_run,
) -> None:
    """Train a GPT language model on text files, with every run tracked in MLflow.

    Under torchrun every process trains its share of each batch; rank 0 tracks and checkpoints.
    """
    ranks = distributed.from_environment()
    echo = click.echo if ranks.is_main else _silent
    check_model_options(no_log_model, register_model, log_model_run)
    if log_model_run:
        conflicts = {"--config": config_path, "--data": data, "--resume": resume, "--replay": replay_dir}
        _log_model(log_model_run, conflicts, tracking_uri, tokenizer_file, register_model)
        return
    if replay_dir:
        if ranks.active:
            raise UserError("--replay sends a run's spool and trains nothing; run it without torchrun")
        conflicts = {"--resume": resume, "--config": config_path, "--data": data, "--set": overrides}
        given = [name for name, value in conflicts.items() if value]
        if given:
            raise UserError(f"--replay sends a run's spool and trains nothing; drop {', '.join(given)}")
        run_id, sent, status = replay(Path(replay_dir), tracking_uri)
        ended = f"; the run is now {status}" if status else ""
        click.echo(f"replayed {sent} spooled items of run {run_id}{ended}")
        return
    shortcuts = [f"train.epochs={epochs}"] * (epochs is not None) + [f"train.seed={seed}"] * (seed is not None)
    shortcuts += [f"train.device={device}"] * (device is not None)
    options = JobOptions(
        experiment="gpt" if experiment is None else experiment,
        run_name=run_name,
        tracking_uri=tracking_uri,
        cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(),
        tokenizer_file=tokenizer_file or os.environ.get("GPT_TIKTOKEN_FILE"),
        progress=ranks.is_main,
        echo=echo,
        ranks=ranks,
        log_model=not no_log_model,
        register_model=register_model,
    )
    if resume:
        conflicts = {"--config": config_path, "--data": data, "--run-name": run_name, "--experiment": experiment}
        given = [name for name, value in conflicts.items() if value]
        if given:
            raise UserError(f"--resume continues a run with its own config, data and name; drop {', '.join(given)}")
        resumption = resume_options(resume, tracking_uri, options.cache_dir, [*overrides, *shortcuts])
        cfg, payload, run_id = resumption.cfg, resumption.payload, resumption.run_id
        options.tracking_uri = resumption.tracking_uri
    else:
        cfg = config_module.load(config_path, overrides)
        if data:
            cfg.data.files = list(data)
        config_module.apply_overrides(cfg, shortcuts)
        config_module.validate(cfg)
        payload = run_id = None
        options.tracking_uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(options.tracking_uri)  # before the data are read: an unusable store fails at once
    prepared = prepare(cfg, options, payload)
    for line in describe(prepared):
        echo(line)
    if payload is not None:
        state = payload["state"]
        echo(
            f"resuming run {run_id} from {resumption.path}: epoch {state['epoch'] + 1} of {cfg.train.epochs}, "
            f"after batch {state['batch_in_epoch']} (step {state['step']})"
        )
    if dry_run:
        echo("dry run: configuration and data are valid; no run was created or changed")
        return
    result = train(cfg, options, prepared, resume_payload=payload, resume_run_id=run_id)
    if not ranks.is_main:  # rank 0 reports the run
        raise SystemExit(result.exit_code)
    click.echo(f"status: {result.status}" + (f": {result.message}" if result.message else ""))  # ends copyable
    if result.final_val_loss is not None:
        click.echo(f"final val loss: {result.final_val_loss:.4f}")
    if result.best_epoch:
        click.echo(f"best val loss: {result.best_val_loss:.4f} (epoch {result.best_epoch})")
    click.echo(f"browse: {ui_link(options.tracking_uri, result.experiment_id, result.run_id)}")
    click.echo(f"run_id: {result.run_id}")
    raise SystemExit(result.exit_code)


def check_model_options(no_log_model: bool, register_model: str | None, log_model_run: str | None) -> None:
    """--register-model NAME must be a valid name, and --no-log-model goes with neither model option."""
    check_registered_name(register_model)
    if no_log_model and (register_model or log_model_run):
        raise UserError("--no-log-model logs no model, so there is nothing to register or log: drop one of them")


def _log_model(
    run_id: str, conflicts: dict, tracking_uri: str | None, tokenizer_file: str | None, name: str | None
) -> None:
    """--log-model: log a trained run's best checkpoint as its MLflow Model (and register it)."""
    given = [option for option, value in conflicts.items() if value]
    if given:
        raise UserError(f"--log-model logs a trained run's model and trains nothing; drop {', '.join(given)}")
    done = log_run_model(run_id, resolve_tracking_uri(tracking_uri), get_encoding(tokenizer_file), name)
    registered = f"; registered as models:/{name}/{done['version']}" if name else ""
    click.echo(f"logged the model of run {run_id}: models:/{done['model_id']}{registered}")


def _silent(message: str) -> None:
    """The echo of ranks other than 0: one line per run, not one per process."""


if __name__ == "__main__":
    main()

"""Ablation grids: vary layers, heads, context length, stride... and compare how runs converge.

python ablate.py plan configs/grids/arch.yaml
python ablate.py run configs/grids/arch.yaml --vary model.n_layers=2,4,8 --seeds 0,1,2
python ablate.py run --base configs/tiny.yaml --data book.txt --vary data.stride=0.5x,1x --seeds 0
python ablate.py compare <parent_run_id>
python ablate.py run grid.yaml --shard 0/2          # on one machine; --shard 1/2 on another, same MLFLOW_TRACKING_URI
python ablate.py slurm grid.yaml --partition gpu    # a Slurm job array: task k trains cell k
"""

from __future__ import annotations

import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click

from gpt import env
from gpt.ablation.grid import CORPUS_KEYS, DESIGNS, Cell, GridSpec, expand, format_plan, plan_rows
from gpt.ablation.grid_file import input_files, load_grid
from gpt.cli import (
    CONTEXT,
    FiniteFloat,
    Group,
    UserPath,
    cache_dir_option,
    creatable_folder,
    friendly_errors,
    tokenizer_file_option,
    tracking_uri_option,
)
from gpt.errors import UserError, writing
from gpt.logged_model import check_registered_name

TARGET_LOSS = FiniteFloat(min=0, min_open=True)  # nats: a cross-entropy above 0
target_loss_option = click.option(
    "--target-loss", type=TARGET_LOSS, help="Loss for tokens/time-to-target (default: worst run's best)."
)
# checked as the options are read: a bad folder must fail before a grid trains, not when its report is written
out_dir_option = click.option(
    "--out-dir", type=UserPath(file_okay=False), callback=creatable_folder, help="Where the report files go."
)


def grid_options(command):
    """The options that define a grid, shared by `plan` and `run`."""
    options = [
        click.argument("grid_file", required=False, type=UserPath(dir_okay=False)),
        click.option("--base", type=UserPath(dir_okay=False), help="Base config YAML (replaces the grid file's)."),
        click.option("--data", multiple=True, help="Text file, glob or gutenberg:<id>; repeatable."),
        click.option("--vary", multiple=True, metavar="KEY=L1,L2", help="A factor and its levels; repeatable."),
        click.option("--seeds", help="Replicate seeds, e.g. 0,1,2."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override for every cell."),
        click.option("--design", type=click.Choice(list(DESIGNS)), help="Cartesian or one-at-a-time."),
        click.option("--name", help="Grid name (default: the grid file's, else derived from the factors)."),
        tokenizer_file_option,
        cache_dir_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_cells(
    grid_file, base, data, vary, seeds, sets, design, name, tokenizer_file, cache_dir,
    check_spec: Callable[[GridSpec], None] | None = None,
):  # fmt: skip
    """Load the grid, build its corpus once, and expand it into runnable and skipped cells.

    check_spec: checks of the caller's own that need the grid (its name, its files), run before the
    corpus is built (minutes for a large one); it raises UserError.
    """
    spec = load_grid(grid_file, base=base, data=data, vary=vary, seeds=seeds, sets=sets, design=design, name=name)
    if check_spec is not None:
        check_spec(spec)
    from gpt.data import build_corpus  # the heavy imports come once the grid is known to be sound
    from gpt.tokenizer import get_encoding

    cache = Path(cache_dir).expanduser() if cache_dir else env.cache_dir()
    tokenizer_file = tokenizer_file or env.tiktoken_file()
    varies_data = any(key in CORPUS_KEYS for key in spec.factor_keys)
    corpus = None
    if not varies_data:  # one corpus serves every cell: count tokens once to skip windowless cells
        corpus = build_corpus(spec.base, get_encoding(tokenizer_file), cache, check=False)
    tokens = {"train_tokens": len(corpus.train), "val_tokens": len(corpus.val)} if corpus else {}
    cells, skipped = expand(spec, **tokens)
    return spec, cells, skipped, corpus, cache, tokenizer_file


@click.group(cls=Group, context_settings=CONTEXT)
def main() -> None:
    """Run ablation grids of GPT trainings and compare how they converge (all tracked in MLflow)."""


@main.command(context_settings=CONTEXT)
@grid_options
@click.option(
    "--tracking-uri",
    help="Store whose finished runs time the cells (default $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db).",
)
@friendly_errors
def plan(grid_file, base, data, vary, seeds, sets, design, name, tokenizer_file, cache_dir, tracking_uri) -> None:
    """Print the grid's cells with parameters, tokens per epoch, FLOPs and measured time; run nothing."""
    spec, cells, skipped, corpus, _, _ = build_cells(
        grid_file, base, data, vary, seeds, sets, design, name, tokenizer_file, cache_dir
    )
    from gpt.store import check_tracking_uri, resolve_tracking_uri  # MLflow loads only once the grid is sound

    uri = resolve_tracking_uri(tracking_uri)
    measured = check_tracking_uri(uri, write=False)  # before any output: False when there is no store yet
    click.echo(f"grid {spec.name}: design {spec.design}, factors {', '.join(spec.factor_keys) or '(none)'}")
    if corpus is None:
        click.echo("(the grid varies the data, so token counts are per cell and not shown)")
        click.echo("\n".join(f"{c.name}  {c.cell_id}" for c in cells))
        return
    rows = plan_rows(cells, len(corpus.train), len(corpus.val))
    base_ids = frozenset(c.cell_id for c in cells if c.levels == spec.base_levels())
    estimates = cell_estimates(cells, rows, uri) if measured else {}
    click.echo(format_plan(rows, skipped, base_ids, estimates))


def cell_estimates(cells: list[Cell], rows: list[dict], uri: str) -> dict[str, str]:
    """Cell id -> estimated training time from finished runs of the same shape (gpt.ablation.estimate) in the
    store at `uri`, which must exist (gpt.store.check_tracking_uri): MLflow would create one."""
    from gpt.ablation.estimate import measured_speeds
    from gpt.device import resolve_device
    from gpt.estimate import duration

    device = str(resolve_device(cells[0].config.train.device)) if cells else "cpu"
    speeds = measured_speeds(uri, cells, device)
    estimates = {}
    for row in rows:
        speed = speeds.get(row["cell_id"])
        if speed is not None:
            seconds = row["tokens_per_epoch"] * row["epochs"] / speed.tokens_per_second
            estimates[row["cell_id"]] = f"{duration(seconds)} ({speed.runs} run{'s' * (speed.runs > 1)})"
    return estimates


@main.command(context_settings=CONTEXT)
@grid_options
@click.option("--experiment", help="MLflow experiment (default: the grid's name).")
@tracking_uri_option
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True, help="Cells trained at once.")
@click.option("--gpus", help="GPUs to spread cells over, e.g. 0,1,2,3 (counted within $CUDA_VISIBLE_DEVICES).")
@click.option("--per-gpu", type=click.IntRange(1, 64), default=1, show_default=True, help="Cells per GPU at once.")
@click.option("--shard", default="0/1", show_default=True, help="Run share i of n of the cells (for many machines).")
@target_loss_option
@out_dir_option
@click.option("--no-log-model", is_flag=True, help="Cells log no MLflow Model (checkpoints only).")
@click.option("--register-model", metavar="NAME", help="Register the best cell's best-seed model as a version of NAME.")
@friendly_errors
def run(grid_file, base, data, vary, seeds, sets, design, name, tokenizer_file, cache_dir, experiment, tracking_uri,
        workers, gpus, per_gpu, shard, target_loss, out_dir, no_log_model, register_model) -> None:  # fmt: skip
    """Train every cell of a grid (skipping finished ones), then compare them.

    Exit codes: 0 done, 1 a cell failed, 2 bad input, 130/143 stopped by Ctrl-C/SIGTERM (run the
    same command again to go on).
    """
    check_registered_name(register_model)
    spec, cells, skipped, corpus, cache, tokenizer_file = build_cells(
        grid_file, base, data, vary, seeds, sets, design, name, tokenizer_file, cache_dir
    )
    from gpt.ablation.identity import cell_digests  # MLflow loads only once the grid is known to be sound
    from gpt.ablation.runner import RunnerOptions, close_parent, run_grid, stop_parent
    from gpt.ablation.workers import parse_shard
    from gpt.store import check_tracking_uri, resolve_tracking_uri
    if not cells:
        raise UserError(f"grid {spec.name} has no runnable cell ({len(skipped)} skipped as invalid)")
    if per_gpu > 1 and not gpus:
        raise UserError(f"--per-gpu {per_gpu} packs cells onto GPUs: name them with --gpus, e.g. --gpus 0")
    for cell in skipped:
        click.echo(f"skipped {cell.name}: {cell.reason}")
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)  # before the cells' data are hashed: an unusable store fails at once
    options = RunnerOptions(
        experiment=experiment or spec.name,
        tracking_uri=uri,
        cache_dir=cache,
        tokenizer_file=tokenizer_file,
        workers=workers,
        gpus=parse_gpus(gpus),
        per_gpu=per_gpu,
        shard=parse_shard(shard),
        echo=click.echo,
        log_model=not no_log_model,
        digests=cell_digests(cells, cache, corpus),
    )
    outcome = run_grid(spec, cells, skipped, options)
    if outcome.stopped:
        stop_parent(uri, outcome.parent_run_id)
        killed = sum(o.status == "KILLED" for o in outcome.outcomes)
        click.echo(
            f"grid stopped by {signal.Signals(outcome.stopped).name}: {killed} running cell(s) ended KILLED with a "
            f"checkpoint, the others did not start; the parent run ends KILLED. Run the same command again to go on."
        )
        click.echo(f"parent_run_id: {outcome.parent_run_id}")
        raise SystemExit(128 + outcome.stopped)
    report_error: Exception | None = None
    if outcome.complete:
        try:
            report_error = report_or_say_how(outcome.parent_run_id, uri, target_loss, out_dir)
            if register_model:
                register_best_model(outcome.parent_run_id, uri, register_model, tokenizer_file)
        finally:
            click.echo(f"parent run {close_parent(uri, outcome)}")
    else:  # other shards (or processes) still have cells: the last one to finish reports and ends the parent
        click.echo(
            f"{len(outcome.waiting)} of {len(cells)} cells are still running or not started elsewhere; the parent "
            f"stays RUNNING until the last shard writes the report (partial report: ablate.py compare "
            f"{outcome.parent_run_id})"
        )
    if outcome.failed:
        click.echo(f"{len(outcome.failed)} cell(s) failed:")
        for failed in outcome.failed:
            click.echo(f"  {failed.cell.name}: {failed.message}")
    click.echo(f"parent_run_id: {outcome.parent_run_id}")
    if report_error is not None:  # its one-line error and exit code, once everything else is said
        raise report_error
    raise SystemExit(1 if outcome.failed else 0)


def report_or_say_how(parent_run_id: str, uri: str, target_loss: float | None, out_dir: str | None) -> Exception | None:
    """report() at the end of `run`; if it fails (a full disk, a folder gone since the start), the error, after
    saying how to make the report again: the runs are safe in MLflow, and the grid must still end its parent
    run, register its model and list its failed cells."""
    try:
        report(parent_run_id, uri, target_loss, out_dir)
    except Exception as exc:
        again = ["ablate.py", "compare", parent_run_id, "--tracking-uri", uri]
        again += [part for flag, value in [("--target-loss", target_loss), ("--out-dir", out_dir)]
                  if value is not None for part in (flag, str(value))]  # fmt: skip
        click.echo(
            f"the report was not written; every run of the grid is in MLflow: once the cause is fixed, make the "
            f"report with: {shlex.join(again)}",
            err=True,
        )
        return exc
    return None


@main.command(context_settings=CONTEXT)
@grid_options
@click.option("--experiment", help="MLflow experiment (default: the grid's name).")
@click.option("--tracking-uri", help="Where every task reports (default $MLFLOW_TRACKING_URI); exported to the job.")
@click.option("--tasks", type=int, help="Array tasks (default: one per cell); task k runs --shard k/TASKS.")
@click.option("--max-running", type=int, help="At most this many tasks at once (sbatch --array=...%N).")
@click.option("--partition", help="Slurm partition.")
@click.option("--account", help="Slurm account.")
@click.option("--time", "time_limit", default="04:00:00", show_default=True, help="Time limit per task.")
@click.option("--gpus-per-task", type=click.IntRange(0, 64), default=1, show_default=True, help="0: CPU only.")
@click.option("--gres", help="Generic resources instead of gpu:N, e.g. gpu:a100:1.")
@click.option("--per-gpu", type=click.IntRange(1, 64), default=1, show_default=True, help="Cells per GPU at once.")
@click.option("--cpus-per-task", type=click.IntRange(1, 1024), default=8, show_default=True)
@click.option("--mem", help="Memory per task, e.g. 32G.")
@click.option("--sbatch", "extra", multiple=True, metavar="OPTION", help="Another #SBATCH option; repeatable.")
@click.option(
    "--log-dir",
    type=UserPath(file_okay=False),
    callback=creatable_folder,
    default="slurm-logs",
    show_default=True,
    help="Where each task writes.",
)
@click.option(
    "--python",
    type=UserPath(dir_okay=False),  # ~ expanded here: the script's exec line quotes it, so no shell would
    default=sys.executable,
    show_default="this Python",
    help="Python on the nodes.",
)
@click.option("--target-loss", type=TARGET_LOSS, help="Passed on to the report of the last task.")
@click.option("--no-log-model", is_flag=True, help="Passed on: cells log no MLflow Model (checkpoints only).")
@click.option("--register-model", metavar="NAME", help="Passed on: the last task registers the grid's best model.")
@click.option("-o", "--output", type=UserPath(dir_okay=False), help="Script file (default: <grid name>.sbatch).")
@friendly_errors
def slurm(grid_file, base, data, vary, seeds, sets, design, name, tokenizer_file, cache_dir, experiment, tracking_uri,
          tasks, max_running, partition, account, time_limit, gpus_per_task, gres, per_gpu, cpus_per_task, mem, extra,
          log_dir, python, target_loss, no_log_model, register_model, output) -> None:  # fmt: skip
    """Write a Slurm job-array script that trains the grid's cells, one array task per cell."""
    check_registered_name(register_model)
    from gpt.ablation.slurm import SlurmOptions, check, check_script_file, job_name, job_script
    from gpt.store import check_tracking_uri, resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri, ask_server=False)  # a SQLite path every task would fail on; nodes may reach a server
    store = sqlite_path(uri)
    ablate = Path(__file__).resolve()
    path = Path(output) if output else None

    def check_output(spec: GridSpec) -> None:
        """-o (or the default <grid name>.sbatch): a file we may write, and none of the files the job reads."""
        nonlocal path
        path = env.check_output_file(path or Path(f"{job_name(spec.name)}.sbatch"), "-o/--output")
        reads = {Path(python): "the Python the tasks run", ablate: "the ablate.py the tasks run", **input_files(spec)}
        for file, role in [(tokenizer_file or env.tiktoken_file(), "the tokenizer file"), (store, "the MLflow store")]:
            if file is not None:
                reads[Path(file)] = role
        check_script_file(path, reads)

    spec, cells, skipped, _, _, tokenizer_file = build_cells(
        grid_file, base, data, vary, seeds, sets, design, name, tokenizer_file, cache_dir, check_output
    )
    if not cells:
        raise UserError(f"grid {spec.name} has no runnable cell ({len(skipped)} skipped as invalid)")
    args = [*([grid_file] if grid_file else []), "--name", spec.name, "--experiment", experiment or spec.name]
    options_given = {"--base": [base], "--data": data, "--vary": vary, "--seeds": [seeds], "--set": sets}
    options_given.update({"--design": [design], "--tokenizer-file": [tokenizer_file], "--cache-dir": [cache_dir]})
    for flag, values in {**options_given, "--target-loss": [target_loss], "--register-model": [register_model]}.items():
        args += [part for value in values if value is not None for part in (flag, str(value))]
    args += ["--no-log-model"] if no_log_model else []
    options = SlurmOptions(
        tasks=tasks or len(cells),
        time=time_limit,
        partition=partition,
        account=account,
        gpus_per_task=gpus_per_task,
        gres=gres,
        per_gpu=per_gpu,
        cpus_per_task=cpus_per_task,
        mem=mem,
        max_running=max_running,
        log_dir=log_dir,
        extra=list(extra),
        python=python,
    )
    check(options, len(cells))
    if store is not None:
        uri = f"sqlite:///{store}"  # the same file from every node
        click.echo(
            f"note: every task writes to the SQLite file {store}; that needs a shared file "
            "system and suits a few tasks; for more, run a tracking server (docs/team-server.md)",
            err=True,
        )
    script = job_script(spec.name, len(cells), args, {"MLFLOW_TRACKING_URI": uri}, ablate, options)
    assert path is not None  # set by check_output
    logs = options.workdir / log_dir
    with writing(logs):  # first: a script that exists is one that can run
        logs.mkdir(parents=True, exist_ok=True)  # Slurm does not create it: the logs would be lost
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        path.chmod(0o755)
    for cell in skipped:
        click.echo(f"skipped {cell.name}: {cell.reason}")
    click.echo(f"wrote {path}: {len(cells)} cells over {options.tasks} array tasks, reporting to {uri}")
    click.echo(f"submit with: sbatch {shlex.quote(str(path))}")


@main.command(context_settings=CONTEXT)
@click.argument("parent_run_id")
@tracking_uri_option
@target_loss_option
@out_dir_option
@friendly_errors
def compare(parent_run_id, tracking_uri, target_loss, out_dir) -> None:
    """Compare the cells of a grid from MLflow: table, curves, main effects, fits (logged to the parent)."""
    from gpt.store import require_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    require_store(uri, "; pass the --tracking-uri the grid was run with")
    report(parent_run_id, uri, target_loss, out_dir)


def report(parent_run_id: str, uri: str, target_loss: float | None, out_dir: str | None) -> None:
    """Compare the grid's runs, write the report (and log it to the parent run), print the table and links."""
    from mlflow.tracking import MlflowClient

    from gpt.ablation.report import compare as analyse  # pandas/scipy load only when needed
    from gpt.ablation.report import grid_link
    from gpt.store import sqlite_folder, ui_link

    folder = Path(out_dir) if out_dir else (sqlite_folder(uri) or env.cache_dir()) / "reports" / parent_run_id
    table, files = analyse(parent_run_id, folder, uri, target_loss)
    click.echo(table)
    click.echo(f"report: {folder / 'report.md'} and report.html (also on the parent run in MLflow)")
    experiment_id = MlflowClient(uri).get_run(parent_run_id).info.experiment_id
    click.echo(f"browse the grid's runs: {grid_link(uri, experiment_id, parent_run_id)}")
    click.echo(f"browse the report: {ui_link(uri, experiment_id, parent_run_id)}")


def register_best_model(parent_run_id: str, uri: str, name: str, tokenizer_file: str | None) -> None:
    """--register-model: the grid's best model as the next version of NAME (gpt.ablation.best_model)."""
    from gpt.ablation.best_model import register_best

    best, version = register_best(parent_run_id, uri, name, tokenizer_file)
    click.echo(
        f"registered models:/{name}/{version}: cell {best.run_name} (mean best val loss {best.cell_mean:.4f} over "
        f"{best.seeds} seeds), run {best.run_id} ({best.best_val_loss:.4f})"
    )


def parse_gpus(text: str | None) -> list[int]:
    """--gpus 0,1,2 -> [0, 1, 2]; UserError for anything else."""
    if not text:
        return []
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--gpus {text!r} must be GPU ids separated by commas, e.g. 0,1") from None


if __name__ == "__main__":
    main()

"""A Slurm job array for a grid: array task k runs `ablate.py run <the same grid> --shard k/N`.

Every task expands the same grid from the same options, so with N = the number of cells task k
trains exactly cell k; with fewer tasks each trains every N-th cell. All tasks report to one
MLFLOW_TRACKING_URI, and the claims of gpt.ablation.claims keep two tasks off one cell (a requeued
task, say). The last task to finish writes the grid's report and ends its parent run.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpt.errors import UserError

# Slurm's --time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]]
_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")


@dataclass
class SlurmOptions:
    tasks: int  # array size: cells are shared out over tasks 0..tasks-1
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    gpus_per_task: int = 1  # 0: CPU-only tasks
    gres: str | None = None  # instead of gpu:<gpus_per_task>, e.g. gpu:a100:1
    per_gpu: int = 1  # cells trained at once on each of a task's GPUs
    cpus_per_task: int = 8
    mem: str | None = None
    max_running: int | None = None  # at most this many tasks at once (the array's %limit)
    log_dir: str = "slurm-logs"
    extra: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. --constraint=a100
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)


def job_name(grid_name: str) -> str:
    return "ablate-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", grid_name).strip("_") or "grid")


def check(options: SlurmOptions, cells: int) -> None:
    if not 1 <= options.tasks <= cells:
        raise UserError(f"--tasks {options.tasks}: the grid has {cells} cells; use 1 to {cells} array tasks")
    if not _TIME.fullmatch(options.time):
        raise UserError(f"--time {options.time!r} is not a Slurm time such as 90, 04:00:00 or 1-12:00:00")
    if options.max_running is not None and options.max_running < 1:
        raise UserError(f"--max-running {options.max_running}: must be at least 1")
    texts = {"--partition": options.partition, "--account": options.account, "--mem": options.mem}
    texts.update({"--gres": options.gres, "--log-dir": options.log_dir, "--python": options.python})
    for name, value in [*texts.items(), *(("--sbatch", extra) for extra in options.extra)]:
        if value is not None and (not value.strip() or any(c in value for c in "\n\r\0")):
            raise UserError(f"{name} {value!r}: must be one non-empty line")
    if "\\" in options.log_dir:  # Slurm's filename patterns: a backslash turns off %x, %A and %a
        raise UserError(
            f"--log-dir {options.log_dir!r}: Slurm reads a backslash in a log path as 'expand no %-patterns', so "
            "every task would write one log file; give a folder without '\\'"
        )


def check_script_file(path: Path, inputs: dict[Path, str]) -> None:
    """UserError when the script's file `path` (-o) is one of the files the job reads (`inputs`: path -> its
    role, e.g. "the grid file"): writing the script there would overwrite it."""
    for source, role in inputs.items():
        # the same path (a store not created yet), or the same file by another name (a link)
        with contextlib.suppress(OSError):
            if path.resolve() == source.resolve() or (path.exists() and path.samefile(source)):
                raise UserError(
                    f"-o/--output {path} is {role} ({source}); the script would overwrite it: give another file"
                )


def sbatch_value(value: str) -> str:
    """`value` as one argument of an #SBATCH line. sbatch splits those lines itself, not a shell (its
    _get_argument): at whitespace outside quotes, ' and " group, a backslash escapes the next character
    even inside quotes, and an unquoted # starts a comment. So a value with any of them goes in double
    quotes with backslash and double quote escaped; others stay bare, as people write them."""
    if value and not any(c.isspace() or c in "\"'\\#" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def job_script(
    grid_name: str, cells: int, run_args: Sequence[str], env: dict[str, str], ablate: Path, options: SlurmOptions
) -> str:
    """The sbatch script. `run_args` follow `ablate.py run` (grid options, --experiment...); `env` is exported."""
    check(options, cells)
    array = f"0-{options.tasks - 1}" + (f"%{options.max_running}" if options.max_running else "")
    lines = [
        "#!/bin/bash",
        f"# Ablation grid {grid_name!r}: {cells} cells; array task k runs --shard k/{options.tasks}.",
        "# Written by `ablate.py slurm`; submit with: sbatch <this file>",
        f"#SBATCH --job-name={job_name(grid_name)}",
        f"#SBATCH --array={array}",
        f"#SBATCH --time={options.time}",
    ]
    if options.partition:
        lines.append(f"#SBATCH --partition={options.partition}")
    if options.account:
        lines.append(f"#SBATCH --account={options.account}")
    if options.gres or options.gpus_per_task:
        lines.append(f"#SBATCH --gres={options.gres or f'gpu:{options.gpus_per_task}'}")
    lines.append(f"#SBATCH --cpus-per-task={options.cpus_per_task}")
    if options.mem:
        lines.append(f"#SBATCH --mem={options.mem}")
    lines += [f"#SBATCH {extra.strip()}" for extra in options.extra]
    lines += [
        f"#SBATCH --chdir={sbatch_value(str(options.workdir))}",
        # %x job name, %A array job id, %a task id; a % of the folder's own name is written %%
        f"#SBATCH --output={sbatch_value(options.log_dir.replace('%', '%%') + '/%x-%A_%a.out')}",
        "",
        "set -euo pipefail",
        "export PYTHONUNBUFFERED=1",
    ]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    command = [options.python, str(ablate), "run", *run_args]
    if options.gpus_per_task > 1 or (options.gpus_per_task and options.per_gpu > 1):  # pack the task's GPUs
        command += ["--gpus", ",".join(map(str, range(options.gpus_per_task))), "--per-gpu", str(options.per_gpu)]
    quoted = " ".join(shlex.quote(part) for part in command)
    lines += ["", f'exec {quoted} --shard "${{SLURM_ARRAY_TASK_ID}}/{options.tasks}"', ""]
    return "\n".join(lines)

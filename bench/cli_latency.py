"""CPU time of the command lines' quick answers: --help and a bad option, for each of the three scripts.

    python bench/cli_latency.py                      # this checkout
    python bench/cli_latency.py --baseline ../old    # and another checkout, alternating with this one

Each command runs as its own process (a fresh Python, as a user types it); the figure is the CPU time
(user + sys) the process used, read from the OS (resource.getrusage of the children), which a busy
machine inflates far less than wall time. The median of --repeat runs is printed per command and
checkout. Target (issue 12): under 0.5 s of CPU for every row.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "train.py --help": ["train.py", "--help"],
    "train.py bad --set key": ["train.py", "--set", "model.n_layerz=4"],
    "generate.py --help": ["generate.py", "--help"],
    "generate.py bad --temperature": ["generate.py", "--prompt", "x", "--temperature", "-1"],
    "ablate.py --help": ["ablate.py", "--help"],
    "ablate.py plan bad --set key": ["ablate.py", "plan", "--base", "configs/tiny.yaml", "--set", "model.n_layerz=4"],
    "ablate.py run bad --set key": ["ablate.py", "run", "--base", "configs/tiny.yaml", "--set", "model.n_layerz=4"],
}  # also the commands tests/test_cli_imports.py checks


def cpu_seconds(args: list[str], cwd: Path) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, exit code) of one run of `python args...` in cwd."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    code = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, env=os.environ).returncode
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs per command and checkout (median printed)")
    parser.add_argument("--baseline", type=Path, help="another checkout to measure alternately, for a ratio")
    args = parser.parse_args()
    checkouts = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; median of {args.repeat} runs, CPU s (wall s)")
    header = f"{'command':34}" + "".join(f"{name:>22}" for name in checkouts)
    print(header + ("  ratio this/baseline" if args.baseline else ""))
    for label, command in COMMANDS.items():
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in checkouts}
        codes = set()
        for _ in range(args.repeat):
            for name, cwd in checkouts.items():  # alternating, so that drift hits both alike
                cpu, wall, code = cpu_seconds(command, cwd)
                samples[name].append((cpu, wall))
                codes.add(code)
        medians = {
            name: (statistics.median(c for c, _ in runs), statistics.median(w for _, w in runs))
            for name, runs in samples.items()
        }
        row = f"{label:34}" + "".join(f"{cpu:>14.3f} ({wall:.2f})" for cpu, wall in medians.values())
        if args.baseline:
            row += f"  {medians['this'][0] / medians['baseline'][0]:.2f}"
        print(row + f"   exit {sorted(codes)}")


if __name__ == "__main__":
    main()

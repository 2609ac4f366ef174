"""Memory across epochs: the process's resident set size (RSS) after each epoch of a tiny training run.

python bench/memory_rss.py                       # 50 tiny epochs on The Verdict, every epoch sampled and
                                                 # checkpointed (metrics and plot as train.py throttles them:
                                                 # at most every 1 s and 10 s), into a throw-away SQLite store
python bench/memory_rss.py --epochs 100 --data book.txt --print-every 10

Each epoch end, after its metrics, samples, loss-curve plot and checkpoints were handed to the
tracker, the RSS is read from /proc/self/statm (Linux) twice: as it is, and after gc.collect() and
glibc's malloc_trim(0). Freed memory often stays in the allocator's pools (a tiny GPT's 50,257-way
logits are 25 MB a batch), so the first column swings by a hundred MB from epoch to epoch; the
trimmed column is what the process really holds, and is the one that must stay flat. The first
epochs allocate caches (matplotlib fonts, MLflow's SQL session), so the summary covers the epochs
after --warmup: the change from there to the end, and the least-squares slope in KB per epoch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt import config as config_module  # noqa: E402
from gpt import env  # noqa: E402
from gpt.job import JobOptions, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VERDICT = ROOT.parent / "shared" / "corpus" / "the_verdict.txt"
TINY = [
    "model.context_length=16",
    "model.emb_dim=16",
    "data.stride=64",
    "train.batch_size=8",
    "train.log_every_steps=1",
    "train.sample_every=1",
    "train.sample_every_s=0",  # a sample every epoch, however its cost compares with the epoch's
    "train.sample_tokens=20",
    "train.checkpoint_every_s=0",
]


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def trimmed_rss_mb() -> float:
    """RSS once garbage is collected and the C allocator has handed its free pages back."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)  # glibc only
        if trim is not None:
            trim(0)
    return rss_mb()


def slope_kb_per_epoch(points: list[tuple[int, float]]) -> float:
    epochs, values = zip(*points, strict=True)
    mean_e, mean_v = statistics.fmean(epochs), statistics.fmean(values)
    num = sum((e - mean_e) * (v - mean_v) for e, v in points)
    den = sum((e - mean_e) ** 2 for e in epochs)
    return num / den * 1024 if den else 0.0


@click.command()
@click.option("--epochs", default=50, show_default=True, help="Epochs to train.")
@click.option("--data", default=str(VERDICT), show_default=True, help="Text file to train on.")
@click.option("--warmup", default=5, show_default=True, help="Epochs left out of the growth summary.")
@click.option("--print-every", default=1, show_default=True, help="Print every Nth epoch's row (all are summarised).")
@click.option("--threads", default=1, show_default=True, help="torch threads (1 is fastest for the tiny model).")
def main(epochs: int, data: str, warmup: int, print_every: int, threads: int) -> None:
    if not Path("/proc/self/statm").is_file():
        raise SystemExit("this benchmark reads /proc/self/statm: run it on Linux")
    torch.set_num_threads(threads)
    cfg = config_module.load(ROOT / "configs" / "tiny.yaml", [*TINY, f"train.epochs={epochs}"])
    cfg.data.files = [data]
    rows: list[tuple[int, float, float, float]] = []  # epoch, RSS MB, trimmed RSS MB, seconds since start
    started = time.perf_counter()
    before = rss_mb()

    def on_line(line: str) -> None:
        """The reporter's per-epoch line comes after the epoch's logging, sampling and checkpointing."""
        if line.startswith("epoch "):
            epoch = int(line.split()[1].split("/")[0])
            rows.append((epoch, rss_mb(), trimmed_rss_mb(), time.perf_counter() - started))
            _, rss, trimmed, seconds = rows[-1]
            if epoch % print_every == 0 or epoch in (1, epochs):
                click.echo(f"{epoch:>5}  {rss:>8.1f}  {trimmed:>8.1f}  {trimmed - rows[0][2]:>+8.1f}  {seconds:>7.1f}")

    with tempfile.TemporaryDirectory() as folder:
        options = JobOptions(
            experiment="memory",
            tracking_uri=f"sqlite:///{folder}/mlflow.db",
            cache_dir=env.cache_dir(),
            tokenizer_file=os.environ.get("GPT_TIKTOKEN_FILE"),
            echo=on_line,
        )
        click.echo(f"torch {torch.__version__}, Python {platform.python_version()}, {threads} thread(s)")
        click.echo(f"RSS before training: {before:.1f} MB")
        click.echo(f"{'epoch':>5}  {'RSS MB':>8}  {'trimmed':>8}  {'vs ep 1':>8}  {'seconds':>7}")
        result = train(cfg, options)
    if result.status != "FINISHED" or len(rows) != epochs:
        raise SystemExit(f"the run ended {result.status} after {len(rows)} epochs: {result.message}")
    for column, name in ((1, "RSS"), (2, "trimmed RSS")):
        after = [(row[0], row[column]) for row in rows if row[0] > warmup]
        values = [value for _, value in after]
        click.echo(
            f"epochs {after[0][0]}-{epochs}, {name}: {min(values):.1f}-{max(values):.1f} MB, "
            f"{after[-1][1] - after[0][1]:+.1f} MB from epoch {after[0][0]} to {epochs}, "
            f"slope {slope_kb_per_epoch(after):+.1f} KB/epoch"
        )


if __name__ == "__main__":
    main()

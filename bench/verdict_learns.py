"""Does the seed-size model (162M) learn a tiny text with our defaults? The seed's check, on CPU or GPU.

The seed trained GPT-2 small on *The Verdict* (about 5,000 tokens) for 10 epochs at batch 2 and saw
the training loss fall from ~10 to below 1. Initialisation decides whether that happens in 10
epochs; this script trains the project's model (configs/gpt2-128.yaml) the same way and prints the
per-epoch losses. It uses the project's own Trainer, without MLflow.

  python bench/verdict_learns.py --data ../shared/corpus/the_verdict.txt [--epochs 10] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt import config as config_module  # noqa: E402
from gpt import env  # noqa: E402
from gpt.data import build_corpus  # noqa: E402
from gpt.device import resolve_device  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.tokenizer import get_encoding  # noqa: E402
from gpt.trainer import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    cfg = config_module.load(
        root / "configs" / "gpt2-128.yaml",
        [f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.compile=false", *args.overrides],
    )
    cfg.data.files = [args.data]
    corpus = build_corpus(cfg, get_encoding(), env.cache_dir())
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, GPT(cfg.model), corpus, resolve_device(cfg.train.device))
    print(f"{len(corpus.train)} train / {len(corpus.val)} val tokens, {trainer.steps_per_epoch} steps per epoch")
    print("epoch  train_loss  val_loss  seconds")
    while trainer.state.epoch < cfg.train.epochs:
        started = time.perf_counter()
        metrics = trainer.run_epoch()
        seconds = time.perf_counter() - started
        print(f"{metrics.epoch:5d}  {metrics.train_loss:10.3f}  {metrics.val_loss:8.3f}  {seconds:7.1f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

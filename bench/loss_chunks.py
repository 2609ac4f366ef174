"""The fused LM head + cross-entropy on a CPU: chunk sizes against the full logits, per model width.

python bench/loss_chunks.py                          # emb_dim 32 (512 rows), 128, 256, 768 (1024 rows)
python bench/loss_chunks.py --widths 32 --chunks 0,16,32,64 --threads 2 --clock wall

Times forward + backward of gpt.model.chunked_cross_entropy (model.loss_chunk_rows = chunk) and of the
full-logits loss (chunk 0) on random hidden states, for GPT-2's 50,257-token vocabulary. Chunk sizes
alternate within each repeat, in turned-around order every other repeat. The default clock is the
process's CPU time with one thread, which a machine shared with other work disturbs least; the figure
per width is each chunk's median time relative to the best one (1.00 = fastest), which is what
gpt.device.loss_chunk_rows's auto rule, max(32, emb_dim), is chosen from.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402

from gpt.config import ModelConfig  # noqa: E402
from gpt.device import loss_chunk_rows  # noqa: E402
from gpt.model import chunked_cross_entropy, padded_vocab  # noqa: E402

VOCAB = 50257
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def loss_step(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> None:
    if chunk:
        loss = chunked_cross_entropy(hidden, weight, targets, VOCAB, chunk)
    else:
        loss = F.cross_entropy(F.linear(hidden, weight[:VOCAB]), targets)
    loss.backward()
    hidden.grad = weight.grad = None


def time_width(width: int, rows: int, chunks: list[int], repeats: int, clock: str) -> dict[int, float]:
    """Median seconds of one forward + backward per chunk size (0: full logits)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=generator).requires_grad_()
    weight = (torch.randn(padded_vocab(VOCAB), width, generator=generator) / width**0.5).requires_grad_()
    targets = torch.randint(0, VOCAB, (rows,), generator=generator)
    sizes = [chunk for chunk in chunks if chunk <= rows]
    now = CLOCKS[clock]
    seconds: dict[int, list[float]] = {chunk: [] for chunk in sizes}
    for chunk in sizes:
        loss_step(hidden, weight, targets, chunk)  # warm-up
    for repeat in range(repeats):
        for chunk in sizes if repeat % 2 == 0 else list(reversed(sizes)):
            started = now()
            loss_step(hidden, weight, targets, chunk)
            seconds[chunk].append(now() - started)
    return {chunk: statistics.median(values) for chunk, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="32,128,256,768", help="emb_dim values (rows: 512 for 32, else 1024)")
    parser.add_argument("--chunks", default="0,8,16,32,64,128,256,512,1024", help="loss_chunk_rows (0: full logits)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chunks = [int(chunk) for chunk in args.chunks.split(",")]
    print(describe(torch.device("cpu")))
    print(f"forward + backward of the LM head + loss, {args.clock} clock, median of {args.repeats}; ms (vs best)")
    for width in (int(w) for w in args.widths.split(",")):
        rows = 512 if width <= 32 else 1024
        medians = time_width(width, rows, chunks, args.repeats, args.clock)
        best = min(medians.values())
        auto = loss_chunk_rows(ModelConfig(emb_dim=width, n_heads=1), torch.device("cpu"))
        cells = "  ".join(
            f"{chunk or 'full'}:{value * 1e3:.0f}({value / best:.2f})" for chunk, value in medians.items()
        )
        print(f"emb_dim {width:4d}, {rows} rows, auto {auto:4d}: {cells}")


if __name__ == "__main__":
    main()

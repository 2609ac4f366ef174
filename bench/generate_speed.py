"""Decode speed: tokens/s with and without the KV cache, measured side by side.

python bench/generate_speed.py                       # configs/tiny.yaml and configs/gpt2-128.yaml, 256 new tokens
python bench/generate_speed.py --configs configs/gpt2-128.yaml --repeats 3 --threads 1

Weights are random (speed does not depend on them). The modes alternate inside each repeat, in
turned-around order every other repeat, so a machine that gets busier slows every mode alike. On
CUDA (bf16) the cache runs with and without CUDA graphs. "end to end" includes prefill and graph
capture; "after first" counts the tokens after the first, i.e. the steady decode rate.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt import config as config_module  # noqa: E402
from gpt.device import resolve_device  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.sampling import Sampling, decode  # noqa: E402
from gpt.sizes import count_parameters  # noqa: E402
from gpt.tokenizer import get_encoding  # noqa: E402

PROMPT = "Every effort moves you"
SAMPLING = Sampling(temperature=1.0, top_k=25)  # the seed's sampling settings


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(model: GPT, prompt: list[int], tokens: int, batch: int, seed: int, **mode: bool) -> tuple[float, float]:
    """Seconds for all tokens, and for the tokens after the first (one host sync at the first)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sync(device)
    start = time.perf_counter()
    steps = decode(model, prompt, tokens, SAMPLING, batch, generator=generator, **mode)
    next(steps)
    sync(device)
    first = time.perf_counter()
    for _ in steps:
        pass
    sync(device)
    end = time.perf_counter()
    return end - start, end - first


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (bf16)"
    return f"{device.type}: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (fp32)"


@click.command()
@click.option("--configs", multiple=True, default=["configs/tiny.yaml", "configs/gpt2-128.yaml"], show_default=True)
@click.option("--tokens", default=256, show_default=True, help="New tokens per generation.")
@click.option("--repeats", default=2, show_default=True, help="Timed generations per mode and config.")
@click.option("--batch", default=1, show_default=True, help="Samples generated together.")
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=int, help="torch CPU threads (default: torch's choice).")
def main(configs: tuple[str, ...], tokens: int, repeats: int, batch: int, device: str, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    torch_device = resolve_device(device, option="--device")
    dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    modes = {"recompute": {"kv_cache": False}, "kv-cache": {"kv_cache": True, "cuda_graph": False}}
    if torch_device.type == "cuda":
        modes["kv-cache + CUDA graph"] = {"kv_cache": True, "cuda_graph": True}
    prompt = get_encoding().encode(PROMPT)
    print(f"device: {device_name(torch_device)}; torch {torch.__version__}")
    print(f"{tokens} new tokens after a {len(prompt)}-token prompt, batch {batch}, {repeats} repeats, median shown")
    header = f"{'config':<24}{'mode':<24}{'end to end tok/s':>18}{'after first tok/s':>19}{'vs recompute':>14}"
    print(header)
    print("-" * len(header))
    for path in configs:
        cfg = config_module.load(path)
        torch.manual_seed(0)
        model = GPT(cfg.model).to(device=torch_device, dtype=dtype).eval()
        for mode in modes.values():  # warm-up: allocator, kernels, lazy initialisation
            timed(model, prompt, 8, batch, seed=0, **mode)
        seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
        for repeat in range(repeats):
            order = list(modes) if repeat % 2 == 0 else list(reversed(modes))
            for name in order:
                seconds[name].append(timed(model, prompt, tokens, batch, seed=repeat, **modes[name]))
        rate = {name: statistics.median(batch * tokens / total for total, _ in runs) for name, runs in seconds.items()}
        label = f"{Path(path).stem} ({count_parameters(cfg.model) / 1e6:.1f}M)"
        for name, runs in seconds.items():
            steady = statistics.median(batch * (tokens - 1) / after for _, after in runs)
            ratio = rate[name] / rate["recompute"]
            print(f"{label:<24}{name:<24}{rate[name]:>18,.1f}{steady:>19,.1f}{ratio:>13.1f}x")
        print(
            f"{'':<24}per-repeat end-to-end seconds: "
            + "; ".join(f"{name} " + ", ".join(f"{total:.1f}" for total, _ in runs) for name, runs in seconds.items())
        )


if __name__ == "__main__":
    main()

"""Decode speed at batch 1: the project's sampling paths against today's, Hugging Face and a recompute loop.

python bench/generate_speed.py                          # the seed model (configs/gpt2-128.yaml), 100 greedy tokens
python bench/generate_speed.py --threads 1 --clock cpu  # on a machine shared with other work
python bench/generate_speed.py --configs configs/tiny.yaml,configs/gpt2-128.yaml --repeats 5

Weights are random (speed does not depend on them). Modes, each timed end to end (prefill included):
  today        before issue 18: fp32, KV cache, the padded LM head computed and sliced (bench/baseline.py)
  kv-cache     generate.py's default now (fp32 on a CPU, bf16 on CUDA), KV cache
  int8         generate.py --quantize int8: int8 weights in every Linear layer (CPU only)
  bf16         bf16 weights on a CPU (bf16 matmuls need AVX-512 BF16 or AMX)
  recompute    nanoGPT-style loop: crop to the context, full forward, last logits (generate.py --no-kv-cache)
  hf-generate  Hugging Face transformers' GPT2LMHeadModel.generate() with its cache, same sizes and dtype
               (GPT-2 ties its head: 38.6M fewer weights to read), if transformers is installed
  CUDA adds kv-cache + CUDA graph. Modes alternate within each repeat, in turned-around order every other
  repeat; ratios are taken within a repeat against today's (the first mode), median and range shown.

Columns: "same" counts the first 50 greedy tokens equal to today's (fewer where the context is shorter);
"KL" is the mean KL divergence (nats) of each mode's next-token distribution from today's over those
positions (teacher-forced on today's tokens); "MB/token" the Linear weights each new token reads; "GB/s"
that times tokens/s, against the read bandwidth measured in this process; "+RSS MiB" the peak resident
memory one generation adds (CPU). Needs GPT_TIKTOKEN_FILE offline (the prompt is encoded).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baseline import todays_head  # noqa: E402
from machine import PeakMemory, describe, read_bandwidth, sync  # noqa: E402

from gpt import config as config_module  # noqa: E402
from gpt.device import resolve_device  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.sampling import Sampling, decode, quantize_int8  # noqa: E402
from gpt.sizes import count_parameters  # noqa: E402
from gpt.tokenizer import get_encoding  # noqa: E402

PROMPT = get_encoding().encode("Every effort moves you")
AGREE = 50  # greedy tokens compared with today's
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
Generate = Callable[[int], list[int]]  # new tokens -> the new token ids


def own_mode(model: GPT, sampling: Sampling, **options: bool) -> Generate:
    def run(tokens: int) -> list[int]:
        return [int(new[0]) for new in decode(model, PROMPT, tokens, sampling, 1, **options)]

    return run


def hf_mode(cfg: config_module.Config, device: torch.device, dtype: torch.dtype, tokens: int) -> Generate | None:
    """transformers' GPT-2 of the same sizes (random weights), greedy generate() with its KV cache.

    Its positions stop at n_positions, where ours slide, so it gets enough of them for the prompt and tokens.
    """
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    m = cfg.model
    hf_config = GPT2Config(
        vocab_size=m.vocab_size,
        n_positions=max(m.context_length, len(PROMPT) + tokens),
        n_embd=m.emb_dim,
        n_layer=m.n_layers,
        n_head=m.n_heads,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_config).to(device=device, dtype=dtype).eval()
    prompt = torch.tensor([PROMPT], device=device)
    mask = torch.ones_like(prompt)

    @torch.inference_mode()
    def run(tokens: int) -> list[int]:
        out = model.generate(
            prompt, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
        )
        return out[0, len(PROMPT) :].tolist()

    return run


def linear_megabytes(model: torch.nn.Module) -> float:
    """MB of Linear weights: what each decoded token reads (embeddings contribute one row)."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif type(module).__name__ == "Linear" and hasattr(module, "_packed_params"):  # dynamic int8
            total += module.in_features * module.out_features
    return total / 1e6


@torch.inference_mode()
def divergence(reference: GPT, model: GPT, tokens: list[int]) -> float:
    """Mean KL(reference || model) in nats of the next-token distributions along PROMPT + tokens."""
    idx = torch.tensor([PROMPT + tokens], device=next(reference.parameters()).device)
    ref = reference(idx)[0, len(PROMPT) - 1 : -1].float().log_softmax(-1)
    other = model(idx)[0, len(PROMPT) - 1 : -1].float().log_softmax(-1)
    return float((ref.exp() * (ref - other)).sum(-1).mean())


def build_modes(
    cfg: config_module.Config, device: torch.device, tokens: int
) -> tuple[dict[str, Generate], dict[str, GPT]]:
    """The modes' generate functions, and the own models (for KL and weight bytes)."""
    greedy = Sampling(temperature=0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = GPT(cfg.model).to(device=device, dtype=dtype).eval()
    # every mode decodes a copy: a copy's weights are laid out in memory alike, and decoded ~3% faster
    # than the freshly initialised model's here, which would skew the ratios
    now = copy.deepcopy(base)
    models = {"today": todays_head(copy.deepcopy(base)), "kv-cache": now}
    if device.type == "cpu":
        models["int8"] = quantize_int8(copy.deepcopy(base))
        models["bf16"] = copy.deepcopy(base).to(torch.bfloat16)
    del base
    modes = {name: own_mode(model, greedy, kv_cache=True, cuda_graph=False) for name, model in models.items()}
    if device.type == "cuda":
        modes["kv-cache + CUDA graph"] = own_mode(now, greedy, kv_cache=True, cuda_graph=True)
    modes["recompute"] = own_mode(now, greedy, kv_cache=False)
    models["recompute"] = now
    hf = hf_mode(cfg, device, dtype, tokens)
    if hf is not None:
        modes["hf-generate"] = hf
    return modes, models


def time_modes(modes: dict[str, Generate], tokens: int, repeats: int, clock: str, device: torch.device) -> dict:
    """Per mode: seconds per repeat, the tokens of the last run, and the peak memory of one run."""
    now = CLOCKS[clock]
    for run in modes.values():  # warm-up: allocator, kernels, lazy initialisation
        run(4)
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    outputs, memory = {}, {}
    for repeat in range(repeats):
        for name in list(modes) if repeat % 2 == 0 else list(reversed(modes)):
            with PeakMemory(device) as peak:
                sync(device)
                started = now()
                outputs[name] = modes[name](tokens)
                sync(device)
                seconds[name].append(now() - started)
            memory[name] = peak.extra_mib
    return {"seconds": seconds, "outputs": outputs, "memory": memory}


def report(cfg_path: str, cfg, modes, models, results, tokens: int, bandwidth: float) -> None:  # noqa: ANN001
    seconds, outputs = results["seconds"], results["outputs"]
    # the teacher-forced KL needs the prompt and tokens within one context
    agree = min(AGREE, tokens, cfg.model.context_length - len(PROMPT))
    label = f"{Path(cfg_path).stem} ({count_parameters(cfg.model) / 1e6:.1f}M)"
    print(f"\n{label}: {tokens} new tokens after a {len(PROMPT)}-token prompt, batch 1, greedy")
    print(
        f"{'mode':22s} {'tokens/s':>9s} {'vs today':>9s} {'range':>10s} {f'same/{agree}':>8s} {'KL':>8s} "
        f"{'MB/token':>9s} {'GB/s':>6s} {'+RSS MiB':>9s}"
    )
    reference = outputs["today"][:agree]
    for name in modes:
        rate = tokens / statistics.median(seconds[name])
        ratios = [base / mine for mine, base in zip(seconds[name], seconds["today"], strict=True)]
        pairs = zip(outputs[name][:agree], reference, strict=True)
        same = next((i for i, (a, b) in enumerate(pairs) if a != b), agree)
        model = models.get(name)
        kl = f"{divergence(models['today'], model, reference):8.1e}" if model is not None else f"{'n/a':>8s}"
        megabytes = linear_megabytes(model) if model is not None else float("nan")
        memory = results["memory"][name]
        print(
            f"{name:22s} {rate:9.1f} {statistics.median(ratios):8.2f}x {min(ratios):4.2f}-{max(ratios):<5.2f} "
            f"{same:8d} {kl} {megabytes:9.0f} {megabytes * rate / 1e3:6.1f} "
            + (f"{memory:9.0f}" if memory is not None else f"{'n/a':>9s}")
        )
    print(f"read bandwidth measured here: {bandwidth / 1e9:.1f} GB/s")


@click.command()
@click.option("--configs", default="configs/gpt2-128.yaml", show_default=True, help="Comma-separated config files.")
@click.option("--tokens", default=100, show_default=True, help="New tokens per generation.")
@click.option("--repeats", default=3, show_default=True, help="Timed generations per mode and config.")
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=int, help="torch CPU threads (default: torch's choice, all cores).")
@click.option("--clock", type=click.Choice(list(CLOCKS)), default="wall", show_default=True)
def main(configs: str, tokens: int, repeats: int, device: str, threads: int | None, clock: str) -> None:
    if threads:
        torch.set_num_threads(threads)
    torch_device = resolve_device(device, option="--device")
    print(describe(torch_device))
    print(f"{repeats} repeats, median shown, {clock} clock")
    bandwidth = read_bandwidth(CLOCKS[clock]) if torch_device.type == "cpu" else float("nan")
    for path in configs.split(","):
        cfg = config_module.load(path)
        modes, models = build_modes(cfg, torch_device, tokens)
        results = time_modes(modes, tokens, repeats, clock, torch_device)
        report(path, cfg, modes, models, results, tokens, bandwidth)
        if "hf-generate" not in modes:
            print("hf-generate: not run (pip install transformers, see requirements-dev.txt)")


if __name__ == "__main__":
    main()

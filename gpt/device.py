"""Where a model runs and in which precision: every device rule of training and sampling, in one place.

| rule              | CUDA          | CPU                                          | MPS               |
| ----------------- | ------------- | -------------------------------------------- | ----------------- |
| training autocast | bf16          | bf16 with AVX-512 BF16 or AMX, else fp32     | none (fp32)       |
| torch.compile     | on            | off                                          | off               |
| AdamW             | fused kernels | fused kernels                                | PyTorch's default |
| LM-head loss      | full logits   | chunked (loss_chunk_rows, below)             | full logits       |
| sampling weights  | bf16          | fp32 (generate.py --quantize int8: int8)     | fp32              |

train.precision and train.compile override the training defaults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gpt.errors import UserError

if TYPE_CHECKING:
    from gpt.config import ModelConfig, TrainConfig

DEVICES = ("auto", "cuda", "mps", "cpu")
# fewest rows per chunk of the fused LM head + loss on a CPU when model.loss_chunk_rows is null (auto): below
# ~32 rows the head's matmuls run slowly (bench/loss_chunks.py)
CPU_MIN_CHUNK_ROWS = 32


def resolve_device(requested: str, option: str = "train.device") -> torch.device:
    """auto | cuda | mps | cpu -> a device that exists here.

    Raises UserError (naming `option`, the setting the value came from) for an unknown name or a
    device this machine does not have.
    """
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if requested == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if requested not in available:
        raise UserError(f"{option} must be one of {', '.join(DEVICES)}; got {requested!r}")
    if not available[requested]:
        what = "CUDA GPU" if requested == "cuda" else "MPS device"
        fix = f"use {option} auto or cpu" if option.startswith("--") else "set it to auto or cpu"
        raise UserError(f"{option} is {requested} but no {what} is available; {fix}")
    return torch.device(requested)


def autocast_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training steps: bf16 by default on CUDA and on CPUs with bf16 matmul
    instructions (AVX-512 BF16 or AMX); None (full fp32) on other CPUs and MPS, where bf16 would be
    emulated and slower. train.precision bf16 or fp32 overrides the choice.

    On such a CPU bf16 matmuls run at about twice fp32's rate: the tiny config trains ~1.2x faster, and
    a 3-epoch Alice run's per-epoch validation losses stay within 0.01% of fp32's, identical from run to
    run (bench/train_speed.py, README).
    """
    if train.precision == "auto" and device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else None
    if train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX tiles), as torch reports it."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def use_compile(train: TrainConfig, device: torch.device) -> bool:
    """Whether training steps go through torch.compile: train.compile, else on CUDA only."""
    return train.compile if train.compile is not None else device.type == "cuda"


def fused_adamw(device: torch.device) -> bool:
    """Fused AdamW runs the whole update as one kernel per parameter instead of ~10 elementwise passes
    over it: on CUDA, and on a CPU, where it is ~5x faster for the tiny config's 3.2M parameters
    (bench/train_speed.py). MPS keeps PyTorch's default."""
    return device.type in ("cuda", "cpu")


def inference_dtype(device: torch.device) -> torch.dtype:
    """The weights' dtype when sampling: bf16 halves the bytes a GPU reads per token; CPU matmuls are
    faster in fp32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_name(device: torch.device) -> str:
    """The GPU's model name (e.g. 'NVIDIA H100 80GB HBM3'), else the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def loss_chunk_rows(cfg: ModelConfig, device: torch.device) -> int:
    """model.loss_chunk_rows as it applies on `device`; null (auto) is max(32, emb_dim) on a CPU, else 0.

    Each chunk reads the head (vocab x emb_dim) twice and reads and writes its gradient, so a chunk needs
    about emb_dim rows before its logits' work outweighs that traffic; the tiny config's 32 rows of fp32
    logits (6.4 MB) stay in cache, where its full logits (103 MB a batch) go to memory and back ~7 times.
    Measured on a CPU for emb_dim 32, 128, 256 and 768 (bench/loss_chunks.py): the rule's size was the
    fastest within noise, except at emb_dim 32, where 16 rows were up to 7% faster in some runs.
    """
    if cfg.loss_chunk_rows is not None:
        return cfg.loss_chunk_rows
    return max(CPU_MIN_CHUNK_ROWS, cfg.emb_dim) if device.type == "cpu" else 0


def check_fits(n_params: int, device: torch.device) -> None:
    """UserError when training n_params parameters cannot fit this device's memory: fp32 weights, gradients
    and AdamW's two moments take 16 bytes a parameter before any activation (the reference model: 2.6 GB)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        import psutil

        total = psutil.virtual_memory().total
    need = 16 * n_params
    if need > total:
        raise UserError(
            f"the model's {n_params:,} parameters need {need / 2**30:,.1f} GiB for weights, gradients and AdamW "
            f"state, more than this {device.type}'s {total / 2**30:,.1f} GiB: make it smaller (model.n_layers, "
            "model.emb_dim, model.context_length)"
        )

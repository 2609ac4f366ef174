"""The project's defaults before issue 18, rebuilt on today's code so that benches time both in one process.

Before issue 18, on a CPU: the LM head computed the full padded logits and sliced them (the slice's copy
and its zero-filled backward included), the loss was never chunked, AdamW ran its per-parameter loop,
and a spawned grid worker only set torch's intra-op threads. Imported by the bench scripts.
"""

from __future__ import annotations

import types

import torch

from gpt.model import GPT


def _padded_head(self: GPT, hidden: torch.Tensor) -> torch.Tensor:
    """The head as it was: every padded column computed, then the logits sliced."""
    return self.lm_head(hidden)[..., : self.cfg.vocab_size]


def todays_head(model: GPT) -> GPT:
    """Make `model` compute its logits as before issue 18: the padded head, then a slice (training and decoding)."""
    model.head = types.MethodType(_padded_head, model)  # type: ignore[method-assign]
    return model


def todays_model(model: GPT) -> GPT:
    """Make `model` compute its loss and logits as before issue 18 (full padded logits, no chunking)."""
    model.cfg.loss_chunk_rows = 0
    return todays_head(model)


def todays_optimizer(optimizer: torch.optim.AdamW) -> torch.optim.AdamW:
    """The same parameter groups and settings under AdamW's default implementation on a CPU (the
    per-parameter loop: foreach and fused kernels were only chosen on CUDA)."""
    groups = [
        {key: value for key, value in group.items() if key not in ("fused", "foreach")}
        for group in optimizer.param_groups
    ]
    return torch.optim.AdamW(groups, fused=False, foreach=False)


def todays_worker_setup(threads: int) -> None:
    """A spawned grid worker's set-up before issue 18: intra-op threads only, nothing in the environment."""
    torch.set_num_threads(threads)

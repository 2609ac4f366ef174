"""The CPU's training defaults (issue 18) against the path they replaced: same losses, step after step.

The defaults: the chunked LM head + loss (model.loss_chunk_rows auto), the head without its padded
rows, and fused AdamW. The reference: full logits of the padded head, sliced, and AdamW's loop.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gpt import model as model_module
from gpt.config import Config, ModelConfig, TrainConfig
from gpt.model import GPT, loss_chunk_rows
from gpt.trainer import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

# 64 rows a batch: two chunks of the auto size (32); vocabulary 100, padded to 128
CONFIG = Config(
    model=ModelConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=2, dropout=0.0),
    train=TrainConfig(batch_size=4, lr=3e-3, weight_decay=0.1),
)
STEPS = 8


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches of random tokens in turn: learnable within STEPS steps, so the losses fall."""
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(CONFIG.model.vocab_size, (2, 4, 17), generator=generator)
    return [(tokens[step % 2, :, :-1], tokens[step % 2, :, 1:]) for step in range(STEPS)]


def train(reference: bool, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Per-step training losses of STEPS AdamW steps from the same init and batches."""
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CONFIG.model))
    optimizer = build_optimizer(CONFIG, model, torch.device("cpu"))
    losses = []
    with monkeypatch.context() as patch:
        if reference:
            model.cfg.loss_chunk_rows = 0
            patch.setattr(model_module, "SLICED_HEAD_DEVICES", ())  # the padded head, its logits sliced
            optimizer = torch.optim.AdamW(optimizer.param_groups, fused=False, foreach=False)
        for inputs, targets in batches():
            loss = model(inputs, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return losses


def test_the_defaults_chunk_the_loss_and_fuse_adamw_on_a_cpu():
    model = GPT(CONFIG.model)
    assert loss_chunk_rows(model.cfg, torch.device("cpu")) == 32
    assert build_optimizer(CONFIG, model, torch.device("cpu")).defaults["fused"] is True


def test_default_cpu_training_follows_the_reference_losses(monkeypatch):
    default, reference = train(False, monkeypatch), train(True, monkeypatch)
    assert default[-1] < default[0] - 0.1, "the steps must learn, or equal losses would say little"
    # both paths compute the same sums in another order, so they differ by fp32 rounding, which AdamW's
    # division by sqrt(v) can amplify a little from step to step
    torch.testing.assert_close(torch.tensor(default), torch.tensor(reference), rtol=1e-5, atol=0)


def test_default_cpu_training_is_deterministic(monkeypatch):
    assert train(False, monkeypatch) == train(False, monkeypatch)

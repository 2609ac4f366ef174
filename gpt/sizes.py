"""Sizes computed from a config alone, without building anything (no torch): parameters, FLOPs per
token, windows and steps per epoch. `ablate.py plan` and the start of every run print them.

Window arithmetic, for a token stream of N tokens, window length L and stride S: windows start at
0, S, 2S, ... while start + L + 1 <= N, so there are (N - L - 1) // S + 1 of them (none when N <= L).
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt.config import Config, ModelConfig


def count_parameters(cfg: ModelConfig) -> int:
    """Trainable parameters of the unpadded model (a tied head counts once), as the reference implementation reports."""
    d, v, layers = cfg.emb_dim, cfg.vocab_size, cfg.n_layers
    per_block = (3 * d * d + (3 * d if cfg.qkv_bias else 0)) + (d * d + d) + (8 * d * d + 5 * d) + 4 * d
    head = 0 if cfg.tie_weights else v * d
    return v * d + cfg.context_length * d + layers * per_block + 2 * d + head


def flops_per_token(cfg: ModelConfig, length: int | None = None) -> int:
    """Training FLOPs per token: 6 per non-embedding parameter and head weight, plus attention.

    6N covers forward and backward matmuls (PaLM appendix B); attention scores and the weighted sum
    add 6 * n_layers * length * emb_dim (causal masking is not discounted, as in the usual MFU).
    """
    length = length or cfg.context_length
    lookups = cfg.context_length * cfg.emb_dim + (0 if cfg.tie_weights else cfg.vocab_size * cfg.emb_dim)
    return 6 * (count_parameters(cfg) - lookups) + 6 * cfg.n_layers * length * cfg.emb_dim


def embedding_parameters(cfg: ModelConfig) -> int:
    """Parameters that are table look-ups or the LM head: token and position embeddings, and the head
    unless it is tied to the token embedding (Kaplan et al. 2020 count "non-embedding" parameters
    without them)."""
    head = 0 if cfg.tie_weights else cfg.vocab_size * cfg.emb_dim
    return cfg.vocab_size * cfg.emb_dim + cfg.context_length * cfg.emb_dim + head


def non_embedding_parameters(cfg: ModelConfig) -> int:
    """The transformer's own parameters (blocks and final norm): what depth and width change.

    With a 50k vocabulary they are a small share of a tiny model's total: one more layer of the tiny
    config changes the total by 0.3% and these by 2x.
    """
    return count_parameters(cfg) - embedding_parameters(cfg)


def count_windows(n_tokens: int, length: int, stride: int) -> int:
    """Windows of `length` (+1 target) tokens every `stride` tokens in a stream of n_tokens (see above)."""
    return 0 if n_tokens <= length else (n_tokens - length - 1) // stride + 1


def uncovered_tokens(n_tokens: int, length: int, stride: int) -> int:
    """Tokens of a stream of n_tokens that no window holds, as input or target: the gaps between windows
    when the stride exceeds length + 1, and the tail after the last window (under `stride` tokens)."""
    windows = count_windows(n_tokens, length, stride)
    if windows == 0:
        return n_tokens
    return n_tokens - ((windows - 1) * min(stride, length + 1) + length + 1)


def steps_per_epoch(n_windows: int, batch_size: int, drop_last: bool) -> int:
    """Optimizer steps per epoch; a partial last batch counts unless dropped (kept when it is the only one)."""
    full, rest = divmod(n_windows, batch_size)
    if full == 0:
        return 1 if rest else 0
    return full + (1 if rest and not drop_last else 0)


@dataclass
class DataStats:
    """The sizes of one run's data: tokens of each split, windows, steps and training tokens per epoch."""

    train_tokens: int
    val_tokens: int
    train_windows: int
    val_windows: int
    steps_per_epoch: int
    tokens_per_epoch: int  # target tokens the model trains on per epoch
    uncovered_tokens: int = 0  # training tokens in no window (uncovered_tokens): a stride over the window skips text

    @property
    def uncovered_fraction(self) -> float:
        """The share of the training tokens that no window covers (0 to 1)."""
        return self.uncovered_tokens / self.train_tokens if self.train_tokens else 0.0


def window_stats(cfg: Config, train_tokens: int, val_tokens: int) -> DataStats:
    """DataStats of a config on splits of train_tokens and val_tokens (validation windows never overlap)."""
    length, stride, t = cfg.window_length, cfg.window_stride, cfg.train
    train_windows = count_windows(train_tokens, length, stride)
    steps = steps_per_epoch(train_windows, t.batch_size, t.drop_last)
    used = min(train_windows, steps * t.batch_size)
    return DataStats(
        train_tokens=train_tokens,
        val_tokens=val_tokens,
        train_windows=train_windows,
        val_windows=count_windows(val_tokens, length, length),
        steps_per_epoch=steps,
        tokens_per_epoch=used * length,
        uncovered_tokens=uncovered_tokens(train_tokens, length, stride),
    )

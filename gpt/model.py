"""The reference implementation's GPT: token + position embeddings, pre-norm transformer blocks, final norm, LM head."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gpt.config import ModelConfig
from gpt.device import loss_chunk_rows

VOCAB_MULTIPLE = 64  # matmuls on tensor cores prefer dimensions that are multiples of 64
# devices whose LM head leaves the weight's padded rows out of the product (the others keep the padded width)
SLICED_HEAD_DEVICES = ("cpu",)


def padded_vocab(vocab_size: int) -> int:
    return math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def explicit_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, visible: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference implementation's formulation (scores, triu mask, softmax): the reference SDPA must match.

    `visible` (queries x keys, True where a query may look) replaces the causal mask for cached keys.
    """
    t_q, t_k = q.size(-2), k.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if visible is None:
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1 + t_k - t_q)
    else:
        mask = visible.logical_not()
    weights = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    return F.dropout(weights, p=dropout, training=dropout > 0) @ v


class KVCache:
    """Every layer's keys and values for `batch` sequences, preallocated at context_length slots.

    Shapes never change, and positions arrive as a tensor, so a CUDA graph can replay a decode step.
    """

    def __init__(self, cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.n_layers, batch, cfg.n_heads, cfg.context_length, cfg.emb_dim // cfg.n_heads)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)


class LayerCache(NamedTuple):
    """One layer's slice of a KVCache, the positions this forward writes and the slots each query sees."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    visible: torch.Tensor


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.emb_dim // cfg.n_heads
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.explicit = False  # True selects the reference masked-softmax path (reference, benchmarks)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        if cache is not None:
            # attend over every slot, written or not, so shapes stay fixed; `visible` hides the slots
            # after each query's position, stale ones included
            cache.keys.index_copy_(2, cache.positions, k)
            cache.values.index_copy_(2, cache.positions, v)
            k, v = cache.keys, cache.values
            if self.explicit:
                out = explicit_causal_attention(q, k, v, dropout, cache.visible)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.visible, dropout_p=dropout)
        elif self.explicit:
            out = explicit_causal_attention(q, k, v, dropout)
        else:
            # fused kernels (flash / memory-efficient) apply the causal mask without materialising it
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.resid_dropout(self.proj(out.transpose(1, 2).reshape(batch, length, width)))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.down = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim)
        self.ff = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.ff(self.norm2(x))


class ChunkedCrossEntropy(torch.autograd.Function):
    """LM head + mean cross-entropy over row chunks, with the gradients computed in the forward.

    Each chunk's logits live only while that chunk is processed: the forward turns them into the
    chunk's loss and, when a gradient is wanted, straight into the gradients of the hidden rows and
    the head weight, which backward only scales. On a CPU a chunk of the tiny config's rows stays in
    cache through the softmax and both gradient matmuls, so its logits never travel to memory
    (bench/train_speed.py). Matmuls run in `compute_dtype` (the autocast dtype, as the plain path's
    lm_head), the softmax in fp32 (as its .float()), and the weight gradient is summed over chunks in fp32.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        vocab_size: int,
        chunk_rows: int,
        compute_dtype: torch.dtype,
        need_grad: bool,
    ) -> torch.Tensor:
        rows, scale = hidden.size(0), 1.0 / hidden.size(0)
        # the weight's padded rows are never predicted: on a CPU they are left out of the matmuls (no
        # wasted columns, contiguous logits); on a GPU the head keeps its padded width, a multiple of 64
        # as tensor cores prefer, and the padded columns are masked out of the softmax
        head_rows = vocab_size if hidden.device.type in SLICED_HEAD_DEVICES else weight.size(0)
        head = weight[:head_rows].to(compute_dtype)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.empty_like(weight, dtype=torch.float32) if need_grad else None
        for start in range(0, rows, chunk_rows):
            chunk = hidden[start : start + chunk_rows].to(compute_dtype)
            target = targets[start : start + chunk_rows, None]
            logits = (chunk @ head.T).float()
            if head_rows > vocab_size:
                logits[:, vocab_size:] = float("-inf")
            loss += _softmax_and_losses(logits, target).sum()
            if grad_hidden is None or grad_weight is None:
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot(target), built in place of the softmax; the
            # 1/rows of the mean is applied to the (small) products, not to the chunk's logits
            grad_logits = logits.scatter_add_(1, target, torch.full_like(target, -1, dtype=logits.dtype))
            grad_logits = grad_logits.to(compute_dtype)
            grad_hidden[start : start + chunk_rows] = grad_logits @ head
            _accumulate_head_grad(grad_weight[:head_rows], grad_logits.T, chunk, scale, first=start == 0)
        if grad_hidden is not None and grad_weight is not None:
            grad_weight[head_rows:] = 0.0
            ctx.save_for_backward(grad_hidden.mul_(scale), grad_weight.to(weight.dtype))
        return loss * scale

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None, None


def _softmax_and_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy (rows, 1) in nats; `logits` (rows, vocab), fp32, becomes its softmax in place.

    One fused softmax pass (plus two cheap max reductions) instead of log-softmax and then exp: the
    log-sum-exp is recovered from the softmax at the row's largest logit m, which is exp(0)/sum = 1/sum
    (never below 1/vocab, so its log is exact to rounding): logsumexp = m - log(p_max).
    """
    target_logit = logits.gather(1, target)
    row_max = logits.amax(dim=1, keepdim=True)
    probs = torch.softmax(logits, dim=1, out=logits)
    return row_max - probs.amax(dim=1, keepdim=True).log() - target_logit


def _accumulate_head_grad(
    total: torch.Tensor, grad_logits_t: torch.Tensor, chunk: torch.Tensor, scale: float, first: bool
) -> None:
    """total (fp32, vocab x emb_dim) += scale * grad_logits_t @ chunk; the first chunk overwrites it.

    In fp32 one addmm_ writes the product straight into the sum (no temporary the size of the head).
    """
    if grad_logits_t.dtype == total.dtype:
        total.addmm_(grad_logits_t, chunk, beta=0.0 if first else 1.0, alpha=scale)
        return
    if first:
        total.zero_()
    total.add_(grad_logits_t @ chunk, alpha=scale)  # the product in compute_dtype, the sum in fp32


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk_rows: int
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` over the first vocab_size columns, chunk_rows rows at a time.

    hidden (rows, emb_dim), weight (padded vocab, emb_dim), targets (rows,) -> a scalar in nats.
    Equals F.cross_entropy(F.linear(hidden, weight)[:, :vocab_size].float(), targets), autocast included.
    """
    device = hidden.device.type
    # autocast is off inside the Function, so that every dtype there is chosen explicitly: matmuls in the
    # autocast dtype (as the plain path's lm_head), softmax and sums in fp32 (as its .float())
    if torch.is_autocast_enabled(device):
        compute_dtype = torch.get_autocast_dtype(device)
    else:
        compute_dtype = weight.dtype
    # validation (no_grad) skips the gradient work: two of the head's three matmuls
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device, enabled=False):
        return ChunkedCrossEntropy.apply(hidden, weight, targets, vocab_size, chunk_rows, compute_dtype, need_grad)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        vocab = padded_vocab(cfg.vocab_size)  # padded rows are never predicted: logits are sliced
        self.tok_emb = nn.Embedding(vocab, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim)
        self.lm_head = nn.Linear(cfg.emb_dim, vocab, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.init == "gpt2":
            self._init_gpt2()
        elif cfg.tie_weights:
            # the reference init leaves embeddings N(0, 1); as the head's weights that would make the
            # first logits ~sqrt(emb_dim) wide, so a shared matrix starts at the head's scale
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=0.02)

    def _init_gpt2(self) -> None:
        """GPT-2's init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layers)
        so the residual stream's variance does not grow with depth."""
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(
        self, idx: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-norm hidden states. With a cache, idx sits at `positions` (a tensor, so the caller
        keeps them below context_length) and attends to the cached tokens before it."""
        layers: list[LayerCache | None] = [None] * len(self.blocks)
        if cache is None:
            length = idx.size(1)
            if length > self.cfg.context_length:
                raise ValueError(f"sequence of {length} tokens exceeds context_length {self.cfg.context_length}")
            positions = torch.arange(length, device=idx.device)
        else:
            visible = positions[:, None] >= torch.arange(self.cfg.context_length, device=idx.device)
            layers = [LayerCache(k, v, positions, visible) for k, v in zip(cache.keys, cache.values, strict=True)]
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        for block, layer in zip(self.blocks, layers, strict=True):
            x = block(x, layer)
        return self.final_norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, length, vocab_size) or, given targets (batch, length), the mean cross-entropy loss."""
        hidden = self.hidden(idx)
        if targets is None:
            return self.head(hidden)
        chunk_rows = loss_chunk_rows(self.cfg, hidden.device)
        if chunk_rows > 0:
            return chunked_cross_entropy(
                hidden.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.cfg.vocab_size, chunk_rows
            )
        return F.cross_entropy(self.head(hidden).flatten(0, 1).float(), targets.flatten())

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab_size) of final hidden states (..., emb_dim).

        On a CPU the weight's padded rows are left out of the product, so no padded column is computed,
        copied or zero-filled in backward; a GPU multiplies the padded width (a multiple of 64, as tensor
        cores prefer) and slices the logits. A quantized head (its weight is a method) is sliced too.
        """
        weight = self.lm_head.weight
        if hidden.device.type in SLICED_HEAD_DEVICES and isinstance(weight, torch.Tensor):
            return F.linear(hidden, weight[: self.cfg.vocab_size])
        return self.lm_head(hidden)[..., : self.cfg.vocab_size]

    def next_logits(
        self, idx: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (batch, vocab_size) for the token after idx: the head runs on the last position only."""
        return self.head(self.hidden(idx, cache, positions)[:, -1])

    def set_explicit_attention(self, explicit: bool) -> None:
        for block in self.blocks:
            block.attn.explicit = explicit

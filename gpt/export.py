"""Our GPT as a Hugging Face GPT-2 folder: config.json + model.safetensors, and back.

The seed architecture is GPT-2's (pre-norm blocks, fused QKV, tanh GELU, learned positions), so a
trained model maps onto `transformers.GPT2LMHeadModel` tensor for tensor:

  ours                                 GPT-2 (transformers)
  tok_emb.weight[:vocab_size]          transformer.wte.weight
  pos_emb.weight                       transformer.wpe.weight
  blocks.i.norm1 / norm2               transformer.h.i.ln_1 / ln_2
  blocks.i.attn.qkv  (Linear, W)       transformer.h.i.attn.c_attn  (Conv1D, W.T; bias zeros without qkv_bias)
  blocks.i.attn.proj                   transformer.h.i.attn.c_proj
  blocks.i.ff.up / ff.down             transformer.h.i.mlp.c_fc / mlp.c_proj
  final_norm                           transformer.ln_f
  lm_head.weight[:vocab_size]          lm_head.weight (left out when tied: tie_word_embeddings)

nn.Linear stores (out, in) and computes x @ W.T + b; HF's Conv1D stores (in, out) and computes
x @ W + b, hence the transposes. Both split the fused QKV output as [q | k | v] and each into heads
in order, and both scale scores by 1/sqrt(head_dim). Our embedding and head are padded to a multiple
of 64 rows (gpt.model.padded_vocab); the padded rows are never looked up or predicted, so they are
dropped on export and zero-filled on import. Only safetensors is written (no pickle to load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from gpt.config import ModelConfig

WEIGHTS_FILE = "model.safetensors"  # the names transformers' from_pretrained looks for
CONFIG_FILE = "config.json"
EOT_TOKEN = 50256  # GPT-2's <|endoftext|>, its bos and eos
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as GPT-2's layer_norm_epsilon
# (our name, GPT-2's name, transposed) for each tensor of block i
_BLOCK = (
    ("norm1.weight", "ln_1.weight", False),
    ("norm1.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True),
    ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.proj.weight", "attn.c_proj.weight", True),
    ("attn.proj.bias", "attn.c_proj.bias", False),
    ("norm2.weight", "ln_2.weight", False),
    ("norm2.bias", "ln_2.bias", False),
    ("ff.up.weight", "mlp.c_fc.weight", True),
    ("ff.up.bias", "mlp.c_fc.bias", False),
    ("ff.down.weight", "mlp.c_proj.weight", True),
    ("ff.down.bias", "mlp.c_proj.bias", False),
)
_OUTER = (
    ("pos_emb.weight", "transformer.wpe.weight"),
    ("final_norm.weight", "transformer.ln_f.weight"),
    ("final_norm.bias", "transformer.ln_f.bias"),
)


def gpt2_config(cfg: ModelConfig) -> dict:
    """transformers' GPT2Config (as config.json) for a model config; dropout carries over, eval ignores it."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,  # 4 * n_embd, as our feed-forward
        "activation_function": "gelu_new",  # GELU, tanh approximation: F.gelu(approximate="tanh")
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "torch_dtype": "float32",
    }


def to_gpt2(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> GPT-2's tensor names and layouts, fp32, contiguous, no shared memory.

    Raises KeyError when `state` lacks a tensor of the model `cfg` describes.
    """
    import torch

    vocab, width = cfg.vocab_size, cfg.emb_dim
    out = {"transformer.wte.weight": state["tok_emb.weight"][:vocab]}
    out.update({theirs: state[ours] for ours, theirs in _OUTER})
    for i in range(cfg.n_layers):
        for ours, theirs, transposed in _BLOCK:
            if ours == "attn.qkv.bias" and not cfg.qkv_bias:
                tensor = torch.zeros(3 * width)  # GPT-2 always has a QKV bias; zeros compute the same
            else:
                tensor = state[f"blocks.{i}.{ours}"]
            out[f"transformer.h.{i}.{theirs}"] = tensor.T if transposed else tensor
    if not cfg.tie_weights:  # a tied head is wte itself; safetensors stores a tensor once
        out["lm_head.weight"] = state["lm_head.weight"][:vocab]
    # clone: slices and transposes are views of the model's (padded) tensors, which safetensors refuses
    return {name: tensor.detach().to("cpu", torch.float32).contiguous().clone() for name, tensor in out.items()}


def from_gpt2(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2's tensors -> our state dict (padded vocab rows zero-filled); inverse of to_gpt2.

    Raises KeyError when a tensor is missing.
    """
    import torch

    from gpt.model import padded_vocab

    def padded(tensor: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(padded_vocab(cfg.vocab_size), cfg.emb_dim, dtype=tensor.dtype)
        full[: cfg.vocab_size] = tensor
        return full

    state = {"tok_emb.weight": padded(tensors["transformer.wte.weight"])}
    state.update({ours: tensors[theirs] for ours, theirs in _OUTER})
    for i in range(cfg.n_layers):
        for ours, theirs, transposed in _BLOCK:
            if ours == "attn.qkv.bias" and not cfg.qkv_bias:
                continue
            tensor = tensors[f"transformer.h.{i}.{theirs}"]
            state[f"blocks.{i}.{ours}"] = tensor.T.contiguous() if transposed else tensor
    state["lm_head.weight"] = state["tok_emb.weight"] if cfg.tie_weights else padded(tensors["lm_head.weight"])
    return state


def write_gpt2_folder(state: dict[str, torch.Tensor], cfg: ModelConfig, folder: Path) -> Path:
    """Write config.json and model.safetensors that GPT2LMHeadModel.from_pretrained(folder) loads.

    Returns the folder. fp32 weights: about 4 bytes per parameter (the reference model: ~650 MB).
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(gpt2_config(cfg), indent=2) + "\n", encoding="utf-8")
    # transformers refuses safetensors files whose metadata does not name the framework
    save_file(to_gpt2(state, cfg), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def read_gpt2_folder(folder: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict from a folder written by write_gpt2_folder (safetensors: no code runs)."""
    from safetensors.torch import load_file

    return from_gpt2(load_file(str(folder / WEIGHTS_FILE)), cfg)

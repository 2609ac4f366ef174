"""Our GPT as a Hugging Face GPT-2 folder: transformers loads it and computes the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt import export
from gpt.config import ModelConfig
from gpt.model import GPT, padded_vocab

transformers = pytest.importorskip("transformers", reason="transformers is a dev requirement (requirements-dev.txt)")


def tiny(**changes: object) -> ModelConfig:
    values = {"context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "dropout": 0.0, **changes}
    return ModelConfig(**values)


def trained_looking(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A model whose every tensor is random, biases and norms included (fresh ones are ones and zeros)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize(
    "changes",
    [{}, {"qkv_bias": True}, {"tie_weights": True}, {"n_heads": 4, "n_layers": 3, "qkv_bias": True}],
    ids=["seed", "qkv-bias", "tied", "4-heads-3-layers"],
)
def test_transformers_gpt2_gives_the_same_logits(tmp_path: Path, changes: dict) -> None:
    cfg = tiny(**changes)
    model = trained_looking(cfg)
    export.write_gpt2_folder(model.state_dict(), cfg, tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.context_length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, hf = model(idx), theirs(idx).logits
    assert hf.shape == ours.shape == (3, cfg.context_length, cfg.vocab_size)
    assert torch.allclose(hf, ours, atol=1e-4, rtol=1e-4), (hf - ours).abs().max()
    assert hf.abs().max() > 1.0  # the comparison is not between two near-zero tensors


def test_the_folder_holds_safetensors_and_a_gpt2_config_only(tmp_path: Path) -> None:
    cfg = tiny(tie_weights=True)
    export.write_gpt2_folder(trained_looking(cfg).state_dict(), cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["activation_function"] == "gelu_new"
    assert (config["n_positions"], config["n_embd"], config["n_layer"], config["n_head"]) == (16, 16, 2, 2)
    assert config["vocab_size"] == 50257 and config["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        assert weights.metadata() == {"format": "pt"}
        assert "lm_head.weight" not in weights.keys()  # a tied head is stored once, as wte
        assert weights.get_tensor("transformer.wte.weight").shape == (50257, 16)  # the padding is dropped


@pytest.mark.parametrize("changes", [{}, {"tie_weights": True, "qkv_bias": True}], ids=["untied", "tied-bias"])
def test_reading_the_folder_back_restores_every_tensor(tmp_path: Path, changes: dict) -> None:
    cfg = tiny(**changes)
    model = trained_looking(cfg)
    export.write_gpt2_folder(model.state_dict(), cfg, tmp_path)
    state = export.read_gpt2_folder(tmp_path, cfg)
    back = GPT(cfg)
    back.load_state_dict(state)
    for name, tensor in model.state_dict().items():
        if name in ("tok_emb.weight", "lm_head.weight"):  # the padded rows are never used: zeros come back
            assert torch.equal(back.state_dict()[name][: cfg.vocab_size], tensor[: cfg.vocab_size]), name
            assert not back.state_dict()[name][cfg.vocab_size :].any()
            assert back.state_dict()[name].shape[0] == padded_vocab(cfg.vocab_size)
        else:
            assert torch.equal(back.state_dict()[name], tensor), name
    if cfg.tie_weights:
        assert back.lm_head.weight.data_ptr() == back.tok_emb.weight.data_ptr()

"""gpt.model: shapes, loss, the chunked loss, attention paths, causality, parameter counts, and that it learns."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import RANKS, VERDICT

from gpt import model as model_module
from gpt import text, tokenizer
from gpt.config import ModelConfig
from gpt.device import loss_chunk_rows
from gpt.model import GPT, chunked_cross_entropy, padded_vocab
from gpt.sizes import count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = ModelConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=2, dropout=0.0)


def small_model(seed: int = 0, **changes: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(SMALL, **changes)).eval()


def random_tokens(batch: int, length: int, vocab: int = SMALL.vocab_size, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def unpadded_parameters(model: GPT) -> int:
    """Parameters of the real module, less the padding rows that are never predicted."""
    cfg = model.cfg
    padding = (padded_vocab(cfg.vocab_size) - cfg.vocab_size) * cfg.emb_dim
    matrices_padded = 1 if cfg.tie_weights else 2  # token embedding and LM head
    return sum(p.numel() for p in model.parameters()) - padding * matrices_padded


# ---------------------------------------------------------------- shapes and loss


def test_vocab_is_padded_to_a_multiple_of_64():
    assert padded_vocab(50257) == 50304
    assert padded_vocab(100) == 128 and padded_vocab(128) == 128


@pytest.mark.parametrize("length", [1, 7, 16])
def test_logits_have_the_unpadded_vocab(length):
    model = small_model()
    assert model.lm_head.weight.shape[0] == 128, "the head is padded to a multiple of 64"
    with torch.no_grad():
        logits = model(random_tokens(3, length))
    assert logits.shape == (3, length, 100), "padded rows must be sliced off the logits"


def test_loss_is_cross_entropy_of_the_logits():
    model = small_model()
    idx, targets = random_tokens(2, 16, seed=1), random_tokens(2, 16, seed=2)
    with torch.no_grad():
        loss = model(idx, targets)
        expected = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert loss.shape == ()
    torch.testing.assert_close(loss, expected)


def test_untrained_loss_is_near_uniform():
    with torch.no_grad():
        loss = small_model()(random_tokens(4, 16, seed=3), random_tokens(4, 16, seed=4))
    assert abs(loss.item() - torch.log(torch.tensor(100.0)).item()) < 0.5, "init should predict ~uniformly"


def test_sequence_longer_than_context_raises():
    with pytest.raises(ValueError, match="context_length"):
        small_model()(random_tokens(1, SMALL.context_length + 1))


# ---------------------------------------------------------------- chunked loss


def loss_and_grads(model: GPT, chunk_rows: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    """The training loss of a fixed batch (48 rows) with loss_chunk_rows set, and every parameter's gradient.

    The loss is scaled before backward so that the chunked path's scaling by grad_output is exercised.
    """
    model.cfg.loss_chunk_rows = chunk_rows
    model.zero_grad(set_to_none=True)
    idx, targets = random_tokens(3, 16, seed=1), random_tokens(3, 16, seed=2)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = model(idx, targets)
    (3.0 * loss).backward()
    return loss.detach(), {name: param.grad for name, param in model.named_parameters()}


@pytest.mark.parametrize("tie_weights", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk_rows", [7, 16, 48, 1000, None], ids=["ragged", "dividing", "one-chunk", "over", "auto"])
def test_chunked_loss_and_gradients_equal_the_full_logits_path(chunk_rows, tie_weights):
    model = small_model(tie_weights=tie_weights)
    full_loss, full_grads = loss_and_grads(model, 0)
    loss, grads = loss_and_grads(model, chunk_rows)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-7, msg=f"gradient of {name}")


def test_chunked_loss_under_bf16_autocast_is_as_accurate_as_the_full_logits_path():
    model = small_model()
    exact_loss, exact_grads = loss_and_grads(model, 0)
    full_loss, full_grads = loss_and_grads(model, 0, torch.bfloat16)
    loss, grads = loss_and_grads(model, 7, torch.bfloat16)
    assert loss.dtype == torch.float32 and all(grad.dtype == torch.float32 for grad in grads.values())
    assert abs(full_loss - exact_loss) > 1e-6, "autocast must reach the head, or this test compares fp32 with fp32"
    torch.testing.assert_close(loss, full_loss, rtol=1e-4, atol=0)
    # both bf16 paths round differently (the chunked one before the loss scale, per chunk), so each is held
    # to the fp32 gradients: within ~2 bf16 steps (2**-7) of the largest entry; both land near 0.5% here
    for name, grad in grads.items():
        tolerance = 2e-2 * exact_grads[name].abs().max().item()
        for path, value in (("chunked", grad), ("full-logits", full_grads[name])):
            error = (value - exact_grads[name]).abs().max().item()
            assert error < tolerance, f"{path} bf16 gradient of {name} is {error:.2e} off fp32 (limit {tolerance:.2e})"


@pytest.fixture(params=["sliced", "padded"])
def head_layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The LM head as a CPU computes it (padded rows left out of the product) or as a GPU does (padded
    width, padded columns sliced off or masked), both run here on the CPU."""
    if request.param == "padded":
        monkeypatch.setattr(model_module, "SLICED_HEAD_DEVICES", ())
    return request.param


def test_padded_vocab_columns_get_no_probability_mass(head_layout):
    model = small_model()
    with torch.no_grad():
        model.lm_head.weight[SMALL.vocab_size :] = 10.0  # padded logits far above the real ones
    idx, targets = random_tokens(2, 16, seed=1), random_tokens(2, 16, seed=2)
    with torch.no_grad():
        expected = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    model.cfg.loss_chunk_rows = 5
    loss = model(idx, targets)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)
    padded_grad = model.lm_head.weight.grad[SMALL.vocab_size :]
    assert torch.count_nonzero(padded_grad) == 0, "padded head rows must get no gradient"


@pytest.mark.parametrize("tie_weights", [False, True], ids=["untied", "tied"])
def test_both_head_layouts_give_the_same_logits_loss_and_gradients(monkeypatch, tie_weights):
    model = small_model(tie_weights=tie_weights)
    idx = random_tokens(3, 16, seed=1)
    with torch.no_grad():
        sliced_logits = model(idx)
    results = {"sliced": (loss_and_grads(model, 0), loss_and_grads(model, 7))}
    monkeypatch.setattr(model_module, "SLICED_HEAD_DEVICES", ())
    with torch.no_grad():
        padded_logits = model(idx)
    results["padded"] = (loss_and_grads(model, 0), loss_and_grads(model, 7))
    assert sliced_logits.shape == padded_logits.shape == (3, 16, SMALL.vocab_size)
    torch.testing.assert_close(sliced_logits, padded_logits, rtol=1e-6, atol=1e-6)
    reference_loss, reference_grads = results["padded"][0]  # the padded product, sliced: the head before issue 18
    for layout, paths in results.items():
        for path, (loss, grads) in zip(("full", "chunked"), paths, strict=True):
            torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=0, msg=f"{layout} {path} loss")
            for name, grad in grads.items():
                torch.testing.assert_close(
                    grad, reference_grads[name], rtol=1e-5, atol=1e-7, msg=f"{layout} {path} {name}"
                )
                if name == "lm_head.weight":
                    assert torch.count_nonzero(grad[SMALL.vocab_size :]) == 0, f"{layout} {path}: padded rows learn"


def test_auto_loss_chunk_rows_chunks_on_a_cpu_only():
    auto = dataclasses.replace(SMALL, loss_chunk_rows=None)
    assert ModelConfig().loss_chunk_rows is None, "auto is the default"
    assert loss_chunk_rows(auto, torch.device("cpu")) == 32, "at least 32 rows: smaller chunks run slowly"
    seed_width = dataclasses.replace(auto, emb_dim=768, n_heads=12)
    assert loss_chunk_rows(seed_width, torch.device("cpu")) == 768, "about emb_dim rows amortise the head's traffic"
    for device in ("cuda", "mps"):
        assert loss_chunk_rows(auto, torch.device(device)) == 0, f"full logits on {device}, as before"
    assert loss_chunk_rows(dataclasses.replace(SMALL, loss_chunk_rows=0), torch.device("cpu")) == 0
    assert loss_chunk_rows(dataclasses.replace(SMALL, loss_chunk_rows=7), torch.device("cuda")) == 7


def test_chunked_loss_without_grad_builds_no_graph():
    model = small_model(loss_chunk_rows=7)
    idx, targets = random_tokens(2, 16, seed=1), random_tokens(2, 16, seed=2)
    with torch.no_grad():
        loss = model(idx, targets)
        model.cfg.loss_chunk_rows = 0
        expected = model(idx, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_chunked_loss_compiles_without_graph_breaks(head_layout):
    torch._dynamo.reset()  # the layout is read at trace time: each one gets its own trace
    torch.manual_seed(0)
    hidden = torch.randn(20, 8, requires_grad=True)
    weight = torch.randn(64, 8, requires_grad=True)
    targets = torch.randint(50, (20,))
    # aot_eager traces the Function's forward and backward as inductor would, without the C++ build
    compiled = torch.compile(chunked_cross_entropy, backend="aot_eager", fullgraph=True)
    loss = compiled(hidden, weight, targets, 50, 7)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected = F.cross_entropy(F.linear(hidden, weight)[:, :50], targets)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for grad, want in zip(grads, torch.autograd.grad(expected, (hidden, weight)), strict=True):
        torch.testing.assert_close(grad, want)


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_sdpa_matches_the_explicit_masked_softmax(qkv_bias):
    model = small_model(dropout=0.1, qkv_bias=qkv_bias)  # eval mode: dropout must not apply
    idx = random_tokens(3, 16)
    with torch.no_grad():
        fused = model(idx)
        model.set_explicit_attention(True)
        explicit = model(idx)
    assert all(block.attn.explicit for block in model.blocks)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("position", [0, 5, 15])
def test_changing_a_token_changes_no_earlier_output(explicit, position):
    model = small_model()
    model.set_explicit_attention(explicit)
    idx = random_tokens(1, 16)
    changed = idx.clone()
    changed[0, position] = (idx[0, position] + 1) % SMALL.vocab_size
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :position], after[:, :position], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, position], after[:, position]), "the changed position must change"


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("tie_weights", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("qkv_bias", [False, True], ids=["no-bias", "qkv-bias"])
@pytest.mark.parametrize("vocab_size", [100, 128], ids=["padded", "unpadded"])
def test_count_parameters_matches_the_module(tie_weights, qkv_bias, vocab_size):
    model = small_model(tie_weights=tie_weights, qkv_bias=qkv_bias, vocab_size=vocab_size)
    assert (model.lm_head.weight is model.tok_emb.weight) == tie_weights
    assert count_parameters(model.cfg) == unpadded_parameters(model)


def test_seed_model_has_162_321_408_parameters():
    seed = ModelConfig()  # GPT-2 small at context 128, untied head: the seed experiment
    assert count_parameters(seed) == 162_321_408
    with torch.device("meta"):  # the real module's shapes, without allocating its 650 MB
        model = GPT(seed)
    assert unpadded_parameters(model) == 162_321_408


def test_tied_gpt2_small_at_context_1024_has_the_published_count():
    gpt2_small = ModelConfig(context_length=1024, qkv_bias=True, tie_weights=True)
    assert count_parameters(gpt2_small) == 124_439_808


# ---------------------------------------------------------------- learning


def test_tiny_model_overfits_a_short_text():
    encoding = tokenizer.get_encoding(str(RANKS))
    ids = torch.tensor(tokenizer.encode(encoding, text.clean_text(VERDICT.read_text(encoding="utf-8")))[:300])
    # Renumber the ~170 distinct GPT-2 ids 0..V-1: a 50257-row head would cost most of the CPU time
    # and say nothing more about whether the transformer learns.
    vocab, compact = torch.unique(ids, return_inverse=True)
    windows = compact.unfold(0, 33, 8)  # every (input, target) window of length 32, stride 8
    inputs, targets = windows[:, :-1], windows[:, 1:]
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=len(vocab), context_length=32, emb_dim=64, n_heads=4, n_layers=2, dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    uniform = torch.log(torch.tensor(float(len(vocab)))).item()
    assert abs(losses[0] - uniform) < 0.5, f"an untrained model starts near ln(V) = {uniform:.2f}, got {losses[0]:.2f}"
    assert losses[-1] < 0.3 * losses[0], f"loss fell only from {losses[0]:.2f} to {losses[-1]:.2f}"

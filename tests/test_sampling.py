"""gpt.sampling: the draw, the KV cache against the recompute reference, sliding, stopping, prompts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import RANKS

from gpt import model as model_module
from gpt import tokenizer
from gpt.config import ModelConfig
from gpt.errors import UserError
from gpt.model import GPT, KVCache
from gpt.sampling import (
    Sampling,
    check_quantize,
    encode_prompt,
    generate,
    quantize_int8,
    sample_next,
    sample_text,
    stream,
    text_pieces,
)
from gpt.text import MAX_PROMPT_CHARS, read_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ModelConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, dropout=0.0)
PROMPT = [5, 17, 42]
SETTINGS = {
    "greedy": Sampling(temperature=0.0),
    "plain": Sampling(temperature=1.0),
    "top-k": Sampling(temperature=0.8, top_k=5),
    "top-p": Sampling(temperature=1.3, top_p=0.9),
    "top-k and top-p": Sampling(temperature=1.0, top_k=20, top_p=0.7),
}


def small_model(seed: int = 0, **changes: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(SMALL, **changes)).eval()


def seeded(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the draw


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, None), (2.0, None), (0.5, 3)])
def test_draws_follow_the_softmax_of_the_filtered_tempered_logits(temperature, top_k):
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0]).log()
    drawn = sample_next(logits.expand(40_000, 5), Sampling(temperature, top_k), seeded(3))
    frequencies = torch.bincount(drawn, minlength=5) / drawn.numel()
    kept = logits if top_k is None else logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    expected = torch.softmax(kept / temperature, dim=-1)
    assert frequencies[expected == 0].sum() == 0, "a token of probability 0 must never be drawn"
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)


def test_temperature_zero_is_argmax_and_draws_no_random_numbers():
    logits = torch.randn(3, 97, generator=seeded(0))
    generator = seeded(1)
    before = generator.get_state()
    assert torch.equal(sample_next(logits, Sampling(temperature=0.0, top_k=1), generator), logits.argmax(-1))
    assert torch.equal(generator.get_state(), before)


def test_top_k_draws_only_the_k_most_likely_tokens():
    logits = torch.randn(1, 97, generator=seeded(0)).expand(2000, 97)
    drawn = set(sample_next(logits, Sampling(temperature=5.0, top_k=3), seeded(1)).tolist())
    assert drawn == set(torch.topk(logits[0], 3).indices.tolist())


@pytest.mark.parametrize(
    ("top_p", "allowed"),
    [(0.5, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_draws_from_the_smallest_set_that_reaches_p(top_p, allowed):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    drawn = set(sample_next(logits, Sampling(temperature=1.0, top_p=top_p), seeded(1)).tolist())
    assert drawn == allowed, f"top_p={top_p}: probabilities 0.5, 0.3, 0.15, 0.05 keep tokens {allowed}"


EXTREME_LOGITS = {
    "ordinary": torch.randn(4, 97, generator=seeded(5)),
    "huge": torch.randn(4, 97, generator=seeded(5)) * 3e38,
    "ties": torch.zeros(4, 97),
    "one infinite": torch.zeros(4, 97).index_fill(1, torch.tensor([13]), float("inf")),
    "two infinite": torch.zeros(4, 97).index_fill(1, torch.tensor([13, 80]), float("inf")),
    "all minus infinity": torch.full((4, 97), float("-inf")),
    "nan": torch.full((4, 97), float("nan")),
    "nan and numbers": torch.randn(4, 97, generator=seeded(5)).index_fill(1, torch.tensor([3]), float("nan")),
}


@pytest.mark.parametrize("logits", EXTREME_LOGITS.values(), ids=list(EXTREME_LOGITS))
@pytest.mark.parametrize("temperature", [1e-45, 1e-40, 1e-30, 1e-8, 0.5, 1.0, 1e30])
@pytest.mark.parametrize(("top_k", "top_p"), [(None, None), (5, None), (None, 0.9), (96, 0.5)])
def test_every_drawn_id_is_in_the_vocabulary(logits, temperature, top_k, top_p):
    drawn = sample_next(logits, Sampling(temperature, top_k, top_p), seeded(1))
    assert drawn.shape == (4,) and drawn.dtype == torch.long
    assert ((drawn >= 0) & (drawn < 97)).all(), f"ids outside the vocabulary of 97: {drawn.tolist()}"


@pytest.mark.parametrize("temperature", [1e-45, 1e-40, 1e-30])
def test_a_tiny_temperature_is_greedy(temperature):
    logits = torch.randn(64, 97, generator=seeded(0)) * 10
    assert torch.equal(sample_next(logits, Sampling(temperature), seeded(1)), logits.argmax(-1))
    assert torch.equal(sample_next(logits, Sampling(temperature, top_k=5, top_p=0.5), seeded(1)), logits.argmax(-1))


def test_generation_at_a_tiny_temperature_equals_greedy_decoding():
    model = small_model()
    for kv_cache in (True, False):
        tiny = generate(model, PROMPT, 20, Sampling(1e-40), generator=seeded(), kv_cache=kv_cache)
        assert tiny == generate(model, PROMPT, 20, SETTINGS["greedy"], kv_cache=kv_cache)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"top_p": float("nan")}, r"top-p must be in \(0, 1\]"),
        ({"temperature": -0.1}, "temperature must not be negative"),
        ({"top_k": 0}, "top-k must be at least 1"),
        ({"top_p": 0.0}, r"top-p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top-p must be in \(0, 1\]"),
    ],
)
def test_invalid_sampling_settings_are_user_errors(changes, message):
    with pytest.raises(UserError, match=message):
        Sampling(**changes)


# ---------------------------------------------------------------- the KV cache


def cached_and_full_logits(model: GPT, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits (batch, 12, vocab) after positions 4..15 of random text: prefilled with 5 tokens
    and decoded one by one through the KV cache, and from one full forward."""
    idx = torch.randint(SMALL.vocab_size, (batch, SMALL.context_length), generator=seeded(2))
    cache = KVCache(SMALL, batch, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        full = model(idx)
        cached = [model.next_logits(idx[:, :5], cache, torch.arange(5))]
        cached += [model.next_logits(idx[:, p : p + 1], cache, torch.tensor([p])) for p in range(5, 16)]
    return torch.stack(cached, 1), full[:, 4:]


@pytest.mark.parametrize("explicit", [False, True])
def test_cached_logits_match_the_full_forward(explicit):
    model = small_model()
    model.set_explicit_attention(explicit)
    cached, full = cached_and_full_logits(model, 2)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SETTINGS)
def test_kv_cache_gives_the_recompute_tokens_within_the_context(name):
    model, new = small_model(), SMALL.context_length - len(PROMPT) + 1  # every prediction sees the whole text
    cached = generate(model, PROMPT, new, SETTINGS[name], num_samples=3, generator=seeded(), kv_cache=True)
    reference = generate(model, PROMPT, new, SETTINGS[name], num_samples=3, generator=seeded(), kv_cache=False)
    assert cached == reference


@pytest.mark.parametrize("name", ["greedy", "top-k"])
def test_sliding_a_full_window_reproduces_the_recompute_beyond_the_context(name):
    model, new = small_model(), 3 * SMALL.context_length
    keep = SMALL.context_length  # re-prefill the reference's own window at every step
    cached = generate(model, PROMPT, new, SETTINGS[name], num_samples=2, generator=seeded(), keep=keep)
    reference = generate(model, PROMPT, new, SETTINGS[name], num_samples=2, generator=seeded(), kv_cache=False)
    assert cached == reference


def test_cpu_decoding_gives_the_greedy_tokens_of_the_padded_head(monkeypatch):
    # before issue 18 every decode step computed the padded head's 128 columns and sliced them to 97;
    # a CPU now leaves the padded rows out of the product: the same fp32 logits, so the same tokens
    model, new = small_model(), 50
    sliced = generate(model, PROMPT, new, SETTINGS["greedy"])
    monkeypatch.setattr(model_module, "SLICED_HEAD_DEVICES", ())
    assert generate(model, PROMPT, new, SETTINGS["greedy"]) == sliced


# ---------------------------------------------------------------- int8 weights (generate.py --quantize int8)


def test_int8_quantizes_every_linear_layer_and_nothing_else():
    model = quantize_int8(small_model())
    assert not any(isinstance(module, torch.nn.Linear) for module in model.modules()), "a Linear stayed fp32"
    quantized = [module for module in model.modules() if isinstance(module, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantized) == 4 * SMALL.n_layers + 1, "qkv, proj, up and down in each block, and the LM head"
    assert model.tok_emb.weight.dtype == torch.float32 and model.final_norm.weight.dtype == torch.float32


def test_int8_next_token_distributions_stay_close_to_fp32():
    fp32 = small_model()
    int8 = quantize_int8(small_model())
    idx = torch.randint(SMALL.vocab_size, (2, SMALL.context_length), generator=seeded(3))
    with torch.no_grad():
        exact, rounded = fp32(idx).log_softmax(-1), int8(idx).log_softmax(-1)
    kl = (exact.exp() * (exact - rounded)).sum(-1)
    # int8 rounding moves each distribution by ~4e-5 nats here; a wrong weight scale moves it by ~1 nat
    assert kl.max() < 1e-3, f"KL(fp32 || int8) up to {kl.max():.1e} nats"
    assert kl.min() > 0, "the weights must really be rounded"


def test_int8_decodes_with_the_kv_cache_as_its_full_forward_predicts():
    model = quantize_int8(small_model())
    cached, full = cached_and_full_logits(model, 1)
    # activations are quantized per call, with one scale for all the rows it gets: one row here, 16 there
    torch.testing.assert_close(cached, full, atol=0.05, rtol=0)
    assert len(generate(model, PROMPT, 3 * SMALL.context_length, SETTINGS["top-k"], generator=seeded())[0]) == 48


@pytest.mark.parametrize(
    ("quantize", "device", "message"),
    [
        ("int8", "cuda", "runs on a CPU only"),
        ("int8", "mps", "runs on a CPU only"),
        ("int4", "cpu", "one of none, int8"),
    ],
)
def test_unusable_quantization_is_a_user_error(quantize, device, message):
    with pytest.raises(UserError, match=message):
        check_quantize(quantize, torch.device(device))
    check_quantize("none", torch.device(device))
    check_quantize("int8", torch.device("cpu"))


def test_the_cache_slides_so_output_is_not_limited_by_the_context():
    model, new = small_model(), 5 * SMALL.context_length
    first = generate(model, PROMPT, new, SETTINGS["plain"], num_samples=2, generator=seeded())
    again = generate(model, PROMPT, new, SETTINGS["plain"], num_samples=2, generator=seeded())
    assert [len(row) for row in first] == [new, new]
    assert first == again, "same seed, same tokens, across re-prefills"


def test_a_prompt_longer_than_the_context_is_cropped_to_its_end():
    model, long_prompt = small_model(), list(range(40))
    for kv_cache in (True, False):
        whole = generate(model, long_prompt, 10, SETTINGS["top-k"], generator=seeded(), kv_cache=kv_cache)
        end = long_prompt[-SMALL.context_length :]
        assert whole == generate(model, end, 10, SETTINGS["top-k"], generator=seeded(), kv_cache=kv_cache)


def test_same_seed_same_tokens_and_another_seed_other_tokens():
    model = small_model()
    runs = [generate(model, PROMPT, 12, SETTINGS["plain"], generator=seeded(s)) for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_samples_of_a_batch_differ():
    rows = generate(small_model(), PROMPT, 12, SETTINGS["plain"], num_samples=4, generator=seeded())
    assert len({tuple(row) for row in rows}) > 1


# ---------------------------------------------------------------- stopping, streaming, modes


def test_each_sample_ends_before_its_first_stop_token():
    model = small_model()
    rows = generate(model, PROMPT, 40, SETTINGS["plain"], num_samples=3, generator=seeded())
    stop = rows[0][7]
    stopped = generate(model, PROMPT, 40, SETTINGS["plain"], num_samples=3, stop_token=stop, generator=seeded())
    assert stopped == [row[: row.index(stop)] if stop in row else row for row in rows]


def test_stream_yields_the_tokens_generate_returns():
    model = small_model()
    stop = generate(model, PROMPT, 30, SETTINGS["top-p"], generator=seeded())[0][20]
    expected = generate(model, PROMPT, 30, SETTINGS["top-p"], stop_token=stop, generator=seeded())[0]
    assert list(stream(model, PROMPT, 30, SETTINGS["top-p"], stop_token=stop, generator=seeded())) == expected


def test_generation_leaves_a_training_model_in_training_mode():
    model = small_model().train()
    generate(model, PROMPT, 4, SETTINGS["greedy"])
    assert model.training


def test_bad_lengths_are_user_errors():
    with pytest.raises(UserError, match="at least 1"):
        generate(small_model(), PROMPT, 0, SETTINGS["greedy"])
    with pytest.raises(UserError, match="no tokens"):
        generate(small_model(), [], 5, SETTINGS["greedy"])
    with pytest.raises(UserError, match="keep"):
        generate(small_model(), PROMPT, 5, SETTINGS["greedy"], keep=SMALL.context_length + 1)


# ---------------------------------------------------------------- text


@pytest.fixture(scope="module")
def encoding():
    if not RANKS.is_file():
        pytest.skip(f"no tokenizer ranks file at {RANKS}")
    return tokenizer.get_encoding(str(RANKS))


def test_streamed_pieces_join_to_the_decoded_text(encoding):
    text = "Caf\u00e9 \u2603 and \U0001f642 emoji"
    tokens = encoding.encode(text)
    pieces = list(text_pieces(encoding, iter(tokens)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces), "a character split across tokens must wait"


def test_prompt_checks(encoding, tmp_path):
    with pytest.raises(UserError, match="prompt is empty"):
        encode_prompt(encoding, "  \n ")
    with pytest.raises(UserError, match="characters"):
        encode_prompt(encoding, "a" * (MAX_PROMPT_CHARS + 1))
    assert encode_prompt(encoding, "<|endoftext|>") == [encoding.eot_token]
    with pytest.raises(UserError, match="exactly one"):
        read_prompt(None, None)
    with pytest.raises(UserError, match="exactly one"):
        read_prompt("a", "b.txt")
    with pytest.raises(UserError, match="not found"):
        read_prompt(None, str(tmp_path / "missing.txt"))
    (tmp_path / "prompt.txt").write_text("Alice was", encoding="utf-8")
    assert read_prompt(None, str(tmp_path / "prompt.txt")) == "Alice was"


def test_sample_text_is_the_decoded_continuation(encoding):
    model = small_model(vocab_size=50257, context_length=8)
    text = sample_text(model, encoding, "Alice was", 6, temperature=1.0, top_k=25, generator=seeded())
    ids = generate(
        model,
        encoding.encode("Alice was"),
        6,
        Sampling(1.0, 25),
        stop_token=encoding.eot_token,
        generator=seeded(),
    )[0]
    assert text == encoding.decode(ids)

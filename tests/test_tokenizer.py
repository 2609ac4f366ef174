"""gpt.tokenizer: GPT-2 BPE ids from the local ranks file, offline."""

from __future__ import annotations

import pytest
from conftest import RANKS

from gpt import env, tokenizer
from gpt.errors import UserError


@pytest.fixture(scope="module")
def encoding():
    return tokenizer.get_encoding(str(RANKS))


@pytest.mark.parametrize(
    ("sentence", "ids"),
    [
        ("Hello world", [15496, 995]),
        ("Harry Potter was a wizard.", [18308, 14179, 373, 257, 18731, 13]),
    ],
)
def test_ids_match_gpt2(encoding, sentence, ids):
    assert tokenizer.encode(encoding, sentence) == ids
    assert encoding.decode(ids) == sentence


def test_endoftext_is_50256_and_vocab_is_50257(encoding):
    assert encoding.eot_token == 50256
    assert tokenizer.encode(encoding, tokenizer.ENDOFTEXT) == [50256]
    assert encoding.n_vocab == 50257


def test_endoftext_inside_text_is_one_token(encoding):
    hello, world = tokenizer.encode(encoding, "Hello"), tokenizer.encode(encoding, " world")
    assert tokenizer.encode(encoding, "Hello<|endoftext|> world") == hello + [50256] + world


def test_round_trip_of_arbitrary_text(encoding):
    sample = "It's 3:14 p.m.  Naïve café — ¿qué?\n\tTabs, 'quotes' and emoji 🙂."
    assert encoding.decode(tokenizer.encode(encoding, sample)) == sample


def test_ranks_file_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("GPT_TIKTOKEN_FILE", str(RANKS))
    assert env.tiktoken_file() == str(RANKS)
    monkeypatch.setenv("GPT_TIKTOKEN_FILE", "")
    assert env.tiktoken_file() is None


def test_missing_ranks_file_names_the_path(tmp_path):
    missing = tmp_path / "gpt2.tiktoken"
    with pytest.raises(UserError, match="not found") as info:
        tokenizer.get_encoding(str(missing))
    assert str(missing) in str(info.value)


def test_missing_ranks_file_from_the_environment_names_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "from-env.tiktoken"
    monkeypatch.setenv("GPT_TIKTOKEN_FILE", str(missing))
    with pytest.raises(UserError) as info:
        tokenizer.get_encoding()
    assert str(missing) in str(info.value) and "GPT_TIKTOKEN_FILE" in str(info.value)


def test_file_that_is_not_a_ranks_file_names_the_path(tmp_path):
    bogus = tmp_path / "bogus.tiktoken"
    bogus.write_text("this is not base64 and has no ranks\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        tokenizer.get_encoding(str(bogus))
    assert str(bogus) in str(info.value)


def test_a_ranks_file_fixed_at_the_same_path_is_read_anew_and_leaves_no_copy(tmp_path, monkeypatch):
    """tiktoken's own loader keeps a copy of a local file by its path and reads that copy from then on."""
    cache = tmp_path / "tiktoken-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))  # where tiktoken's loader would keep its copy
    ranks = tmp_path / "gpt2.tiktoken"
    ranks.write_bytes(b"\x89binary \xff\nTWFu 0\n")
    with pytest.raises(UserError) as info:
        tokenizer.get_encoding(str(ranks))
    assert str(info.value) == (
        f"tokenizer file {ranks} is not a tiktoken ranks file (line 1 is not '<base64 token> <rank>')"
    ), "one short line, not the file's bytes"
    ranks.write_bytes(RANKS.read_bytes())  # fixed in place
    assert tokenizer.encode(tokenizer.get_encoding(str(ranks)), "Hello world") == [15496, 995]
    assert not cache.exists(), "no copy of the ranks file is kept"
    assert tokenizer.read_ranks(RANKS) == tokenizer.read_ranks(ranks) and len(tokenizer.read_ranks(ranks)) == 50_256

"""gpt.data: the reference's windows without copies, the positional train/val split, batches, token cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import RANKS

from gpt import config, data, tokenizer
from gpt.config import Config
from gpt.data import Windows, epoch_order
from gpt.errors import UserError
from gpt.sizes import count_windows, steps_per_epoch, uncovered_tokens, window_stats


class PositionEncoding:
    """A stand-in tokenizer whose ids are positions: word i of a file becomes token i.

    With it, "no validation token inside a training window" reads as "every training id is
    below the first validation id".
    """

    name = "positions"
    n_vocab = 50257
    eot_token = 50256

    def encode(self, text: str, allowed_special: object = ()) -> list[int]:
        return list(range(len(text.split())))


@pytest.fixture(scope="module")
def gpt2():
    return tokenizer.get_encoding(str(RANKS))


def make_config(files: list[Path], context: int = 8, **data_keys: object) -> Config:
    cfg = Config()
    cfg.model.context_length = context
    cfg.data.files = [str(f) for f in files]
    for key, value in data_keys.items():
        setattr(cfg.data, key, value)
    return config.validate(cfg)


def words_file(tmp_path: Path, n_words: int, name: str = "words.txt") -> Path:
    path = tmp_path / name
    path.write_text(" ".join(f"w{i}" for i in range(n_words)), encoding="utf-8")
    return path


def story_file(tmp_path: Path, sentence: str) -> Path:
    """The sentence ten times over: enough GPT-2 tokens for training and validation windows of 8."""
    path = tmp_path / "story.txt"
    path.write_text(sentence * 10, encoding="utf-8")
    return path


def seed_windows(ids: list[int], length: int, stride: int) -> tuple[list[list[int]], list[list[int]]]:
    """The reference's loop, written out: the reference every window must match."""
    inputs, targets = [], []
    for i in range(0, len(ids) - length, stride):
        inputs.append(ids[i : i + length])
        targets.append(ids[i + 1 : i + length + 1])
    return inputs, targets


# ---------------------------------------------------------------- windows


@pytest.mark.parametrize(
    ("n_tokens", "length", "stride"),
    [
        (100, 10, 10),
        (101, 10, 10),
        (100, 10, 3),
        (100, 10, 1),
        (37, 7, 2),
        (64, 4, 5),
        (11, 10, 1),  # exactly one window
        (100, 10, 200),  # a stride longer than the stream: one window
        (10, 10, 1),  # no room for the shifted target
        (5, 10, 1),
    ],
)
def test_windows_match_the_seed_loop(n_tokens, length, stride):
    ids = [(7 * i + 3) % 1000 for i in range(n_tokens)]
    expected_inputs, expected_targets = seed_windows(ids, length, stride)
    windows = Windows(torch.tensor(ids), length, stride)
    assert len(windows) == len(expected_inputs) == count_windows(n_tokens, length, stride)
    if not expected_inputs:
        return
    inputs, targets = windows.batch(torch.arange(len(windows)))
    assert inputs.tolist() == expected_inputs
    assert targets.tolist() == expected_targets


def test_target_is_input_shifted_by_one_token():
    windows = Windows(torch.arange(50), 6, 4)
    inputs, targets = windows.batch(torch.arange(len(windows)))
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert torch.equal(targets, inputs + 1)


def test_count_windows_agrees_with_the_seed_loop_everywhere():
    for n in range(0, 40):
        for length in range(1, 12):
            for stride in range(1, 14):
                expected = len(range(0, n - length, stride))
                assert count_windows(n, length, stride) == expected, (n, length, stride)


def test_uncovered_tokens_are_those_in_no_window():
    for n in range(0, 40):
        for length in range(1, 12):
            for stride in range(1, 30):
                windows = Windows(torch.arange(n), length, stride) if n > length else None
                covered = set()
                if windows is not None:
                    inputs, targets = windows.batch(torch.arange(len(windows)))
                    covered = set(inputs.flatten().tolist()) | set(targets.flatten().tolist())
                assert uncovered_tokens(n, length, stride) == n - len(covered), (n, length, stride)


def test_a_stride_over_the_window_reports_the_text_it_skips():
    cfg = config.load(None, ["model.context_length=16", "data.stride=40"])
    stats = window_stats(cfg, 10_000, 1_000)
    assert stats.uncovered_fraction == pytest.approx(1 - 17 / 40, abs=0.01), "17 of every 40 tokens are in a window"
    assert window_stats(config.load(None, ["model.context_length=16"]), 10_000, 1_000).uncovered_fraction < 0.002


def test_batch_gathers_the_requested_windows_in_order():
    windows = Windows(torch.arange(100), 5, 5)
    inputs, targets = windows.batch(torch.tensor([3, 0, 7]))
    assert inputs.tolist() == [list(range(15, 20)), list(range(0, 5)), list(range(35, 40))]
    assert targets[:, -1].tolist() == [20, 5, 40]


def test_stride_one_windows_share_storage_with_the_tokens():
    tokens = torch.arange(1_000_000)
    windows = Windows(tokens, 128, 1)
    assert len(windows) == 1_000_000 - 128
    # a copy per window would need len * 129 * 8 bytes (about 1 GB); the view needs none
    assert windows.rows.untyped_storage().data_ptr() == tokens.untyped_storage().data_ptr()
    assert windows.rows.untyped_storage().nbytes() == tokens.untyped_storage().nbytes() == 8_000_000
    inputs, targets = windows.batch(torch.tensor([0, 999_871]))
    assert inputs.shape == targets.shape == (2, 128)
    assert inputs.untyped_storage().nbytes() <= 2 * 129 * 8, "a batch gathers only its own windows"
    assert targets[1, -1].item() == 999_999


def test_windows_of_a_slice_share_the_stream_storage():
    stream = torch.arange(1000)
    train = stream[:900]
    windows = Windows(train, 16, 3)
    assert windows.rows.untyped_storage().data_ptr() == stream.untyped_storage().data_ptr()


# ---------------------------------------------------------------- shuffling and batches


def test_epoch_order_is_reproducible_for_a_seed_and_epoch():
    first = epoch_order(100, 8, False, seed=123, epoch=3)
    again = epoch_order(100, 8, False, seed=123, epoch=3)
    assert [b.tolist() for b in first] == [b.tolist() for b in again]


def test_epoch_order_differs_between_epochs_and_seeds():
    def flat(seed: int, epoch: int) -> list[int]:
        return torch.cat(epoch_order(100, 8, False, seed=seed, epoch=epoch)).tolist()

    assert flat(123, 1) != flat(123, 2), "each epoch must see a new order"
    assert flat(123, 1) != flat(124, 1), "another seed must give another order"
    assert flat(123, 1) != list(range(100)), "the order must be shuffled"


def test_epoch_order_visits_every_window_once():
    assert sorted(torch.cat(epoch_order(103, 8, False, seed=1, epoch=1)).tolist()) == list(range(103))


@pytest.mark.parametrize(
    ("n_windows", "batch_size", "drop_last", "sizes"),
    [
        (10, 4, True, [4, 4]),
        (10, 4, False, [4, 4, 2]),
        (8, 4, True, [4, 4]),
        (8, 4, False, [4, 4]),
        (3, 4, True, [3]),  # the only batch is kept even though it is partial
        (3, 4, False, [3]),
        (1, 64, True, [1]),
    ],
)
def test_drop_last(n_windows, batch_size, drop_last, sizes):
    batches = epoch_order(n_windows, batch_size, drop_last, seed=0, epoch=1)
    assert [len(b) for b in batches] == sizes
    assert steps_per_epoch(n_windows, batch_size, drop_last) == len(sizes)


def test_steps_per_epoch_counts_the_batches_of_an_epoch():
    for n in range(1, 30):
        for batch_size in range(1, 9):
            for drop_last in (True, False):
                batches = epoch_order(n, batch_size, drop_last, seed=5, epoch=2)
                assert steps_per_epoch(n, batch_size, drop_last) == len(batches), (n, batch_size, drop_last)


def test_sequential_batches_cover_all_windows_in_order():
    batches = data.sequential_batches(10, 4)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# ---------------------------------------------------------------- corpus: split, cache, joining


def test_split_is_by_position_before_windowing(tmp_path):
    source = words_file(tmp_path, 1000)
    cfg = make_config([source], context=8, stride=1, val_fraction=0.1)
    corpus = data.build_corpus(cfg, PositionEncoding(), tmp_path / "cache")
    assert corpus.train.tolist() == list(range(900)), "the head of the stream trains"
    assert corpus.val.tolist() == list(range(900, 1000)), "the tail of the stream validates"
    windows = Windows(corpus.train, cfg.window_length, cfg.window_stride)
    inputs, targets = windows.batch(torch.arange(len(windows)))
    assert max(inputs.max().item(), targets.max().item()) < 900, "a validation token sits in a training window"
    assert targets.max().item() == 899, "stride 1 reaches the last training token"


@pytest.mark.parametrize(("context", "stride", "max_length"), [(8, None, None), (16, "0.5x", None), (32, 3, 20)])
def test_split_is_the_same_for_every_stride_and_context(tmp_path, context, stride, max_length):
    source = words_file(tmp_path, 1000)
    reference = data.build_corpus(make_config([source]), PositionEncoding(), tmp_path / "cache")
    cfg = make_config([source], context=context, stride=stride, max_length=max_length)
    corpus = data.build_corpus(cfg, PositionEncoding(), tmp_path / "cache")
    assert torch.equal(corpus.train, reference.train) and torch.equal(corpus.val, reference.val)
    windows = Windows(corpus.train, cfg.window_length, cfg.window_stride)
    assert windows.batch(torch.arange(len(windows)))[1].max().item() < corpus.val[0].item()


def test_data_stats(tmp_path):
    cfg = make_config([words_file(tmp_path, 1000)], context=8, stride=4, val_fraction=0.1)
    cfg.train.batch_size = 32
    stats = data.data_stats(cfg, data.build_corpus(cfg, PositionEncoding(), tmp_path / "cache"))
    assert (stats.train_tokens, stats.val_tokens) == (900, 100)
    assert stats.train_windows == len(range(0, 900 - 8, 4)) == 223
    assert stats.val_windows == len(range(0, 100 - 8, 8)) == 12, "validation windows never overlap"
    assert stats.steps_per_epoch == 6, "223 windows in batches of 32, last partial batch dropped"
    assert stats.tokens_per_epoch == 6 * 32 * 8


def test_files_are_joined_with_endoftext(tmp_path, gpt2):
    first = tmp_path / "a.txt"
    second = tmp_path / "b.txt"
    first.write_text("It was a bright cold day in April,\n\nand the clocks were striking thirteen.", encoding="utf-8")
    second.write_text("Call me Ishmael. Some years ago, never mind how long precisely.", encoding="utf-8")
    cfg = make_config([first, second], context=4, val_fraction=0.3)
    corpus = data.build_corpus(cfg, gpt2, tmp_path / "cache")
    ids_a = gpt2.encode("It was a bright cold day in April, and the clocks were striking thirteen.")
    ids_b = gpt2.encode("Call me Ishmael. Some years ago, never mind how long precisely.")
    stream = torch.cat([corpus.train, corpus.val]).tolist()
    assert stream == ids_a + [50256] + ids_b
    assert [(f["name"], f["tokens"]) for f in corpus.files] == [("a", len(ids_a)), ("b", len(ids_b))]
    assert corpus.train.dtype == torch.int64


def test_token_cache_is_hit_on_the_second_build(tmp_path, gpt2, monkeypatch):
    source = story_file(tmp_path, "Once upon a time there was a tiny model that learned to talk. ")
    cfg = make_config([source], context=8)
    first = data.build_corpus(cfg, gpt2, tmp_path / "cache")

    def no_encoding(*args: object, **kwargs: object) -> list[int]:
        raise AssertionError("the encoder ran although the tokens are cached")

    monkeypatch.setattr(data, "encode", no_encoding)
    second = data.build_corpus(cfg, gpt2, tmp_path / "cache")
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)

    story_file(tmp_path, "A different text now, so the cache must miss. ")
    with pytest.raises(AssertionError, match="encoder ran"):
        data.build_corpus(cfg, gpt2, tmp_path / "cache")


def test_torn_token_cache_is_rebuilt(tmp_path, gpt2):
    source = story_file(tmp_path, "The quick brown fox jumps over the lazy dog. ")
    cfg = make_config([source], context=8)
    first = data.build_corpus(cfg, gpt2, tmp_path / "cache")
    (cached,) = (tmp_path / "cache").rglob("*.npy")
    cached.write_bytes(cached.read_bytes()[:20])
    second = data.build_corpus(cfg, gpt2, tmp_path / "cache")
    assert torch.equal(first.train, second.train)


def test_corpus_too_short_for_one_window_names_the_file(tmp_path, gpt2):
    source = tmp_path / "short.txt"
    source.write_text("Far too short for a window.", encoding="utf-8")
    with pytest.raises(UserError) as info:
        data.build_corpus(make_config([source], context=32), gpt2, tmp_path / "cache")
    assert str(source) in str(info.value) and "data.max_length" in str(info.value)


def test_validation_split_too_short_names_the_file_and_key(tmp_path):
    source = words_file(tmp_path, 200)
    cfg = make_config([source], context=16, val_fraction=0.05)  # 10 validation tokens < 16 + 1
    with pytest.raises(UserError) as info:
        data.build_corpus(cfg, PositionEncoding(), tmp_path / "cache")
    assert str(source) in str(info.value) and "data.val_fraction" in str(info.value)


def test_vocab_smaller_than_the_tokenizer_names_the_key(tmp_path, gpt2):
    source = story_file(tmp_path, "Zebras quietly synchronize their kaleidoscopic stripes. ")
    cfg = make_config([source], context=8)
    cfg.model.vocab_size = 256
    with pytest.raises(UserError, match="model.vocab_size"):
        data.build_corpus(cfg, gpt2, tmp_path / "cache")

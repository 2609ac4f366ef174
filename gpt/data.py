"""Tokens on disk, the train/validation split, zero-copy sliding windows and shuffled batches.

Window arithmetic, for a token stream of N tokens, window length L and stride S:
windows start at 0, S, 2S, ... while start + L + 1 <= N, so there are (N - L - 1) // S + 1 of them
(none when N <= L). Input is tokens[start : start+L], target is tokens[start+1 : start+L+1].
Validation always uses non-overlapping windows (S = L) so every stride sees the same held-out text.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tiktoken
import torch

from gpt.config import Config
from gpt.errors import UserError, cache_write
from gpt.sizes import DataStats, count_windows, window_stats
from gpt.text import Document, load_documents
from gpt.tokenizer import encode


@dataclass
class Corpus:
    """One run's token stream, split by position: train is the head, val the tail (int64 ids)."""
    train: torch.Tensor  # int64 token ids, the head of the stream
    val: torch.Tensor  # int64 token ids, the tail of the stream
    files: list[dict] = field(default_factory=list)  # name, path, sha256, tokens per source file


class Windows:
    """All (input, target) windows of a token tensor, as one strided view: no copy per window."""

    def __init__(self, tokens: torch.Tensor, length: int, stride: int):
        self.length, self.stride = length, stride
        n = count_windows(len(tokens), length, stride)
        # unfold returns a view over the same storage: memory stays O(tokens) even for stride 1.
        self.rows = tokens[: (n - 1) * stride + length + 1].unfold(0, length + 1, stride) if n else None
        self.count = n

    def __len__(self) -> int:
        return self.count

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (batch, length) of the windows at `index` (batch,); targets are inputs shifted by one."""
        rows = self.rows[index]  # gathers only this batch
        return rows[:, :-1], rows[:, 1:]


def epoch_order(n_windows: int, batch_size: int, drop_last: bool, seed: int, epoch: int) -> list[torch.Tensor]:
    """The shuffled batches of one epoch. Seeded by (seed, epoch) so a resumed run sees the same order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_windows, generator=generator)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def sequential_batches(n_windows: int, batch_size: int) -> list[torch.Tensor]:
    """Window indices 0..n_windows-1 in order, in batches of batch_size (validation)."""
    return list(torch.arange(n_windows).split(batch_size))


# ---------------------------------------------------------------- tokens


def sha256_file(path: Path) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenize_cached(doc: Document, encoding: tiktoken.Encoding, cache_dir: Path) -> np.ndarray:
    """Token ids of a document, cached on disk by a hash of the text and the encoding.

    A cache is only a cache: an entry that cannot be read (empty or torn after a power loss, garbled)
    or whose ids the tokenizer cannot have produced is rebuilt, and one that cannot be written (a full
    or read-only disk) is skipped with a warning.
    """
    key = hashlib.sha256(f"{encoding.name}:{encoding.n_vocab}\0{doc.text}".encode()).hexdigest()[:32]
    path = cache_dir / "tokens" / f"{key}.npy"
    if path.is_file():
        ids = _read_cached(path, encoding.n_vocab)
        if ids is not None:
            return ids
        path.unlink(missing_ok=True)  # rebuilt below
    ids = np.asarray(encode(encoding, doc.text), dtype=np.uint16 if encoding.n_vocab <= 65536 else np.int32)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")  # parallel workers may race here
    with cache_write("token cache", path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as handle:
                np.save(handle, ids)
                handle.flush()
                os.fsync(handle.fileno())  # a power loss must not leave an empty file under the final name
            partial.replace(path)
        finally:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
    return ids


def _read_cached(path: Path, n_vocab: int) -> np.ndarray | None:
    """The cached ids, or None when the entry is unreadable or holds ids outside the tokenizer's vocabulary."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # EOFError: an empty file
        return None
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or not ids.size or int(ids.max()) >= n_vocab or int(ids.min()) < 0:
        return None
    return ids


def build_corpus(cfg: Config, encoding: tiktoken.Encoding, cache_dir: Path, check: bool = True) -> Corpus:
    """Read, clean and tokenize the data, then split the stream by position into train/val.

    Files are joined with <|endoftext|>. The split happens before windowing, so no validation
    token ever sits in a training window, whatever the stride or context length.
    """
    d = cfg.data
    documents = load_documents(d.files, clean=d.clean, strip_header=d.strip_gutenberg, cache_dir=cache_dir)
    pieces, files = [], []
    for i, doc in enumerate(documents):
        ids = tokenize_cached(doc, encoding, cache_dir)
        if i:
            pieces.append(np.asarray([encoding.eot_token], dtype=ids.dtype))
        pieces.append(ids)
        files.append(
            {"name": doc.name, "path": str(doc.path), "sha256": sha256_file(doc.path), "tokens": len(ids),
             "characters": len(doc.text)}  # after cleaning
        )  # fmt: skip
    stream = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
    if stream.max().item() >= cfg.model.vocab_size:
        raise UserError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's ids "
            f"(up to {stream.max().item()}); use 50257 for GPT-2's encoding"
        )
    n_val = int(round(len(stream) * d.val_fraction))
    corpus = Corpus(train=stream[: len(stream) - n_val], val=stream[len(stream) - n_val :], files=files)
    if check:  # an ablation plan checks each cell's windows itself
        check_corpus(cfg, corpus)
    return corpus


def check_corpus(cfg: Config, corpus: Corpus) -> None:
    """UserError when either split is too short for one window of the config's length."""
    length, names = cfg.window_length, ", ".join(f["path"] for f in corpus.files)
    if count_windows(len(corpus.train), length, cfg.window_stride) == 0:
        raise UserError(
            f"data: the training split of {names} has {len(corpus.train)} tokens, too few for one window "
            f"of {length}+1; use more text or a smaller data.max_length"
        )
    if count_windows(len(corpus.val), length, length) == 0:
        raise UserError(
            f"data: the validation split of {names} has {len(corpus.val)} tokens, too few for one window "
            f"of {length}+1; raise data.val_fraction or lower data.max_length"
        )


def data_stats(cfg: Config, corpus: Corpus) -> DataStats:
    """DataStats (gpt.sizes) of the config on this corpus."""
    return window_stats(cfg, len(corpus.train), len(corpus.val))

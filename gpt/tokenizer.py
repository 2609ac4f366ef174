"""The GPT-2 BPE encoding, from tiktoken online or from a local ranks file offline."""

from __future__ import annotations

import base64
import binascii
import functools
from pathlib import Path

import tiktoken

from gpt import env
from gpt.errors import UserError, check_file

ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenizer split pattern (tiktoken's r50k pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def get_encoding(ranks_file: str | None = None) -> tiktoken.Encoding:
    """GPT-2's encoding; built from `ranks_file` (or $GPT_TIKTOKEN_FILE) when one is given.

    Without a local file this is tiktoken.get_encoding("gpt2"), which downloads once and caches.
    """
    return _encoding(ranks_file or env.tiktoken_file())


GPT2_RANKS = 50_256  # byte-pair ranks in gpt2.tiktoken; <|endoftext|> is id 50,256


@functools.lru_cache(maxsize=4)
def _encoding(ranks_file: str | None) -> tiktoken.Encoding:
    if ranks_file is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as exc:  # tiktoken fetches the ranks over HTTP on first use
            raise UserError(
                f"could not fetch GPT-2's tokenizer files ({type(exc).__name__}); without internet, point "
                "--tokenizer-file or GPT_TIKTOKEN_FILE at a local gpt2.tiktoken ranks file"
            ) from None
    path = Path(ranks_file).expanduser()
    missing = f"tokenizer file not found: {path} (set by --tokenizer-file or GPT_TIKTOKEN_FILE)"
    check_file(path, "tokenizer file", missing)
    ranks = read_ranks(path)
    if len(ranks) != GPT2_RANKS:  # an empty or cut file would make another (smaller) vocabulary
        raise UserError(f"tokenizer file {path} holds {len(ranks):,} ranks, not GPT-2's {GPT2_RANKS:,} (gpt2.tiktoken)")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: len(ranks)},
        explicit_n_vocab=len(ranks) + 1,
    )


def read_ranks(path: Path) -> dict[bytes, int]:
    """The byte-pair ranks of a tiktoken ranks file: a line `<base64 token> <rank>` per token.

    The format is tiktoken's (tiktoken.load.load_tiktoken_bpe); it is read here because that loader keeps a
    copy of every local file, keyed by its path, in /tmp/data-gym-cache and reads the copy from then on, so a
    file fixed or replaced at the same path would still load as it was. Raises UserError naming the path and
    the first line that is not a rank, or the reason the file cannot be read.
    """
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise UserError(f"tokenizer file {path} cannot be read: {exc.strerror or exc}") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise UserError(
                f"tokenizer file {path} is not a tiktoken ranks file (line {number} is not '<base64 token> <rank>')"
            ) from None
    return ranks


def encode(encoding: tiktoken.Encoding, text: str) -> list[int]:
    """Token ids of text; <|endoftext|> in the text becomes its special token (50256)."""
    return encoding.encode(text, allowed_special={ENDOFTEXT})

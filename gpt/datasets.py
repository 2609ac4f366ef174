"""The run's texts as MLflow dataset inputs: what the run page and the runs table list under Datasets.

The corpus is one token stream (files joined by <|endoftext|>) whose tail is the validation split, so
a file can feed training, validation or both. Each file is one dataset input per split it feeds,
with MLflow's context tag `training` or `validation`:
  name     the file's stem (`gutenberg:<id>` for a downloaded book)
  digest   the first 16 hex digits of the sha256 of that split's token ids (MLflow keeps a dataset's
           profile per name and digest, so the digest changes whenever the text, its cleaning, the
           tokenizer or the split does; a split is a different dataset, as in MLflow's own examples)
  source   the file (source type local) or the book's download URL (http; gpt.env.gutenberg_url)
  profile  characters (after cleaning) and tokens of the file, the split's tokens, train and val
           tokens of the file, and the file's sha256 (the same as the data.file<i>.sha256 param)
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt import env

if TYPE_CHECKING:
    import torch

    from gpt.data import Corpus
    from gpt.tracking import Tracker

DIGEST_LENGTH = 16  # MLflow allows at most 36 characters
_BOOK = re.compile(r"pg(\d+)")


def file_spans(corpus: Corpus) -> list[tuple[int, int]]:
    """[start, end) of each file in the token stream (train then val); an <|endoftext|> sits between files."""
    spans, start = [], 0
    for info in corpus.files:
        spans.append((start, start + info["tokens"]))
        start += info["tokens"] + 1
    return spans


def _digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(memoryview(tokens.contiguous().numpy())).hexdigest()[:DIGEST_LENGTH]


def _source(path: Path, cache_dir: Path) -> tuple[str, str, str]:
    """(name, source type, source JSON) of a data file, through MLflow's dataset sources."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    book = _BOOK.fullmatch(path.stem)
    if book and path.parent.resolve() == (cache_dir / "gutenberg").resolve():  # gpt.text.download_gutenberg
        source = HTTPDatasetSource(env.gutenberg_url().format(id=book.group(1)))
        return f"gutenberg:{book.group(1)}", source._get_source_type(), source.to_json()
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about it
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(path.resolve()))
    return path.stem, source._get_source_type(), source.to_json()


def dataset_records(corpus: Corpus, cache_dir: Path) -> list[dict[str, Any]]:
    """One JSON-ready record per (file, split it feeds): name, digest, source, profile, context."""
    n_train = len(corpus.train)
    records = []
    for info, (start, end) in zip(corpus.files, file_spans(corpus), strict=True):
        parts = {
            "training": corpus.train[start : min(end, n_train)],
            "validation": corpus.val[max(start, n_train) - n_train : max(end - n_train, 0)],
        }
        name, source_type, source = _source(Path(info["path"]), cache_dir)
        profile = {
            "characters": info.get("characters"),
            "tokens": info["tokens"],
            "train_tokens": len(parts["training"]),
            "val_tokens": len(parts["validation"]),
            "sha256": info["sha256"],
        }
        for context, tokens in parts.items():
            if len(tokens):
                split_profile = json.dumps({**profile, "split_tokens": len(tokens)})
                records.append(
                    {"name": name, "digest": _digest(tokens), "source_type": source_type, "source": source,
                     "profile": split_profile, "context": context}
                )  # fmt: skip
    return records


def log_datasets(tracker: Tracker, corpus: Corpus, cache_dir: Path) -> None:
    """Spool the corpus's dataset inputs (gpt.delivery.deliver_datasets sends them)."""
    tracker.log_datasets(dataset_records(corpus, cache_dir))

"""Shared test set-up: offline tokenizer, a private cache, no MLflow telemetry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "corpus"
ALICE = CORPUS / "alice_in_wonderland.txt"
VERDICT = CORPUS / "the_verdict.txt"
RANKS = SHARED / "tokenizer" / "gpt2.tiktoken"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
if RANKS.is_file():
    os.environ.setdefault("GPT_TIKTOKEN_FILE", str(RANKS))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Token caches and cleaned texts go to a temporary folder, never the user's ~/.cache."""
    os.environ["GPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("gpt-cache"))

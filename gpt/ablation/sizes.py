"""Model sizes an ablation compares: total and non-embedding parameters.

With GPT-2's 50k vocabulary the embedding and the LM head hold nearly all the weights of a small
model: one more tiny layer changes the total by 0.3% but the transformer by 2x. Scaling-law work
counts non-embedding parameters for this reason (Kaplan et al. 2020, "Scaling Laws for Neural
Language Models", section 2.1); the report shows both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def non_embedding_params(n_params: int, vocab_size: int, emb_dim: int, context_length: int, tie_weights: bool) -> int:
    """Parameters outside the token and position embeddings and the LM head's vocab x emb_dim matrix.

    n_params counts a tied head once (gpt.model.count_parameters), an untied one as a second
    vocab_size x emb_dim matrix.
    """
    lookups = vocab_size * emb_dim * (1 if tie_weights else 2) + context_length * emb_dim
    return n_params - lookups


def non_embedding_from_params(params: Mapping[str, str]) -> float:
    """non_embedding_params from a training run's logged params; NaN when one of them is missing."""
    try:
        return float(
            non_embedding_params(
                int(params["n_params"]),
                int(params["model.vocab_size"]),
                int(params["model.emb_dim"]),
                int(params["model.context_length"]),
                params["model.tie_weights"].strip().lower() == "true",
            )
        )
    except (KeyError, ValueError):
        return math.nan

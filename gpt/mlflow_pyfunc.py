"""The MLflow pyfunc of a trained GPT, logged as MLflow "models from code".

MLflow copies this file into the model (code/) and runs it when the model is loaded; it defines the
model class and hands an instance to mlflow.models.set_model. Nothing is pickled: the weights come
from the model's artifacts as safetensors (gpt.export), the config from a YAML file and the
tokenizer from a GPT-2 ranks file stored with the model, so a served model works offline.

predict(model_input, params) takes prompts (a DataFrame column "prompt", a list of strings or one
string) and returns one generated continuation per prompt, without the prompt. params:
max_tokens, temperature (0: greedy), top_k, top_p, seed (same seed, same text; none: random).
model_config: device ("auto", "cpu", "cuda", "mps"), chosen when the model is loaded.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from gpt.mlflow_model import DEFAULT_PARAMS  # the gpt package travels with the model (code_paths)


class GPTTextGenerator(PythonModel):
    """Continues prompts with the model's KV-cached sampler (gpt.sampling.generate)."""

    def load_context(self, context: Any) -> None:
        """Build the GPT from the artifacts: config (YAML), weights (safetensors), tokenizer (ranks file)."""
        from gpt.mlflow_model import load_artifacts

        device = (context.model_config or {}).get("device", "auto")
        self.model, self.cfg, self.encoding = load_artifacts(context.artifacts, device)

    # model_input is annotated DataFrame, a type MLflow derives no signature from: the logged one stays
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """One continuation (text, prompt excluded) per prompt; bad input raises MlflowException."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from gpt.errors import UserError
        from gpt.mlflow_model import continue_prompts

        settings = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
        try:
            return continue_prompts(self.model, self.encoding, prompts_of(model_input), settings)
        except UserError as exc:  # the scoring server answers 400 with the message, not 500
            raise MlflowException(str(exc), INVALID_PARAMETER_VALUE) from None


def prompts_of(model_input: Any) -> list[str]:
    """The prompts in a DataFrame ("prompt" column, else the first), a list, a dict or one string."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        model_input = model_input.get("prompt", next(iter(model_input.values()), []))
        return [model_input] if isinstance(model_input, str) else [str(p) for p in model_input]
    columns = getattr(model_input, "columns", None)
    if columns is not None:
        column = "prompt" if "prompt" in columns else columns[0]
        return [str(p) for p in model_input[column].tolist()]
    return [str(p) for p in model_input]


mlflow.models.set_model(GPTTextGenerator())

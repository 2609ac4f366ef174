"""A trained GPT as an MLflow Model (pyfunc from code), and the model read back from its folder.

The folder, written by mlflow.pyfunc.save_model:
  MLmodel, requirements.txt, python_env.yaml, conda.yaml, input_example.json, serving_input_example.json
  mlflow_pyfunc.py        the model class (gpt/mlflow_pyfunc.py), run on load: MLflow "models from code"
  code/gpt/               this package (code_paths), so the model loads without this repository
  artifacts/hf/           config.json + model.safetensors: GPT2LMHeadModel.from_pretrained loads it (gpt.export)
  artifacts/config.yaml   the training config; model.* rebuilds the GPT
  artifacts/gpt2.tiktoken GPT-2's BPE ranks (1.6 MB), so encoding needs no download
Weights are fp32 safetensors, ~4 bytes a parameter (the reference model: ~650 MB); nothing is pickled.
"""

from __future__ import annotations

import base64
import importlib.metadata
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt import export

if TYPE_CHECKING:
    import tiktoken
    import torch
    from mlflow.models import ModelSignature

    from gpt.config import Config
    from gpt.model import GPT

PACKAGE = Path(__file__).resolve().parent
PYFUNC_FILE = PACKAGE / "mlflow_pyfunc.py"
WEIGHTS, CONFIG, TOKENIZER = "hf", "config.yaml", "gpt2.tiktoken"  # artifact names (and file names)
EXAMPLE_PROMPT = "Every effort moves you"
# predict()'s params and their defaults: top_k, top_p None keep every token; seed None draws a random one
DEFAULT_PARAMS: dict[str, Any] = {"max_tokens": 50, "temperature": 1.0, "top_k": None, "top_p": None, "seed": None}
# what `mlflow models serve` installs into a fresh environment (--env-manager local uses this one)
REQUIREMENTS = ("mlflow", "torch", "tiktoken", "safetensors", "PyYAML", "numpy", "pandas")


def signature() -> ModelSignature:
    """Prompts in, texts out; the sampling settings as params with their defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {"max_tokens": "long", "temperature": "double", "top_k": "long", "top_p": "double", "seed": "long"}
    params = ParamSchema([ParamSpec(name, kinds[name], DEFAULT_PARAMS[name]) for name in kinds])
    return ModelSignature(Schema([ColSpec("string")]), Schema([ColSpec("string")]), params)


def pinned_requirements() -> list[str]:
    """REQUIREMENTS pinned to the versions installed here (torch without a local tag such as +cpu)."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def write_ranks(encoding: tiktoken.Encoding, path: Path) -> Path:
    """The encoding's BPE ranks in tiktoken's file format (base64 token, space, rank; special tokens aside)."""
    lines = []
    for rank in range(encoding.n_vocab):
        if rank in encoding._special_tokens.values():  # noqa: SLF001 - tiktoken exposes them no other way
            continue
        token = encoding.decode_single_token_bytes(rank)
        lines.append(base64.b64encode(token) + b" " + str(rank).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def save_model_folder(
    state: dict[str, torch.Tensor],
    cfg: Config,
    encoding: tiktoken.Encoding,
    target: Path,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the MLflow Model folder `target` (it must not exist) from a model state dict; returns it.

    Raises MlflowException when MLflow cannot save, OSError when the disk fails.
    """
    import mlflow
    import pandas as pd

    from gpt.config import dump_yaml

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".model-") as staging:
        folder = Path(staging)
        export.write_gpt2_folder(state, cfg.model, folder / WEIGHTS)
        (folder / CONFIG).write_text(dump_yaml(cfg), encoding="utf-8")
        write_ranks(encoding, folder / TOKENIZER)
        example = (pd.DataFrame({"prompt": [EXAMPLE_PROMPT]}), {"max_tokens": 20, "temperature": 0.8, "seed": 0})
        mlflow.pyfunc.save_model(
            path=str(target),
            python_model=str(PYFUNC_FILE),
            artifacts={name: str(folder / name) for name in (WEIGHTS, CONFIG, TOKENIZER)},
            code_paths=[str(PACKAGE)],
            signature=signature(),
            input_example=example,
            pip_requirements=pinned_requirements(),
            model_config={"device": "auto"},
            metadata=metadata,
        )
    for cache in target.rglob("__pycache__"):  # compiled copies of code/gpt: not part of the model
        shutil.rmtree(cache, ignore_errors=True)
    return target


def load_artifacts(
    artifacts: dict[str, str], device: str | torch.device = "auto"
) -> tuple[GPT, Config, tiktoken.Encoding]:
    """The model (eval mode; bf16 on CUDA, fp32 elsewhere), its config and its encoding, from artifact paths.

    Raises UserError when the config or tokenizer file is unusable or the device is not available.
    """
    import torch

    from gpt import config as config_module
    from gpt.device import inference_dtype, resolve_device
    from gpt.model import GPT
    from gpt.tokenizer import get_encoding

    cfg = config_module.load(artifacts[CONFIG])
    encoding = get_encoding(artifacts[TOKENIZER])
    target = device if isinstance(device, torch.device) else resolve_device(device, option="device")
    model = GPT(cfg.model)
    model.load_state_dict(export.read_gpt2_folder(Path(artifacts[WEIGHTS]), cfg.model))
    model.to(device=target, dtype=inference_dtype(target)).eval()
    return model, cfg, encoding


def model_folder_artifacts(folder: Path) -> dict[str, str]:
    """The artifact paths of a saved (or downloaded) model folder, as load_artifacts takes them."""
    return {name: str(folder / "artifacts" / name) for name in (WEIGHTS, CONFIG, TOKENIZER)}


def continue_prompts(
    model: GPT, encoding: tiktoken.Encoding, prompts: Sequence[str], settings: dict[str, Any]
) -> list[str]:
    """One sampled continuation per prompt, ending before <|endoftext|>; settings as DEFAULT_PARAMS.

    Raises UserError for an empty prompt or settings out of range (gpt.sampling's checks).
    """
    import secrets

    import torch

    from gpt.config import Sampling
    from gpt.errors import UserError
    from gpt.sampling import encode_prompt, generate

    top_k, top_p = settings["top_k"], settings["top_p"]
    sampling = Sampling(
        float(settings["temperature"]), None if top_k is None else int(top_k), None if top_p is None else float(top_p)
    )
    max_tokens = int(settings["max_tokens"])
    if max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1, got {max_tokens}")
    seed = secrets.randbelow(2**31) if settings["seed"] is None else int(settings["seed"])
    device = next(model.parameters()).device
    texts = []
    for number, prompt in enumerate(prompts):
        generator = torch.Generator(device=device).manual_seed(seed + number)  # each prompt reproducible alone
        ids = encode_prompt(encoding, prompt)
        rows = generate(model, ids, max_tokens, sampling, stop_token=encoding.eot_token, generator=generator)
        texts.append(encoding.decode(rows[0]))
    return texts

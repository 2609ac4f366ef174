"""Checkpoints: written atomically, loaded with weights_only=True, carrying their own config.

A checkpoint is a plain dict of tensors and primitive values, so `torch.load(weights_only=True)`
can read it and a checkpoint file can never run code:
  format, config (nested dict), model (state_dict), optimizer (state_dict or None),
  epoch (last finished epoch, 1-based), step, best_val_loss, rng (torch CPU/CUDA states), tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from gpt import config as config_module
from gpt.config import Config
from gpt.errors import UserError

FORMAT = "gpt-mlflow-checkpoint/1"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a model, unwrapped from torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return model.state_dict()


def save(path: Path, payload: dict[str, Any]) -> Path:
    """Write to a temporary file, fsync it, then rename: a crash mid-write keeps the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    try:
        with open(partial, "wb") as handle:
            torch.save({"format": FORMAT, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # as large as the model: don't leave it on a disk that may be full
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely; a truncated, foreign or missing file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # the weights-only unpickler also raises IndexError, KeyError... on foreign bytes
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} is truncated, corrupt or not from this tool ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not a checkpoint of this tool (expected format {FORMAT})")
    return payload


def config_of(payload: dict[str, Any], source: str = "checkpoint") -> Config:
    return config_module.validate(config_module.from_dict(payload["config"], source=source))


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, turning a shape mismatch into a message that names the tensor and both shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"{source} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise UserError(
                f"{source} does not fit the config: {name} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(own[name].shape)}"
            )
    model.load_state_dict(state)

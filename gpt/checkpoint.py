"""The checkpoint format: what a training checkpoint holds, how it is built from a trainer and restored
into one, written atomically and read with weights_only=True.

A checkpoint is a plain dict of tensors and primitive values, so `torch.load(weights_only=True)`
can read it and a checkpoint file can never run code:
  format, config (nested dict), model (state_dict), optimizer (state_dict), state (gpt.state.TrainState:
  epoch, step, best val loss... stored there only), rng (Python, NumPy, torch CPU/CUDA/MPS states),
  tokenizer, run_id, and what the job adds: data (path, sha256 and tokens of each file trained on) and
  tracking_uri, so a run can be resumed from the file alone.
Format 1 also stored epoch, step and best_val_loss at the top level; both formats are read.
"""

from __future__ import annotations

import errno
import math
import os
import random
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gpt import config as config_module
from gpt.config import Config
from gpt.errors import DiskFault, UserError, check_file, disk_fault, writing
from gpt.state import TrainState

FORMAT = "gpt-mlflow-checkpoint/2"
READABLE = ("gpt-mlflow-checkpoint/1", FORMAT)
TRAINING_KEYS = ("config", "model", "optimizer", "state", "rng", "run_id")  # what resuming needs


class Trainable(Protocol):
    """What a checkpoint is built from and restored into (gpt.trainer.Trainer)."""

    cfg: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState


def payload(trainer: Trainable, run_id: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A training checkpoint of the trainer as it stands (tensors are the live ones: snapshot or save it
    before training goes on). extra: what the job adds (data, tracking_uri)."""
    return {
        "config": trainer.cfg.to_dict(),
        "model": model_state(trainer.model),
        "optimizer": trainer.optimizer.state_dict(),
        "state": trainer.state.to_dict(),
        "rng": rng_state(),
        "tokenizer": {"name": "gpt2"},
        "run_id": run_id,
        **(extra or {}),
    }


def restore(trainer: Trainable, payload: dict[str, Any], source: str = "the checkpoint") -> None:
    """Put a training checkpoint's weights, optimizer state, position and random generators into a new
    trainer of the same config. Raises UserError (naming `source`) when the checkpoint does not fit.

    Call it right before training starts: the random generators it restores are the ones the next step draws from.
    """
    require(payload, TRAINING_KEYS, source)
    load_model_state(trainer.model, payload["model"], source)
    trainer.state = TrainState.from_dict(payload["state"], source)
    if payload["optimizer"]:
        try:
            trainer.optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{source}: its optimizer state does not fit the model ({exc})") from None
    set_rng_state(payload["rng"], source)


def position(payload: dict[str, Any]) -> dict[str, Any]:
    """epoch (finished, 1-based), step, best_val_loss and run_id of a checkpoint of either format."""
    state = payload.get("state") if isinstance(payload.get("state"), dict) else payload
    return {
        "epoch": state.get("epoch"),
        "step": state.get("step"),
        "best_val_loss": state.get("best_val_loss"),
        "run_id": payload.get("run_id"),
    }


def rng_state() -> dict[str, Any]:
    """Every random generator a training step could draw from, in types weights_only can load."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": position,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
    }
    if torch.cuda.is_available():
        # the current (training) device's generator only: a checkpoint from an 8-GPU node resumes on one
        state["cuda"] = torch.cuda.get_rng_state()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], source: str = "checkpoint") -> None:
    """Restore rng_state(); generators the checkpoint lacks (or this machine lacks) are left alone."""
    try:
        torch.set_rng_state(state["torch"])
        if "python" in state:
            version, internal, gauss = state["python"]
            random.setstate((version, tuple(internal), gauss))
        if "numpy" in state:
            n = state["numpy"]
            keys = n["keys"].numpy().astype(np.uint32)
            np.random.set_state((n["kind"], keys, n["position"], n["has_gauss"], n["gauss"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        if "mps" in state and torch.backends.mps.is_available():
            torch.mps.set_rng_state(state["mps"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise UserError(f"{source}: its random generator states are unusable ({type(exc).__name__}: {exc})") from None


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a model, unwrapped from torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return model.state_dict()


def save(path: Path, payload: dict[str, Any], staging: Path | None = None) -> Path:
    """Write to a temporary file, fsync it, then rename: a crash mid-write keeps the old file.

    staging: the folder of the temporary file (on the same file system as `path`). A run's artifact
    folder lists every file in it, so a checkpoint written there is staged outside it, where MLflow
    never shows a partial file. Raises gpt.errors.DiskFault when the disk is full ("disk full: no space
    left on the device at <path>, N MB needed") or read-only; the old file is then left as it was.
    """
    folder = staging or path.parent
    with writing(folder):
        path.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{path.name}.tmp"
    try:
        with writing(path):
            with open(partial, "wb") as handle:
                torch.save({"format": FORMAT, **payload}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
    except BaseException as exc:
        partial.unlink(missing_ok=True)  # as large as the model: don't leave it on a disk that may be full
        fault = disk_fault(exc, path) or _out_of_space(folder, payload, path)
        if fault is None:
            raise
        needed = math.ceil(payload_bytes(payload) / 2**20)
        detail = f", {needed:,} MB needed" if str(fault).startswith("disk full") else ""
        raise DiskFault(f"{fault}{detail}", path) from None
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    return path


def payload_bytes(value: Any) -> int:
    """The bytes of every tensor in a checkpoint payload: about the size of its file."""
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, dict):
        return sum(payload_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(item) for item in value)
    return 0


def _out_of_space(folder: Path, payload: dict[str, Any], path: Path) -> DiskFault | None:
    """torch reports a full disk as `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`:
    when the folder's free space is below the checkpoint's size, that is what it was."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= payload_bytes(payload):
        return None
    return disk_fault(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)))


def load(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint safely; a truncated, foreign or missing file is a UserError naming it.

    mmap: map the tensors instead of reading them (to look at a checkpoint's position or config only).
    """
    path = check_file(Path(path), "checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # the weights-only unpickler also raises IndexError, KeyError... on foreign bytes
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if reason.startswith("Weights only load failed"):  # not torch's advice to load unsafely: the file is not ours
            reason = "torch's weights-only loader refused it"
        raise UserError(f"checkpoint {path} is truncated, corrupt or not from this tool ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") not in READABLE:
        raise UserError(f"checkpoint {path} is not a checkpoint of this tool (expected format {FORMAT})")
    return payload


def require(payload: dict[str, Any], keys: Iterable[str], source: str) -> None:
    """A checkpoint that lacks what a use of it needs is named, with what it lacks."""
    missing = [key for key in keys if key not in payload]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}: it is not a training checkpoint of this tool")


def config_of(payload: dict[str, Any], source: str = "checkpoint") -> Config:
    """The validated Config a checkpoint carries; UserError when it has none or an invalid one."""
    if not isinstance(payload.get("config"), dict):
        raise UserError(f"{source} holds no config (expected a mapping under 'config')")
    return config_module.validate(config_module.from_dict(payload["config"], source=source))


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, turning a shape mismatch into a message that names the tensor and both shapes."""
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise UserError(f"{source} holds no model weights (expected a mapping of tensor names to tensors)")
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

"""The one config object: dataclasses, YAML loading, dotted overrides and validation.

A Config flows from a YAML file plus `key=value` overrides into every part of the project.
Everything is checked before any work starts; each mistake raises UserError naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt.errors import UserError


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    context_length: int = 128
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    dropout: float = 0.1
    qkv_bias: bool = False
    tie_weights: bool = False
    # "seed": PyTorch's default init, as the seed (embeddings N(0, 1)); it learns a 5,000-token
    # text in 10 epochs where GPT-2's N(0, 0.02) init stalls near the unigram loss (bench/verdict_learns.py)
    init: str = "seed"
    # rows of hidden states per chunk of the fused LM head + cross-entropy, which never holds more than one
    # chunk's logits (the seed config's full fp32 logits are 1.6 GB); 0 computes the full logits as the seed;
    # null (auto): max(32, emb_dim) rows on a CPU, where that is faster (gpt.model.loss_chunk_rows), else 0
    loss_chunk_rows: int | None = None


@dataclass
class DataConfig:
    files: list[str] = field(default_factory=list)  # paths, globs or gutenberg:<id>
    max_length: int | None = None  # window length; None means model.context_length
    stride: int | str | None = None  # tokens, or "0.5x" of max_length; None means max_length
    val_fraction: float = 0.1  # tail of the token stream held out, before windowing
    clean: bool = True  # collapse runs of whitespace and newlines to one space, as the seed
    strip_gutenberg: bool = True  # drop Project Gutenberg header/footer when the markers exist


@dataclass
class TrainConfig:
    batch_size: int = 64
    epochs: int = 100
    lr: float = 4e-4
    weight_decay: float = 0.1  # the seed's AdamW setting
    decay_groups: bool = False  # True: no weight decay on biases, norms and embeddings
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    min_lr: float = 0.0  # floor of the cosine schedule
    grad_clip: float = 0.0  # max gradient norm; 0 disables clipping
    seed: int = 123
    drop_last: bool = True  # drop the last partial batch, as the seed (kept if it is the only one)
    device: str = "auto"  # auto | cuda | mps | cpu
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | bf16 | fp32
    compile: bool | None = None  # None: on for CUDA, off elsewhere
    eval_every: int = 1  # validation every N epochs
    log_every_steps: int = 10  # train_loss_step logged every N optimizer steps
    checkpoint_every_s: float = 600.0  # write last.pt at most this often (always at the end)
    sample_every: int = 1  # generate samples every N epochs; 0 disables
    # samples that take over 5% of an epoch (a GPU's 50 ms epochs) come at most this often; cheaper
    # ones (a CPU's) every sample_every epochs; always the first two and the final. 0: no time limit
    sample_every_s: float = 10.0
    sample_prompts: list[str] = field(default_factory=lambda: ["Every effort moves you"])
    sample_tokens: int = 50
    temperature: float = 1.0
    top_k: int = 25


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def window_length(self) -> int:
        return self.data.max_length or self.model.context_length

    @property
    def window_stride(self) -> int:
        return resolve_stride(self.data.stride, self.window_length)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {'model.n_layers': 12, ...}."""
        return {f"{s}.{k}": v for s, d in self.to_dict().items() for k, v in d.items()}


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*x\s*$")
_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def resolve_stride(stride: int | str | None, window_length: int) -> int:
    """A stride in tokens from an int, a relative '0.5x' of the window length, or None."""
    if stride is None:
        return window_length
    if isinstance(stride, str):
        match = _RELATIVE.match(stride)
        if not match:
            raise UserError(f"data.stride: {stride!r} is neither a token count nor a ratio like '0.5x'")
        ratio = float(match.group(1))
        if ratio <= 0:
            raise UserError(f"data.stride: {stride!r} must be a positive ratio such as '0.5x'")
        return max(1, round(ratio * window_length))
    return stride


# ---------------------------------------------------------------- loading and overrides


def from_dict(raw: Any, source: str = "config") -> Config:
    """Build a Config from nested dicts, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections (model, data, train), got {type(raw).__name__}")
    cfg = Config()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise UserError(f"{source}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
        for key, value in values.items():
            set_key(cfg, f"{section}.{key}", value, parse=False)
    return cfg


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply `key=value` overrides, validate."""
    cfg = Config()
    if path is not None:
        cfg = from_dict(read_yaml(path), source=str(path))
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not valid YAML ({first_line})") from None


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.key=value (e.g. model.n_layers=4)")
        key, value = item.split("=", 1)
        set_key(cfg, key.strip(), value.strip(), parse=True)
    return cfg


def get_key(cfg: Config, dotted: str) -> Any:
    """The value of `section.key` as set on cfg (the key is known to exist)."""
    section, _, key = dotted.partition(".")
    return getattr(getattr(cfg, section), key)


def set_key(cfg: Config, dotted: str, value: Any, parse: bool) -> None:
    """Set `section.key` on cfg, converting and type-checking the value."""
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or not key:
        raise UserError(f"unknown config key {dotted!r}; keys look like model.n_layers, data.stride, train.lr")
    target = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(target)}
    if key not in fields:
        raise UserError(f"unknown config key {dotted!r}; valid keys in {section}: {', '.join(fields)}")
    hint = typing.get_type_hints(type(target))[key]
    if parse and isinstance(value, str):
        value = _parse_text(value, hint)
    setattr(target, key, _check_type(dotted, value, hint))


def _parse_text(text: str, hint: Any) -> Any:
    """Command-line text -> value: YAML scalars and lists ("[a, b]"), but plain str fields stay text."""
    return text if hint is str else yaml_scalar(text)


def yaml_scalar(text: str) -> Any:
    """Text as YAML reads it ("2" -> 2, "[a, b]" -> a list, "" -> None); text YAML cannot parse stays text."""
    try:
        return yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        return text


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except UserError:
                continue
        names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
        raise UserError(f"{key}: expected {names}, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, item_type):  # a single item where a list is expected
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, item_type) for v in value):
            raise UserError(f"{key}: expected a list of {item_type.__name__}, got {value!r}")
        return list(value)
    if hint in (int, float) and isinstance(value, str) and _EXPONENT.match(value.strip()):
        # PyYAML follows YAML 1.1, which reads 1e-3 and 1e3 as strings; YAML 1.2 reads numbers, as here
        value = float(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> Config:
    """Check every constraint that does not need the data; raise UserError naming the key."""
    m, d, t = cfg.model, cfg.data, cfg.train
    positive = {
        "model.vocab_size": m.vocab_size,
        "model.context_length": m.context_length,
        "model.emb_dim": m.emb_dim,
        "model.n_heads": m.n_heads,
        "model.n_layers": m.n_layers,
        "train.batch_size": t.batch_size,
        "train.epochs": t.epochs,
        "train.eval_every": t.eval_every,
        "train.log_every_steps": t.log_every_steps,
        "train.sample_tokens": t.sample_tokens,
        "train.top_k": t.top_k,
    }
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"{key} must be at least 1, got {value}")
    if m.emb_dim % m.n_heads:
        raise UserError(f"model.emb_dim ({m.emb_dim}) must be divisible by model.n_heads ({m.n_heads})")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.loss_chunk_rows is not None and m.loss_chunk_rows < 0:
        raise UserError(f"model.loss_chunk_rows must not be negative (0 disables chunking), got {m.loss_chunk_rows}")
    if d.max_length is not None and d.max_length < 1:
        raise UserError(f"data.max_length must be at least 1, got {d.max_length}")
    if cfg.window_length > m.context_length:
        raise UserError(f"data.max_length ({d.max_length}) must not exceed model.context_length ({m.context_length})")
    if isinstance(d.stride, int) and d.stride < 1:
        raise UserError(f"data.stride must be at least 1, got {d.stride}")
    cfg.window_stride  # noqa: B018 - raises UserError for a malformed relative stride
    if not 0.0 < d.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    if t.lr <= 0:
        raise UserError(f"train.lr must be positive, got {t.lr}")
    keys = "weight_decay min_lr grad_clip checkpoint_every_s temperature warmup_steps sample_every sample_every_s"
    for key in keys.split():
        if getattr(t, key) < 0:
            raise UserError(f"train.{key} must not be negative, got {getattr(t, key)}")
    choices = {
        "model.init": (m.init, ("seed", "gpt2")),
        "train.lr_schedule": (t.lr_schedule, ("constant", "cosine")),
        "train.device": (t.device, ("auto", "cuda", "mps", "cpu")),
        "train.precision": (t.precision, ("auto", "bf16", "fp32")),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise UserError(f"{key} must be one of {', '.join(valid)}; got {value!r}")
    if any(not p.strip() for p in t.sample_prompts):
        raise UserError("train.sample_prompts must not contain an empty prompt")
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

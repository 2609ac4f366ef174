"""The one config object: dataclasses, YAML loading, dotted overrides and validation.

A Config flows from a YAML file plus `key=value` overrides into every part of the project.
Everything is checked before any work starts; each mistake raises UserError naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt.errors import UserError, check_file


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, identity: bool = True,
            resumable: bool = False) -> Any:
    """A config field and what it is.

    identity: the key defines the experiment (what is learned), so it enters an ablation cell's id
    (gpt.ablation.grid.cell_id); keys that only say where, how fast or how often something is done or
    reported do not. resumable: `train.py --resume` may change it, because it changes nothing the
    run's logged params describe.
    """
    metadata = {"identity": identity, "resumable": resumable}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """The GPT's shape (see gpt.model.GPT); every key but loss_chunk_rows defines the experiment."""

    vocab_size: int = setting(50257)  # GPT-2's BPE; the embedding is padded to a multiple of 64 inside
    context_length: int = setting(128)  # positions the model can attend to (tokens)
    emb_dim: int = setting(768)  # width; divisible by n_heads
    n_heads: int = setting(12)
    n_layers: int = setting(12)
    dropout: float = setting(0.1)  # on embeddings, attention weights and residual branches
    qkv_bias: bool = setting(False)
    tie_weights: bool = setting(False)  # share the token embedding with the LM head
    # "pytorch": PyTorch's default init, as the reference code (embeddings N(0, 1)); it learns a
    # 5,000-token text in 10 epochs where GPT-2's N(0, 0.02) init ("gpt2") stalls near the unigram loss
    # (bench/verdict_learns.py). "seed", its former name, is still read.
    init: str = setting("pytorch")
    # rows of hidden states per chunk of the fused LM head + cross-entropy, which never holds more than one
    # chunk's logits (the reference config's full fp32 logits are 1.6 GB); 0 computes the full logits;
    # null (auto): max(32, emb_dim) rows on a CPU, where that is faster (gpt.device.loss_chunk_rows), else 0.
    # How the loss is computed, not what: like train.compile
    loss_chunk_rows: int | None = setting(None, identity=False, resumable=True)


@dataclass
class DataConfig:
    """Which text, cut how: every key defines the experiment."""

    files: list[str] = setting(factory=list)  # paths, globs or gutenberg:<id>
    max_length: int | None = setting(None)  # window length (tokens); None means model.context_length
    stride: int | str | None = setting(None)  # tokens, or "0.5x" of max_length; None means max_length
    val_fraction: float = setting(0.1)  # tail of the token stream held out, before windowing
    clean: bool = setting(True)  # collapse runs of whitespace and newlines to one space, as the reference
    strip_gutenberg: bool = setting(True)  # drop Project Gutenberg header/footer when the markers exist


@dataclass
class TrainConfig:
    """Optimisation (defines the experiment), then where and how often to validate, report and save (does not)."""

    batch_size: int = setting(64)  # windows per optimizer step
    epochs: int = setting(100, resumable=True)
    lr: float = setting(4e-4)
    weight_decay: float = setting(0.1)  # the reference's AdamW setting
    decay_groups: bool = setting(False)  # True: no weight decay on biases, norms and embeddings
    lr_schedule: str = setting("constant")  # constant | cosine
    warmup_steps: int = setting(0)
    min_lr: float = setting(0.0)  # floor of the cosine schedule
    grad_clip: float = setting(0.0)  # max gradient norm; 0 disables clipping
    seed: int = setting(123)  # model init, data order, dropout
    drop_last: bool = setting(True)  # drop the last partial batch, as the reference (kept if it is the only one)
    precision: str = setting("auto")  # auto (bf16 on CUDA, fp32 elsewhere) | bf16 | fp32
    device: str = setting("auto", identity=False, resumable=True)  # auto | cuda | mps | cpu
    compile: bool | None = setting(None, identity=False, resumable=True)  # None: on for CUDA, off elsewhere
    eval_every: int = setting(1, identity=False)  # validation every N epochs
    log_every_steps: int = setting(10, identity=False)  # train_loss_step logged every N optimizer steps
    # seconds between writes of last.pt; null: adapt to what a write costs (at most ~5% of the time, every
    # epoch when that is cheaper still; see gpt.reporting.Checkpoints); 0: every epoch
    checkpoint_every_s: float | None = setting(None, identity=False, resumable=True)
    sample_every: int = setting(1, identity=False, resumable=True)  # samples every N epochs; 0 disables
    # samples that take over 5% of an epoch (a GPU's 50 ms epochs) come at most this often; cheaper
    # ones (a CPU's) every sample_every epochs; always the first two and the final. 0: no time limit
    sample_every_s: float = setting(10.0, identity=False, resumable=True)
    sample_prompts: list[str] = setting(factory=lambda: ["Every effort moves you"], identity=False)
    sample_tokens: int = setting(50, identity=False)
    temperature: float = setting(1.0, identity=False)  # of the per-epoch samples
    top_k: int = setting(25, identity=False)  # of the per-epoch samples
    # MLflow's system metrics (CPU, memory, disk, network, GPU) every 10 s, spooled (gpt.system_metrics)
    system_metrics: bool = setting(True, identity=False, resumable=True)


@dataclass
class Config:
    """The one config of a run: model, data and train sections; see the README's configuration reference."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def window_length(self) -> int:
        """Tokens per training window: data.max_length, else model.context_length."""
        return self.data.max_length or self.model.context_length

    @property
    def window_stride(self) -> int:
        """Tokens between window starts, resolved (raises UserError for a malformed relative stride)."""
        return resolve_stride(self.data.stride, self.window_length)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts {section: {key: value}}, as YAML and checkpoints hold them."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {'model.n_layers': 12, ...}."""
        return {f"{s}.{k}": v for s, d in self.to_dict().items() for k, v in d.items()}


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits (gpt.sampling); temperature 0 means greedy (argmax).

    Raises UserError for values that make no sense: negative or non-finite temperature, top-k below 1,
    top-p outside (0, 1].
    """

    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens; None keeps all
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p; None or 1 keeps all

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature):
            raise UserError(f"temperature must be a finite number (0 means greedy), got {self.temperature}")
        if self.temperature < 0:
            raise UserError(f"temperature must not be negative (0 means greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:  # NaN fails this too
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
# the choices of text-valued keys; model.init's former spelling "seed" is read as "pytorch"
CHOICES = {
    "model.init": ("pytorch", "gpt2"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.device": ("auto", "cuda", "mps", "cpu"),
    "train.precision": ("auto", "bf16", "fp32"),
}
_ALIASES = {"model.init": {"seed": "pytorch"}}
MAX_SEED = 2**32 - 1  # numpy's seeding takes 32 bits
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
    cfg = read_config_file(path) if path is not None else Config()
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def read_config_file(path: str | Path) -> Config:
    """The Config of a YAML file (not yet validated); UserError for a missing, malformed or empty file (an empty
    file would silently be the 162M reference model: a truncated or wrong file, far more often than a wish)."""
    raw = read_yaml(path)
    if raw is None:
        raise UserError(
            f"config file {path} is empty; give the settings that differ from the defaults, e.g. model: {{n_layers: 2}}"
        )
    return from_dict(raw, source=str(path))


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; a missing or malformed file is a UserError naming it."""
    path = check_file(Path(path).expanduser(), "config file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not valid YAML ({first_line})") from None


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply `section.key=value` items in order (values parsed as YAML scalars); returns cfg."""
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
    value = _check_type(dotted, value, hint)
    setattr(target, key, _ALIASES.get(dotted, {}).get(value, value) if isinstance(value, str) else value)


def fields_of(cfg: Config | None = None) -> dict[str, dataclasses.Field]:
    """Every dotted key -> its dataclass field (whose metadata says identity and resumable; see setting).

    With cfg, the fields of its own section classes (which may extend the standard ones).
    """
    classes = {name: type(getattr(cfg, name)) if cfg else section for name, section in SECTIONS.items()}
    return {f"{name}.{f.name}": f for name, section in classes.items() for f in dataclasses.fields(section)}


def defaults_of(cfg: Config) -> Config:
    """A config of the same section classes as cfg, every key at its default."""
    return Config(**{name: type(getattr(cfg, name))() for name in SECTIONS})


def identity_keys(cfg: Config | None = None) -> list[str]:
    """The keys that define an experiment (they enter ablation cell ids)."""
    return [key for key, f in fields_of(cfg).items() if f.metadata.get("identity", True)]


def resumable_keys() -> list[str]:
    """The keys `train.py --resume` may change."""
    return [key for key, f in fields_of().items() if f.metadata.get("resumable", False)]


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
    """value converted to the field's type hint (int <-> float where exact), or a UserError naming key."""
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
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key}: expected a finite number, got {value!r}")
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> Config:
    """Check every constraint that does not need the data; raise UserError naming the key."""
    _check_counts(cfg)
    _check_ranges(cfg)
    flat = cfg.flat()
    for key, valid in CHOICES.items():
        if flat[key] not in valid:
            raise UserError(f"{key} must be one of {', '.join(valid)}; got {flat[key]!r}")
    if any(not p.strip() for p in cfg.train.sample_prompts):
        raise UserError("train.sample_prompts must not contain an empty prompt")
    return cfg


def _check_counts(cfg: Config) -> None:
    """Sizes and counts that must be at least 1, and the width/heads and window/context relations."""
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
    if d.max_length is not None and d.max_length < 1:
        raise UserError(f"data.max_length must be at least 1, got {d.max_length}")
    if cfg.window_length > m.context_length:
        raise UserError(f"data.max_length ({d.max_length}) must not exceed model.context_length ({m.context_length})")
    if isinstance(d.stride, int) and d.stride < 1:
        raise UserError(f"data.stride must be at least 1, got {d.stride}")
    cfg.window_stride  # noqa: B018 - raises UserError for a malformed relative stride


def _check_ranges(cfg: Config) -> None:
    """Rates, fractions and intervals: within their ranges."""
    m, d, t = cfg.model, cfg.data, cfg.train
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.loss_chunk_rows is not None and m.loss_chunk_rows < 0:
        raise UserError(f"model.loss_chunk_rows must not be negative (0 disables chunking), got {m.loss_chunk_rows}")
    if not 0.0 < d.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    if t.lr <= 0:
        raise UserError(f"train.lr must be positive, got {t.lr}")
    if not 0 <= t.seed <= MAX_SEED:  # torch, numpy and the data order all take it
        raise UserError(f"train.seed must be an integer from 0 to {MAX_SEED}, got {t.seed}")
    keys = "weight_decay min_lr grad_clip checkpoint_every_s temperature warmup_steps sample_every sample_every_s"
    for key in keys.split():
        if getattr(t, key) is not None and getattr(t, key) < 0:
            raise UserError(f"train.{key} must not be negative, got {getattr(t, key)}")
    if t.min_lr > t.lr:  # the cosine schedule would climb from lr to its "floor"
        raise UserError(f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")


def dump_yaml(cfg: Config) -> str:
    """The config as YAML, sections in order (the run's config.yaml; `--config` reads it back)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

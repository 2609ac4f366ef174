"""Ablation grids: a GridSpec -> concrete, validated cells, their ids and names, and the plan of their cost.

gpt.ablation.grid_file reads a GridSpec from a grid file and command-line options.
Each cell is the base config with one level per factor and the replicate seed applied, then
validated and with its stride resolved to tokens. A combination that cannot run (heads not dividing
the width, a window longer than the data...) becomes a SkippedCell with the reason, never an error.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.config import Config, defaults_of, get_key, identity_keys, set_key, validate
from gpt.errors import UserError
from gpt.sizes import count_parameters, count_windows, flops_per_token, non_embedding_parameters, window_stats

# Cell ids hash what a cell learns (config fields with identity metadata, see gpt.config.setting).
# _ID_V1 holds the keys the first ids hashed, so that grids already in users' stores keep their ids:
# those keys always enter; the ones since found not to change what is learned enter at the fixed
# value they had then; keys added later enter only when a cell sets them away from their default,
# so adding a key to the config changes no id. Frozen: never edit it.
_ID_V1 = {
    "model": ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "dropout", "qkv_bias",
              "tie_weights", "init"),
    "data": ("files", "max_length", "stride", "val_fraction", "clean", "strip_gutenberg"),
    "train": ("batch_size", "epochs", "lr", "weight_decay", "decay_groups", "lr_schedule", "warmup_steps",
              "min_lr", "grad_clip", "seed", "drop_last", "precision", "eval_every", "temperature", "top_k"),
}  # fmt: skip
_ID_V1_FIXED = {"train.eval_every": 1, "train.temperature": 1.0, "train.top_k": 25}
_ID_V1_SPELLING = {"model.init": {"pytorch": "seed"}}  # values renamed since
# Keys spelled out in every cell name; other factors are appended as <last key part><label>.
_NAME_KEYS = (
    "model.n_layers",
    "model.n_heads",
    "model.emb_dim",
    "model.context_length",
    "data.max_length",
    "data.stride",
)


@dataclass(frozen=True)
class Factor:
    """One varied config key and its levels."""

    key: str  # dotted config key, e.g. model.n_layers
    values: tuple[Any, ...]  # typed levels, as set on the config ("0.5x" stays a string)
    labels: tuple[str, ...]  # one display label per level, used in names, tags and plots


@dataclass
class GridSpec:
    """A grid as its file and options define it: base config, factors, replicate seeds and design."""

    name: str
    base: Config  # base file + inline config + data + set; not validated: cells are
    factors: list[Factor]
    seeds: list[int]
    design: str  # one of DESIGNS
    source: Path | None = None  # the grid file, if any
    base_path: Path | None = None  # the base config file, if any
    sets: list[str] = field(default_factory=list)  # already applied to base; kept for display

    @property
    def factor_keys(self) -> list[str]:
        """The varied keys, in the grid's order."""
        return [f.key for f in self.factors]

    def base_levels(self) -> dict[str, str]:
        """Factor key -> label of the base config's value: the center of a one-at-a-time design."""
        return {f.key: _base_level(self.base, f)[1] for f in self.factors}

    def parent_tags(self) -> dict[str, str]:
        """The MLflow tags of the grid's parent run; gpt.ablation.analysis reads ablation.base.<key>."""
        tags = {
            "ablation.grid": self.name,
            "ablation.design": self.design,
            "ablation.factors": ",".join(self.factor_keys),
        }
        tags.update({f"ablation.base.{key}": label for key, label in self.base_levels().items()})
        return tags

    def to_dict(self) -> dict[str, Any]:
        """A self-contained grid file (the base inlined): loading it expands to the same cells."""
        return {
            "name": self.name,
            "config": self.base.to_dict(),
            "vary": {f.key: list(f.values) for f in self.factors},
            "seeds": list(self.seeds),
            "design": self.design,
        }


@dataclass
class Cell:
    """One run of the grid: a resolved, validated config, its levels, its replicate seed and its id."""

    config: Config  # validated, data.stride resolved to tokens, train.seed = seed
    levels: dict[str, str]  # factor key -> level label, for every factor of the grid
    seed: int
    cell_id: str
    name: str

    def tags(self) -> dict[str, str]:
        """The MLflow tags of this cell's child run; gpt.ablation.analysis reads them back."""
        tags = {
            "ablation.cell_id": self.cell_id,
            "ablation.factors": ",".join(self.levels),
            "ablation.seed": str(self.seed),
        }
        tags.update({f"factor.{key}": label for key, label in self.levels.items()})
        return tags


@dataclass
class SkippedCell:
    """A combination of levels that cannot run, and why."""

    name: str
    levels: dict[str, str]
    seed: int
    reason: str


# ---------------------------------------------------------------- levels


def format_level(value: Any) -> str:
    """The display label of a level: YAML spelling for scalars, '+'-joined items for lists."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "+".join(format_level(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _base_level(base: Config, factor: Factor) -> tuple[Any, str]:
    """The base config's level of a factor, labelled like the matching level when one exists."""
    effective = _effective(base, factor.key)
    for value, label in zip(factor.values, factor.labels, strict=True):
        if _effective(_with(base, factor.key, value), factor.key) == effective:
            return value, label
    raw = get_key(base, factor.key)
    if factor.key == "data.stride" and raw is None:
        return raw, "1x"
    return raw, format_level(effective)


def _with(cfg: Config, key: str, value: Any) -> Config:
    out = copy.deepcopy(cfg)
    set_key(out, key, copy.deepcopy(value), parse=False)
    return out


def _effective(cfg: Config, key: str) -> Any:
    """The value a key takes in a run: defaults of max_length and stride resolved to tokens."""
    if key == "data.max_length":
        return cfg.window_length
    if key == "data.stride":
        try:
            return cfg.window_stride
        except UserError:
            return cfg.data.stride
    return get_key(cfg, key)


# ---------------------------------------------------------------- expansion


def expand(
    spec: GridSpec, *, train_tokens: int | None = None, val_tokens: int | None = None
) -> tuple[list[Cell], list[SkippedCell]]:
    """All cells of the grid, seeds outermost (an interrupted run has whole replicates), and the skipped ones.

    With token counts, cells whose training (or validation) split has no window of their length are skipped.
    A combination that resolves to the same experiment as an earlier cell (say stride 16 and 0.5x at
    context 32) is skipped as a duplicate rather than trained twice.
    """
    cells: list[Cell] = []
    skipped: list[SkippedCell] = []
    seen: dict[str, str] = {}
    for seed in spec.seeds:
        for assignment in DESIGNS[spec.design](spec):
            levels = {key: label for key, (_, label) in assignment.items()}
            cfg = copy.deepcopy(spec.base)
            for key, (value, _) in assignment.items():
                set_key(cfg, key, copy.deepcopy(value), parse=False)
            cfg.train.seed = seed
            name = cell_name(cfg, levels, seed)
            reason = _problem(cfg, train_tokens, val_tokens)
            if reason is None:
                cfg.data.stride = cfg.window_stride
                identity = cell_id(cfg, seed)
                if identity in seen:
                    reason = f"same experiment as {seen[identity]}"
            if reason is not None:
                skipped.append(SkippedCell(name=name, levels=levels, seed=seed, reason=reason))
                continue
            seen[identity] = name
            cells.append(Cell(config=cfg, levels=levels, seed=seed, cell_id=identity, name=name))
    return cells, skipped


Assignment = dict[str, tuple[Any, str]]  # factor key -> (value, label), every factor present, in factor order


def _full_grid(spec: GridSpec) -> list[Assignment]:
    """Every combination of the factors' levels (the Cartesian product)."""
    choices = [list(zip(f.values, f.labels, strict=True)) for f in spec.factors]
    return [dict(zip(spec.factor_keys, combo, strict=True)) for combo in itertools.product(*choices)]


def _one_at_a_time(spec: GridSpec) -> list[Assignment]:
    """The base cell, then each factor's other levels with every other factor at its base level."""
    center = {f.key: _base_level(spec.base, f) for f in spec.factors}
    result = [dict(center)]
    for factor in spec.factors:
        base_value = _effective(spec.base, factor.key)
        for value, label in zip(factor.values, factor.labels, strict=True):
            if _effective(_with(spec.base, factor.key, value), factor.key) != base_value:
                result.append({**center, factor.key: (value, label)})
    return result


# The designs a grid may use: name -> the cells' level assignments. The command line's choices come from here.
DESIGNS: dict[str, Callable[[GridSpec], list[Assignment]]] = {"grid": _full_grid, "one-at-a-time": _one_at_a_time}


def _problem(cfg: Config, train_tokens: int | None, val_tokens: int | None) -> str | None:
    """Why this cell cannot run, or None."""
    try:
        validate(cfg)
    except UserError as exc:
        return str(exc)
    length, stride = cfg.window_length, cfg.window_stride
    if train_tokens is not None and count_windows(train_tokens, length, stride) == 0:
        return f"the training split has {train_tokens} tokens, too few for one window of {length}+1"
    if val_tokens is not None and count_windows(val_tokens, length, length) == 0:
        return f"the validation split has {val_tokens} tokens, too few for one window of {length}+1"
    return None


def cell_id(cfg: Config, seed: int) -> str:
    """12 hex digits of sha256 over the experiment: the cell's identity keys (see _ID_V1) and the seed.

    max_length and stride enter as resolved token counts, so spelling the same window differently
    (null, 32, '1x') gives the same id.
    """
    resolved = copy.deepcopy(cfg)
    resolved.data.max_length, resolved.data.stride = cfg.window_length, cfg.window_stride
    values, defaults = resolved.flat(), defaults_of(cfg).flat()
    payload: dict[str, dict[str, Any]] = {section: {} for section in _ID_V1}
    for key in identity_keys(cfg):
        section, name = key.split(".", 1)
        if name in _ID_V1[section] or values[key] != defaults[key]:
            value = values[key]
            payload[section][name] = _ID_V1_SPELLING.get(key, {}).get(value, value) if isinstance(value, str) else value
    for key, value in _ID_V1_FIXED.items():
        section, name = key.split(".", 1)
        payload[section][name] = value
    text = json.dumps({"config": payload, "seed": seed}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cell_name(cfg: Config, levels: dict[str, str], seed: int) -> str:
    """A readable name such as L2-H4-E64-ctx32-s16-seed0 (plus any other factor, e.g. -lr0.002)."""
    m = cfg.model
    parts = [f"L{m.n_layers}", f"H{m.n_heads}", f"E{m.emb_dim}", f"ctx{m.context_length}"]
    if cfg.data.max_length is not None and cfg.data.max_length != m.context_length:
        parts.append(f"len{cfg.data.max_length}")
    try:
        parts.append(f"s{cfg.window_stride}")
    except UserError:  # a malformed stride: the cell is skipped, its name shows what was asked
        parts.append(f"s{cfg.data.stride}")
    parts.extend(f"{key.rsplit('.', 1)[-1]}{label}" for key, label in levels.items() if key not in _NAME_KEYS)
    parts.append(f"seed{seed}")
    return "-".join(parts)


# ---------------------------------------------------------------- names


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Factor key -> the last part of its name (model.n_layers -> n_layers); the whole key where two share it."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: part if last.count(part) == 1 else key for key, part in zip(keys, last, strict=True)}


def default_grid_name(keys: Sequence[str]) -> str:
    """What a grid varies, e.g. 'n_layers x stride' (the name of a grid that was given none)."""
    return " x ".join(short_keys(keys).values()) or "base"


_RUN_NAME_CHARS = re.compile(r"[^A-Za-z0-9 ._+=,:@-]")  # what gpt.job.check_run_name accepts


def run_name(cell: Cell) -> str:
    """The MLflow run name of a cell, varied factors first so a cut name still tells cells apart.

    For example 'n_layers=2 stride=0.5x seed=0, L2-H2-E32-ctx32-s16'. Characters a run name may not
    hold (a '/' in a file level) become '_'; the name is at most 250 characters.
    """
    short = short_keys(list(cell.levels))
    levels = " ".join(f"{short[key]}={label}" for key, label in cell.levels.items())
    shape = cell.name.removesuffix(f"-seed{cell.seed}")
    name = _RUN_NAME_CHARS.sub("_", f"{levels} seed={cell.seed}, {shape}".strip()).replace("..", "._")
    return name[:250]


# The keys build_corpus reads: cells that differ in one of them train on different token streams.
CORPUS_KEYS = ("data.files", "data.clean", "data.strip_gutenberg", "data.val_fraction")


# ---------------------------------------------------------------- planning


def plan_rows(cells: Sequence[Cell], train_tokens: int, val_tokens: int) -> list[dict[str, Any]]:
    """Size and cost of each cell on a corpus of the given split sizes, counted as a training run counts them.

    All cells must share one corpus: a grid that varies one of CORPUS_KEYS has none to plan against.
    """
    rows = []
    for cell in cells:
        cfg = cell.config
        stats = window_stats(cfg, train_tokens, val_tokens)
        per_token = flops_per_token(cfg.model, cfg.window_length)
        rows.append(
            {
                "name": cell.name,
                "cell_id": cell.cell_id,
                "seed": cell.seed,
                "levels": dict(cell.levels),
                "n_params": count_parameters(cfg.model),
                "non_embedding_params": non_embedding_parameters(cfg.model),
                "train_windows": stats.train_windows,
                "val_windows": stats.val_windows,
                "steps_per_epoch": stats.steps_per_epoch,
                "tokens_per_epoch": stats.tokens_per_epoch,
                "epochs": cfg.train.epochs,
                "flops_per_token": per_token,
                "flops": per_token * stats.tokens_per_epoch * cfg.train.epochs,
            }
        )
    return rows


def format_plan(
    rows: Sequence[dict[str, Any]],
    skipped: Sequence[SkippedCell] = (),
    base_ids: frozenset[str] = frozenset(),
    estimates: dict[str, str] | None = None,
) -> str:
    """A table of the cells (one column per factor), the totals, then the skipped cells and why.

    Cells whose id is in base_ids are marked '*' (the base config's level of every factor);
    `estimates` (cell id -> text) adds an estimated-time column.
    """
    factor_keys = list(dict.fromkeys(key for row in rows for key in row["levels"]))
    header = ["cell", *factor_keys, "params", "non-emb", "windows", "steps/ep", "tokens/ep", "epochs", "FLOPs"]
    cells = [
        [
            row["name"] + (" *" if row["cell_id"] in base_ids else ""),
            *(row["levels"].get(key, "") for key in factor_keys),
            si(row["n_params"]),
            si(row["non_embedding_params"]),
            str(row["train_windows"]),
            str(row["steps_per_epoch"]),
            si(row["tokens_per_epoch"]),
            str(row["epochs"]),
            f"{row['flops']:.2e}",
            *([estimates.get(row["cell_id"], "no measurement")] if estimates is not None else []),
        ]
        for row in rows
    ]
    lines = table_lines(header + (["est. time"] if estimates is not None else []), cells, numbers_right=True)
    steps = sum(r["steps_per_epoch"] * r["epochs"] for r in rows)
    tokens = sum(r["tokens_per_epoch"] * r["epochs"] for r in rows)
    flops = sum(r["flops"] for r in rows)
    lines.append(f"total: {len(rows)} cells, {steps} steps, {si(tokens)} training tokens, {flops:.2e} FLOPs")
    if base_ids:
        lines.append("* base cell: the base config's level of every factor")
    if skipped:
        lines.append(f"skipped ({len(skipped)}):")
        # the levels as asked: two skipped cells can share a name (stride 16 and 0.5x both show s16)
        for cell in skipped:
            levels = ", ".join(f"{key}={label}" for key, label in cell.levels.items())
            lines.append(f"  {cell.name} ({levels}): {cell.reason}" if levels else f"  {cell.name}: {cell.reason}")
    return "\n".join(lines)


# ---------------------------------------------------------------- terminal formatting (also used by report)


def si(x: float) -> str:
    """A count in three significant digits with an SI suffix (12.3M); '-' for NaN and infinities."""
    if not math.isfinite(x):
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def table_lines(header: list[str], rows: list[list[str]], numbers_right: bool = False) -> list[str]:
    """Text lines of aligned columns, two spaces apart; `numbers_right` right-aligns all but the first column."""
    table = [header, *rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return [
        "  ".join(
            cell.rjust(width) if numbers_right and i else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in table
    ]

"""Reading an ablation grid: a grid file plus command-line options -> a GridSpec.

A grid file (YAML) looks like::

    name: tiny-stride
    base: ../tiny.yaml                # relative to this file, else to the working directory
    config: {train.epochs: 2}         # inline overrides of the base (nested or dotted keys)
    data: [gutenberg:11]              # files, globs or gutenberg:<id> (relative to the working directory)
    vary:                             # config key -> levels
      model.context_length: [16, 32]
      data.stride: [0.25x, 0.5x, 1x]  # relative strides resolve against each cell's window length
    seeds: [0, 1]                     # replicates; each sets train.seed
    design: grid                      # grid (cartesian product) | one-at-a-time (each factor alone)
    set: [train.lr=0.002]             # `key=value` overrides applied to every cell

The base config of a grid is: base file (or defaults), then `config`, then `data`, then `set`.
Each level is type-checked against its config field here, but whether a combination of levels can
run is decided per cell by gpt.ablation.grid.expand; only mistakes in the grid itself raise UserError.
"""

from __future__ import annotations

import copy
import glob
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt.ablation.grid import DESIGNS, Factor, GridSpec, default_grid_name, format_level
from gpt.config import (
    SECTIONS,
    Config,
    apply_overrides,
    get_key,
    read_config_file,
    read_yaml,
    resolve_stride,
    set_key,
    yaml_scalar,
)
from gpt.errors import UserError, check_file

GRID_KEYS = ("name", "base", "config", "data", "vary", "seeds", "design", "set")


def load_grid(
    path: str | Path | None,
    *,
    base: str | Path | None = None,
    data: Sequence[str] = (),
    vary: Sequence[str] = (),
    seeds: str | Sequence[int | str] | None = None,
    sets: Sequence[str] = (),
    design: str | None = None,
    name: str | None = None,
) -> GridSpec:
    """Read a grid file (or none) and apply command-line options on top of it.

    base, data, seeds, design and name replace the file's (None or empty: keep the file's);
    each `vary` item ("model.n_layers=2,4,8") replaces that factor's levels or adds the factor;
    `sets` ("train.epochs=2") are applied after the file's.
    """
    source = Path(path).expanduser() if path is not None else None
    raw = _read_grid_file(source) if source is not None else {}
    where = str(source) if source else "grid"
    base_path, cfg = _base_config(base, raw, source, where)

    files = list(data) or _string_list(raw.get("data"), f"{where}: data")
    if files:
        cfg.data.files = files
    all_sets = _string_list(raw.get("set"), f"{where}: set") + list(sets)
    for item in all_sets:
        try:
            _apply_set(cfg, item)
        except UserError as exc:
            raise UserError(f"set {item!r}: {exc}") from None
    factors = _factors(raw, vary, where)

    spec = GridSpec(
        name=name or str(raw.get("name") or (source.stem if source else default_grid_name(list(factors)))),
        base=cfg,
        factors=list(factors.values()),
        seeds=_cli_seeds(seeds) if seeds else _file_seeds(raw, cfg, where),
        design=_design(design, "--design") if design else _design(raw.get("design", "grid"), where),
        source=source,
        base_path=base_path,
        sets=all_sets,
    )
    if spec.design == "grid":
        # in a full grid every cell sets each factor, so a `set` on a factor would be silently lost
        for item in all_sets:
            key = item.split("=", 1)[0].strip()
            if key in factors:
                raise UserError(f"set {item!r} conflicts with the varied factor {key}; give its levels in vary instead")
    return spec


def input_files(spec: GridSpec) -> dict[Path, str]:
    """The files the grid reads -> their role ("the grid file", "the base config"...), so that nothing the
    grid writes lands on one of them. Data globs are matched now; gutenberg:<id> books are downloads in
    the cache, not the user's files, and are left out."""
    sources = list(spec.base.data.files)
    for factor in spec.factors:
        if factor.key == "data.files":  # each level is a list of sources
            sources += [source for level in factor.values for source in level]
    found: dict[Path, str] = {}
    for source in sources:
        if source.startswith("gutenberg:"):
            continue
        matches = glob.glob(os.path.expanduser(source), recursive=True) if glob.has_magic(source) else [source]
        found.update({Path(match).expanduser(): "a data file of the grid" for match in matches})
    for path, role in [(spec.base_path, "the base config"), (spec.source, "the grid file")]:
        if path is not None:
            found[path] = role
    return found


def _read_grid_file(source: Path) -> dict[str, Any]:
    """The grid file's mapping; UserError for a missing file, another YAML shape or an unknown key."""
    check_file(source, "grid file")
    raw = read_yaml(source)
    if raw is None:
        raise UserError(f"grid file {source} is empty; give at least its data and a factor to vary (configs/grids/)")
    if not isinstance(raw, dict):
        what = type(raw).__name__
        raise UserError(f"{source}: a grid file must be a mapping (name, base, data, vary...), got {what}")
    unknown = [str(k) for k in raw if k not in GRID_KEYS]
    if unknown:
        raise UserError(f"{source}: unknown grid key {unknown[0]!r}; valid keys: {', '.join(GRID_KEYS)}")
    return raw


def _base_config(
    base: str | Path | None, raw: dict[str, Any], source: Path | None, where: str
) -> tuple[Path | None, Config]:
    """The base config's file (--base, else the grid file's `base`, else none) and the config it gives,
    with the grid file's inline `config` applied."""
    base_path = _find_base(base, None) if base is not None else None
    if base_path is None and raw.get("base") is not None:
        base_path = _find_base(raw["base"], source)
    cfg = read_config_file(base_path) if base_path else Config()
    try:
        _apply_inline(cfg, raw.get("config"))
    except UserError as exc:
        raise UserError(f"{where}: config: {exc}") from None
    return base_path, cfg


def _factors(raw: dict[str, Any], vary: Sequence[str], where: str) -> dict[str, Factor]:
    """The grid file's factors, each --vary replacing a factor's levels or adding one (key -> Factor)."""
    factors = {key: _factor(key, levels, f"{where}: vary") for key, levels in _vary_items(raw.get("vary"), where)}
    cli_keys: set[str] = set()
    for item in vary:
        key, levels = _parse_vary(item)
        if key in cli_keys:
            raise UserError(f"--vary {key} is given twice; list all its levels once: --vary {key}=a,b,c")
        cli_keys.add(key)
        factors[key] = _factor(key, levels, "--vary")
    return factors


def _find_base(value: Any, grid_file: Path | None) -> Path:
    """The base config: relative to the grid file first, then to the working directory."""
    if not isinstance(value, (str, Path)) or not str(value):
        raise UserError(f"{grid_file or 'grid'}: base must be a path to a config YAML, got {value!r}")
    base = Path(value).expanduser()
    candidates = [base]
    if grid_file is not None and not base.is_absolute():
        candidates.insert(0, grid_file.parent / base)
    for candidate in candidates:
        if candidate.exists():
            return check_file(candidate, "base config")
    tried = " or ".join(str(c) for c in candidates)
    raise UserError(f"base config not found: {tried}")


def _apply_inline(cfg: Config, inline: Any) -> None:
    """`config:` of a grid file, nested ({model: {n_layers: 2}}) or dotted ({model.n_layers: 2})."""
    if inline is None:
        return
    if not isinstance(inline, dict):
        raise UserError(f"expected a mapping of config keys, got {type(inline).__name__}")
    for key, value in inline.items():
        key = str(key)
        if key in SECTIONS and isinstance(value, dict):
            for sub, sub_value in value.items():
                set_key(cfg, f"{key}.{sub}", sub_value, parse=False)
        else:
            set_key(cfg, key, value, parse=False)


def _apply_set(cfg: Config, item: str) -> None:
    """One `set` item, read exactly as train.py --set reads it."""
    if "=" not in item:
        raise UserError("must look like section.key=value (e.g. train.epochs=2)")
    apply_overrides(cfg, [item])


def _vary_items(vary: Any, where: str) -> list[tuple[str, Any]]:
    if vary is None:
        return []
    if not isinstance(vary, dict):
        raise UserError(f"{where}: vary must be a mapping of config key -> list of levels, got {type(vary).__name__}")
    items = []
    for key, levels in vary.items():
        key = str(key)
        if key in SECTIONS and isinstance(levels, dict):  # nested form: {model: {n_layers: [1, 2]}}
            items.extend((f"{key}.{sub}", sub_levels) for sub, sub_levels in levels.items())
        else:
            items.append((key, levels))
    return items


def _parse_vary(item: str) -> tuple[str, list[Any]]:
    """'model.n_layers=2,4,8' -> ('model.n_layers', [2, 4, 8]) with YAML scalar rules per level."""
    if "=" not in item:
        raise UserError(f"--vary {item!r} must look like section.key=level,level (e.g. model.n_layers=2,4,8)")
    key, text = (part.strip() for part in item.split("=", 1))
    parts = [p.strip() for p in text.split(",")] if text else []
    if _is_text_field(key):
        return key, parts
    return key, [yaml_scalar(p) for p in parts]


def _factor(key: str, levels: Any, where: str) -> Factor:
    """Type-check each level against the config field; reject empty, duplicate and malformed levels."""
    if key == "train.seed":
        raise UserError(f"{where}: vary train.seed is not a factor; list replicate seeds under seeds: [0, 1, 2]")
    if not isinstance(levels, list):
        raise UserError(f"{where} {key}: expected a list of levels such as [1, 2, 4], got {levels!r}")
    if not levels:
        raise UserError(f"{where} {key}: the list of levels is empty")
    scratch = Config()
    values, labels = [], []
    for level in levels:
        if key == "data.stride" and isinstance(level, float):
            raise UserError(f"{where}: data.stride: {level} is not a token count; write a ratio as '{level}x'")
        try:
            set_key(scratch, key, copy.deepcopy(level), parse=False)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        value = get_key(scratch, key)
        if key == "data.stride" and isinstance(value, str):
            try:
                resolve_stride(value, 1)
            except UserError as exc:
                raise UserError(f"{where}: {exc}") from None
        label = format_level(value)
        if label in labels:
            raise UserError(f"{where} {key}: duplicate level {label}")
        values.append(value)
        labels.append(label)
    return Factor(key=key, values=tuple(values), labels=tuple(labels))


def _file_seeds(raw: dict[str, Any], cfg: Config, where: str) -> list[int]:
    if raw.get("seeds") is None:
        return [cfg.train.seed]  # no replicates asked for: the base config's seed, once
    return _seeds(raw["seeds"], f"{where}: seeds")


def _cli_seeds(value: str | Sequence[int | str]) -> list[int]:
    """'0,1,2', ['0', '1'] (a repeated option) or [0, 1]."""
    if isinstance(value, str) or all(isinstance(v, str) for v in value):
        text = value if isinstance(value, str) else ",".join(value)
        items: list[Any] = []
        for part in (p.strip() for p in text.split(",")):
            try:
                items.append(int(part))
            except ValueError:
                raise UserError(f"--seeds: {part!r} is not an integer seed (e.g. --seeds 0,1,2)") from None
        value = items
    return _seeds(list(value), "--seeds")


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list):
        raise UserError(f"{where}: expected a list of integer seeds such as [0, 1, 2], got {value!r}")
    if not value:
        raise UserError(f"{where}: the list of seeds is empty")
    for seed in value:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise UserError(f"{where}: expected integers, got {seed!r}")
    duplicates = sorted({s for s in value if value.count(s) > 1})
    if duplicates:
        raise UserError(f"{where}: duplicate seed {duplicates[0]}")
    return list(value)


def _design(value: Any, where: str) -> str:
    if value not in DESIGNS:
        raise UserError(f"{where}: design must be one of {', '.join(DESIGNS)}; got {value!r}")
    return value


def _string_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: expected a list of strings, got {value!r}")
    return list(value)


def _is_text_field(key: str) -> bool:
    """str and list[str] fields take --vary text verbatim ("2024.txt" stays a file name, not a number)."""
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        return False
    hint = typing.get_type_hints(SECTIONS[section]).get(name)
    return hint is str or hint == list[str]

"""What a grid is: the hash that finds its parent run, and the data digests that let a cell reuse another grid's run.

Two grids share a parent run only when they are the same experiment: the same resolved base config
(hashed with gpt.ablation.grid.cell_id, so the keys that do not change what is learned are left
out as they are for cells), factors and levels, replicate seeds, design, and the same data bytes
(sha256 of every file). The grid's name is not part of it: it only labels the parent run.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from gpt.ablation.grid import Cell, GridSpec, cell_id
from gpt.data import Corpus, sha256_file
from gpt.errors import UserError
from gpt.text import expand_sources

GRID_ID_TAG = "ablation.grid_id"
REUSED_TAG = "ablation.reused."  # + cell id, on the parent: a finished run of another grid stands for the cell


def cell_digests(cells: Sequence[Cell], cache_dir: Path, corpus: Corpus | None = None) -> dict[str, list[str]]:
    """Cell id -> sha256 of each of its data files, in the order a training run logs them (data.file<i>.sha256).

    `corpus` (built once when no cell varies the data) gives the digests of every cell without re-reading.
    """
    shared = [f["sha256"] for f in corpus.files] if corpus is not None else None
    by_files: dict[tuple[str, ...], list[str]] = {}
    digests = {}
    for cell in cells:
        if shared is not None:
            digests[cell.cell_id] = shared
            continue
        files = tuple(cell.config.data.files)
        if files not in by_files:
            by_files[files] = [sha256_file(path) for path in expand_sources(list(files), cache_dir)]
        digests[cell.cell_id] = by_files[files]
    return digests


def grid_id(spec: GridSpec, digests: dict[str, list[str]]) -> str:
    """16 hex digits of sha256 over the grid's definition (see the module docstring).

    The base enters with train.seed cleared, since every cell sets its replicate seed; factors,
    levels and seeds enter as sets, since their order changes no cell.
    """
    base = copy.deepcopy(spec.base)
    base.train.seed = 0
    try:
        base_id = cell_id(base, 0)
    except UserError:  # a malformed base stride: only possible when the stride is a factor, whose levels count
        base.data.stride = None
        base_id = cell_id(base, 0)
    payload = {
        "base": base_id,
        "design": spec.design,
        "factors": sorted([f.key, sorted(f.labels)] for f in spec.factors),
        "seeds": sorted(spec.seeds),
        "data": sorted({digest for files in digests.values() for digest in files}),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reuse_tag_value(run_id: str, cell: Cell) -> str:
    """The parent's tag REUSED_TAG + cell id: which run stands for the cell, at this grid's levels and seed."""
    return json.dumps({"run_id": run_id, "levels": cell.levels, "seed": cell.seed}, sort_keys=True)


def read_reuse_tags(tags: dict[str, str]) -> dict[str, dict]:
    """Cell id -> {run_id, levels, seed} from a parent run's tags; malformed values are ignored."""
    reused = {}
    for key, value in tags.items():
        if key.startswith(REUSED_TAG):
            try:
                entry = json.loads(value)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("run_id"), str):
                reused[key[len(REUSED_TAG) :]] = entry
    return reused

"""What makes a grid the same grid (its parent's identity), and the names of grids and their runs."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import ROOT

from gpt.ablation.grid import default_grid_name, expand, run_name, short_keys
from gpt.ablation.grid_file import load_grid
from gpt.ablation.identity import grid_id, read_reuse_tags, reuse_tag_value

TINY = ROOT / "configs" / "tiny.yaml"
DIGESTS = {"any": ["a" * 64]}


def spec(tmp_path: Path, **fields):
    grid = {"base": str(TINY), "data": ["book.txt"], "vary": {"model.n_layers": [1, 2]}, "seeds": [0, 1], **fields}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return load_grid(path)


def test_the_same_grid_spelled_differently_has_the_same_identity(tmp_path):
    first = spec(tmp_path, vary={"model.n_layers": [1, 2], "data.stride": ["0.5x", "1x"]}, seeds=[0, 1])
    second = spec(tmp_path, vary={"data.stride": ["1x", "0.5x"], "model.n_layers": [2, 1]}, seeds=[1, 0])
    assert grid_id(first, DIGESTS) == grid_id(second, DIGESTS), "order changes no cell"
    renamed = spec(tmp_path, name="another name", vary={"model.n_layers": [1, 2], "data.stride": ["0.5x", "1x"]})
    assert grid_id(renamed, DIGESTS) == grid_id(first, DIGESTS), "the name only labels the parent"
    logging = spec(tmp_path, vary=first.to_dict()["vary"], set=["train.log_every_steps=7", "train.device=cpu"])
    assert grid_id(logging, DIGESTS) == grid_id(first, DIGESTS), "settings that change nothing learned"


def test_what_changes_a_cell_changes_the_grid(tmp_path):
    base = grid_id(spec(tmp_path), DIGESTS)
    assert grid_id(spec(tmp_path, vary={"model.n_heads": [1, 2]}), DIGESTS) != base, "another factor"
    assert grid_id(spec(tmp_path, vary={"model.n_layers": [1, 2, 4]}), DIGESTS) != base, "another level"
    assert grid_id(spec(tmp_path, seeds=[0, 1, 2]), DIGESTS) != base, "more seeds"
    assert grid_id(spec(tmp_path, design="one-at-a-time"), DIGESTS) != base, "another design"
    assert grid_id(spec(tmp_path, set=["train.lr=0.001"]), DIGESTS) != base, "another base config"
    assert grid_id(spec(tmp_path), {"any": ["b" * 64]}) != base, "other data bytes under the same file name"


def test_default_names_say_what_varies_and_run_names_lead_with_the_levels(tmp_path):
    assert default_grid_name(["model.n_layers", "data.stride"]) == "n_layers x stride"
    assert short_keys(["model.dropout", "train.dropout"]) == {
        "model.dropout": "model.dropout",
        "train.dropout": "train.dropout",
    }
    cells, _ = expand(spec(tmp_path, vary={"model.n_layers": [1, 2], "data.stride": ["0.5x", "1x"]}))
    assert run_name(cells[0]) == "n_layers=1 stride=0.5x seed=0, L1-H2-E32-ctx32-s16"
    files, _ = expand(spec(tmp_path, vary={"data.files": [["books/a.txt"], ["books/b.txt"]]}))
    assert run_name(files[0]).startswith("files=books_a.txt seed=0, "), "a '/' is not allowed in a run name"


def test_reuse_tags_carry_this_grids_levels(tmp_path):
    cell = expand(spec(tmp_path))[0][0]
    tags = {"ablation.reused." + cell.cell_id: reuse_tag_value("r1", cell), "ablation.reused.bad": "{not json"}
    assert read_reuse_tags(tags) == {cell.cell_id: {"run_id": "r1", "levels": {"model.n_layers": "1"}, "seed": 0}}

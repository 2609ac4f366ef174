"""Ablation grids: loading a grid file with command-line overrides, expanding cells, ids, the plan."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import RANKS, ROOT, VERDICT

from gpt.ablation.grid import (
    Cell,
    GridSpec,
    SkippedCell,
    cell_id,
    expand,
    format_plan,
    plan_rows,
)
from gpt.ablation.grid_file import load_grid
from gpt.config import TrainConfig, load, setting
from gpt.data import build_corpus, data_stats
from gpt.errors import UserError
from gpt.sizes import count_windows, flops_per_token
from gpt.tokenizer import get_encoding

TINY = ROOT / "configs" / "tiny.yaml"
GRIDS = ROOT / "configs" / "grids"


def write_grid(tmp_path: Path, content: dict | str, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def tiny_grid(tmp_path: Path, **fields) -> Path:
    """A grid file on configs/tiny.yaml (2 layers, 2 heads, width 32, context 32, stride = window)."""
    return write_grid(tmp_path, {"name": "test", "base": str(TINY), "data": ["book.txt"], **fields})


def by_name(cells: list[Cell]) -> dict[str, Cell]:
    return {cell.name: cell for cell in cells}


# ---------------------------------------------------------------- expansion


def test_full_grid_is_every_combination_of_levels_for_every_seed(tmp_path):
    spec = load_grid(tiny_grid(tmp_path, vary={"model.n_layers": [1, 2, 3], "model.n_heads": [2, 4]}, seeds=[0, 1]))
    cells, skipped = expand(spec)
    assert (len(cells), skipped) == (12, [])
    combos = {(c.levels["model.n_layers"], c.levels["model.n_heads"], c.seed) for c in cells}
    assert len(combos) == 12, "each (levels, seed) combination must appear exactly once"
    assert [c.seed for c in cells] == [0] * 6 + [1] * 6, "seeds are the outermost loop: whole replicates first"
    for cell in cells:
        assert cell.config.model.n_layers == int(cell.levels["model.n_layers"])
        assert cell.config.model.n_heads == int(cell.levels["model.n_heads"])
        assert cell.config.train.seed == cell.seed


def test_one_at_a_time_has_the_base_cell_once_plus_each_other_level(tmp_path):
    spec = load_grid(
        tiny_grid(
            tmp_path, vary={"model.n_layers": [1, 2, 4], "model.n_heads": [2, 4]}, seeds=[0], design="one-at-a-time"
        )
    )
    cells, skipped = expand(spec)
    assert skipped == []
    assert [c.name for c in cells] == [
        "L2-H2-E32-ctx32-s32-seed0",  # the base: tiny.yaml's 2 layers and 2 heads
        "L1-H2-E32-ctx32-s32-seed0",
        "L4-H2-E32-ctx32-s32-seed0",
        "L2-H4-E32-ctx32-s32-seed0",
    ]
    assert cells[0].levels == {"model.n_layers": "2", "model.n_heads": "2"}
    assert cells[3].levels == {"model.n_layers": "2", "model.n_heads": "4"}, "other factors stay at the base"


def test_one_at_a_time_base_not_among_the_levels_adds_every_level(tmp_path):
    spec = load_grid(tiny_grid(tmp_path, vary={"model.n_layers": [1, 3]}, seeds=[0, 1], design="one-at-a-time"))
    cells, _ = expand(spec)
    assert len(cells) == 2 * (1 + 2)
    assert cells[0].levels == {"model.n_layers": "2"}, "the base cell is labelled with the base config's value"


def test_one_at_a_time_default_stride_matches_the_1x_level(tmp_path):
    spec = load_grid(tiny_grid(tmp_path, vary={"data.stride": ["0.5x", "1x"]}, seeds=[0], design="one-at-a-time"))
    cells, _ = expand(spec)
    assert [(c.levels["data.stride"], c.config.data.stride) for c in cells] == [("1x", 32), ("0.5x", 16)]


def test_relative_strides_resolve_against_each_cells_context_length(tmp_path):
    spec = load_grid(
        tiny_grid(tmp_path, vary={"model.context_length": [16, 32], "data.stride": ["0.25x", "0.5x", "1x"]}, seeds=[0])
    )
    cells, _ = expand(spec)
    got = {(c.config.model.context_length, c.levels["data.stride"]): c.config.data.stride for c in cells}
    assert got == {
        (16, "0.25x"): 4,
        (16, "0.5x"): 8,
        (16, "1x"): 16,
        (32, "0.25x"): 8,
        (32, "0.5x"): 16,
        (32, "1x"): 32,
    }
    assert all(isinstance(c.config.data.stride, int) for c in cells), "a cell's config holds the stride in tokens"


def test_a_relative_stride_in_the_base_config_is_resolved_too(tmp_path):
    spec = load_grid(tiny_grid(tmp_path, vary={"model.context_length": [16, 32]}, seeds=[0], set=["data.stride=0.5x"]))
    cells, _ = expand(spec)
    assert [c.config.data.stride for c in cells] == [8, 16]


def test_invalid_combinations_are_skipped_with_the_reason_not_raised(tmp_path):
    spec = load_grid(tiny_grid(tmp_path, vary={"model.n_heads": [3, 4], "data.max_length": [16, 64]}, seeds=[0]))
    cells, skipped = expand(spec)
    assert [(c.levels["model.n_heads"], c.levels["data.max_length"]) for c in cells] == [("4", "16")]
    reasons = {(s.levels["model.n_heads"], s.levels["data.max_length"]): s.reason for s in skipped}
    assert set(reasons) == {("3", "16"), ("3", "64"), ("4", "64")}
    assert "divisible by model.n_heads (3)" in reasons[("3", "16")]
    assert "must not exceed model.context_length" in reasons[("4", "64")]
    assert all(isinstance(s, SkippedCell) and s.name for s in skipped)


def test_cells_without_a_window_in_the_data_are_skipped_when_token_counts_are_known(tmp_path):
    spec = load_grid(tiny_grid(tmp_path, vary={"model.context_length": [16, 32]}, seeds=[0]))
    cells, skipped = expand(spec, train_tokens=20)
    assert [c.config.model.context_length for c in cells] == [16]
    assert len(skipped) == 1 and "training split has 20 tokens" in skipped[0].reason
    assert "32+1" in skipped[0].reason
    cells, skipped = expand(spec, train_tokens=1000, val_tokens=30)
    assert [c.config.model.context_length for c in cells] == [16]
    assert "validation split has 30 tokens" in skipped[0].reason


def test_levels_that_resolve_to_the_same_experiment_run_once(tmp_path):
    spec = load_grid(tiny_grid(tmp_path, vary={"data.stride": ["0.5x", 16]}, seeds=[0]))
    cells, skipped = expand(spec)
    assert [c.levels["data.stride"] for c in cells] == ["0.5x"]
    assert skipped[0].levels["data.stride"] == "16"
    assert skipped[0].reason == f"same experiment as {cells[0].name}"


def test_cell_names_are_readable_and_show_non_architecture_factors(tmp_path):
    spec = load_grid(tiny_grid(tmp_path, vary={"data.stride": ["0.5x"], "train.lr": [0.002]}, seeds=[7]))
    (cell,), _ = expand(spec)
    assert cell.name == "L2-H2-E32-ctx32-s16-lr0.002-seed7"


def test_cell_tags_follow_the_contract(tmp_path):
    spec = load_grid(tiny_grid(tmp_path, vary={"model.n_layers": [1], "data.stride": ["0.5x"]}, seeds=[3]))
    (cell,), _ = expand(spec)
    assert cell.tags() == {
        "ablation.cell_id": cell.cell_id,
        "ablation.factors": "model.n_layers,data.stride",
        "ablation.seed": "3",
        "factor.model.n_layers": "1",
        "factor.data.stride": "0.5x",
    }


def test_parent_tags_name_the_grid_and_the_base_level_of_each_factor(tmp_path):
    spec = load_grid(tiny_grid(tmp_path, vary={"model.n_layers": [1, 2, 4], "data.stride": ["0.5x"]}, seeds=[0]))
    assert spec.parent_tags() == {
        "ablation.grid": "test",
        "ablation.design": "grid",
        "ablation.factors": "model.n_layers,data.stride",
        "ablation.base.model.n_layers": "2",
        "ablation.base.data.stride": "1x",  # tiny.yaml's stride is null: one window length
    }


# ---------------------------------------------------------------- cell identity


def test_cell_ids_are_stable_across_calls_and_look_like_hex(tmp_path):
    path = tiny_grid(tmp_path, vary={"model.n_layers": [1, 2]}, seeds=[0, 1])
    first = [c.cell_id for c in expand(load_grid(path))[0]]
    second = [c.cell_id for c in expand(load_grid(path))[0]]
    assert first == second
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in first)
    assert len(set(first)) == 4, "different configs or seeds must give different ids"


def test_cell_ids_ignore_keys_that_do_not_change_the_experiment(tmp_path):
    path = tiny_grid(tmp_path, vary={"model.n_layers": [1, 2]}, seeds=[0])
    plain = [c.cell_id for c in expand(load_grid(path))[0]]
    irrelevant = [
        "train.device=cpu",
        "train.compile=true",
        "train.log_every_steps=1",
        "train.sample_every=0",
        "train.sample_every_s=0",
        "model.loss_chunk_rows=64",
        "train.checkpoint_every_s=1",
        "train.sample_prompts=Hello",
        "train.sample_tokens=5",
        "train.eval_every=2",  # validation cadence, sampling settings: nothing a cell learns
        "train.temperature=0.5",
        "train.top_k=3",
    ]
    moved = [c.cell_id for c in expand(load_grid(path, sets=irrelevant))[0]]
    assert moved == plain


def test_cell_ids_change_with_the_seed_and_with_any_experiment_key(tmp_path):
    path = tiny_grid(tmp_path, seeds=[0])
    (base,), _ = expand(load_grid(path))
    (other_seed,), _ = expand(load_grid(path, seeds="1"))
    (other_lr,), _ = expand(load_grid(path, sets=["train.lr=0.003"]))
    (other_data,), _ = expand(load_grid(path, data=["other.txt"]))
    assert len({base.cell_id, other_seed.cell_id, other_lr.cell_id, other_data.cell_id}) == 4


def test_cell_ids_see_resolved_windows_not_their_spelling():
    cfg = load(TINY, ["train.seed=0"])
    spelled_out = load(TINY, ["train.seed=0", "data.max_length=32", "data.stride=1x"])
    assert cell_id(cfg, 0) == cell_id(spelled_out, 0)


# Ids computed by the first implementation (commit 982ba4b) for grids that may already sit in users'
# stores: a later version of the tool must find the same cells there.
EARLIER_IDS = {
    (("model.n_layers=1,2", "data.stride=0.5x,1x"), "0,1", ("train.epochs=3", "model.context_length=16")): [
        "f7257113b7ed", "4b32d22cc52d", "8616ec6ffca7", "f9b3b4437193",
        "253f94585663", "ab2cb2bf993d", "cb61258c929f", "aa5099b10bad",
    ],
    (("model.n_layers=1,2",), "3", ("train.precision=fp32", "train.top_k=25", "model.init=gpt2")): [
        "26f1d35386c3", "c45d94b42e9f",
    ],
}  # fmt: skip


@pytest.mark.parametrize("vary, seeds, sets", list(EARLIER_IDS))
def test_cell_ids_of_grids_run_by_earlier_versions_are_unchanged(vary, seeds, sets):
    data = ["a.txt", "b.txt"] if seeds == "3" else ["x.txt"]
    spec = load_grid(None, base=TINY, data=data, vary=list(vary), seeds=seeds, sets=list(sets))
    assert [c.cell_id for c in expand(spec)[0]] == EARLIER_IDS[(vary, seeds, sets)]


def test_cell_ids_of_the_reference_config_are_unchanged():
    spec = load_grid(
        None,
        base=ROOT / "configs" / "gpt2-128.yaml",
        data=["book.txt"],
        vary=["model.n_heads=6,12", "train.lr=1e-4,4e-4"],
        seeds="0",
    )
    assert [c.cell_id for c in expand(spec)[0]] == ["3a3032baa69d", "54a1e1192972", "c7aa2a2bd35d", "5c51587094a4"]


@dataclasses.dataclass
class TrainWithANewKey(TrainConfig):
    """The config as a later version might extend it: a new key that defines the experiment."""

    label_smoothing: float = setting(0.0)


def test_adding_a_config_key_with_a_default_leaves_existing_cell_ids_unchanged(tmp_path):
    path = tiny_grid(tmp_path, vary={"model.n_layers": [1, 2], "data.stride": ["0.5x", "1x"]}, seeds=[0, 1])
    cells = expand(load_grid(path))[0]
    extended = []
    for cell in cells:
        cfg = copy.deepcopy(cell.config)
        cfg.train = TrainWithANewKey(**dataclasses.asdict(cfg.train))
        assert "train.label_smoothing" in cfg.flat()
        extended.append(cell_id(cfg, cell.seed))
    assert extended == [c.cell_id for c in cells]
    cfg.train.label_smoothing = 0.1  # a cell that sets the new key is a different experiment
    assert cell_id(cfg, cells[-1].seed) != cells[-1].cell_id


# ---------------------------------------------------------------- command-line options


def test_vary_option_replaces_a_factor_in_place_and_adds_new_ones(tmp_path):
    path = tiny_grid(tmp_path, vary={"model.n_layers": [1, 2, 3], "model.n_heads": [2, 4]}, seeds=[0, 1])
    spec = load_grid(path, vary=["model.n_layers=2,4,8", "data.stride=0.5x,1x"])
    assert spec.factor_keys == ["model.n_layers", "model.n_heads", "data.stride"]
    assert spec.factors[0].values == (2, 4, 8)
    assert spec.factors[2].values == ("0.5x", "1x")
    assert len(expand(spec)[0]) == 3 * 2 * 2 * 2


def test_seeds_option_replaces_the_files_seeds(tmp_path):
    path = tiny_grid(tmp_path, seeds=[0, 1])
    assert load_grid(path, seeds="5,6,7").seeds == [5, 6, 7]
    assert load_grid(path, seeds=["8", "9"]).seeds == [8, 9], "a repeated option gives a list of strings"
    assert load_grid(path, seeds=[3]).seeds == [3]


def test_without_seeds_the_base_configs_seed_runs_once(tmp_path):
    assert load_grid(tiny_grid(tmp_path)).seeds == [123]


def test_set_options_apply_after_the_files_set(tmp_path):
    path = tiny_grid(tmp_path, set=["train.epochs=5", "train.lr=0.002"])
    spec = load_grid(path, sets=["train.epochs=2"])
    assert (spec.base.train.epochs, spec.base.train.lr) == (2, 0.002)
    assert spec.sets == ["train.epochs=5", "train.lr=0.002", "train.epochs=2"]


def test_base_data_design_and_name_options_replace_the_files(tmp_path):
    other = write_grid(tmp_path, {"model": {"n_layers": 6, "emb_dim": 32, "n_heads": 2}}, name="other.yaml")
    spec = load_grid(
        tiny_grid(tmp_path, vary={"model.n_layers": [1, 6]}),
        base=other,
        data=["a.txt", "b.txt"],
        design="one-at-a-time",
        name="renamed",
    )
    assert spec.base_path == other and spec.base.model.emb_dim == 32
    assert spec.base.data.files == ["a.txt", "b.txt"]
    assert (spec.design, spec.name) == ("one-at-a-time", "renamed")
    assert [c.config.model.n_layers for c in expand(spec)[0]] == [6, 1]


def test_a_grid_needs_no_file(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_grid(
        None,
        base="configs/tiny.yaml",
        data=["book.txt"],
        vary=["model.n_layers=1,2", "data.stride=0.5x,1x"],
        seeds="0",
        sets=["train.epochs=2"],
    )
    cells, skipped = expand(spec)
    assert (spec.name, spec.design, spec.source) == ("n_layers x stride", "grid", None)
    assert (len(cells), skipped) == (4, [])
    assert all(c.config.train.epochs == 2 and c.config.data.files == ["book.txt"] for c in cells)


def test_levels_from_text_follow_yaml_scalar_rules_except_relative_strides():
    spec = load_grid(
        None,
        vary=[
            "model.n_layers=2,4",
            "model.dropout=0,0.1",
            "model.qkv_bias=true,false",
            "data.stride=0.5x,16",
            "train.lr=1e-3,3e-4",
            "train.lr_schedule=constant,cosine",
        ],
    )
    values = {f.key: f.values for f in spec.factors}
    assert values == {
        "model.n_layers": (2, 4),
        "model.dropout": (0.0, 0.1),
        "model.qkv_bias": (True, False),
        "data.stride": ("0.5x", 16),
        "train.lr": (0.001, 0.0003),
        "train.lr_schedule": ("constant", "cosine"),
    }
    assert spec.factors[1].labels == ("0.0", "0.1")


def test_inline_config_takes_nested_and_dotted_keys_over_the_base(tmp_path):
    spec = load_grid(tiny_grid(tmp_path, config={"model": {"n_layers": 3}, "train.lr": "1e-3"}))
    assert (spec.base.model.n_layers, spec.base.model.emb_dim, spec.base.train.lr) == (3, 32, 0.001)


def test_vary_takes_nested_keys_too(tmp_path):
    spec = load_grid(tiny_grid(tmp_path, vary={"model": {"n_layers": [1, 2]}, "train.lr": [0.002]}))
    assert spec.factor_keys == ["model.n_layers", "train.lr"]


def test_in_one_at_a_time_a_set_on_a_factor_moves_the_base_cell(tmp_path):
    spec = load_grid(
        tiny_grid(
            tmp_path, vary={"model.n_layers": [1, 4]}, seeds=[0], design="one-at-a-time", set=["model.n_layers=4"]
        )
    )
    assert [c.config.model.n_layers for c in expand(spec)[0]] == [4, 1]


def test_base_is_found_next_to_the_grid_file_first(tmp_path):
    (tmp_path / "grids").mkdir()
    write_grid(tmp_path, {"model": {"n_layers": 5}}, name="base.yaml")
    path = write_grid(tmp_path / "grids", {"base": "../base.yaml"})
    assert load_grid(path).base.model.n_layers == 5


def test_to_dict_is_a_self_contained_grid_that_expands_to_the_same_cells(tmp_path):
    spec = load_grid(
        tiny_grid(
            tmp_path,
            vary={"data.stride": ["0.5x", "1x"], "train.lr": [1e-3, 2e-3]},
            seeds=[0, 1],
            design="one-at-a-time",
            set=["train.epochs=2"],
        )
    )
    copy = load_grid(write_grid(tmp_path, spec.to_dict(), name="logged.yaml"))
    assert [c.cell_id for c in expand(copy)[0]] == [c.cell_id for c in expand(spec)[0]]


# ---------------------------------------------------------------- mistakes in the grid


GRID_ERRORS = {
    "yaml is a list": ("- a\n- b\n", "must be a mapping"),
    "unknown top-level key": ({"name": "x", "factors": {}}, "unknown grid key 'factors'"),
    "empty levels": ({"vary": {"model.n_layers": []}}, "model.n_layers: the list of levels is empty"),
    "levels not a list": ({"vary": {"model.n_layers": 2}}, "expected a list of levels"),
    "unknown vary key": ({"vary": {"model.n_layer": [1, 2]}}, "unknown config key 'model.n_layer'"),
    "level of the wrong type": ({"vary": {"model.n_layers": [1, "two"]}}, "model.n_layers: expected int"),
    "malformed relative stride": ({"vary": {"data.stride": ["half"]}}, "'half' is neither a token count"),
    "stride as a bare fraction": ({"vary": {"data.stride": [0.5]}}, "write a ratio as '0.5x'"),
    "varying the seed": ({"vary": {"train.seed": [1, 2]}}, "list replicate seeds under seeds"),
    "bad design": ({"design": "factorial"}, "design must be one of grid, one-at-a-time; got 'factorial'"),
    "seeds not ints": ({"seeds": [0, "one"]}, "seeds: expected integers, got 'one'"),
    "seeds not a list": ({"seeds": 3}, "expected a list of integer seeds"),
    "duplicate seeds": ({"seeds": [0, 1, 0]}, "duplicate seed 0"),
    "duplicate levels": ({"vary": {"model.n_layers": [1, 2, 1]}}, "model.n_layers: duplicate level 1"),
    "duplicate after typing": ({"vary": {"train.lr": [1, 1.0]}}, "train.lr: duplicate level 1.0"),
    "base not found": ({"base": "nowhere.yaml"}, "base config not found"),
    "set conflicts with a factor": (
        {"vary": {"model.n_layers": [1, 2]}, "set": ["model.n_layers=4"]},
        "conflicts with the varied factor",
    ),
    "unknown set key": ({"set": ["train.epoch=2"]}, "unknown config key 'train.epoch'"),
    "set without a value": ({"set": ["train.epochs"]}, "set 'train.epochs': must look like section.key=value"),
    "inline config not a mapping": ({"config": ["train.epochs=2"]}, "config: expected a mapping of config keys"),
    "inline config wrong type": ({"config": {"train": {"epochs": "two"}}}, "config: train.epochs: expected int"),
    "level not a number": ({"vary": {"train.lr": [0.001, float("nan")]}}, "train.lr: expected a finite number"),
    "level infinite": ({"vary": {"model.dropout": [0.0, float("inf")]}}, "model.dropout: expected a finite number"),
    "inline config nan": ({"config": {"train.lr": float("nan")}}, "config: train.lr: expected a finite number"),
}


@pytest.mark.parametrize("content, message", GRID_ERRORS.values(), ids=GRID_ERRORS.keys())
def test_mistakes_in_a_grid_file_raise_one_line_user_errors(tmp_path, content, message):
    with pytest.raises(UserError) as caught:
        load_grid(write_grid(tmp_path, content))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_grid_file_names_the_path(tmp_path):
    with pytest.raises(UserError, match="grid file not found: .*absent.yaml"):
        load_grid(tmp_path / "absent.yaml")
    with pytest.raises(UserError, match="grid file /dev/null is not a regular file"):
        load_grid(Path("/dev/null"))
    (tmp_path / "empty.yaml").touch()
    with pytest.raises(UserError, match="grid file .*empty.yaml is empty; give at least its data and a factor"):
        load_grid(tmp_path / "empty.yaml")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"vary": ["model.n_layers"]}, "must look like section.key=level,level"),
        ({"vary": ["model.n_layers="]}, "the list of levels is empty"),
        ({"vary": ["model.n_layers=1,2", "model.n_layers=3"]}, "--vary model.n_layers is given twice"),
        ({"seeds": "0,x"}, "'x' is not an integer seed"),
        ({"design": "oat"}, "--design: design must be one of"),
        ({"base": "missing.yaml"}, "base config not found: missing.yaml"),
        ({"base": "/dev/null"}, "base config /dev/null is not a regular file (a device, pipe or socket)"),
        ({"vary": ["train.lr=0.001,.nan"]}, "--vary: train.lr: expected a finite number, got nan"),
        ({"vary": ["train.weight_decay=.inf"]}, "--vary: train.weight_decay: expected a finite number, got inf"),
        ({"sets": ["train.lr=-.inf"]}, "train.lr: expected a finite number"),
    ],
)
def test_mistakes_in_command_line_options_raise_user_errors(options, message):
    with pytest.raises(UserError) as caught:
        load_grid(None, **options)
    assert message in str(caught.value)


# ---------------------------------------------------------------- the plan


@pytest.mark.skipif(not RANKS.is_file() or not VERDICT.is_file(), reason="needs the shared tokenizer and corpus")
def test_plan_rows_match_the_data_pipelines_counts(tmp_path):
    spec = load_grid(
        tiny_grid(
            tmp_path,
            data=[str(VERDICT)],
            vary={"model.context_length": [16, 32], "data.stride": ["0.5x", "1x"]},
            set=["train.batch_size=16"],
            seeds=[0],
        )
    )
    cells, _ = expand(spec)
    corpus = build_corpus(cells[0].config, get_encoding(), tmp_path / "cache")
    rows = plan_rows(cells, len(corpus.train), len(corpus.val))
    for cell, row in zip(cells, rows, strict=True):
        stats = data_stats(cell.config, corpus)
        length, stride = cell.config.window_length, cell.config.data.stride
        assert row["train_windows"] == count_windows(len(corpus.train), length, stride) == stats.train_windows
        assert (row["val_windows"], row["steps_per_epoch"], row["tokens_per_epoch"]) == (
            stats.val_windows,
            stats.steps_per_epoch,
            stats.tokens_per_epoch,
        ), cell.name
        epochs = cell.config.train.epochs
        assert row["flops"] == flops_per_token(cell.config.model, length) * stats.tokens_per_epoch * epochs
        assert (row["name"], row["cell_id"], row["levels"]) == (cell.name, cell.cell_id, cell.levels)


def test_format_plan_lists_cells_totals_and_skipped_reasons(tmp_path):
    spec = load_grid(tiny_grid(tmp_path, vary={"model.n_heads": [3, 4], "data.stride": ["0.5x", "1x"]}, seeds=[0]))
    cells, skipped = expand(spec)
    rows = plan_rows(cells, train_tokens=10_000, val_tokens=1_000)
    text = format_plan(rows, skipped)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["cell", "model.n_heads", "data.stride"]
    assert "L2-H4-E32-ctx32-s16-seed0" in lines[1] and "0.5x" in lines[1]
    steps = sum(r["steps_per_epoch"] * r["epochs"] for r in rows)
    assert lines[3].startswith(f"total: 2 cells, {steps} steps")
    assert lines[4] == "skipped (2):"
    assert "model.n_heads=3, data.stride=0.5x" in lines[5] and "divisible by model.n_heads (3)" in lines[5]


# ---------------------------------------------------------------- the example grids


@pytest.mark.parametrize("grid, n_cells", [("arch.yaml", 16), ("stride.yaml", 18)])
def test_example_grids_load_and_expand(grid, n_cells):
    spec = load_grid(GRIDS / grid)
    cells, skipped = expand(spec)
    assert isinstance(spec, GridSpec) and spec.base_path.resolve() == TINY.resolve()
    assert (len(cells), skipped) == (n_cells, [])
    assert len({c.cell_id for c in cells}) == n_cells
    assert all(c.config.window_stride == c.config.data.stride for c in cells)

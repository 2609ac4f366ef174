"""gpt.config: YAML presets, dotted overrides, and validation errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from gpt import config
from gpt.config import Config
from gpt.errors import UserError
from gpt.sizes import count_parameters

TINY = ROOT / "configs" / "tiny.yaml"
SEED = ROOT / "configs" / "gpt2-128.yaml"


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(*overrides: str, path: Path | None = None) -> str:
    """The message of the UserError that loading with these overrides raises."""
    with pytest.raises(UserError) as info:
        config.load(path, list(overrides))
    return str(info.value)


# ---------------------------------------------------------------- presets


def test_seed_preset_is_exactly_the_seed_experiment():
    cfg = config.load(SEED)
    m, d, t = cfg.model, cfg.data, cfg.train
    assert (m.vocab_size, m.context_length, m.emb_dim, m.n_heads, m.n_layers) == (50257, 128, 768, 12, 12)
    assert (m.dropout, m.qkv_bias, m.tie_weights) == (0.1, False, False)
    assert t.lr == pytest.approx(4e-4) and isinstance(t.lr, float)
    assert (t.lr_schedule, t.warmup_steps, t.batch_size, t.epochs, t.eval_every) == ("constant", 0, 64, 100, 1)
    assert t.weight_decay == pytest.approx(0.1)
    assert d.val_fraction == pytest.approx(0.1)
    assert (d.max_length, d.stride) == (None, None)
    assert cfg.window_length == 128, "max_length: null must resolve to model.context_length"
    assert cfg.window_stride == 128, "stride: null must resolve to max_length (non-overlapping windows)"


def test_tiny_preset_loads_and_is_small():
    cfg = config.load(TINY)
    assert count_parameters(cfg.model) < 5_000_000, "tiny.yaml must train in seconds on a CPU"
    assert cfg.model.n_layers <= 2 and cfg.model.dropout == 0.0
    assert cfg.window_length == cfg.window_stride == cfg.model.context_length
    assert cfg.train.sample_prompts, "the quick-start config should show samples"


def test_no_file_gives_the_validated_defaults():
    assert config.load(None) == Config()


@pytest.mark.parametrize("text", ["", "# all commented out\n# model: {n_layers: 2}\n"])
def test_an_empty_yaml_file_is_bad_input_not_the_reference_model(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        config.load(path)
    assert str(info.value).startswith(f"config file {path} is empty; give the settings that differ")


def test_flat_keys_are_dotted_section_keys():
    flat = config.load(SEED).flat()
    assert flat["model.n_layers"] == 12
    assert flat["train.lr"] == pytest.approx(4e-4)
    assert "data.stride" in flat and all(k.split(".")[0] in ("model", "data", "train") for k in flat)


def test_dumped_yaml_loads_back_to_the_same_config(tmp_path):
    cfg = config.load(TINY, ["data.stride=0.5x", "model.tie_weights=true"])
    assert config.load(write(tmp_path, config.dump_yaml(cfg))) == cfg


# ---------------------------------------------------------------- overrides


def test_override_sets_an_int():
    cfg = config.load(SEED, ["model.n_layers=4"])
    assert cfg.model.n_layers == 4 and isinstance(cfg.model.n_layers, int)


def test_override_stride_in_tokens():
    cfg = config.load(SEED, ["data.stride=64"])
    assert cfg.data.stride == 64 and cfg.window_stride == 64


@pytest.mark.parametrize(("ratio", "expected"), [("0.5x", 64), ("1x", 128), ("0.25x", 32), ("2x", 256)])
def test_override_stride_relative_to_max_length(ratio, expected):
    cfg = config.load(SEED, [f"data.stride={ratio}"])
    assert cfg.data.stride == ratio, "the relative stride is kept as written (it is a factor level)"
    assert cfg.window_stride == expected


def test_relative_stride_follows_max_length():
    cfg = config.load(SEED, ["data.stride=0.5x", "data.max_length=32"])
    assert cfg.window_length == 32 and cfg.window_stride == 16


def test_override_list_of_strings():
    cfg = config.load(None, ["data.files=[a.txt, 'dir/*.txt', gutenberg:11]", "train.sample_prompts=[Hi there, Yo]"])
    assert cfg.data.files == ["a.txt", "dir/*.txt", "gutenberg:11"]
    assert cfg.train.sample_prompts == ["Hi there", "Yo"]


def test_override_single_item_becomes_a_list():
    cfg = config.load(None, ["train.sample_prompts=Alice was", "data.files=story.txt"])
    assert cfg.train.sample_prompts == ["Alice was"]
    assert cfg.data.files == ["story.txt"]


def test_override_glob_is_taken_as_text():
    # '*' starts a YAML alias; a glob must still arrive as the file pattern the user typed
    assert config.load(None, ["data.files=*.txt"]).data.files == ["*.txt"]


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False), ("True", True)])
def test_override_bools(text, expected):
    cfg = config.load(None, [f"model.tie_weights={text}", f"train.drop_last={text}"])
    assert cfg.model.tie_weights is expected and cfg.train.drop_last is expected


def test_override_float_from_int():
    cfg = config.load(None, ["train.lr=1", "model.dropout=0"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)


def test_override_int_from_integral_float():
    assert config.load(None, ["model.n_layers=4.0"]).model.n_layers == 4


@pytest.mark.parametrize("text", ["4e-4", "4E-4", "1e-3", "+3e-4", "5.0e-4"])
def test_override_float_in_scientific_notation(text):
    # PyYAML (YAML 1.1) reads '4e-4' as a string; the reference config's lr is written exactly like this.
    assert config.load(None, [f"train.lr={text}"]).train.lr == pytest.approx(float(text))


def test_integer_in_scientific_notation_is_an_int_as_yaml_1_2_reads_it():
    cfg = config.load(None, ["train.epochs=1e2", "data.stride=2E1", "model.context_length=1.28e2"])
    assert (cfg.train.epochs, cfg.data.stride, cfg.model.context_length) == (100, 20, 128)
    message = load_error("model.n_layers=1.5e0")
    assert "model.n_layers" in message and "1.5" in message


def test_yaml_float_in_scientific_notation(tmp_path):
    path = write(tmp_path, "train:\n  lr: 4e-4\n  min_lr: 1e-5\n")
    cfg = config.load(path)
    assert cfg.train.lr == pytest.approx(4e-4) and cfg.train.min_lr == pytest.approx(1e-5)


def test_override_plain_string_is_kept_verbatim():
    assert config.load(None, ["train.lr_schedule=cosine"]).train.lr_schedule == "cosine"


def test_override_null_resets_an_optional_key():
    cfg = config.load(SEED, ["data.max_length=64", "data.max_length=null", "train.compile=null"])
    assert cfg.data.max_length is None and cfg.window_length == 128
    assert cfg.train.compile is None


def test_override_beats_the_file():
    assert config.load(TINY, ["train.epochs=7"]).train.epochs == 7


def test_override_without_equals_sign_is_an_error():
    message = load_error("model.n_layers")
    assert "model.n_layers" in message and "=" in message


# ---------------------------------------------------------------- errors name the key


@pytest.mark.parametrize("override", ["model.n_layer=4", "model.foo=1", "train.learning_rate=0.1"])
def test_unknown_key_is_named(override):
    key = override.split("=")[0]
    message = load_error(override)
    assert key in message and "unknown" in message


@pytest.mark.parametrize("override", ["optim.lr=0.1", "lr=0.1", "model=3"])
def test_unknown_section_is_named(override):
    assert override.split("=")[0] in load_error(override)


def test_unknown_section_in_yaml_is_named(tmp_path):
    message = load_error(path=write(tmp_path, "optimizer:\n  lr: 0.1\n"))
    assert "optimizer" in message and "model" in message, "the message should list the valid sections"


def test_unknown_key_in_yaml_is_named(tmp_path):
    message = load_error(path=write(tmp_path, "model:\n  n_layer: 4\n"))
    assert "model.n_layer" in message and "n_layers" in message, "the message should list the valid keys"


@pytest.mark.parametrize(
    "override",
    [
        "model.n_layers=four",
        "model.n_layers=true",  # a bool is not an int here
        "model.n_layers=4.5",
        "model.tie_weights=1",
        "model.tie_weights=maybe",
        "train.lr=fast",
        "train.lr=true",
        "data.val_fraction=[0.1]",
        "data.stride=0.5",  # a ratio needs its 'x'
        "data.stride=true",
        "data.files=123",
        "train.sample_prompts=[1, 2]",
    ],
)
def test_wrong_type_names_the_key(override):
    key = override.split("=", 1)[0]
    message = load_error(override)
    assert key in message, f"{message!r} should name {key}"


def test_wrong_type_in_yaml_names_the_key_and_value(tmp_path):
    message = load_error(path=write(tmp_path, "train:\n  batch_size: lots\n"))
    assert "train.batch_size" in message and "lots" in message


def test_section_that_is_not_a_mapping_is_named(tmp_path):
    assert "model" in load_error(path=write(tmp_path, "model: 12\n"))


def test_emb_dim_not_divisible_by_heads_names_both_keys():
    message = load_error("model.emb_dim=100", "model.n_heads=12")
    assert "model.emb_dim" in message and "model.n_heads" in message


@pytest.mark.parametrize(
    "key",
    [
        "model.vocab_size",
        "model.context_length",
        "model.emb_dim",
        "model.n_heads",
        "model.n_layers",
        "train.batch_size",
        "train.epochs",
        "train.eval_every",
        "train.log_every_steps",
    ],
)
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_sizes_name_the_key(key, value):
    assert key in load_error(f"{key}={value}")


@pytest.mark.parametrize("stride", [0, -3])
def test_stride_below_one_names_the_key(stride):
    assert "data.stride" in load_error(f"data.stride={stride}")


@pytest.mark.parametrize("stride", ["0x", "0.0x", "0.00x"])
def test_zero_relative_stride_names_the_key(stride):
    assert "data.stride" in load_error(f"data.stride={stride}")


@pytest.mark.parametrize("stride", ["half", "x", "0.5y", "64"])
def test_malformed_relative_stride_names_the_key(tmp_path, stride):
    # written as YAML text so that '64' stays a string, as a quoted value in a file would
    path = write(tmp_path, f"data:\n  stride: '{stride}'\n")
    message = load_error(path=path)
    assert "data.stride" in message and stride in message


def test_max_length_longer_than_context_names_both_keys():
    message = load_error("model.context_length=64", "data.max_length=65")
    assert "data.max_length" in message and "model.context_length" in message


def test_max_length_equal_to_context_is_fine():
    assert config.load(None, ["model.context_length=64", "data.max_length=64"]).window_length == 64


def test_non_positive_max_length_names_the_key():
    assert "data.max_length" in load_error("data.max_length=0")


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_val_fraction_outside_open_unit_interval_names_the_key(fraction):
    assert "data.val_fraction" in load_error(f"data.val_fraction={fraction}")


@pytest.mark.parametrize("dropout", [1, 1.5, -0.1])
def test_dropout_outside_unit_interval_names_the_key(dropout):
    assert "model.dropout" in load_error(f"model.dropout={dropout}")


def test_negative_loss_chunk_rows_names_the_key():
    assert "model.loss_chunk_rows" in load_error("model.loss_chunk_rows=-1")
    assert config.load(None).model.loss_chunk_rows is None, "auto (chunked on a CPU only) is the default"
    assert config.load(None, ["model.loss_chunk_rows=null"]).model.loss_chunk_rows is None


@pytest.mark.parametrize("override", ["train.lr=0", "train.lr=-0.001"])
def test_non_positive_lr_names_the_key(override):
    assert "train.lr" in load_error(override)


@pytest.mark.parametrize(
    "key", ["weight_decay", "grad_clip", "temperature", "warmup_steps", "sample_every", "sample_every_s"]
)
def test_negative_train_settings_name_the_key(key):
    assert f"train.{key}" in load_error(f"train.{key}=-1")


def test_sample_every_s_takes_whole_seconds_and_zero():
    assert config.load(None, ["train.sample_every_s=0"]).train.sample_every_s == 0.0
    assert config.load(None, ["train.sample_every_s=30"]).train.sample_every_s == 30.0


@pytest.mark.parametrize(
    ("key", "value"), [("train.lr_schedule", "linear"), ("train.device", "tpu"), ("train.precision", "fp16")]
)
def test_bad_choice_names_key_value_and_choices(key, value):
    message = load_error(f"{key}={value}")
    assert key in message and value in message
    assert {"train.lr_schedule": "cosine", "train.device": "cpu", "train.precision": "bf16"}[key] in message


@pytest.mark.parametrize("prompts", ["['']", "['Alice', '   ']"])
def test_empty_sample_prompt_names_the_key(prompts):
    assert "train.sample_prompts" in load_error(f"train.sample_prompts={prompts}")


# ---------------------------------------------------------------- broken files


def test_yaml_that_is_a_list_names_the_file(tmp_path):
    path = write(tmp_path, "- model\n- data\n")
    message = load_error(path=path)
    assert str(path) in message and "mapping" in message


def test_malformed_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "model:\n  n_layers: [4\n")
    message = load_error(path=path)
    assert str(path) in message and "YAML" in message


def test_non_utf8_yaml_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  sample_prompts: ['caf\xe9']\n".encode("latin-1"))
    assert str(path) in load_error(path=path)


def test_missing_config_file_names_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    message = load_error(path=path)
    assert str(path) in message and "not found" in message


def test_directory_as_config_file_names_the_path(tmp_path):
    assert str(tmp_path) in load_error(path=tmp_path)


# ---------------------------------------------------------------- numbers that are not numbers

FLOAT_KEYS = [key for key, f in config.fields_of().items() if f.type in ("float", float)]


def test_the_float_keys_are_found():
    assert {"model.dropout", "data.val_fraction", "train.lr", "train.temperature"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN", "1e999"])
def test_no_float_key_takes_nan_or_infinity(key, value, tmp_path):
    expected = f"{key}: expected a finite number"
    assert expected in load_error(f"{key}={value}")
    section, name = key.split(".")
    assert expected in load_error(path=write(tmp_path, f"{section}:\n  {name}: {value}\n"))


@pytest.mark.parametrize("value", [".nan", ".inf", "nanx", "infx"])
def test_stride_takes_no_nan_or_infinity(value):
    assert "data.stride" in load_error(f"data.stride={value}")


def test_a_tiny_temperature_is_a_valid_config():
    assert config.load(None, ["train.temperature=1e-40"]).train.temperature == 1e-40

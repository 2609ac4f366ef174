"""generate.py and gpt.runs: sampling from runs in an MLflow store, options, logging and one-line errors."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import RANKS, ROOT, assert_options_exist
from mlflow.tracking import MlflowClient

from gpt import checkpoint
from gpt.config import Config, ModelConfig
from gpt.errors import UserError
from gpt.model import GPT
from gpt.runs import find_checkpoint
from gpt.state import TrainState
from gpt.store import resolve_tracking_uri

pytestmark = pytest.mark.usefixtures("one_thread")

pytestmark = pytest.mark.skipif(not RANKS.is_file(), reason=f"no tokenizer ranks file at {RANKS}")

_spec = importlib.util.spec_from_file_location("generate_script", ROOT / "generate.py")
generate_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_script)

TINY = Config(
    model=ModelConfig(
        vocab_size=50257, context_length=16, emb_dim=32, n_heads=2, n_layers=2, dropout=0.0, tie_weights=True
    )
)
OTHER_RUN = "0" * 32


def payload(seed: int, config: Config = TINY, model_config: ModelConfig | None = None, **extra: object) -> dict:
    """A checkpoint as training writes it; weights of model_config (default: the config's own model)."""
    torch.manual_seed(seed)
    model = GPT(model_config or config.model)
    return {
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": None,
        "state": TrainState(epoch=3, step=30, best_val_loss=5.0).to_dict(),
        "rng": checkpoint.rng_state(),
        "tokenizer": {"name": "gpt2"},
        **extra,
    }


@dataclass
class Store:
    uri: str
    client: MlflowClient
    root: Path
    run: str  # best.pt and last.pt (different weights)
    empty: str  # no artifacts at all
    last_only: str
    mismatch: str  # a checkpoint whose config says 3 layers over 2 layers of weights


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("generate", artifact_location=(root / "artifacts").as_uri())

    def new_run(name: str, files: dict[str, dict]) -> str:
        run_id = client.create_run(experiment, run_name=name).info.run_id
        for file_name, content in files.items():
            path = checkpoint.save(root / "staging" / name / file_name, content)
            client.log_artifact(run_id, str(path), "checkpoints")
        client.set_terminated(run_id)
        return run_id

    three_layers = Config(model=ModelConfig(**{**TINY.model.__dict__, "n_layers": 3}))
    return Store(
        uri=uri,
        client=client,
        root=root,
        run=new_run("good", {"best.pt": payload(0), "last.pt": payload(1)}),
        empty=new_run("empty", {}),
        last_only=new_run("last-only", {"last.pt": payload(1)}),
        mismatch=new_run("mismatch", {"best.pt": payload(0, three_layers, TINY.model)}),
    )


def generate(store: Store, *args: str, prompt: str | None = "Dobby is") -> Result:
    options = ["--tracking-uri", store.uri, "--max-tokens", "8", "--device", "cpu", *args]
    if prompt is not None:
        options += ["--prompt", prompt]
    return CliRunner().invoke(generate_script.main, options)


def text_of(result: Result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}"
    return result.stdout


# ---------------------------------------------------------------- sampling from a run


def test_prints_a_continuation_of_the_runs_best_checkpoint(store):
    result = generate(store, "--run", store.run, "--seed", "1")
    assert text_of(result).strip(), "a continuation is printed"
    assert "checkpoints/best.pt" in result.stderr and "seed 1" in result.stderr
    assert "tokens/s" in result.stderr


def test_same_seed_same_text_other_seed_other_text(store):
    first, again, other = (text_of(generate(store, "--run", store.run, "--seed", s)) for s in ("4", "4", "5"))
    assert first == again
    assert first != other


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--seed", "3", "--top-k", "40", "--top-p", "0.9"]])
def test_no_kv_cache_gives_the_same_text_within_the_context(store, sampling):
    # "Dobby is" is 3 tokens: 8 new tokens stay within the context of 16
    cached = text_of(generate(store, "--run", store.run, *sampling))
    assert cached == text_of(generate(store, "--run", store.run, "--no-kv-cache", *sampling))


def test_quantize_int8_samples_on_a_cpu(store):
    first, again = (text_of(generate(store, "--run", store.run, "--seed", "2", "--quantize", "int8")) for _ in "ab")
    assert first.strip() and first == again, "a continuation, the same for the same seed"


def test_checkpoint_last_by_name_by_artifact_path_and_as_a_local_file(store):
    best = text_of(generate(store, "--run", store.run, "--temperature", "0"))
    last = text_of(generate(store, "--run", store.run, "--checkpoint", "last", "--temperature", "0"))
    assert best != last, "best.pt and last.pt hold different weights"
    by_path = generate(store, "--run", store.run, "--checkpoint", "checkpoints/last.pt", "--temperature", "0")
    assert text_of(by_path) == last
    local = find_checkpoint(store.run, "last", store.uri)
    assert text_of(generate(store, "--checkpoint", str(local), "--temperature", "0")) == last


def test_stream_prints_the_same_text(store):
    batch = text_of(generate(store, "--run", store.run, "--seed", "9"))
    assert text_of(generate(store, "--run", store.run, "--seed", "9", "--stream")) == batch


def test_num_samples_prints_each_sample(store):
    out = text_of(generate(store, "--run", store.run, "--num-samples", "3", "--seed", "2"))
    assert [line for line in out.splitlines() if line.startswith("===")] == [
        "=== prompt ===",
        *(f"=== sample {n}/3 ===" for n in (1, 2, 3)),
    ]


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_the_prompt_comes_first_and_marked(store, stream):
    out = text_of(generate(store, "--run", store.run, "--seed", "5", *stream))
    assert out.startswith("=== prompt ===\nDobby is\n=== continuation ===\n"), out
    bare = text_of(generate(store, "--run", store.run, "--seed", "5", "--no-echo", *stream))
    assert out == "=== prompt ===\nDobby is\n=== continuation ===\n" + bare, "--no-echo prints the text alone"
    assert "===" not in bare and "Dobby is" not in bare


def test_a_prompt_past_the_context_is_echoed_as_the_model_sees_it(store):
    prompt = " ".join(f"w{i}" for i in range(40))  # more than the 16 tokens of context
    out = text_of(generate(store, "--run", store.run, "--seed", "5", prompt=prompt))
    shown = out.split("=== prompt ===\n", 1)[1].split("\n=== continuation ===", 1)[0]
    assert shown.startswith("...") and prompt.endswith(shown[3:]) and len(shown) < len(prompt)


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--seed", "3", "--top-k", "40"]])
def test_cache_keep_of_the_context_gives_the_recompute_text_past_the_context(store, sampling):
    # 30 new tokens after a 3-token prompt run past the context of 16: the cache slides
    args = ["--run", store.run, "--max-tokens", "30", "--no-echo", *sampling]
    reference = text_of(generate(store, *args, "--no-kv-cache"))
    assert text_of(generate(store, *args, "--cache-keep", "16")) == reference
    assert text_of(generate(store, *args, "--cache-keep", "4")).strip(), "a smaller keep still generates"


def test_a_tiny_temperature_is_greedy(store):
    greedy = text_of(generate(store, "--run", store.run, "--temperature", "0"))
    assert text_of(generate(store, "--run", store.run, "--temperature", "1e-40", "--seed", "1")) == greedy


def test_prompt_file(store, tmp_path):
    (tmp_path / "prompt.txt").write_text("Dobby is", encoding="utf-8")
    from_file = generate(
        store, "--run", store.run, "--seed", "1", "--prompt-file", str(tmp_path / "prompt.txt"), prompt=None
    )
    assert text_of(from_file) == text_of(generate(store, "--run", store.run, "--seed", "1"))


def test_log_adds_the_prompt_settings_and_text_to_the_run(store):
    result = generate(store, "--run", store.run, "--seed", "6", "--log", "--no-echo")
    text = text_of(result)
    logged = store.client.list_artifacts(store.run, "generations")
    assert len(logged) == 1 and logged[0].path in result.stderr
    record = (store.root / "artifacts" / store.run / "artifacts" / logged[0].path).read_text(encoding="utf-8")
    assert "seed: 6" in record and "temperature: 1.0" in record
    assert "=== prompt ===\nDobby is\n" in record
    assert text.rstrip("\n") in record


# ---------------------------------------------------------------- errors: one line, exit 2


def one_line_error(result: Result) -> str:
    assert result.exit_code == 2, f"expected exit 2, got {result.exit_code}: {result.output}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got {lines}"
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--run", "deadbeef" * 4], "unknown run id 'deadbeefdeadbeefdeadbeefdeadbeef'"),
        (["--run", "{empty}"], "has no checkpoint: nothing under checkpoints/"),
        (["--run", "{last_only}"], "has no checkpoints/best.pt; its checkpoints: checkpoints/last.pt"),
        (["--run", "{run}", "--checkpoint", "checkpoints/epoch_9.pt"], "has no checkpoints/epoch_9.pt"),
        (["--run", "{mismatch}"], "does not fit the model: missing .*blocks.2"),
        (["--run", "{run}", "--temperature", "-1"], r"--temperature.: -1.0 is not in the range x>=0"),
        (["--run", "{run}", "--temperature", "nan"], r"--temperature.: 'nan' is not a finite number"),
        (["--run", "{run}", "--temperature", "inf"], r"--temperature.: 'inf' is not a finite number"),
        (["--run", "{run}", "--temperature", "-inf"], r"--temperature.: -inf is not in the range x>=0"),
        (["--run", "{run}", "--top-k", "0"], "top-k must be at least 1, got 0"),
        (["--run", "{run}", "--top-p", "0"], r"--top-p.: 0.0 is not in the range 0<x<=1"),
        (["--run", "{run}", "--top-p", "1.5"], r"--top-p.: 1.5 is not in the range 0<x<=1"),
        (["--run", "{run}", "--top-p", "NaN"], r"--top-p.: 'NaN' is not a finite number"),
        (["--run", "{run}", "--cache-keep", "17"], "--cache-keep must be at most the model's context length 16"),
        (["--run", "{run}", "--cache-keep", "0"], r"--cache-keep.: 0 is not in the range x>=1"),
        (["--run", "{run}", "--cache-keep", "4", "--no-kv-cache"], "drop it or --no-kv-cache"),
        (["--run", "{run}", "--max-tokens", "0"], "--max-tokens and --num-samples must be at least 1"),
        (["--run", "{run}", "--stream", "--num-samples", "2"], "--stream prints one sample"),
        (["--run", "{run}", "--device", "tpu"], "Invalid value for .--device."),
        (["--run", "{run}", "--top-k", "many"], "'many' is not a valid integer"),
        (["--run", "{run}", "--quantize", "int4"], "'int4' is not one of 'none', 'int8'"),
        ([], "give --run RUN_ID"),
        (["--checkpoint", "missing.pt"], "there is no file 'missing.pt'"),
    ],
)
def test_mistakes_are_one_line_errors(store, args, message):
    args = [a.format(**store.__dict__) for a in args]
    line = one_line_error(generate(store, *args))
    assert re.search(message, line), f"expected {message!r} in {line!r}"
    assert_options_exist(line, generate_script.main, args)


@pytest.mark.parametrize(
    ("prompt", "message"), [("", "the prompt is empty"), ("  ", "the prompt is empty"), ("a" * 1_000_001, "characters")]
)
def test_empty_and_absurd_prompts_are_one_line_errors(store, prompt, message):
    assert message in one_line_error(generate(store, "--run", store.run, prompt=prompt))


def test_a_missing_store_is_a_one_line_error(store, tmp_path):
    result = CliRunner().invoke(
        generate_script.main,
        ["--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", "--run", store.run, "--prompt", "a"],
    )
    assert "no MLflow store at" in one_line_error(result)
    assert not (tmp_path / "none.db").exists(), "looking for a run must not create a store"


def test_a_checkpoint_of_another_run_is_refused(store, tmp_path):
    foreign = checkpoint.save(tmp_path / "foreign.pt", payload(0, run_id=OTHER_RUN))
    result = generate(store, "--run", store.run, "--checkpoint", str(foreign))
    assert f"belongs to run {OTHER_RUN}, not to run {store.run}" in one_line_error(result)


def test_debug_shows_the_traceback(store):
    result = generate(store, "--run", "deadbeef" * 4, "--debug")
    assert isinstance(result.exception, UserError)


# ---------------------------------------------------------------- gpt.runs


def test_find_checkpoint_uses_a_local_store_in_place(store):
    best = find_checkpoint(store.run, "best", store.uri)
    assert best == store.root / "artifacts" / store.run / "artifacts" / "checkpoints" / "best.pt"
    assert checkpoint.load(best)["state"]["epoch"] == 3


def test_default_tracking_uri_is_the_environment_or_the_local_sqlite_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{Path('mlruns/mlflow.db').resolve()}", "absolute, from the cwd"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri(None) == "http://tracking:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == f"sqlite:///{Path('x.db').resolve()}", "--tracking-uri wins"
    assert resolve_tracking_uri("sqlite:///~/x.db") == f"sqlite:///{Path.home().resolve()}/x.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"

"""Runs as MLflow users expect them: dataset inputs, system metrics, a summary, and a logged, registered,
servable model (pyfunc from code, safetensors weights) that generate.py and transformers load too."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import RANKS, ROOT, TINY_TRAIN, VERDICT, free_port, last_run_id, run_train, subprocess_env
from mlflow.tracking import MlflowClient

from gpt.ablation.best_model import best_run, register_best
from gpt.data import build_corpus
from gpt.datasets import file_spans
from gpt.delivery import deliver_datasets
from gpt.logged_model import using_store
from gpt.run_summary import NOTE_TAG
from gpt.tokenizer import get_encoding

pytestmark = [
    pytest.mark.skipif(not RANKS.is_file(), reason=f"no tokenizer ranks file at {RANKS}"),
    pytest.mark.usefixtures("one_thread"),
]
_spec = importlib.util.spec_from_file_location("generate_script", ROOT / "generate.py")
generate_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_script)

TINY = [*TINY_TRAIN, "--set", "train.batch_size=32", "--set", "train.sample_every=0"]
NAME = "tiny-verdict"
UI_SYSTEM_METRICS = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")


class Trained:
    """A store with one finished, registered run (and its training output)."""

    def __init__(self, uri: str, run_id: str, output: str):
        self.uri, self.run_id, self.output = uri, run_id, output
        self.client = MlflowClient(uri)
        self.run = self.client.get_run(run_id)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    store = tmp_path_factory.mktemp("native")
    uri = f"sqlite:///{store}/mlflow.db"
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.3"  # MLflow's own setting: readings during a short run
    try:
        code, output = run_train([*TINY, "--epochs", "2", "--tracking-uri", uri, "--register-model", NAME])
    finally:
        del os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"]
    assert code == 0, output
    yield Trained(uri, last_run_id(output), output)


def generate(uri: str, *args: str) -> str:
    """generate.py's continuation alone (--no-echo: without the prompt and its markers)."""
    options = ["--tracking-uri", uri, "--prompt", "It was", "--max-tokens", "6", "--device", "cpu", "--no-echo", *args]
    result = CliRunner().invoke(generate_script.main, options)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


# ---------------------------------------------------------------- datasets, system metrics, summary


def test_each_text_is_a_training_and_a_validation_dataset_input(trained: Trained) -> None:
    inputs = trained.run.inputs.dataset_inputs
    contexts = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert sorted(contexts) == ["training", "validation"]
    params = trained.run.data.params
    for context, dataset in contexts.items():
        assert dataset.name == VERDICT.stem and dataset.source_type == "local"
        assert json.loads(dataset.source) == {"uri": str(VERDICT.resolve())}
        assert len(dataset.digest) == 16
        profile = json.loads(dataset.profile)
        assert profile["sha256"] == params["data.file0.sha256"]
        assert profile["tokens"] == int(params["data.file0.tokens"])
        assert (profile["train_tokens"], profile["val_tokens"]) == (
            int(params["train_tokens"]),
            int(params["val_tokens"]),
        )
        assert profile["split_tokens"] == int(params["train_tokens" if context == "training" else "val_tokens"])
        assert profile["characters"] > profile["tokens"]
    assert contexts["training"].digest != contexts["validation"].digest  # two splits, two datasets


def test_a_file_feeding_both_splits_is_cut_where_the_validation_tail_begins(tmp_path: Path) -> None:
    from gpt.config import load

    head = tmp_path / "head.txt"
    head.write_text(VERDICT.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    cfg = load(ROOT / "configs" / "tiny.yaml", [f"data.files=['{head}','{VERDICT}']", "data.val_fraction=0.6"])
    corpus = build_corpus(cfg, get_encoding(), tmp_path / "cache")
    from gpt.datasets import dataset_records

    records = dataset_records(corpus, tmp_path / "cache")
    by_split = {(r["name"], r["context"]): json.loads(r["profile"])["split_tokens"] for r in records}
    (start0, end0), (start1, end1) = file_spans(corpus)
    n_train = len(corpus.train)
    assert start0 == 0 and start1 == end0 + 1  # an <|endoftext|> between the files
    assert n_train < end0  # the validation tail reaches into the first file
    assert by_split == {
        ("head", "training"): n_train,
        ("head", "validation"): end0 - n_train,
        ("the_verdict", "validation"): end1 - start1,
    }


def test_runs_logging_the_same_new_dataset_at_once_all_get_it(tmp_path: Path) -> None:
    """MLflow inserts a new dataset after looking for it: simultaneous runs collide on its unique key."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("race")
    records = [
        {"name": "book", "digest": f"{n:016x}", "source_type": "local", "source": '{"uri": "/book.txt"}',
         "profile": "{}", "context": "training"}
        for n in range(3)
    ]  # fmt: skip
    runs = [client.create_run(experiment).info.run_id for _ in range(4)]
    start, errors = threading.Barrier(len(runs)), []

    def deliver(run_id: str) -> None:
        own = MlflowClient(uri)
        start.wait()
        try:
            deliver_datasets(own, run_id, records)
        except Exception as exc:  # noqa: BLE001 - collected and shown by the assertion
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(run_id,)) for run_id in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for run_id in runs:
        assert sorted(i.dataset.digest for i in client.get_run(run_id).inputs.dataset_inputs) == [
            r["digest"] for r in records
        ]


def test_system_metrics_are_logged_under_the_names_the_ui_charts(trained: Trained) -> None:
    for key in UI_SYSTEM_METRICS:
        history = trained.client.get_metric_history(trained.run_id, key)
        assert len(history) >= 2, key  # readings every 0.3 s over the run, and one at its end
        assert sorted(m.step for m in history) == list(range(len(history)))
    memory = trained.client.get_metric_history(trained.run_id, UI_SYSTEM_METRICS[1])
    assert all(m.value > 0 for m in memory)
    cpu = [m.value for m in trained.client.get_metric_history(trained.run_id, UI_SYSTEM_METRICS[0])]
    assert all(0 <= value <= 100 for value in cpu) and max(cpu) > 0  # training keeps a CPU busy


def test_summary_metrics_and_description(trained: Trained) -> None:
    metrics = trained.run.data.metrics
    history = trained.client.get_metric_history(trained.run_id, "val_loss")
    best = min(history, key=lambda m: m.value)
    assert metrics["best_val_loss"] == pytest.approx(best.value) and metrics["best_epoch"] == best.step
    note = trained.run.data.tags[NOTE_TAG]
    n_params = int(trained.run.data.params["n_params"])
    assert note.startswith(f"L2-H2-E16-ctx16-s16: {n_params / 1e6:.1f}M parameters")
    assert "the_verdict (" in note and "; 2 epochs; " in note
    assert f"best val loss {best.value:.4f} (epoch {best.step}), final {history[-1].value:.4f}" in note


# ---------------------------------------------------------------- the logged model


def test_the_logged_model_loads_with_pyfunc_and_continues_prompts(trained: Trained) -> None:
    with using_store(trained.uri):
        model = mlflow.pyfunc.load_model(f"runs:/{trained.run_id}/model")
    params = {"max_tokens": 6, "temperature": 0.0}
    texts = model.predict(["It was", "Alice"], params=params)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    assert model.predict(pd.DataFrame({"prompt": ["It was"]}), params=params) == texts[:1]
    # greedy decoding of the logged weights is exactly what generate.py prints from the run's best.pt
    assert texts[0] == generate(trained.uri, "--run", trained.run_id, "--temperature", "0")
    sampled = {"max_tokens": 6, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "seed": 7}
    assert model.predict(["It was"], params=sampled) == model.predict(["It was"], params=sampled)
    signature = model.metadata.signature
    assert [p.name for p in signature.params.params] == ["max_tokens", "temperature", "top_k", "top_p", "seed"]
    assert model.metadata.get_input_schema().input_types() == [mlflow.types.DataType.string]


def test_the_model_is_code_and_safetensors_and_loads_in_transformers(trained: Trained, tmp_path: Path) -> None:
    with using_store(trained.uri):
        folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{trained.run_id}/model", dst_path=str(tmp_path)))
    flavor = (folder / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in flavor  # models from code: nothing pickled
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".bin"))], files
    assert {"artifacts/hf/model.safetensors", "artifacts/gpt2.tiktoken", "code/gpt/mlflow_pyfunc.py"} <= files
    assert (folder / "artifacts" / "gpt2.tiktoken").read_bytes() == RANKS.read_bytes()  # works offline
    transformers = pytest.importorskip("transformers")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder / "artifacts" / "hf").eval()
    from gpt.mlflow_model import load_artifacts, model_folder_artifacts

    ours, _, _ = load_artifacts(model_folder_artifacts(folder), "cpu")
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(theirs(idx).logits, ours(idx), atol=1e-4, rtol=1e-4)


def test_the_registered_version_is_found_by_name_and_alias(trained: Trained) -> None:
    version = trained.client.get_model_version(NAME, "1")
    assert version.run_id == trained.run_id and version.status == "READY"
    logged = trained.client.search_logged_models([trained.run.info.experiment_id])
    assert [m.source_run_id for m in logged] == [trained.run_id]
    trained.client.set_registered_model_alias(NAME, "champion", "1")
    greedy = generate(trained.uri, "--run", trained.run_id, "--temperature", "0")
    for uri in (f"models:/{NAME}/1", f"models:/{NAME}@champion", f"runs:/{trained.run_id}/model"):
        assert generate(trained.uri, "--model", uri, "--temperature", "0") == greedy, uri


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("my-model", [], "--model 'my-model': give models:/NAME/VERSION"),
        (f"models:/{NAME}/7", [], f"cannot fetch model models:/{NAME}/7 from sqlite:///"),
        (f"models:/{NAME}/1", ["--run", "0" * 32], "--model samples from a logged MLflow Model: drop --run"),
    ],
    ids=["not-a-uri", "no-such-version", "with-run"],
)
def test_model_uri_mistakes_are_one_line_errors(trained: Trained, model: str, extra: list, message: str) -> None:
    result = CliRunner().invoke(
        generate_script.main, ["--tracking-uri", trained.uri, "--model", model, "--prompt", "It was", *extra]
    )
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_model_uri_against_a_missing_store_creates_none(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/nothing.db"
    result = CliRunner().invoke(
        generate_script.main, ["--tracking-uri", uri, "--model", "models:/x/1", "--prompt", "a"]
    )
    assert result.exit_code == 2 and "no MLflow store at" in result.output, result.output
    assert not list(tmp_path.iterdir())


def test_mlflow_models_serve_answers_a_prompt(trained: Trained, tmp_path: Path) -> None:
    port = free_port()
    env = subprocess_env(MLFLOW_TRACKING_URI=trained.uri)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/1", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    try:
        request = json.dumps({"inputs": ["It was"], "params": {"max_tokens": 6, "temperature": 0.0}}).encode()
        answer = _post(f"http://127.0.0.1:{port}/invocations", request, server)
        with using_store(trained.uri):
            expected = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(
                ["It was"], {"max_tokens": 6, "temperature": 0.0}
            )
        assert answer == {"predictions": expected}
        bad = json.dumps({"inputs": ["It was"], "params": {"max_tokens": 0}}).encode()
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post(f"http://127.0.0.1:{port}/invocations", bad, server)
        assert refused.value.code == 400 and "max_tokens must be at least 1" in refused.value.read().decode()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _post(url: str, body: bytes, server: subprocess.Popen, timeout: float = 180) -> dict:
    """POST JSON once the scoring server is up (it loads the model first)."""
    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError:
            raise
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not answer (exit code {server.poll()})")
            time.sleep(0.5)


# ---------------------------------------------------------------- logging later, and the grid's best


def test_no_log_model_then_log_model_later(trained: Trained) -> None:
    code, output = run_train([*TINY, "--epochs", "1", "--tracking-uri", trained.uri, "--no-log-model"])
    assert code == 0, output
    run_id = last_run_id(output)
    experiment = trained.run.info.experiment_id
    assert not trained.client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    code, output = run_train(["--log-model", run_id, "--tracking-uri", trained.uri, "--register-model", "later"])
    assert code == 0, output
    assert "registered as models:/later/1" in output
    assert trained.client.get_model_version("later", "1").run_id == run_id
    assert generate(trained.uri, "--model", "models:/later/1", "--temperature", "0") == generate(
        trained.uri, "--run", run_id, "--temperature", "0"
    )


def test_the_best_cell_is_the_lowest_mean_over_seeds_and_its_best_seed_is_registered(trained: Trained) -> None:
    client, loss = trained.client, trained.run.data.metrics["best_val_loss"]
    experiment = trained.run.info.experiment_id
    parent = client.create_run(experiment, run_name="grid").info.run_id

    def child(cell: str, value: float | None, run_id: str | None = None) -> str:
        run_id = run_id or client.create_run(experiment).info.run_id
        client.set_tag(run_id, "mlflow.parentRunId", parent)
        client.set_tag(run_id, "ablation.cell_id", cell)
        if value is not None:
            client.log_metric(run_id, "best_val_loss", value)
        client.set_terminated(run_id)
        return run_id

    child("a", None, trained.run_id)  # the trained run, with its own best_val_loss
    child("a", loss + 0.1)
    child("b", loss - 0.5)  # the best single run, in the cell with the worse mean
    child("b", loss + 1.0)
    best = best_run(parent, trained.uri)
    assert (best.cell_id, best.run_id, best.seeds) == ("a", trained.run_id, 2)
    assert best.cell_mean == pytest.approx(loss + 0.05)
    _, version = register_best(parent, trained.uri, "grid-best", None)
    assert trained.client.get_model_version("grid-best", version).run_id == trained.run_id


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--register-model", "a/b"], "registered model name 'a/b' is not allowed"),
        (["--register-model", "my gpt"], "registered model name 'my gpt' is not allowed"),  # models:/ URIs break
        (["--register-model", "a?x#y"], "registered model name 'a?x#y' is not allowed"),
        (["--register-model", "new\nline"], "registered model name 'new\\nline' is not allowed"),
        (["--register-model", "x", "--no-log-model"], "--no-log-model logs no model"),
        (["--log-model", "0" * 32, "--data", str(VERDICT)], "--log-model logs a trained run's model"),
    ],
)
def test_model_option_mistakes_are_one_line_errors_that_create_nothing(tmp_path: Path, args, message) -> None:
    code, output = run_train([*TINY, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *args])
    assert code == 2 and output.startswith("error: ") and message in output, output
    assert not (tmp_path / "mlflow.db").exists()

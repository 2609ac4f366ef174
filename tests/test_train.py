"""train.py end to end: what a run leaves in MLflow, its checkpoints, and what bad input leaves (nothing)."""

from __future__ import annotations

import math
import os
import re
import socket
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_TRAIN, MlflowServer, last_run_id, run_train
from mlflow.tracking import MlflowClient

from gpt import checkpoint
from gpt.config import from_dict
from gpt.data import Windows, build_corpus
from gpt.model import GPT
from gpt.runs import find_checkpoint
from gpt.tokenizer import get_encoding

EPOCH_METRICS = (
    "train_loss", "val_loss", "val_ppl", "tokens_seen", "epoch_seconds", "wall_seconds", "tokens_per_second"
)  # fmt: skip
TINY = [*TINY_TRAIN, "--set", "train.batch_size=32", "--set", "train.log_every_steps=2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    store = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{store}/mlflow.db"
    code, output = run_train([*TINY, "--epochs", "3", "--tracking-uri", uri, "--experiment", "e2e"])
    assert code == 0, output
    return uri, last_run_id(output), output


def test_run_logs_whole_config_and_derived_params(finished_run: tuple[str, str, str]) -> None:
    uri, run_id, _ = finished_run
    run = MlflowClient(uri).get_run(run_id)
    params = run.data.params
    assert params["model.emb_dim"] == "16" and params["model.n_layers"] == "2"
    assert params["data.stride"] == "16", "stride is logged resolved to tokens"
    for key in ("n_params", "tokens_per_epoch", "train_windows", "steps_per_epoch", "device", "dtype"):
        assert key in params, f"derived param {key} missing"
    assert params["model.loss_chunk_rows"] == "None", "the config as given: null is auto"
    assert params["loss_chunk_rows"] == "32", "auto on a CPU, resolved: max(32, emb_dim 16) rows"
    assert params["data.file0.sha256"] and params["data.file0.tokens"].isdigit()
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "L2-H2-E16-ctx16-s16"
    for tag in ("git_commit", "torch_version", "mlflow_version", "device_name"):
        assert tag in run.data.tags


def test_run_has_one_point_per_epoch_for_each_metric(finished_run: tuple[str, str, str]) -> None:
    uri, run_id, _ = finished_run
    client = MlflowClient(uri)
    for key in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == [1, 2, 3], f"{key}: expected one point per epoch, got steps {steps}"
    step_points = client.get_metric_history(run_id, "train_loss_step")
    assert len(step_points) >= 3 and len({m.step for m in step_points}) == len(step_points)


def test_run_has_samples_plot_config_and_checkpoints(finished_run: tuple[str, str, str]) -> None:
    uri, run_id, _ = finished_run
    client = MlflowClient(uri)
    folders = ("", "samples", "plots", "checkpoints")
    names = {a.path for folder in folders for a in client.list_artifacts(run_id, folder)}
    expected = {"config.yaml", "plots/loss_curve.png", "checkpoints/best.pt", "checkpoints/last.pt"}
    expected |= {f"samples/epoch_00{i}.txt" for i in (1, 2, 3)}
    assert expected <= names, f"missing artifacts: {expected - names}"
    sample = Path(client.download_artifacts(run_id, "samples/epoch_003.txt")).read_text()
    assert sample.count("Alice was") == 1


def test_output_ends_with_summary_and_run_id(finished_run: tuple[str, str, str]) -> None:
    _, run_id, output = finished_run
    assert "best val loss:" in output and "final val loss:" in output
    assert "workflowType=machine_learning" in output
    assert output.strip().splitlines()[-1] == f"run_id: {run_id}"


def test_best_checkpoint_reproduces_the_logged_val_loss(finished_run: tuple[str, str, str]) -> None:
    uri, run_id, _ = finished_run
    client = MlflowClient(uri)
    payload = checkpoint.load(client.download_artifacts(run_id, "checkpoints/best.pt"))
    cfg = checkpoint.config_of(payload)
    model = GPT(cfg.model)
    checkpoint.load_model_state(model, payload["model"], "best.pt")
    model.eval()
    corpus = build_corpus(cfg, get_encoding(), Path(os.environ["GPT_CACHE_DIR"]))
    windows = Windows(corpus.val, cfg.window_length, cfg.window_length)
    with torch.no_grad():
        inputs, targets = windows.batch(torch.arange(len(windows)))
        loss = model(inputs, targets).item()
    best = min(m.value for m in client.get_metric_history(run_id, "val_loss"))
    assert math.isclose(loss, best, rel_tol=1e-4), f"best.pt gives val loss {loss}, the run logged {best}"
    assert payload["optimizer"] is not None and payload["rng"]["torch"].dtype == torch.uint8


def test_same_command_twice_gives_the_same_losses(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ids = []
    for _ in range(2):
        code, output = run_train([*TINY, "--epochs", "1", "--tracking-uri", uri])
        assert code == 0, output
        ids.append(last_run_id(output))
    client = MlflowClient(uri)
    first, second = ([m.value for m in client.get_metric_history(i, "train_loss_step")] for i in ids)
    assert first == second


def test_bad_config_exits_nonzero_and_creates_no_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code, output = run_train([*TINY, "--set", "model.n_heads=3", "--tracking-uri", uri])
    assert code == 2
    assert output.strip().splitlines() == ["error: model.emb_dim (16) must be divisible by model.n_heads (3)"]
    assert not (tmp_path / "mlflow.db").exists(), "no store (and so no run) should be created"


def test_dry_run_prints_sizes_and_creates_no_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code, output = run_train([*TINY, "--dry-run", "--tracking-uri", uri])
    assert code == 0, output
    assert "parameters" in output and "steps of batch 32" in output and "windows:" in output
    assert not (tmp_path / "mlflow.db").exists()


def test_unreachable_tracking_server_fails_fast_before_training(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once the socket closes
    started = time.monotonic()
    code, output = run_train([*TINY, "--tracking-uri", f"http://127.0.0.1:{port}"])
    assert code == 2 and "not reachable" in output
    assert time.monotonic() - started < 15


def test_training_against_a_real_mlflow_server(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    code, output = run_train([*TINY, "--epochs", "2", "--tracking-uri", mlflow_server.url])
    assert code == 0, output
    run_id = last_run_id(output)
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2]
    names = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert names == {"checkpoints/best.pt", "checkpoints/last.pt"}
    # fetched from the server into the cache, as generate.py and --resume do, with no download left behind
    fetched = find_checkpoint(run_id, "last", mlflow_server.url)
    assert checkpoint.load(fetched)["state"]["epoch"] == 2
    assert [path.name for path in fetched.parent.iterdir()] == ["last.pt"]


def test_from_dict_round_trips_the_logged_config(finished_run: tuple[str, str, str]) -> None:
    uri, run_id, _ = finished_run
    import yaml

    text = Path(MlflowClient(uri).download_artifacts(run_id, "config.yaml")).read_text()
    cfg = from_dict(yaml.safe_load(text))
    assert cfg.model.context_length == 16 and cfg.train.epochs == 3


# ---------------------------------------------------------------- names and numbers MLflow takes


@pytest.mark.parametrize("name", ["modèle-1", "модель 2", "模型 3", "it's \"v2\"", "../not-a-path", "a/b", "x" * 250])
def test_run_names_are_what_mlflow_takes(name: str) -> None:
    from gpt.job import check_run_name

    assert check_run_name(name) == name


@pytest.mark.parametrize("name", ["it's", 'say "hi"', "a/b"])
def test_grid_names_take_no_quotes_or_slashes(name: str) -> None:
    from gpt.errors import UserError
    from gpt.job import check_grid_name

    with pytest.raises(UserError, match="grid name .* is not allowed"):
        check_grid_name(name)
    assert check_grid_name("stride-modèle") == "stride-modèle"


def test_a_unicode_run_name_and_a_tiny_temperature_train_to_the_end(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*TINY, "--epochs", "1", "--run-name", "modèle-1", "--set", "train.temperature=1e-40"]
    code, output = run_train([*args, "--tracking-uri", uri])
    assert code == 0, output
    run = MlflowClient(uri).get_run(last_run_id(output))
    assert run.info.run_name == "modèle-1" and run.info.status == "FINISHED"
    assert run.data.params["train.temperature"] == "1e-40"
    (sample,) = (a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "samples"))
    assert "Alice was" in Path(MlflowClient(uri).download_artifacts(run.info.run_id, sample)).read_text()


# ---------------------------------------------------------------- what a run says before it starts


def test_a_dry_run_estimates_the_time_and_notes_a_stride_over_the_window(tmp_path: Path) -> None:
    code, output = run_train([*TINY, "--set", "data.stride=40", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                              "--dry-run"])  # fmt: skip
    assert code == 0, output
    assert re.search(r"^estimate: ~[\d.]+ (s|min|h|days) per epoch, ~[\d.]+ (s|min|h|days) for 2 epochs on cpu", output,
                     re.MULTILINE), output  # fmt: skip
    note = next(line for line in output.splitlines() if line.startswith("note: data.stride 40"))
    share = float(re.search(r"([\d.]+)% of the training tokens", note).group(1))
    assert 55 < share < 60, f"17 of every 40 tokens are in a window: {note}"
    assert "configs/tiny.yaml" not in output, "a tiny model needs no advice"
    assert not (tmp_path / "m.db").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the advice is for a CPU")
def test_the_reference_config_on_a_cpu_says_how_long_and_what_suits_a_cpu(tmp_path: Path) -> None:
    from conftest import VERDICT

    # a 5k-token text: 100 epochs of the reference model take ~30 min on a fast CPU with bf16 (no advice then);
    # 2,000 epochs are hours on any CPU
    args = ["--data", str(VERDICT), "--epochs", "2000", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--dry-run"]
    code, output = run_train(args)
    assert code == 0, output
    (note,) = [line for line in output.splitlines() if "configs/tiny.yaml" in line]
    expected = (r"note: this 162M-parameter model takes ~[\d.]+ (h|days) on this CPU; configs/tiny.yaml trains on a "
                r"CPU in minutes \(--config configs/tiny.yaml\), or use a GPU")
    assert re.fullmatch(expected, note), note


def test_the_estimate_scales_with_the_work(one_thread: None) -> None:
    from gpt.config import load
    from gpt.estimate import estimate
    from gpt.sizes import window_stats

    cfg = load(ROOT / "configs" / "tiny.yaml")
    found = estimate(cfg, window_stats(cfg, 40_000, 4_000), torch.device("cpu"))
    assert 0 < found.step_seconds < 60 and 0 < found.validation_seconds < found.epoch_seconds
    assert found.epoch_seconds == pytest.approx(found.steps_per_epoch * found.step_seconds + found.validation_seconds)
    assert found.run_seconds == pytest.approx(2 * found.epoch_seconds), "tiny.yaml trains 2 epochs"
    before = torch.get_rng_state()
    estimate(cfg, window_stats(cfg, 40_000, 4_000), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before), "a resumed run's restored RNG state must not move"
    wide = load(ROOT / "configs" / "tiny.yaml", ["model.emb_dim=256", "model.n_heads=4"])
    assert estimate(wide, window_stats(wide, 40_000, 4_000), torch.device("cpu")).step_seconds > found.step_seconds

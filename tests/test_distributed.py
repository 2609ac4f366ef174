"""Data-parallel training: `torchrun --nproc_per_node=N train.py` trains like one process with the same batch.

The end-to-end tests launch real torchrun processes on CPU (gloo). Each rank trains on its slice of
every global batch; the losses, the one MLflow run and its checkpoints must be those of a single
process with the same train.batch_size, and the run must resume with a different number of ranks.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, TINY_TRAIN, free_port, last_run_id, run_train, subprocess_env
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from gpt.config import Config
from gpt.data import Corpus
from gpt.distributed import STOP_CHECK_STEPS, Ranks, from_environment, leave
from gpt.errors import UserError
from gpt.model import GPT
from gpt.trainer import Interrupted, Trainer

# An odd global batch (8 + 7 windows on two ranks) and a kept partial last batch: the weighting of
# uneven shares is what makes two ranks match one process.
BATCH = ["--set", "train.batch_size=15", "--set", "train.drop_last=false", "--set", "train.sample_every=0"]
KEYS = ("train_loss", "val_loss")


def test_one_process_without_torchrun_variables() -> None:
    assert from_environment({}) == Ranks()
    assert not Ranks().active and Ranks().is_main


def test_torchrun_variables_name_the_rank() -> None:
    ranks = from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert ranks == Ranks(rank=3, world_size=4, local_rank=1)
    assert ranks.active and not ranks.is_main


@pytest.mark.parametrize("env", [{"RANK": "4", "WORLD_SIZE": "4"}, {"WORLD_SIZE": "two"}, {"WORLD_SIZE": "0"}])
def test_inconsistent_torchrun_variables_are_a_user_error(env: dict[str, str]) -> None:
    with pytest.raises(UserError, match="RANK|WORLD_SIZE"):
        from_environment(env)


def test_shards_cover_the_batch_once_and_weights_make_the_global_mean() -> None:
    batch = torch.arange(15)
    values = torch.rand(15)
    parts = [Ranks(rank, 2).shard(batch) for rank in range(2)]
    assert torch.equal(torch.cat([index for index, _ in parts]), batch)
    # DDP averages over ranks: mean over ranks of (weight x the rank's mean) is the mean of the batch
    averaged = sum(weight * values[index].mean() for index, weight in parts) / 2
    assert averaged == pytest.approx(values.mean().item(), rel=1e-6)


def test_a_rank_without_windows_steps_on_one_window_with_weight_zero() -> None:
    first, second = (Ranks(rank, 2).shard(torch.tensor([7])) for rank in range(2))
    assert first[0].tolist() == [7] and first[1] == 2.0  # the average over ranks is this window's loss
    assert second[0].tolist() == [7] and second[1] == 0.0


def test_validation_windows_split_into_contiguous_shares() -> None:
    shares = [Ranks(rank, 3).part(10) for rank in range(3)]
    assert [list(share) for share in shares] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert list(Ranks(1, 2).part(1)) == []


def _train_until_stopped(rank: int) -> tuple:
    """Rank 1 alone is asked to stop, at its second step; (rank, step, per-step losses) where all stopped."""
    cfg = Config()
    cfg.model.vocab_size, cfg.model.context_length, cfg.model.emb_dim = 64, 8, 16
    cfg.model.n_heads, cfg.model.n_layers, cfg.model.dropout = 2, 1, 0.0
    cfg.train.batch_size, cfg.train.epochs, cfg.train.compile = 4, 1, False
    tokens = torch.randint(0, 64, (8 * 4 * 20 + 1,), generator=torch.Generator().manual_seed(0))
    corpus = Corpus(train=tokens, val=tokens[:40])
    torch.manual_seed(0)
    trainer = Trainer(cfg, GPT(cfg.model), corpus, torch.device("cpu"), ranks=Ranks(rank, 2, rank))

    def ask_to_stop(epoch: int, done: int, total: int, loss: torch.Tensor) -> None:
        if rank == 1 and done == 2:
            trainer.stop_requested = True

    trainer.on_step = ask_to_stop  # a cycle: the trainer outlives this call until leave() collects it
    try:
        trainer.fit()
        return rank, "finished", None
    except Interrupted:
        return rank, trainer.state.step, trainer.state.epoch_losses


def _stop_worker(rank: int, port: int, results: mp.SimpleQueue) -> None:
    """One of two gloo ranks, left as train.py leaves them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    results.put(_train_until_stopped(rank))
    leave()


def test_a_stop_asked_on_one_rank_stops_every_rank_at_the_same_step() -> None:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_stop_worker, args=(free_port(), results), nprocs=2, start_method="spawn")
    by_rank = dict((rank, (step, losses)) for rank, step, losses in (results.get(), results.get()))
    assert by_rank[0][0] == by_rank[1][0] == STOP_CHECK_STEPS, by_rank
    # both hold the same global per-step losses, so either could be checkpointed
    assert by_rank[0][1] == pytest.approx(by_rank[1][1]) and len(by_rank[0][1]) == STOP_CHECK_STEPS


def _hold_and_fail(ddp: torch.nn.Module) -> None:
    raise RuntimeError("uncaught")  # its frame, which holds `ddp`, stays in the traceback


@pytest.mark.parametrize("held_by", ["a cycle", "an uncaught error's traceback"])
def test_leaving_frees_a_ddp_wrapper_while_the_group_still_exists(held_by: str, monkeypatch) -> None:
    """A wrapper freed after its group is destroyed aborts the process at exit (SIGABRT, ~1 exit in 10)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))
        group_at_free: list[bool] = []
        weakref.finalize(ddp, lambda: group_at_free.append(dist.is_initialized()))
        if held_by == "a cycle":  # as a trainer with callbacks that refer back to it makes
            holder: dict = {"ddp": ddp}
            holder["self"] = holder
            del holder
        else:  # as Python keeps an error that ends the program (train.py --debug) while atexit runs
            try:
                _hold_and_fail(ddp)
            except RuntimeError as error:
                monkeypatch.setattr(sys, "last_traceback", error.__traceback__, raising=False)
        del ddp
        leave()
        assert group_at_free == [True]
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def curves(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(uri)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in KEYS}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, list]:
    """Three epochs in one process: the curves two ranks must reproduce."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('single')}/mlflow.db"
    code, output = run_train([*TINY_TRAIN, *BATCH, "--epochs", "3", "--tracking-uri", uri])
    assert code == 0, output
    return curves(uri, last_run_id(output))


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py")]


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = subprocess_env()
    return subprocess.run([*TORCHRUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_two_ranks_train_like_one_process_into_one_run_that_resumes_on_one(
    single_process: dict[str, list], tmp_path: Path, one_thread: None
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    launched = torchrun([*TINY_TRAIN, *BATCH, "--epochs", "2", "--tracking-uri", uri], tmp_path)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    run_id = last_run_id(launched.stdout)
    assert launched.stdout.count("run_id: ") == 1, "only rank 0 reports"
    assert "ranks: 2 processes" in launched.stdout

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [run.info.run_id for run in runs] == [run_id], "exactly one run, written by rank 0"
    assert runs[0].data.tags["world_size"] == "2"
    two_ranks = curves(uri, run_id)
    for key in KEYS:
        assert [step for step, _ in two_ranks[key]] == [1, 2]
        expected = [value for _, value in single_process[key][:2]]
        assert [value for _, value in two_ranks[key]] == pytest.approx(expected, rel=1e-4), key

    # rank 0's checkpoint continues in one process, in the same run, as if never split
    code, output = run_train(["--resume", run_id, "--epochs", "3", "--tracking-uri", uri])
    assert code == 0, output
    resumed = curves(uri, run_id)
    for key in KEYS:
        assert [step for step, _ in resumed[key]] == [1, 2, 3]
        assert resumed[key][2][1] == pytest.approx(single_process[key][2][1], rel=1e-4), key
    assert len(client.search_runs([runs[0].info.experiment_id])) == 1


def test_ctrl_c_under_torchrun_stops_every_rank_with_a_checkpoint_that_resumes(
    single_process: dict[str, list], tmp_path: Path, one_thread: None
) -> None:
    """A terminal's Ctrl-C reaches torchrun and every rank at once, and torchrun forwards its own copy:
    that is one stop, not the 'second Ctrl-C' that exits without a checkpoint."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    launched = subprocess.Popen(
        [*TORCHRUN, *TINY_TRAIN, *BATCH, "--epochs", "3", "--tracking-uri", uri],
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    output = []
    for line in launched.stdout:
        output.append(line)
        if line.startswith("epoch 1/3"):
            os.killpg(launched.pid, signal.SIGINT)
            break
    rest, _ = launched.communicate(timeout=300)
    text = "".join(output) + rest
    assert "status: KILLED" in text and "stopped at once" not in text, text
    # torchrun ends with its own traceback of the signal; rank 0's lines come before it
    run_id = re.search(r"^run_id: ([0-9a-f]{32})$", text, re.MULTILINE).group(1)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == RunStatus.to_string(RunStatus.KILLED)

    code, output_resumed = run_train(["--resume", run_id, "--tracking-uri", uri])
    assert code == 0, output_resumed
    resumed = curves(uri, run_id)
    for key in KEYS:
        assert [step for step, _ in resumed[key]] == [1, 2, 3]
        expected = [value for _, value in single_process[key]]
        assert [value for _, value in resumed[key]] == pytest.approx(expected, rel=1e-4), key

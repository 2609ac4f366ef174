"""Faults: whatever fails, a run ends in a state that says what happened, with the documented exit code,
one line that names the cause, no traceback, and a command that recovers what can be recovered.

Each fault is made on the CPU in seconds: a full or read-only disk by failing Python's file writes
under the store's folder (and the store's own writes, as SQLite reports them), a checkpoint that
meets a real full device (/dev/full), signals sent at chosen points through test hooks, processes
killed with SIGKILL, and files damaged on purpose. After the recovery the README documents, every
metric point is in the store exactly once and the losses equal those of a run nobody disturbed.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import RANKS, Training, run_train
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from test_resume import FAST as RESUMABLE
from test_resume import STEPS_PER_EPOCH

import gpt.checkpoint
import gpt.trainer
from gpt import checkpoint, data
from gpt.config import Config
from gpt.errors import DiskFault
from gpt.text import Document
from gpt.tokenizer import get_encoding
from gpt.tracked_run import TrackedRun
from gpt.tracking import Spool, Tracker

pytestmark = [
    pytest.mark.skipif(not RANKS.is_file(), reason=f"no tokenizer ranks file at {RANKS}"),
    pytest.mark.usefixtures("one_thread"),
]

# tests/test_resume.py's runs (8 steps of batch 8 an epoch, step points every 3 steps, dropout on: only a
# resume that restores the random generators matches; a checkpoint at every epoch's end), 2 epochs
FAST = [*RESUMABLE, "--epochs", "2"]
CURVES = ("train_loss", "val_loss", "tokens_seen", "train_loss_step", "best_val_loss")
# Each end of a run logs its summary at its best epoch: a run that failed after epoch 1 and was then
# resumed holds best_val_loss at step 1 and at step 2, each once; the last is the undisturbed run's.
SUMMARY = "best_val_loss"
Curves = dict[str, list[tuple[int, float]]]
READ_ONLY_STORE = "(sqlite3.OperationalError) attempt to write a readonly database"


# ---------------------------------------------------------------- the store, the reference run, what to check


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store for the module's runs (a new store's migrations take seconds)."""
    return tmp_path_factory.mktemp("faults")


def uri_of(store: Path) -> str:
    return f"sqlite:///{store}/mlflow.db"


def train(store: Path, *args: str) -> tuple[int, str]:
    """train.py in this process, on the module's store."""
    return run_train([*args, "--tracking-uri", uri_of(store)])


@pytest.fixture(scope="module")
def reference(store: Path, one_thread: None) -> Curves:
    """The curves of a 2-epoch run nobody disturbs: every recovered run must end with exactly these."""
    code, output = train(store, *FAST)
    assert code == 0, output
    return curves(store, run_id_in(output))


def curves(store: Path, run_id: str) -> Curves:
    """Every point of the run's key metrics, sorted by step: a duplicate or a gap shows."""
    client = MlflowClient(uri_of(store))
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in CURVES}


def status(store: Path, run_id: str) -> str:
    return MlflowClient(uri_of(store)).get_run(run_id).info.status


def run_id_in(output: str) -> str:
    """The run id of the `run_id:` line (warnings of the sender thread, on stderr, may come after it here)."""
    return re.search(r"^run_id: ([0-9a-f]{32})$", output, re.MULTILINE).group(1)


def status_line(output: str) -> str:
    """The one line that says how the run ended."""
    lines = [line for line in output.splitlines() if line.startswith("status: ")]
    assert len(lines) == 1, f"expected one status line:\n{output}"
    return lines[0]


def run_folder(store: Path, run_id: str) -> Path:
    """The run's spool and local files."""
    return store / "local" / run_id


def artifact_names(store: Path, run_id: str) -> set[str]:
    """Every file MLflow lists for the run, in every folder."""
    client, names, folders = MlflowClient(uri_of(store)), set(), [None]
    while folders:
        for info in client.list_artifacts(run_id, folders.pop()):
            (folders.append(info.path) if info.is_dir else names.add(info.path))
    return names


def last_checkpoint(store: Path, run_id: str) -> Path:
    (path,) = store.glob(f"artifacts/*/{run_id}/artifacts/checkpoints/last.pt")
    return path


def assert_recovered(store: Path, run_id: str, reference: Curves, output: str) -> None:
    """The run is FINISHED with every point once and the undisturbed run's losses; no partial file listed."""
    assert "Traceback" not in output, output
    assert status(store, run_id) == "FINISHED"
    recovered = curves(store, run_id)
    summary = recovered.pop(SUMMARY)
    assert recovered == {k: v for k, v in reference.items() if k != SUMMARY}, "the metrics differ from the reference"
    assert summary[-1] == reference[SUMMARY][-1] and len({step for step, _ in summary}) == len(summary), summary
    names = artifact_names(store, run_id)
    assert {"checkpoints/last.pt", "samples/epoch_002.txt", "plots/loss_curve.png"} <= names, names
    assert not [name for name in names if ".tmp" in name], f"a partial file is listed: {names}"


# ---------------------------------------------------------------- hooks that make the faults


def at_step(monkeypatch: pytest.MonkeyPatch, step: int, action: Callable[[], None]) -> None:
    """Run `action` once, during optimizer step `step` (1-based) of the run."""
    learning_rate = gpt.trainer.learning_rate

    def hooked(cfg: Config, done: int, total_steps: int) -> float:
        if done + 1 == step:
            action()
        return learning_rate(cfg, done, total_steps)

    monkeypatch.setattr(gpt.trainer, "learning_rate", hooked)


def send(number: int) -> Callable[[], None]:
    return lambda: os.kill(os.getpid(), number)


class Disk:
    """Python's file writes under `root` fail with `number` (ENOSPC: full; EROFS: read-only) while
    `failing`; with `store_too`, the store's own writes fail as SQLite reports a read-only database."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path, number: int, store_too: bool = False):
        self.root, self.number, self.failing = str(root), number, False
        real = io.open

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            writes = any(flag in mode for flag in "wax+")
            if self.failing and writes and isinstance(file, (str, os.PathLike)) and self._under_root(file):
                raise OSError(self.number, os.strerror(self.number), str(file))
            return real(file, mode, *args, **kwargs)

        monkeypatch.setattr(io, "open", open_)  # pathlib writes through io.open
        monkeypatch.setattr(builtins, "open", open_)
        if store_too:
            for name in ("log_batch", "set_terminated", "update_run"):
                self._refuse(monkeypatch, name)

    def _under_root(self, file: Any) -> bool:
        return os.path.abspath(os.fspath(file)).startswith(self.root)

    def _refuse(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        method = getattr(MlflowClient, name)

        def refused(client: MlflowClient, *args: Any, **kwargs: Any) -> Any:
            if self.failing:
                raise MlflowException(READ_ONLY_STORE, error_code="TEMPORARILY_UNAVAILABLE")
            return method(client, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, name, refused)

    def fail(self) -> None:
        self.failing = True


# ---------------------------------------------------------------- a disk that fills up or turns read-only


def test_disk_full_mid_run_stops_training_ends_failed_and_resume_recovers(store, reference, monkeypatch) -> None:
    disk = Disk(monkeypatch, store, errno.ENOSPC)
    at_step(monkeypatch, STEPS_PER_EPOCH + 2, disk.fail)  # after epoch 1's checkpoint
    monkeypatch.setenv("GPT_TRACKING_TIMEOUT", "2")

    code, output = train(store, *FAST)

    run_id = run_id_in(output)
    assert code == 5, output
    assert re.fullmatch(
        rf"status: FAILED: disk full: no space left on the device at {store}/\S+; free some space, then "
        rf"continue with: python train\.py --resume {run_id} --tracking-uri {uri_of(store)}",
        status_line(output),
    ), output
    assert "Traceback" not in output and "epoch 2/2" not in output, "training should stop at the fault"
    assert status(store, run_id) == "FAILED"
    assert checkpoint.load(last_checkpoint(store, run_id))["state"]["epoch"] == 1

    monkeypatch.undo()  # room again
    code, output = train(store, "--resume", run_id)

    assert code == 0, output
    assert_recovered(store, run_id, reference, output)


def test_read_only_store_mid_run_ends_failed_and_replay_then_resume_recover(store, reference, monkeypatch) -> None:
    disk = Disk(monkeypatch, store, errno.EROFS, store_too=True)
    at_step(monkeypatch, STEPS_PER_EPOCH + 2, disk.fail)
    monkeypatch.setenv("GPT_TRACKING_TIMEOUT", "1")

    code, output = train(store, *FAST)

    run_id = run_id_in(output)
    folder = run_folder(store, run_id)
    assert code == 5, output
    line = status_line(output)
    assert re.match(rf"status: FAILED: read-only: {store}/\S+ is on a read-only file system; make it writable", line)
    assert line.endswith(f"--resume sends it, or end the run with: python train.py --replay {folder}"), line
    assert "read-only: the tracking store" in line, "the store's own refusal should be named"
    assert "Traceback" not in output
    assert len([x for x in output.splitlines() if "waits in its spool" in x]) == 1, "reported once, not per retry"
    assert status(store, run_id) == "RUNNING", "a read-only store cannot take the end: the message says so"

    monkeypatch.undo()  # writable again
    code, output = train(store, "--replay", str(folder))
    assert code == 0 and output.strip().endswith("the run is now FAILED"), output  # its checkpoint is epoch 1's
    assert status(store, run_id) == "FAILED"
    code, output = train(store, "--resume", run_id)

    assert code == 0, output
    assert_recovered(store, run_id, reference, output)


def test_full_disk_at_the_first_checkpoint_is_named_and_the_run_starts_again(store, reference, monkeypatch) -> None:
    real = builtins.open

    def full_device(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if str(file).endswith(".pt.tmp"):  # a real device with no space: torch meets ENOSPC itself
            return real("/dev/full", mode, *args, **kwargs)
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(gpt.checkpoint, "open", full_device, raising=False)

    code, output = train(store, *FAST)

    run_id = run_id_in(output)
    assert code == 5, output
    assert re.fullmatch(
        rf"status: FAILED: disk full: no space left on the device at {store}/artifacts/\S+/{run_id}/artifacts/"
        rf"checkpoints/last\.pt, \d+ MB needed; free some space, then continue with: "
        rf"python train\.py --resume {run_id} --tracking-uri {uri_of(store)}",
        status_line(output),
    ), output
    assert "Traceback" not in output and "RuntimeError" not in output and "inline_container" not in output
    assert status(store, run_id) == "FAILED"
    assert not list(store.rglob("*.tmp")), "the partial checkpoint should be removed"

    monkeypatch.undo()
    code, output = train(store, "--resume", run_id)  # no checkpoint: it starts again from epoch 0, same run

    assert code == 0, output
    assert f"restarting run {run_id} from epoch 1 of 2: it saved no checkpoint" in output
    assert_recovered(store, run_id, reference, output)


# ---------------------------------------------------------------- signals at chosen points


def test_second_ctrl_c_while_a_checkpoint_is_written_ends_killed_130_and_keeps_the_old_one(
    store, reference, monkeypatch
) -> None:
    """Torch turns the exit raised inside its write into a RuntimeError; the run must still end KILLED,
    exit 130, the previous last.pt and best.pt as they were, and no partial file listed meanwhile."""
    name = "second-ctrl-c"
    before: dict[str, bytes] = {}
    listed_while_writing: list[set[str]] = []

    def first_ctrl_c() -> None:  # in epoch 2: epoch 1's checkpoints are written
        before.update(hashes(store, run_named(store, name)))
        os.kill(os.getpid(), signal.SIGINT)

    at_step(monkeypatch, STEPS_PER_EPOCH + 3, first_ctrl_c)
    save = checkpoint.torch.save

    class SecondCtrlC:  # a file that gets the second Ctrl-C once the first bytes are written
        def __init__(self, handle: Any):
            self.handle = handle

        def write(self, chunk: bytes) -> int:
            written = self.handle.write(chunk)
            if not listed_while_writing:
                listed_while_writing.append(artifact_names(store, run_named(store, name)))
                os.kill(os.getpid(), signal.SIGINT)
            return written

        def __getattr__(self, attribute: str) -> Any:
            return getattr(self.handle, attribute)

    def interrupted_save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        save(obj, SecondCtrlC(handle) if before else handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", interrupted_save)

    code, output = train(store, *FAST, "--run-name", name)

    assert code == 130, output
    assert "stopped at once, without a checkpoint; the run ends KILLED" in output
    assert "Traceback" not in output and "RuntimeError" not in output, output
    run_id = run_named(store, name)
    assert status(store, run_id) == "KILLED"
    assert listed_while_writing and not [n for n in listed_while_writing[0] if ".tmp" in n], listed_while_writing
    assert set(before) == {"last.pt", "best.pt"} and hashes(store, run_id) == before, "a checkpoint changed"
    assert checkpoint.load(last_checkpoint(store, run_id))["state"]["epoch"] == 1
    assert not list(store.rglob("*.tmp")), "the partial file should be removed"

    monkeypatch.undo()
    code, output = train(store, "--resume", run_id)

    assert code == 0, output
    assert_recovered(store, run_id, reference, output)


def run_named(store: Path, name: str) -> str:
    """The id of the module's one run of that name."""
    client = MlflowClient(uri_of(store))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], f"run_name = '{name}'")
    assert len(runs) == 1, f"expected one run named {name}, found {len(runs)}"
    return runs[0].info.run_id


def hashes(store: Path, run_id: str) -> dict[str, bytes]:
    """The run's checkpoint files and the SHA-256 of their bytes."""
    folder = last_checkpoint(store, run_id).parent
    return {path.name: hashlib.sha256(path.read_bytes()).digest() for path in folder.iterdir()}


def test_sigterm_during_the_final_validation_finishes_and_says_so(store, reference, monkeypatch, capfd) -> None:
    evaluate = gpt.trainer.Trainer.evaluate

    def terminated_in_the_final_validation(trainer: gpt.trainer.Trainer) -> float:
        if trainer.state.epoch + 1 == trainer.cfg.train.epochs:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(trainer)

    monkeypatch.setattr(gpt.trainer.Trainer, "evaluate", terminated_in_the_final_validation)

    code, output = train(store, *FAST)

    run_id = run_id_in(output)
    assert code == 0, output
    expected = "status: FINISHED: SIGTERM came after the last training step; the run finished all its epochs"
    assert status_line(output) == expected
    assert "the last step is done: finishing the run" in capfd.readouterr().err  # the handler writes to fd 2
    assert_recovered(store, run_id, reference, output)


# ---------------------------------------------------------------- processes killed outright


def test_run_killed_before_its_first_checkpoint_starts_again_in_the_same_run(store, reference) -> None:
    args = [*FAST, "--set", "train.checkpoint_every_s=600", "--run-name", "no-checkpoint"]
    training = Training([*args, "--tracking-uri", uri_of(store)], store)
    training.wait_for("epoch 1/2")  # epoch 1 logged, no checkpoint yet (every 600 s)
    training.process.send_signal(signal.SIGKILL)
    code, _ = training.finish()
    run_id = run_named(store, "no-checkpoint")
    assert code == -signal.SIGKILL and status(store, run_id) == "RUNNING"
    assert not list(store.glob(f"artifacts/*/{run_id}/artifacts/checkpoints/*.pt")), "there should be no checkpoint"

    code, output = train(store, "--resume", run_id)

    assert code == 0, output
    assert f"restarting run {run_id} from epoch 1 of 2: it saved no checkpoint" in output
    assert_recovered(store, run_id, reference, output)


def test_the_command_a_stopped_run_prints_names_the_store_a_plain_rerun_would_not_find(store, monkeypatch) -> None:
    """Copied as printed, the command must find the run: a store chosen with --tracking-uri is named (a plain
    train.py would look in ./mlruns), one a plain rerun finds ($MLFLOW_TRACKING_URI here) is not."""
    at_step(monkeypatch, STEPS_PER_EPOCH + 3, send(signal.SIGINT))
    code, output = train(store, *FAST)
    run_id = run_id_in(output)
    assert code == 130, output
    assert status_line(output).endswith(
        f"continue with: python train.py --resume {run_id} --tracking-uri {uri_of(store)}"
    ), output

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri_of(store))
    code, output = run_train([*FAST])
    run_id = run_id_in(output)
    assert code == 130, output
    assert status_line(output).endswith(f"continue with: python train.py --resume {run_id}"), output


def test_resumed_run_killed_before_its_first_flush_is_ended_by_replay(store, reference, monkeypatch) -> None:
    at_step(monkeypatch, STEPS_PER_EPOCH + 3, send(signal.SIGINT))
    code, output = train(store, *FAST)
    run_id = run_id_in(output)
    assert code == 130 and status(store, run_id) == "KILLED", output
    monkeypatch.undo()

    resumed = Training(["--resume", run_id, "--tracking-uri", uri_of(store)], store)
    resumed.wait_for("resuming run")
    deadline = time.monotonic() + 120
    while status(store, run_id) != "RUNNING":  # reopened: now kill it before it spools anything more
        assert time.monotonic() < deadline, "the resumed run never showed RUNNING"
        time.sleep(0.05)
    resumed.process.send_signal(signal.SIGKILL)
    resumed.finish()
    assert status(store, run_id) == "RUNNING"

    code, output = train(store, "--replay", str(run_folder(store, run_id)))

    assert code == 0 and output.strip().endswith("the run is now FAILED"), output  # its checkpoint is mid-epoch 2
    assert status(store, run_id) == "FAILED"
    code, output = train(store, "--resume", run_id)
    assert code == 0, output
    assert_recovered(store, run_id, reference, output)


def test_run_killed_after_its_final_checkpoint_is_ended_finished(store, reference, monkeypatch) -> None:
    def killed(tracked: TrackedRun) -> None:  # the process dies after the final checkpoint, before the end
        tracked.tracker._abandoned.set()
        raise SystemExit(137)

    monkeypatch.setattr(TrackedRun, "_deliver", killed)
    code, output = train(store, *FAST, "--run-name", "killed-at-the-end")
    assert code == 137
    run_id = run_named(store, "killed-at-the-end")
    assert status(store, run_id) == "RUNNING"
    monkeypatch.undo()

    code, output = train(store, "--replay", str(run_folder(store, run_id)))

    assert code == 0 and output.strip().endswith("the run is now FINISHED"), output  # complete: not FAILED
    assert_recovered(store, run_id, reference, output)

    MlflowClient(uri_of(store)).set_terminated(run_id, "FAILED")  # as the replay of earlier versions left it
    code, output = train(store, "--resume", run_id)

    assert code == 0, output
    assert status_line(output).startswith(f"status: FINISHED: run {run_id} already trained its 2 epochs")
    assert_recovered(store, run_id, reference, output)  # the summary (best_val_loss) is still there once


# ---------------------------------------------------------------- damaged files


def test_corrupt_spool_skips_unreadable_lines_and_replay_and_resume_go_on(store, reference, monkeypatch) -> None:
    at_step(monkeypatch, STEPS_PER_EPOCH + 3, send(signal.SIGINT))
    code, output = train(store, *FAST)
    run_id = run_id_in(output)
    assert code == 130, output
    monkeypatch.undo()
    spool = run_folder(store, run_id) / "spool.jsonl"
    lines = spool.read_bytes().splitlines(keepends=True)
    damaged = next(i for i, line in enumerate(lines) if b'"kind": "metrics"' in line)
    lines[damaged] = lines[damaged][:20] + b"\xff\xfe\x00garbled" + lines[damaged][28:]
    spool.write_bytes(b"".join(lines))
    (run_folder(store, run_id) / "spool.delivered").write_text("0")  # everything readable is sent again

    code, output = train(store, "--replay", str(run_folder(store, run_id)))

    assert code == 0, output
    sent = len(lines) - 1  # every line but the garbled one
    expected = f"replayed {sent} spooled items of run {run_id} (1 unreadable line skipped); the run is now KILLED"
    assert output.strip() == expected, output
    code, output = train(store, "--resume", run_id)

    assert code == 0, output
    assert f"warning: 1 unreadable line of {spool} skipped (damaged on disk)" in output
    assert_recovered(store, run_id, reference, output)


def test_unreadable_token_cache_entries_are_rebuilt(tmp_path: Path, capsys) -> None:
    encoding = get_encoding(str(RANKS))
    doc = Document(name="story", path=tmp_path / "story.txt", text="Once upon a time there was a cache. " * 20)
    expected = data.tokenize_cached(doc, encoding, tmp_path)
    (entry,) = (tmp_path / "tokens").glob("*.npy")
    for damage in (b"", entry.read_bytes()[:40], b"not numpy at all"):  # empty after a power loss, torn, garbled
        entry.write_bytes(damage)
        assert np.array_equal(data.tokenize_cached(doc, encoding, tmp_path), expected)
        assert np.array_equal(np.load(entry), expected), "the entry should be rebuilt"
    np.save(entry, np.full(5, encoding.n_vocab, dtype=np.int32))  # ids this tokenizer cannot produce
    assert np.array_equal(data.tokenize_cached(doc, encoding, tmp_path), expected)


def test_a_token_cache_that_cannot_be_written_is_skipped(tmp_path: Path, monkeypatch, capsys) -> None:
    encoding = get_encoding(str(RANKS))
    doc = Document(name="story", path=tmp_path / "story.txt", text="A cache on a full disk. " * 20)
    Disk(monkeypatch, tmp_path, errno.ENOSPC).fail()

    ids = data.tokenize_cached(doc, encoding, tmp_path)

    assert len(ids) and not list(tmp_path.rglob("*.npy")), "nothing should be left in the cache"
    assert "warning: the token cache is not kept (disk full: no space left on the device at" in capsys.readouterr().err


def test_a_token_cache_folder_taken_by_a_file_is_skipped(tmp_path: Path, capsys) -> None:
    encoding = get_encoding(str(RANKS))
    doc = Document(name="story", path=tmp_path / "story.txt", text="A cache folder that is a file. " * 20)
    (tmp_path / "tokens").write_text("a file where the folder goes")

    ids = data.tokenize_cached(doc, encoding, tmp_path)

    assert ids.tolist() == encoding.encode(doc.text)
    assert f"warning: the token cache is not kept (File exists: {tmp_path / 'tokens'})" in capsys.readouterr().err


def test_an_empty_token_cache_file_does_not_stop_a_run(store, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path))
    code, output = train(store, *FAST, "--dry-run")
    assert code == 0, output
    entries = list(tmp_path.glob("tokens/*.npy"))
    assert entries, "the first run should cache its tokens"
    for entry in entries:
        entry.write_bytes(b"")  # a power loss right after the file was created

    code, output = train(store, *FAST, "--dry-run")

    assert code == 0 and "dry run: configuration and data are valid" in output, output
    assert all(entry.stat().st_size for entry in entries), "the empty entry should be rebuilt"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GPT_TRACKING_TIMEOUT", "soon", "GPT_TRACKING_TIMEOUT must be a number of seconds (0 or more), got 'soon'"),
        ("GPT_TIKTOKEN_FILE", "/dev/null",
         "GPT_TIKTOKEN_FILE: /dev/null is not a regular file (a device, pipe or socket); give a file"),
        ("GPT_CACHE_DIR", "/dev/null", "cannot create the folder /dev/null set by GPT_CACHE_DIR: it is a device, pipe "
         "or socket; give a folder that exists or can be created"),
        ("GPT_GUTENBERG_URL", "/mirror/pg{id}.txt",
         "GPT_GUTENBERG_URL must be an http://, https:// or file:// address, got '/mirror/pg{id}.txt'"),
    ],
)  # fmt: skip
def test_a_bad_environment_setting_fails_before_any_run_exists(store, monkeypatch, variable, value, message) -> None:
    monkeypatch.setenv(variable, value)
    client = MlflowClient(uri_of(store))
    before = {r.info.run_id for e in client.search_experiments() for r in client.search_runs(e.experiment_id)}

    code, output = train(store, *FAST)

    assert code == 2 and output.strip() == f"error: {message}", output
    assert {r.info.run_id for e in client.search_experiments() for r in client.search_runs(e.experiment_id)} == before


# ---------------------------------------------------------------- the sender thread


class FullStore:
    """A real client whose store is full (or read-only) while `failing`: artifacts fail with ENOSPC as a
    local copy does, metrics and ends as SQLite reports it."""

    def __init__(self, client: MlflowClient):
        self.client, self.failing, self.calls = client, True, 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.failing and name == "log_artifact":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if self.failing:
                raise MlflowException("(sqlite3.OperationalError) database or disk is full", "TEMPORARILY_UNAVAILABLE")
            return method(*args, **kwargs)

        return call


def test_the_sender_survives_a_full_store_and_a_full_spool_disk_and_reports_each_once(
    store, tmp_path, monkeypatch, capfd
) -> None:
    client = MlflowClient(uri_of(store))
    experiment = client.create_experiment("sender", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    full = FullStore(client)
    warnings: list[str] = []
    local = tmp_path / "local"
    tracker = Tracker(full, run_id, local, retry_wait=0.05, warn=warnings.append)
    tracker.log_points([("train_loss", 3.0, 1, 1000)])
    tracker.log_loss_curve([{"epoch": 1, "train_loss": 3.0, "val_loss": 3.1}], "title")
    tracker.log_text("sample", "samples/epoch_001.txt")
    deadline = time.monotonic() + 30
    while full.calls < 6:  # retried several times, still alive
        assert time.monotonic() < deadline and tracker._thread.is_alive()
        time.sleep(0.05)
    disk = Disk(monkeypatch, local, errno.ENOSPC)
    disk.fail()  # the spool's own disk fills too: what was delivered cannot be recorded

    full.failing = False
    deadline = time.monotonic() + 30
    while tracker.spool._delivered < 3:
        assert time.monotonic() < deadline, f"not delivered: {warnings}"
        time.sleep(0.05)
    disk.failing = False
    assert tracker.close("FINISHED", timeout=30)

    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")] == [(1, 3.0)]
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/loss_curve.png"}, "ENOSPC is not final"
    assert {a.path for a in client.list_artifacts(run_id, "samples")} == {"samples/epoch_001.txt"}
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(warnings) == len(set(warnings)) and len(warnings) <= 3, warnings
    assert any(f"disk full: the tracking store {store}/mlflow.db cannot grow" in w for w in warnings), warnings
    assert any("cannot record what was delivered (disk full: no space left" in w for w in warnings), warnings
    assert "Traceback" not in capfd.readouterr().err


def test_spool_reads_every_readable_line_and_counts_the_rest(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for step in (1, 2, 3):
        spool.add({"kind": "metrics", "points": [["loss", float(step), step, 0]]})
    raw = spool.journal.read_bytes().splitlines(keepends=True)
    raw[1] = raw[1].replace(b"metrics", b"metr\xc3\x28cs")  # invalid UTF-8 in the middle line
    spool.journal.write_bytes(b"".join([*raw, b'"not an item"\n']))

    reopened = Spool(tmp_path)

    assert [item["seq"] for item in reopened.items()] == [1, 3] and reopened.unreadable == 2
    assert reopened.add({"kind": "end", "status": "FINISHED"})["seq"] == 4


def test_a_full_disk_is_one_line_naming_the_path(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        Disk(patch, tmp_path, errno.ENOSPC).fail()
        with pytest.raises(DiskFault, match=f"^disk full: no space left on the device at {spool.journal}$"):
            spool.add({"kind": "metrics", "points": []})
    with pytest.MonkeyPatch.context() as patch:
        Disk(patch, tmp_path, errno.EACCES).fail()
        with pytest.raises(DiskFault, match=f"^read-only: no permission to write {spool.delivered_file}$"):
            spool.mark_delivered(1)
    assert spool.delivered() == 1, "what was delivered counts in this process even when it cannot be recorded"
    assert DiskFault.exit_code == 5


def test_a_cache_folder_that_cannot_be_created_is_named_before_any_run_exists(store, monkeypatch, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("GPT_CACHE_DIR", str(blocker / "cache"))
    client = MlflowClient(uri_of(store))
    before = {r.info.run_id for e in client.search_experiments() for r in client.search_runs(e.experiment_id)}

    code, output = train(store, *FAST)

    expected = f"error: cannot create the folder {blocker / 'cache'} set by GPT_CACHE_DIR"
    assert code == 2 and output.strip().startswith(expected), output
    assert {r.info.run_id for e in client.search_experiments() for r in client.search_runs(e.experiment_id)} == before

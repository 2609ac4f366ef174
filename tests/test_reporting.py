"""gpt.reporting: what each epoch end costs, and how the per-epoch work is throttled by time.

The Reporter is driven directly, with a fake clock and a tracker that only records: an epoch of
the reference config on a GPU takes ~50 ms, so these tests replay hundreds of such epochs in no time.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from gpt import reporting
from gpt.config import Config, load
from gpt.data import Corpus
from gpt.model import GPT
from gpt.reporting import PLOT_EVERY_S, Checkpoints, ProgressBar, Reporter, snapshot, timed
from gpt.trainer import EpochMetrics, Trainer

GPU_EPOCH_S = 1 / 16  # ~the reference config's epoch on an H100; a power of two keeps the fake clock exact
GPU_SAMPLE_S = 1 / 8  # two prompts of 50 tokens at batch 1


class Clock:
    """Stands in for the time module in gpt.reporting: time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


class Tracker:
    """Records what the Reporter hands to the tracker, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def log_points(self, points: list[tuple[str, float, int, int]]) -> None:
        if points:
            self.events.append(("points", list(points)))

    def log_loss_curve(self, history: list[dict], title: str) -> None:
        self.events.append(("plot", len(history)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.events.append(("text", artifact_file))

    def of(self, kind: str) -> list[Any]:
        return [value for event, value in self.events if event == kind]

    def sampled_epochs(self) -> list[int]:
        return [int(name.split("_")[1].split(".")[0]) for name in self.of("text")]

    def points(self, key: str) -> list[int]:
        return [step for batch in self.of("points") for name, _, step, _ in batch if name == key]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(reporting, "time", fake)
    return fake


def make_reporter(tmp_path: Path, clock: Clock, *overrides: str, sample_s: float = GPU_SAMPLE_S):
    """A Reporter over a recording tracker whose samples take sample_s on the clock."""
    cfg = load(None, list(overrides))
    tracker = Tracker()
    reporter = Reporter(cfg, tracker, encoding=None, echo=lambda line: None, title="t", seconds={})

    def samples(trainer: Any, epoch: int) -> str:
        clock.advance(sample_s)
        return f"sample of epoch {epoch}"

    reporter.samples = samples
    return reporter, tracker


def train_epochs(reporter: Reporter, clock: Clock, epochs: int, seconds: float, trainer: Any = None) -> Any:
    """Epoch ends as the trainer makes them: each after `seconds` of training, no best epoch."""
    trainer = trainer or SimpleNamespace(state=SimpleNamespace(best_epoch=0, history=[]))
    for epoch in range(1, epochs + 1):
        clock.advance(seconds)
        trainer.state.history.append({"epoch": epoch, "train_loss": 1.0, "val_loss": 1.0, "step": epoch})
        metrics = EpochMetrics(epoch, 1.0, 1.0, epoch * 100, seconds, epoch * seconds, 100 / seconds, [(epoch, 1.0)])
        reporter.on_epoch_end(trainer, metrics)
    return trainer


def test_timed_adds_each_block_to_its_activity(clock: Clock) -> None:
    seconds: dict[str, float] = {}
    for spent in (0.25, 0.5):
        with timed(seconds, "plot"):
            clock.advance(spent)
    with pytest.raises(RuntimeError), timed(seconds, "samples"):
        clock.advance(2.0)
        raise RuntimeError("a failed activity still took its time")
    assert seconds == {"plot": 0.75, "samples": 2.0}


def test_reporter_books_its_time_by_activity(tmp_path: Path, clock: Clock) -> None:
    reporter, _ = make_reporter(tmp_path, clock, "train.epochs=3", sample_s=0.5)
    train_epochs(reporter, clock, 3, seconds=10.0)
    assert reporter.seconds == {"metrics": 0.0, "plot": 0.0, "samples": 1.5, "summary line": 0.0}


def test_costly_samples_come_every_sample_every_s_and_at_the_final_epoch(tmp_path: Path, clock: Clock) -> None:
    reporter, tracker = make_reporter(tmp_path, clock, "train.sample_every_s=3")
    train_epochs(reporter, clock, 100, GPU_EPOCH_S)
    # the first warms up, the second measures the cost; then one when 3 s have passed: every 48 epochs
    assert tracker.sampled_epochs() == [1, 2, 50, 98, 100]


def test_costly_samples_never_take_more_than_their_share_of_the_time(tmp_path: Path, clock: Clock) -> None:
    # the reference model on a CPU: 3-minute epochs, samples of a minute; sample_every_s (10 s) would
    # let them come every epoch, a third of the run
    reporter, tracker = make_reporter(tmp_path, clock, "train.epochs=40", sample_s=60.0)
    train_epochs(reporter, clock, 40, seconds=180.0)
    sampled = tracker.sampled_epochs()
    assert sampled[:2] == [1, 2] and sampled[-1] == 40
    assert len(sampled) * 60.0 <= 0.06 * 40 * 180.0 + 3 * 60.0, f"too many samples: {sampled}"


def test_cheap_samples_come_every_epoch_whatever_sample_every_s(tmp_path: Path, clock: Clock) -> None:
    reporter, tracker = make_reporter(tmp_path, clock, "train.epochs=5", "train.sample_every_s=3600")
    train_epochs(reporter, clock, 5, seconds=60.0)  # a CPU's minute-long epoch; samples take 1/8 s
    assert tracker.sampled_epochs() == [1, 2, 3, 4, 5]


def test_a_slow_first_sample_does_not_throttle_the_rest(tmp_path: Path, clock: Clock) -> None:
    reporter, tracker = make_reporter(tmp_path, clock, "train.epochs=5", "train.sample_every_s=3600")
    first = reporter.samples

    def samples(trainer: Any, epoch: int) -> str:
        clock.advance(30.0 if epoch == 1 else 0.0)  # one-off warm-up: half an epoch
        return first(trainer, epoch)

    reporter.samples = samples
    train_epochs(reporter, clock, 5, seconds=60.0)
    assert tracker.sampled_epochs() == [1, 2, 3, 4, 5]


def test_sample_every_s_zero_samples_every_epoch_as_the_seed(tmp_path: Path, clock: Clock) -> None:
    reporter, tracker = make_reporter(tmp_path, clock, "train.epochs=20", "train.sample_every_s=0")
    train_epochs(reporter, clock, 20, GPU_EPOCH_S)
    assert tracker.sampled_epochs() == list(range(1, 21))


def test_sample_every_still_picks_the_epochs(tmp_path: Path, clock: Clock) -> None:
    reporter, tracker = make_reporter(tmp_path, clock, "train.epochs=7", "train.sample_every=2")
    train_epochs(reporter, clock, 7, seconds=60.0)
    assert tracker.sampled_epochs() == [2, 4, 6, 7]


def test_sample_every_zero_disables_samples_even_at_the_end(tmp_path: Path, clock: Clock) -> None:
    reporter, tracker = make_reporter(tmp_path, clock, "train.epochs=3", "train.sample_every=0")
    train_epochs(reporter, clock, 3, seconds=60.0)
    assert tracker.sampled_epochs() == []


def test_metric_points_are_spooled_in_few_batches_each_point_once(tmp_path: Path, clock: Clock) -> None:
    reporter, tracker = make_reporter(tmp_path, clock, "train.sample_every=0")
    train_epochs(reporter, clock, 100, GPU_EPOCH_S)
    assert tracker.points("train_loss") == list(range(1, 101)), "every epoch once, in order"
    assert tracker.points("train_loss_step") == list(range(1, 101))
    batches = len(tracker.of("points"))
    assert batches <= 100 * GPU_EPOCH_S / reporting.METRICS_EVERY_S + 1, f"{batches} spool writes for 100 epochs"


def test_loss_curve_is_sent_every_plot_every_s_and_at_the_final_epoch(tmp_path: Path, clock: Clock) -> None:
    reporter, tracker = make_reporter(tmp_path, clock, "train.epochs=25", "train.sample_every=0")
    train_epochs(reporter, clock, 25, seconds=PLOT_EVERY_S / 10)
    assert tracker.of("plot") == [10, 20, 25], "the curve of the epochs so far, each time"


def test_stopping_early_sends_what_was_held_back(tmp_path: Path, clock: Clock) -> None:
    reporter, tracker = make_reporter(tmp_path, clock, "train.sample_every=0")
    train_epochs(reporter, clock, 5, GPU_EPOCH_S)  # half a second: nothing spooled or plotted yet
    assert tracker.events == []

    reporter.log_steps([(6, 2.0), (7, 2.0)])  # what job.py does when training is interrupted

    assert tracker.points("train_loss") == [1, 2, 3, 4, 5]
    assert tracker.points("train_loss_step") == [1, 2, 3, 4, 5, 6, 7]
    assert len(tracker.of("points")) == 1, "one batch: one fsync"
    assert tracker.of("plot") == [5]


def tiny_trainer() -> Trainer:
    sizes = ["model.vocab_size=64", "model.context_length=8", "model.emb_dim=8", "model.n_heads=2", "model.n_layers=1"]
    cfg = load(None, sizes)
    tokens = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(0))
    return Trainer(cfg, GPT(cfg.model), Corpus(train=tokens[:150], val=tokens[150:]), torch.device("cpu"))


def test_a_checkpoint_is_never_ahead_of_the_spooled_metrics(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume trains on from the checkpoint's epoch: the epochs before it must be logged by then."""
    reporter, tracker = make_reporter(tmp_path, clock, "train.sample_every=0")
    save = reporting.checkpoint.save

    def recorded_save(path: Path, payload: dict[str, Any], *args: Any) -> Path:
        tracker.events.append(("save", path.name))
        return save(path, payload, *args)

    monkeypatch.setattr(reporting.checkpoint, "save", recorded_save)
    trainer = tiny_trainer()
    train_epochs(reporter, clock, 3, GPU_EPOCH_S, trainer)  # held back: less than a second
    # wired as gpt.job wires them
    checkpoints = Checkpoints(tmp_path, "run", 1e9, {}, before_write=reporter.flush_points, seconds=reporter.seconds)

    checkpoints.write(trainer)

    assert tracker.events == [("points", tracker.of("points")[0]), ("save", "last.pt")]
    assert tracker.points("train_loss") == [1, 2, 3]


def improved_epoch(trainer: Trainer) -> EpochMetrics:
    """An epoch end at which the trainer's best epoch is the current one."""
    trainer.state.best_epoch = trainer.state.epoch
    return EpochMetrics(trainer.state.epoch, 1.0, 1.0, 0, 1.0, 1.0, 1.0, [])


def checkpoints_in(folder: Path, every_s: float | None) -> Checkpoints:
    return Checkpoints(folder, "run", every_s, {}, before_write=lambda: None, seconds={})


def test_best_snapshots_and_writes_are_booked_apart(tmp_path: Path, clock: Clock) -> None:
    trainer = tiny_trainer()
    checkpoints = checkpoints_in(tmp_path, every_s=0.0)
    checkpoints.on_epoch_end(trainer, improved_epoch(trainer))
    assert set(checkpoints.seconds) == {"best snapshots", "checkpoint writes"}
    assert {path.name for path in tmp_path.glob("*.pt")} == {"last.pt", "best.pt"}


def test_best_snapshot_keeps_the_epoch_while_training_goes_on(tmp_path: Path) -> None:
    trainer = tiny_trainer()
    checkpoints = checkpoints_in(tmp_path, every_s=1e9)
    trainer.run_epoch()
    checkpoints.on_epoch_end(trainer, improved_epoch(trainer))
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {i: s["exp_avg"].clone() for i, s in trainer.optimizer.state_dict()["state"].items()}

    trainer.run_epoch()  # changes the weights and the AdamW state in place

    best = checkpoints.best_payload
    assert best["state"]["epoch"] == 1
    assert all(torch.equal(best["model"][k], v) for k, v in weights.items()), "the weights followed training"
    assert all(torch.equal(best["optimizer"]["state"][i]["exp_avg"], v) for i, v in moments.items())
    assert not torch.equal(trainer.model.state_dict()["tok_emb.weight"], weights["tok_emb.weight"])


def test_snapshot_copies_tensors_and_keeps_shared_ones_shared() -> None:
    weight = torch.ones(3)
    payload = {"model": {"tok_emb.weight": weight, "out_head.weight": weight}, "rng": ("MT19937", [1, 2])}
    copied = snapshot(payload)
    weight.add_(1.0)
    assert torch.equal(copied["model"]["tok_emb.weight"], torch.ones(3))
    assert copied["model"]["tok_emb.weight"] is copied["model"]["out_head.weight"], "tied weights saved once"
    assert copied["rng"] == payload["rng"] and copied["rng"][1] is not payload["rng"][1]


def test_snapshot_of_a_tied_model_keeps_one_matrix() -> None:
    cfg = Config()
    cfg.model.vocab_size, cfg.model.context_length, cfg.model.emb_dim = 64, 8, 16
    cfg.model.n_heads, cfg.model.n_layers, cfg.model.tie_weights = 2, 1, True
    state = GPT(cfg.model).state_dict()
    assert state["tok_emb.weight"] is not state["lm_head.weight"], "state_dict gives two tensor objects"
    copied = snapshot(state)
    assert copied["tok_emb.weight"] is copied["lm_head.weight"], "one storage before, one after"


# ---------------------------------------------------------------- progress


def run_steps(bar: ProgressBar, clock: Clock, epoch: int, steps: range, total: int, seconds: float) -> None:
    for done in steps:
        clock.advance(seconds)
        bar(epoch, done, total, torch.tensor(2.0))


def test_progress_lines_come_every_30_s_with_real_rates_and_time_left(clock: Clock) -> None:
    lines: list[str] = []
    bar = ProgressBar(512, True, epochs=3, terminal=False, echo=lines.append)
    run_steps(bar, clock, 1, range(1, 51), 50, seconds=1.0)  # one step a second from the start
    assert lines == [
        "progress: epoch 1/3, step 30/50, loss 2.000, 512 tokens/s, ~20 s left in the epoch, ~2 min in the run "
        "(training steps)"
    ]
    clock.advance(5.0)  # validation and reports
    run_steps(bar, clock, 2, range(1, 2), 50, seconds=0.5)  # an epoch's first step: its start is not seen here
    assert bar.steps_per_s == 1.0, "the previous rate, not one step over no time"
    run_steps(bar, clock, 2, range(2, 51), 50, seconds=0.5)
    assert bar.steps_per_s == 2.0
    assert [line.split(", loss")[0] for line in lines[1:]] == ["progress: epoch 2/3, step 10/50"]  # 30 s later
    assert "1,024 tokens/s" in lines[1]


def test_a_bar_shows_real_rates_from_its_first_update(clock: Clock) -> None:
    bar = ProgressBar(512, True, epochs=2, terminal=True)
    run_steps(bar, clock, 1, range(1, 2), 10, seconds=0.25)
    assert "2,048 tokens/s" in bar.bar.postfix, "one step of 512 tokens in 0.25 s since training started"
    assert "run ~5 s left" in bar.bar.postfix, "9 steps of this epoch and 10 of the next at 4 steps/s"
    assert bar.bar.format_dict["n"] == bar.bar.format_dict["initial"], "tqdm's own rate counts the next steps"
    run_steps(bar, clock, 1, range(2, 10), 10, seconds=0.25)
    clock.advance(3.0)
    run_steps(bar, clock, 2, range(1, 2), 10, seconds=0.5)
    assert "2,048 tokens/s" in bar.bar.postfix, "an epoch's first update: the last measured rate"
    bar.close()


def test_progress_lines_in_a_log_of_a_real_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import TINY_TRAIN, run_train

    monkeypatch.setattr(reporting, "PROGRESS_LINE_EVERY_S", 0.0)  # every step, for the test
    code, output = run_train([*TINY_TRAIN, "--epochs", "1", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert code == 0, output
    lines = [line for line in output.splitlines() if line.startswith("progress: ")]
    assert lines and all(re.match(r"progress: epoch 1/1, step \d+/\d+, loss \d+\.\d{3}, [\d,]+ tokens/s, ~", line)
                         for line in lines), lines  # fmt: skip

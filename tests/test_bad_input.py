"""Bad input to train.py and generate.py: one line naming the problem, exit 2, no traceback, no run
left RUNNING, and nothing written outside the command's output locations (the store, the cache).

Each case runs the command in-process from an empty working folder, with a store that holds a
finished run (with a checkpoint) and a run without checkpoints.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import RANKS, ROOT, VERDICT, assert_options_exist
from mlflow.tracking import MlflowClient

import train
from gpt import checkpoint
from gpt.config import Config, ModelConfig
from gpt.data import sha256_file
from gpt.errors import UserError
from gpt.model import GPT
from gpt.state import TrainState
from gpt.trainer import build_optimizer

pytestmark = pytest.mark.skipif(not RANKS.is_file(), reason=f"no tokenizer ranks file at {RANKS}")

_spec = importlib.util.spec_from_file_location("generate_script", ROOT / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)

UNKNOWN_RUN = "0123456789abcdef0123456789abcdef"
LONG = "a" * 300  # a file name longer than any file system takes (ENAMETOOLONG)
TINY_YAML = str(ROOT / "configs" / "tiny.yaml")


@dataclass
class World:
    inputs: Path  # the bad files
    uri: str  # a store with two runs, both FINISHED
    finished: str  # trained its 2 epochs: checkpoints/last.pt and best.pt
    bare: str  # no checkpoint at all


def tiny_config(**model: object) -> Config:
    cfg = Config(model=ModelConfig(**{"context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 2, **model}))
    cfg.data.files = [str(VERDICT)]
    cfg.train.epochs = 2
    return cfg


def training_checkpoint(run_id: str, uri: str, epoch: int, data: Path = VERDICT, **changes: object) -> dict:
    """A checkpoint as training writes it, for a tiny model that never trained."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = GPT(cfg.model)
    payload = {
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": build_optimizer(cfg, model, torch.device("cpu")).state_dict(),
        "state": TrainState(epoch=epoch, step=16 * epoch, best_val_loss=9.0).to_dict(),
        "rng": checkpoint.rng_state(),
        "tokenizer": {"name": "gpt2"},
        "run_id": run_id,
        "data": [{"name": data.stem, "path": str(data), "sha256": sha256_file(data), "tokens": 0}],
        "tracking_uri": uri,
    }
    return {**payload, **changes}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    inputs = tmp_path_factory.mktemp("inputs")
    files = {
        "list.yaml": "- model\n- train\n",
        "broken.yaml": "model: [1, 2\n",
        "sections.yaml": "optimizer: {lr: 0.1}\n",
        "keys.yaml": "model: {layers: 2}\n",
        "types.yaml": "model: {n_layers: two}\n",
        "empty.txt": "",
        "blank.txt": "  \n\t\n",
        "short.txt": "Too short to hold a window.",
        "notes.txt": "not a database\n",
        "garbage.tiktoken": "this is not a ranks file\n",
        "notes.pt": "a text file with a checkpoint's name\n",
    }
    for name, text in files.items():
        (inputs / name).write_text(text)
    (inputs / "binary.dat").write_bytes(bytes(range(256)) * 4)
    (inputs / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1") * 50)
    (inputs / "folder").mkdir()
    os.mkfifo(inputs / "pipe.txt")  # what `--data <(zcat book.gz)` hands over: a pipe, readable once
    (inputs / "loop1.yaml").symlink_to(inputs / "loop2.yaml")
    (inputs / "loop2.yaml").symlink_to(inputs / "loop1.yaml")

    store = inputs / "store"
    uri = f"sqlite:///{store}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("bad-input", artifact_location=(store / "artifacts").as_uri())
    finished, bare = (client.create_run(experiment, run_name=name).info.run_id for name in ("finished", "bare"))
    staged = inputs / "staged"
    for name in ("last.pt", "best.pt"):
        checkpoint.save(staged / name, training_checkpoint(finished, uri, epoch=2))
        client.log_artifact(finished, str(staged / name), "checkpoints")
    for run_id in (finished, bare):
        client.set_terminated(run_id)

    resumable = dict(run_id=finished, uri=uri, epoch=1)
    checkpoint.save(inputs / "good.pt", training_checkpoint(**resumable))
    good = (inputs / "good.pt").read_bytes()
    (inputs / "truncated.pt").write_bytes(good[: len(good) // 2])
    torch.save({"weights": torch.zeros(3)}, inputs / "foreign.pt")
    torch.save({"model": World}, inputs / "pickled.pt")  # a class: what only an unsafe (full pickle) load reads
    wider = tiny_config(emb_dim=32).to_dict()
    checkpoint.save(inputs / "wider.pt", training_checkpoint(**resumable, config=wider))
    anonymous = training_checkpoint(**resumable)
    del anonymous["run_id"]
    checkpoint.save(inputs / "anonymous.pt", anonymous)
    old_state = training_checkpoint(**resumable)
    old_state["state"]["epoch_loss_sum"] = old_state["state"].pop("epoch_losses")
    checkpoint.save(inputs / "old-state.pt", old_state)
    checkpoint.save(inputs / "moved.pt", training_checkpoint(finished, f"sqlite:///{inputs}/gone/mlflow.db", epoch=1))
    orphan = inputs / "orphan-spool"  # a run's spool whose store is gone, with no store above it
    orphan.mkdir()
    (orphan / "run.json").write_text(f'{{"run_id": "{finished}", "tracking_uri": "sqlite:///{inputs}/gone/mlflow.db"}}')
    (orphan / "lock").touch()
    edited = inputs / "verdict-copy.txt"
    shutil.copy(VERDICT, edited)
    checkpoint.save(inputs / "edited-data.pt", training_checkpoint(**resumable, data=edited))
    with open(edited, "a") as handle:
        handle.write(" One more sentence, added after the run started.")
    return World(inputs, uri, finished, bare)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket closes


CLOSED_PORT = closed_port()
BASE = ["--config", TINY_YAML, "--data", str(VERDICT), "--set", "model.context_length=16", "--set", "model.emb_dim=16"]

SAMPLE = ["--checkpoint", "{inputs}/good.pt", "--prompt", "Hi"]
RUN = ["--run", UNKNOWN_RUN, "--prompt", "Hi"]


def case(name: str, script: str, args: list[str], words: str) -> object:
    return pytest.param(script, args, words, id=name.replace(" ", "-"))


# (name, script, arguments, words the one-line error must contain). In arguments, {inputs}, {uri},
# {finished} and {bare} are filled from the world; train.py cases get --tracking-uri for a store
# in the working folder unless they name one (or resume or replay a run, which names its own), so a
# store created by mistake would show.
CASES = [
    # configs
    case("yaml is a list", "train", ["--config", "{inputs}/list.yaml"], "expected a mapping of sections"),
    case("yaml does not parse", "train", ["--config", "{inputs}/broken.yaml"], "not valid YAML"),
    case("yaml file missing", "train", ["--config", "{inputs}/none.yaml"], "config file not found"),
    case("yaml is a folder", "train", ["--config", "{inputs}/folder"], "is a directory"),
    case("yaml is /dev/null", "train", ["--config", "/dev/null"], "config file /dev/null is not a regular file"),
    case("yaml is a loop of links", "train", ["--config", "{inputs}/loop1.yaml"],
         "loop1.yaml is a broken symbolic link (to nothing, or a loop of links)"),
    case("yaml is empty", "train", ["--config", "{inputs}/empty.txt"], "is empty; give the settings that differ"),
    case("yaml name too long", "train", ["--config", f"{{inputs}}/{LONG}.yaml"], "yaml: File name too long"),
    case("unknown section", "train", ["--config", "{inputs}/sections.yaml"], "unknown section 'optimizer'"),
    case("unknown key", "train", ["--config", "{inputs}/keys.yaml"], "unknown config key 'model.layers'"),
    case("wrong type in yaml", "train", ["--config", "{inputs}/types.yaml"], "model.n_layers: expected int"),
    # data files
    case("data file missing", "train", [*BASE, "--data", "{inputs}/none.txt"], "file not found"),
    case("data is a folder", "train", [*BASE, "--data", "{inputs}/folder"], "is a directory"),
    case("data is /dev/null", "train", [*BASE, "--data", "/dev/null"], "data: /dev/null is not a regular file"),
    case("data is a pipe", "train", [*BASE, "--data", "{inputs}/pipe.txt"], "pipe.txt is not a regular file"),
    case("data name too long", "train", [*BASE, "--data", f"{{inputs}}/{LONG}"], f"{LONG}: File name too long"),
    case("data an empty path", "train", [*BASE, "--data", ""], "data: an empty path; give a .txt file"),
    case("data is binary", "train", [*BASE, "--data", "{inputs}/binary.dat"], "looks binary"),
    case("data is not utf-8", "train", [*BASE, "--data", "{inputs}/latin1.txt"], "is not UTF-8"),
    case("data file empty", "train", [*BASE, "--data", "{inputs}/empty.txt"], "is empty"),
    case("data only blanks", "train", [*BASE, "--data", "{inputs}/blank.txt"], "is empty"),
    case("glob matches nothing", "train", [*BASE, "--data", "{inputs}/*.none"], "matches no file"),
    case("too short for a window", "train", ["--config", TINY_YAML, "--data", "{inputs}/short.txt"], "too few for one"),
    case("gutenberg id not a number", "train", [*BASE, "--data", "gutenberg:alice"], "must be a number"),
    case("no data at all", "train", ["--config", TINY_YAML], "no data given"),
    # config values on the command line
    case("override unknown key", "train", [*BASE, "--set", "model.layers=3"], "unknown config key 'model.layers'"),
    case("override without =", "train", [*BASE, "--set", "model.n_layers"], "must look like section.key=value"),
    case("override wrong type", "train", [*BASE, "--set", "model.n_layers=many"], "model.n_layers: expected int"),
    case("negative learning rate", "train", [*BASE, "--set", "train.lr=-0.1"], "train.lr must be positive"),
    case("negative temperature", "train", [*BASE, "--set", "train.temperature=-1"], "train.temperature must not be"),
    case("temperature nan", "train", [*BASE, "--set", "train.temperature=.nan"], "expected a finite number"),
    case("temperature nan text", "train", [*BASE, "--set", "train.temperature=nan"], "train.temperature: expected"),
    case("learning rate inf", "train", [*BASE, "--set", "train.lr=.inf"], "train.lr: expected a finite number"),
    case("dropout -inf", "train", [*BASE, "--set", "model.dropout=-.inf"], "model.dropout: expected a finite"),
    case("heads do not divide", "train", [*BASE, "--set", "model.n_heads=3"], "must be divisible by model.n_heads"),
    case("dropout of 1.5", "train", [*BASE, "--set", "model.dropout=1.5"], "model.dropout must be in [0, 1)"),
    case("stride of 0", "train", [*BASE, "--set", "data.stride=0"], "data.stride must be at least 1"),
    case("stride not a ratio", "train", [*BASE, "--set", "data.stride=halfx"], "neither a token count nor a ratio"),
    case("window over context", "train", [*BASE, "--set", "data.max_length=64"], "must not exceed model.context"),
    case("validation fraction 1.5", "train", [*BASE, "--set", "data.val_fraction=1.5"], "data.val_fraction must be"),
    case("unknown device in config", "train", [*BASE, "--set", "train.device=tpu"], "train.device must be one of"),
    case("blank sample prompt", "train", [*BASE, "--set", "train.sample_prompts=[' ']"], "empty prompt"),
    # command-line values
    case("epochs not a number", "train", [*BASE, "--epochs", "many"], "Invalid value for '--epochs'"),
    case("zero epochs", "train", [*BASE, "--epochs", "0"], "train.epochs must be at least 1"),
    case("unknown option", "train", [*BASE, "--epoch", "3"], "No such option '--epoch'"),
    case("unknown device option", "train", [*BASE, "--device", "tpu"], "Invalid value for '--device'"),
    case("run name with a newline", "train", [*BASE, "--run-name", "a\nb"], "run name 'a\\nb' is not allowed"),
    case("run name with a tab", "train", [*BASE, "--run-name", "a\tb"], "no tabs, newlines or other control"),
    case("run name too long", "train", [*BASE, "--run-name", "x" * 251], "1 to 250 printable characters"),
    case("run name empty", "train", [*BASE, "--run-name", ""], "run name '' is not allowed"),
    case("run name blank", "train", [*BASE, "--run-name", "   "], "not only spaces"),
    case("experiment blank", "train", [*BASE, "--experiment", " "], "experiment name must not be empty"),
    case("experiment empty", "train", [*BASE, "--experiment", ""], "experiment name must not be empty"),
    case("server unreachable", "train", [*BASE, "--tracking-uri", f"http://127.0.0.1:{CLOSED_PORT}"], "not reachable"),
    case("unknown uri scheme", "train", [*BASE, "--tracking-uri", "ftp://host/db"], "unknown scheme 'ftp'"),
    case("uri is a plain folder", "train", [*BASE, "--tracking-uri", "mlruns"], "retired file store"),
    case("sqlite uri is a folder", "train", [*BASE, "--tracking-uri", "sqlite:///{inputs}/folder"], "is a folder"),
    case("sqlite uri not a db", "train", [*BASE, "--tracking-uri", "sqlite:///{inputs}/notes.txt"], "not a SQLite"),
    case("sqlite uri is a pipe", "train", [*BASE, "--tracking-uri", "sqlite:///{inputs}/pipe.txt"],
         "{inputs}/pipe.txt is not a regular file (a device, pipe or socket)"),
    case("sqlite uri is a pipe (dry run)", "train", [*BASE, "--dry-run", "--tracking-uri", "sqlite:///{inputs}/pipe.txt"],
         "{inputs}/pipe.txt is not a regular file"),
    case("sqlite uri is /dev/null", "train", [*BASE, "--tracking-uri", "sqlite:////dev/null"],
         "/dev/null is not a regular file"),
    case("sqlite uri is /dev/null (dry run)", "train", [*BASE, "--dry-run", "--tracking-uri", "sqlite:////dev/null"],
         "/dev/null is not a regular file"),
    case("sqlite uri in /proc", "train", [*BASE, "--tracking-uri", "sqlite:////proc/x/mlflow.db"],
         "cannot create /proc/x/mlflow.db: /proc takes no new files"),
    case("sqlite uri under a file", "train", [*BASE, "--tracking-uri", "sqlite:///{inputs}/notes.txt/sub/mlflow.db"],
         "{inputs}/notes.txt is not a folder"),
    case("sqlite uri in memory", "train", [*BASE, "--tracking-uri", "sqlite:///:memory:"], "in-memory SQLite"),
    case("sqlite uri without a path", "train", [*BASE, "--tracking-uri", "sqlite:///"], "runs need a store on disk"),
    case("sqlite uri in memory (dry run)", "train", [*BASE, "--dry-run", "--tracking-uri", "sqlite://"],
         "in-memory SQLite"),
    case("tokenizer file missing", "train", [*BASE, "--tokenizer-file", "{inputs}/none.tiktoken"], "not found"),
    case("tokenizer file /dev/null", "train", [*BASE, "--tokenizer-file", "/dev/null"],
         "tokenizer file /dev/null is not a regular file"),
    case("tokenizer file garbage", "train", [*BASE, "--tokenizer-file", "{inputs}/garbage.tiktoken"], "not a tiktoken"),
    case("tokenizer file empty", "train", [*BASE, "--tokenizer-file", "{inputs}/empty.txt"], "holds 0 ranks"),
    case("tokenizer file empty (generate)", "generate", [*SAMPLE, "--tokenizer-file", "{inputs}/empty.txt"],
         "holds 0 ranks"),
    case("cache dir cannot be created", "train", [*BASE, "--cache-dir", "{inputs}/notes.txt/sub"], "cannot create"),
    case("seed too large", "train", [*BASE, "--seed", "99999999999999999999"], "--seed"),
    case("model beyond memory", "train", [*BASE, "--set", "model.n_layers=1e30"], "AdamW state, more than this"),
    case("min_lr above lr", "train", [*BASE, "--set", "train.min_lr=1"], "train.min_lr (1.0) must not exceed"),
    case("seed too large in --set", "train", [*BASE, "--set", "train.seed=99999999999999999999"], "train.seed"),
    case("seed too large (generate)", "generate", [*SAMPLE, "--seed", "99999999999999999999"], "--seed"),
    case("cache dir is a file", "train", [*BASE, "--cache-dir", "{inputs}/notes.txt"], "is a file"),
    case("cache dir /dev/null", "train", [*BASE, "--cache-dir", "/dev/null"], "/dev/null: it is a device, pipe"),
    case("cache dir name too long", "train", [*BASE, "--cache-dir", f"{{inputs}}/{LONG}"], "File name too long"),
    # run ids
    case("resume unknown run", "train", ["--resume", UNKNOWN_RUN, "--tracking-uri", "{uri}"], "unknown run id"),
    case("resume neither id nor file", "train", ["--resume", "last-week"], "neither a run id"),
    case("resume without a store", "train", ["--resume", UNKNOWN_RUN], "no MLflow store at"),
    case("resume with a config", "train", ["--resume", "{finished}", "--config", TINY_YAML], "drop --config"),
    case("resume with a new name", "train", ["--resume", "{finished}", "--run-name", "again"], "drop --run-name"),
    case("resume run without checkpoint", "train", ["--resume", "{bare}", "--tracking-uri", "{uri}"],
         "has no checkpoint"),
    case("resume a finished run", "train", ["--resume", "{finished}", "--tracking-uri", "{uri}"],
         "already trained 2 epochs (its plan: 2)"),
    case("resume a finished run with fewer epochs", "train",
         ["--resume", "{finished}", "--tracking-uri", "{uri}", "--epochs", "1"],
         "already trained 2 epochs (its plan: 1)"),
    case("replay a missing folder", "train", ["--replay", "{inputs}/none"], "no such folder"),
    case("replay /dev/null", "train", ["--replay", "/dev/null"], "--replay /dev/null: is not a folder"),
    case("replay a name too long", "train", ["--replay", f"{{inputs}}/{LONG}"], "no such folder"),
    case("replay a folder without spool", "train", ["--replay", "{inputs}/folder"], "run.json is missing"),
    case("replay with a config", "train", ["--replay", "{inputs}/folder", "--config", TINY_YAML], "drop --config"),
    case("replay to a missing store", "train", ["--replay", "{inputs}/orphan-spool"],
         "no MLflow store at {inputs}/gone"),
    case("replay to another missing store", "train",
         ["--replay", "{inputs}/orphan-spool", "--tracking-uri", "sqlite:///{inputs}/none.db"],
         "no MLflow store at {inputs}/none.db"),
    case("resume from a moved store", "train", ["--resume", "{inputs}/moved.pt"],
         "names the store {inputs}/gone/mlflow.db, which does not exist (moved?)"),
    case("resume into a missing store", "train", ["--resume", "{inputs}/good.pt", "--tracking-uri", "sqlite:///x.db"],
         "no MLflow store at"),
    # checkpoints
    case("resume changes the model", "train", ["--resume", "{inputs}/good.pt", "--set", "model.emb_dim=32"],
         "may change, not model.emb_dim"),
    case("resume truncated file", "train", ["--resume", "{inputs}/truncated.pt"], "truncated, corrupt"),
    case("resume foreign torch file", "train", ["--resume", "{inputs}/foreign.pt"], "not a checkpoint of this tool"),
    case("resume text named .pt", "train", ["--resume", "{inputs}/notes.pt"], "truncated, corrupt"),
    case("resume a folder", "train", ["--resume", "{inputs}/folder"], "is a folder"),
    case("resume /dev/null", "train", ["--resume", "/dev/null"], "--resume /dev/null is not a regular file"),
    case("resume name too long", "train", ["--resume", f"{{inputs}}/{LONG}.pt"], ".pt: File name too long"),
    case("resume missing file", "train", ["--resume", "{inputs}/none.pt"], "checkpoint not found"),
    case("resume shapes off config", "train", ["--resume", "{inputs}/wider.pt"],
         "does not fit the config: tok_emb.weight has shape"),
    case("resume without run id", "train", ["--resume", "{inputs}/anonymous.pt"], "lacks run_id"),
    case("resume older state format", "train", ["--resume", "{inputs}/old-state.pt"], "not from this version"),
    case("resume edited data", "train", ["--resume", "{inputs}/edited-data.pt"], "changed since run"),
    # generate.py
    case("negative temperature", "generate", [*SAMPLE, "--temperature", "-1"], "not in the range x>=0"),
    case("temperature nan", "generate", [*SAMPLE, "--temperature", "nan"], "'nan' is not a finite number"),
    case("temperature inf", "generate", [*SAMPLE, "--temperature", "inf"], "'inf' is not a finite number"),
    case("top-k of 0", "generate", [*SAMPLE, "--top-k", "0"], "top-k must be"),
    case("top-p of 1.5", "generate", [*SAMPLE, "--top-p", "1.5"], "not in the range 0<x<=1"),
    case("top-p nan", "generate", [*SAMPLE, "--top-p", "nan"], "'nan' is not a finite number"),
    case("no new tokens", "generate", [*SAMPLE, "--max-tokens", "0"],
     "--max-tokens and --num-samples must be at least 1"),
    case("stream several", "generate", [*SAMPLE, "--stream", "--num-samples", "2"], "--stream prints one sample"),
    case("best without a run", "generate", ["--prompt", "Hi"], "give --run RUN_ID"),
    case("checkpoint file missing", "generate", ["--checkpoint", "{inputs}/none.pt", "--prompt", "Hi"], "no file"),
    case("checkpoint /dev/null", "generate", ["--checkpoint", "/dev/null", "--prompt", "Hi"],
         "--checkpoint /dev/null is not a regular file"),
    case("checkpoint truncated", "generate", ["--checkpoint", "{inputs}/truncated.pt", "--prompt", "Hi"], "truncated"),
    case("checkpoint foreign", "generate", ["--checkpoint", "{inputs}/foreign.pt", "--prompt", "Hi"],
         "not a checkpoint"),
    case("checkpoint pickles a class", "generate", ["--checkpoint", "{inputs}/pickled.pt", "--prompt", "Hi"],
         "pickled.pt is truncated, corrupt or not from this tool (torch's weights-only loader refused it)"),
    case("run and checkpoint /dev/null", "generate",
         ["--run", "{finished}", "--checkpoint", "/dev/null", "--prompt", "Hi", "--tracking-uri", "{uri}"],
         "--checkpoint /dev/null is not a regular file"),
    case("checkpoint shapes off", "generate", ["--checkpoint", "{inputs}/wider.pt", "--prompt", "Hi"], "does not fit"),
    case("unknown run", "generate", ["--run", UNKNOWN_RUN, "--prompt", "Hi", "--tracking-uri", "{uri}"],
         "unknown run id"),
    case("run without checkpoint", "generate", ["--run", "{bare}", "--prompt", "Hi", "--tracking-uri", "{uri}"],
     "has no checkpoint"),
    case("store is a folder (generate)", "generate", [*RUN, "--tracking-uri", "sqlite:///{inputs}/folder"],
         "{inputs}/folder is a folder; give a database file in it"),
    case("store is /dev/null (generate)", "generate", [*RUN, "--tracking-uri", "sqlite:////dev/null"],
         "/dev/null is not a regular file (a device, pipe or socket)"),
    case("store is a pipe (generate)", "generate", [*RUN, "--tracking-uri", "sqlite:///{inputs}/pipe.txt"],
         "pipe.txt is not a regular file"),
    case("store is an empty file (generate)", "generate", [*RUN, "--tracking-uri", "sqlite:///{inputs}/empty.txt"],
         "no MLflow store at {inputs}/empty.txt (an empty file): train a model first"),
    case("store not a db (generate)", "generate", [*RUN, "--tracking-uri", "sqlite:///{inputs}/notes.txt"],
         "{inputs}/notes.txt is not a SQLite database"),
    case("store in memory (generate)", "generate", [*RUN, "--tracking-uri", "sqlite:///:memory:"], "in-memory SQLite"),
    case("server unreachable (generate)", "generate", [*RUN, "--tracking-uri", f"http://127.0.0.1:{CLOSED_PORT}"],
         "not reachable"),
    case("model from a store that is a folder", "generate",
         ["--model", "models:/m/1", "--prompt", "Hi", "--tracking-uri", "sqlite:///{inputs}/folder"], "is a folder"),
    case("model from an empty store file", "generate",
         ["--model", "models:/m/1", "--prompt", "Hi", "--tracking-uri", "sqlite:///{inputs}/empty.txt"],
         "no MLflow store at {inputs}/empty.txt (an empty file)"),
    case("prompt twice", "generate", [*SAMPLE, "--prompt-file", "x.txt"],
     "give exactly one of --prompt"),
    case("prompt file missing", "generate", ["--checkpoint", "{inputs}/good.pt", "--prompt-file", "{inputs}/none.txt"],
     "prompt file not found"),
    case("prompt file /dev/null", "generate", ["--checkpoint", "{inputs}/good.pt", "--prompt-file", "/dev/null"],
         "prompt file /dev/null is not a regular file"),
    case("empty prompt", "generate", ["--checkpoint", "{inputs}/good.pt", "--prompt", "  "], "the prompt is empty"),
    case("unknown device", "generate", [*SAMPLE, "--device", "tpu"],
     "Invalid value for '--device'"),
    case("tokens not a number", "generate", [*SAMPLE, "--max-tokens", "many"], "Invalid value for '--max-tokens'"),
]  # fmt: skip


def files_under(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*")}


def statuses(uri: str) -> set[str]:
    client = MlflowClient(uri)
    return {run.info.status for e in client.search_experiments() for run in client.search_runs(e.experiment_id)}


@pytest.mark.parametrize(("script", "args", "words"), CASES)
def test_bad_input_gets_one_line_naming_it(
    world: World, script: str, args: list[str], words: str, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    fill = {"inputs": world.inputs, "uri": world.uri, "finished": world.finished, "bare": world.bare}
    args = [arg.format(**fill) for arg in args]
    words = words.format(**fill)
    if script == "train" and not {"--tracking-uri", "--resume", "--replay"} & set(args):
        args += ["--tracking-uri", f"sqlite:///{tmp_path}/store/mlflow.db"]
    inputs_before = files_under(world.inputs)

    result = CliRunner().invoke(train.main if script == "train" else generate.main, args)

    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, f"exit code {result.exit_code}; output:\n{result.output}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line:\n{result.output}"
    assert words in lines[0], f"the error should say {words!r}: {lines[0]}"
    assert_options_exist(lines[0], train.main if script == "train" else generate.main, args)
    assert "Traceback" not in result.output
    assert files_under(tmp_path) == set(), f"{script}.py wrote {sorted(files_under(tmp_path))}"
    assert files_under(world.inputs) == inputs_before, "files appeared beside the inputs or in the store"
    assert statuses(world.uri) == {"FINISHED"}, "a run was left RUNNING"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_machine_without_one(world: World, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(train.main, [*BASE, "--device", "cuda", "--tracking-uri", f"sqlite:///{tmp_path}/s.db"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: train.device is cuda but no CUDA GPU is available; set it to auto or cpu"
    assert files_under(tmp_path) == set()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_device_message_names_only_options_of_the_script_that_prints_it() -> None:
    from gpt.device import resolve_device

    with pytest.raises(UserError) as from_config:  # from a config: train.py, or a grid's cells in ablate.py
        resolve_device("cuda")
    assert "--" not in str(from_config.value), "ablate.py has no --device"
    with pytest.raises(UserError, match="use --device auto or cpu"):  # generate.py's own option
        resolve_device("cuda", option="--device")

"""What logging a run's model costs: the MLflow Model folder (safetensors, code, tokenizer) and its delivery.

python bench/model_logging.py                       # tiny (the tests' config) and the reference model
python bench/model_logging.py --configs tiny        # one of them

For each config: seconds to write the folder from a model state dict (gpt.mlflow_model.save_model_folder:
safetensors export, MLflow's save_model with its environment files), seconds to deliver it to a fresh
local SQLite store (create the Logged Model, upload the folder, mark it READY, register a version),
seconds to load it back with mlflow.pyfunc, and the folder's size. Measured in one process, each
config `--repeat` times, alternating; the median is printed. Nothing is asserted.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt import config as config_module  # noqa: E402
from gpt.delivery import deliver_model  # noqa: E402
from gpt.logged_model import using_store  # noqa: E402
from gpt.mlflow_model import save_model_folder  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.tokenizer import get_encoding  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "tiny": (ROOT / "configs" / "tiny.yaml", ["model.context_length=16", "model.emb_dim=16"]),
    "reference": (ROOT / "configs" / "gpt2-128.yaml", []),
}


def once(name: str, folder: Path) -> dict[str, float]:
    """One save, delivery and load of config `name`'s model under `folder`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    path, overrides = CONFIGS[name]
    cfg = config_module.load(path, overrides)
    torch.manual_seed(0)
    state = GPT(cfg.model).state_dict()
    started = time.perf_counter()
    target = save_model_folder(state, cfg, get_encoding(), folder / "model")
    saved = time.perf_counter()
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("bench", artifact_location=(folder / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    before = time.perf_counter()
    item = {"seq": 1, "kind": "model", "path": str(target), "register": "bench", "step": 1}
    deliver_model(client, run_id, item, folder)
    delivered = time.perf_counter()
    with using_store(uri):
        mlflow.pyfunc.load_model("models:/bench/1")
    loaded = time.perf_counter()
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return {"save_s": saved - started, "deliver_s": delivered - before, "load_s": loaded - delivered, "MB": size / 1e6}


@click.command()
@click.option("--configs", default="tiny,reference", show_default=True, help="Comma-separated: tiny, reference.")
@click.option("--repeat", default=3, show_default=True, help="Measurements per config (alternating).")
def main(configs: str, repeat: int) -> None:
    names = [n for n in configs.split(",") if n]
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for _ in range(repeat):
        for name in names:
            with tempfile.TemporaryDirectory() as folder:
                results[name].append(once(name, Path(folder)))
    for name, rows in results.items():
        medians = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        print(f"{name}: " + ", ".join(f"{key} {value:,.2f}" for key, value in medians.items()))


if __name__ == "__main__":
    main()

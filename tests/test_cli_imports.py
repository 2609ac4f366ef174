"""Quick answers stay quick (issue 12): --help and bad input load neither torch nor MLflow (seconds of imports).

Checked by the modules a fresh interpreter imports (python -X importtime), not by timing them; the
times themselves are measured by bench/cli_latency.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

QUICK = {
    "train.py --help": ["train.py", "--help"],
    "train.py bad --set key": ["train.py", "--set", "model.n_layerz=4"],
    "generate.py --help": ["generate.py", "--help"],
    "generate.py bad --temperature": ["generate.py", "--prompt", "x", "--temperature", "-1"],
    "ablate.py --help": ["ablate.py", "--help"],
    "ablate.py plan bad --set key": ["ablate.py", "plan", "--base", "configs/tiny.yaml", "--set", "model.n_layerz=4"],
    "ablate.py run bad --set key": ["ablate.py", "run", "--base", "configs/tiny.yaml", "--set", "model.n_layerz=4"],
}
HEAVY = ("torch", "mlflow")


@pytest.mark.parametrize("args", list(QUICK.values()), ids=list(QUICK))
def test_quick_answers_import_neither_torch_nor_mlflow(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *args], cwd=ROOT, capture_output=True, text=True, env=subprocess_env()
    )
    assert done.returncode in (0, 2), done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    loaded = sorted(name for name in imported if name.split(".")[0] in HEAVY)
    assert not loaded, f"{' '.join(args)} imported {loaded[:5]}"

"""Quick answers stay quick (issue 12): --help and bad input load neither torch nor MLflow (seconds of imports).

Checked by the modules a fresh interpreter imports (python -X importtime), not by timing them; the
times themselves are measured by bench/cli_latency.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, load_script, subprocess_env

QUICK = load_script("bench/cli_latency").COMMANDS  # the commands the bench times
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

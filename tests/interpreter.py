"""Running a probe module under Triton's CPU interpreter, which must be chosen before Triton is imported: in a
process of its own, one JSON line per case on its stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_probe(module: str, *args: str) -> dict[str, dict]:
    """``python -m module args`` with TRITON_INTERPRET=1: its cases by name."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {c["case"]: c for c in map(json.loads, proc.stdout.splitlines())}


def assert_models_agree(cases: dict[str, dict], *names: str) -> None:
    """The probe's model cases: the same parameters get gradients, the loss within 1e-5 and every gradient
    within 1e-4 (relative) of the reference model's."""
    for name in names:
        c = cases[name]
        assert c["same_params"] and c["loss_diff"] < 1e-5 and c["grad_rel"] < 1e-4, c

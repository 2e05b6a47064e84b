"""task=demo (the default): the embedded chain, one stage after another.

Stages that are tasks (prepare, show, train_tokenizer, encode) run in this process with their own task
config, which is a sub-node of this one (task.prepare, task.show, ...), so a stage behaves exactly as
when run alone and stays overridable (`python run.py task.show.per_class=4`). Two stages are not tasks:

  sweep  runs `python run.py -m sweep=<task.sweep.name>` with this command's overrides, as a user would
  fit    runs `python -m analysis fit runs/<sweep>` and prints the fitted law and the plot's path
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from var.errors import UserError
from var.tasks import dispatch

# Overrides of the demo command that the sweep must not inherit (they configure the demo itself).
_NOT_PASSED = ("task", "task.", "sweep", "hydra.", "debug")


def passthrough_overrides() -> list[str]:
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(_NOT_PASSED)]


def run_sweep(cfg: DictConfig, stage: DictConfig) -> dict:
    cmd = [sys.executable, str(Path(sys.argv[0]).resolve()), "-m", f"sweep={stage.name}",
           *passthrough_overrides(), *stage.get("overrides", [])]
    print(" ".join(cmd[1:]))
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"sweep {stage.name} failed (see its output above)")
    return {"sweep_dir": str(Path(cfg.paths.runs_dir) / stage.name)}


def run_fit(cfg: DictConfig, stage: DictConfig) -> dict:
    from analysis.cli import main as analysis_main

    sweep_dir = Path(cfg.paths.runs_dir) / stage.sweep
    args = ["fit", str(sweep_dir), "--bootstrap", str(stage.bootstrap), *stage.get("args", [])]
    print("python -m analysis " + " ".join(args))
    if analysis_main(args) != 0:
        raise UserError(f"fitting {sweep_dir} failed (see above)")
    return {"analysis_dir": str(sweep_dir / "analysis")}


def run(cfg: DictConfig) -> dict:
    results, start = {}, time.time()
    for name in cfg.task.stages:
        stage = cfg.task[name]
        print(f"== {name}  ({time.time() - start:.0f} s)")
        if name == "sweep":
            results[name] = run_sweep(cfg, stage)
        elif name == "fit":
            results[name] = run_fit(cfg, stage)
        else:
            stage_cfg = cfg.copy()
            with open_dict(stage_cfg):
                stage_cfg.task = stage
            results[name] = dispatch(stage_cfg)
    print(f"demo finished in {time.time() - start:.1f} s")
    return results

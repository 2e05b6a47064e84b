"""task=demo (the default): the embedded chain, one stage after another.

Each stage's own task config is a sub-node of this one (task.prepare, task.show, ...), so a stage
behaves exactly as when run alone and stays overridable: `python run.py task.show.per_class=4`.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig, open_dict

from var.tasks import dispatch


def run(cfg: DictConfig) -> dict:
    results, start = {}, time.time()
    for stage in cfg.task.stages:
        stage_cfg = cfg.copy()
        with open_dict(stage_cfg):
            stage_cfg.task = cfg.task[stage]
        print(f"== {stage}")
        results[stage] = dispatch(stage_cfg)
    print(f"demo finished in {time.time() - start:.1f} s")
    return results

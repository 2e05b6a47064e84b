"""Experiment loggers from cfg.logger (CSV by default, W&B optional), shared by the training tasks.

W&B: group = sweep name, job_type = task, name = the run directory's name (conf/logger/wandb.yaml); the
run id is derived from the run directory, so a requeued or re-run job resumes the same W&B run; the
whole resolved config is logged, so a dashboard can group and filter by any key. WANDB_MODE=offline
works with no network.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


def run_id(run_dir: str | Path) -> str:
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def build_loggers(cfg: DictConfig, run_dir: str | Path) -> list:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if name == "wandb":
            derived = {"name": node.get("name") or Path(run_dir).name}
            if node.get("id") is None:
                derived |= {"id": run_id(run_dir), "resume": "allow"}
            node = OmegaConf.merge(node, derived)
        loggers.append(hydra.utils.instantiate(node))
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    config.pop("hydra", None)
    for logger in loggers:
        logger.log_hyperparams({"config": config})
    return loggers

"""Tasks: one small function per `task=` value, wiring configs to modules.

Each task module exposes ``run(cfg) -> dict | None``. ``run_task`` validates the config first and turns a
``UserError`` (bad config value, missing file) into one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from omegaconf import DictConfig

from var.config import validate
from var.errors import UserError

TASKS = ("demo", "prepare", "show", "train_tokenizer", "encode", "train", "sample", "edit", "evaluate")


def dispatch(cfg: DictConfig):
    name = cfg.task.name
    if name not in TASKS:
        raise UserError(f"task={name}: unknown task; choose one of {', '.join(TASKS)}")
    if importlib.util.find_spec(f"var.tasks.{name}") is None:
        raise UserError(f"task={name}: not available in this version")
    module = importlib.import_module(f"var.tasks.{name}")
    return module.run(cfg)


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_task(cfg: DictConfig):
    """Run one task. In a multirun a failing job is reported (and recorded failed by the training task)
    and the sweep goes on with the next grid point; a single run exits with status 2 on a user error."""
    try:
        validate(cfg)
        return dispatch(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if in_multirun():
            return None
        sys.exit(2)
    except Exception as e:
        if not in_multirun():
            raise
        first = str(e).strip().splitlines()
        print(f"error: grid point failed: {type(e).__name__}: {first[0] if first else ''}", file=sys.stderr)
        return None

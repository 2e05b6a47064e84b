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


def run_task(cfg: DictConfig):
    try:
        validate(cfg)
        return dispatch(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

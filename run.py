"""The one entry point: `python run.py task=NAME [overrides]`, or `python run.py -m sweep=NAME` for grids.

With no arguments it runs the embedded demo chain on the generated synthetic dataset (task=demo).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from var.config import preflight, setup

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")

setup()  # resolvers and schemas must exist before Hydra composes the config


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from var.tasks import run_task

    return run_task(cfg)


if __name__ == "__main__":
    problem = preflight(CONFIG_DIR, sys.argv[1:])
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()

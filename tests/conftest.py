"""Shared fixtures: composing the real configs, and small generated datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from var.config import setup

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

setup()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def compose_cfg(overrides: list[str] | None = None, root: Path | None = None):
    """Compose conf/config.yaml like run.py does, with the hydra node resolvable (run dir, etc.)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides or []), return_hydra_config=True)
    if root is not None:
        with open_dict(cfg):
            cfg.paths.root_dir = str(root)
    # The hydra: resolver reads the runtime node, which a real run fills in.
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str((root or REPO) / "runs" / "test-output")
        cfg.hydra.job.override_dirname = ",".join(overrides or [])
    HydraConfig.instance().set_config(cfg)
    return cfg


def resolved(cfg):
    """A resolved copy without the hydra node (what a task sees)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("hydra", None)
    return OmegaConf.create(c)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A small synthetic dataset (10 classes, 32 px), generated once per test session."""
    from var.data.prepare import prepare_synthetic

    root = tmp_path_factory.mktemp("synthetic32")
    data = OmegaConf.create(dict(name="synthetic", root=str(root), seed=0, resolution=32, num_classes=10,
                                 samples_per_shard=100, splits=dict(train=400, val=60, test=60)))
    return prepare_synthetic(data), root

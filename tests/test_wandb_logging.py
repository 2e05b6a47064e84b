"""W&B (offline, no network): group = sweep name, job_type = task, name = run dir, stable resumable id,
the whole resolved config logged."""

from __future__ import annotations

import pytest
from lightning.pytorch.loggers import CSVLogger

from tests.conftest import compose_cfg, resolved
from var.loggers import build_loggers, run_id

wandb = pytest.importorskip("wandb")


def test_wandb_run_is_grouped_named_resumable_and_carries_the_full_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = resolved(compose_cfg(["task=train", "logger=wandb", "sweep_name=scaling_demo", "model.depth=3"],
                               root=tmp_path))
    run_dir = tmp_path / "runs" / "scaling_demo" / "model.depth=3"
    cfg.paths.output_dir = str(run_dir)
    cfg.logger.wandb.save_dir = str(run_dir)
    loggers = build_loggers(cfg, run_dir)
    wb = next(lg for lg in loggers if type(lg).__name__ == "WandbLogger")
    run = wb.experiment
    try:
        assert run.group == "scaling_demo" and run.job_type == "train" and run.name == "model.depth=3"
        assert run.id == run_id(run_dir)  # re-running the same point resumes this W&B run
        logged = dict(run.config)["config"]
        assert logged["model"]["depth"] == 3 and logged["task"]["name"] == "train"
        assert logged["sweep_name"] == "scaling_demo" and "hydra" not in logged
    finally:
        wandb.finish()
    assert any(isinstance(lg, CSVLogger) for lg in loggers)  # CSV stays on beside W&B

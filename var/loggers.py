"""Experiment loggers from cfg.logger (CSV by default, W&B optional), shared by the training tasks.

W&B: group = sweep name, job_type = task, name = the run directory's name (conf/logger/wandb.yaml); the
run id is derived from the run directory, so a requeued or re-run job resumes the same W&B run; the
whole resolved config is logged, so a dashboard can group and filter by any key. WANDB_MODE=offline
works with no network.

CSV: Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, so a run preempted and
resumed in the same directory would keep only its last leg's metrics. ``ResumingCSVLogger`` keeps the
earlier rows and drops only those the resumed leg logs again: the steps a killed leg ran past its last
checkpoint belong to an abandoned trajectory, and the resumed leg replaces them. The file reads as one run.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import hydra
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
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


class ResumingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Replaces the parent's check, which deletes metrics.csv: read its header and rows instead.
        self._earlier_rows: list[dict] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                reader = csv.DictReader(f)
                self.metrics_keys = sorted(reader.fieldnames or [])
                self._earlier_rows = list(reader)

    def save(self) -> None:
        if self._earlier_rows is not None and self.metrics:
            # First save after a resume: keep the earlier legs' rows up to where this leg starts.
            first = min(int(m["step"]) for m in self.metrics)
            kept = [r for r in self._earlier_rows if r.get("step") not in (None, "") and int(r["step"]) < first]
            tmp = self.metrics_file_path + ".tmp"  # a crash mid-write keeps the old file whole
            with self._fs.open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self._fs.mv(tmp, self.metrics_file_path)
            self._earlier_rows = None
        super().save()


class ResumingCSVLogger(CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` whose metrics.csv carries on across resumes (see above)."""

    @property
    @rank_zero_experiment  # other ranks get a no-op writer, as with the parent
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumingExperimentWriter(log_dir=self.log_dir)
        return self._experiment

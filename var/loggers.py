"""Experiment loggers from cfg.logger (CSV by default, W&B optional), shared by the training tasks.

W&B: group = sweep name, job_type = task, name = the run directory's name (conf/logger/wandb.yaml); the
run id is derived from the run directory, so a requeued or re-run job resumes the same W&B run; the
whole resolved config is logged, so a dashboard can group and filter by any key. WANDB_MODE=offline
works with no network.

CSV: Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, so a run preempted and
resumed in the same directory would keep only its last leg's metrics. ``ResumingCSVLogger`` keeps the
earlier rows and drops only those the resumed leg logs again: the steps a killed leg ran past its last
checkpoint belong to an abandoned trajectory, and the resumed leg replaces them. The file reads as one run.
Lightning saves a step's checkpoint before it hands that step's metrics to the loggers, so a leg killed in
between would resume after a step whose row it never wrote; ``LogRowInCheckpoint`` carries that row in the
checkpoint and puts it back into metrics.csv when the run resumes. When a new metric widens the header,
the file is rewritten through a temporary file, so a kill then keeps the rows written before.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import hydra
import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
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


def _row_step(row: dict) -> int | None:
    """A metrics.csv row's step (None where the row has none)."""
    step = row.get("step")
    return None if step in (None, "") else int(step)


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
            self._rewrite([r for r in self._earlier_rows if (step := _row_step(r)) is not None and step < first])
            self._earlier_rows = None
        super().save()

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # The parent truncates metrics.csv and writes it again when a new metric appears: a kill in between
        # would leave a header and no rows. Same rows, through the temporary file.
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        self.metrics_keys = list(fieldnames)
        self._rewrite(rows)

    def _rewrite(self, rows: list[dict]) -> None:
        rows = [{k: v for k, v in r.items() if k is not None} for r in rows]  # None: a torn line's overflow
        self.metrics_keys = sorted(set(self.metrics_keys).union(*rows))
        tmp = self.metrics_file_path + ".tmp"  # a crash mid-write keeps the old file whole
        with self._fs.open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        self._fs.mv(tmp, self.metrics_file_path)

    def restore_row(self, row: dict) -> None:
        """Write back a training row that the killed leg logged too late (see LogRowInCheckpoint), unless a
        row of that step already carries its metrics. Before the resumed leg's first save, which keeps it."""
        if self._earlier_rows is None and self._fs.isfile(self.metrics_file_path):
            return  # this leg has written already: too late to insert a row before it
        rows = self._earlier_rows or []
        keys = set(row) - {"step", "epoch"}
        if any(_row_step(r) == row["step"] and all(r.get(k) not in (None, "") for k in keys) for r in rows):
            return
        rows = sorted([*rows, row], key=lambda r: -1 if _row_step(r) is None else _row_step(r))
        self._rewrite(rows)
        self._earlier_rows = rows


class ResumingCSVLogger(CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` whose metrics.csv carries on across resumes (see above)."""

    @property
    @rank_zero_experiment  # other ranks get a no-op writer, as with the parent
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


class LogRowInCheckpoint(L.Callback):
    """Carries the training step's row of logged metrics in each checkpoint saved at that step's end.

    Lightning runs the checkpoint callbacks in ``on_train_batch_end`` and logs the step's metrics after all
    hooks: a leg killed in between resumes after a step whose row is missing from metrics.csv. The row is
    taken here (this callback runs before the checkpoint callbacks, which Lightning orders last) exactly as
    Lightning is about to log it, and on resume each ``ResumingCSVLogger`` gets it back if it lacks it."""

    def __init__(self):
        self._row: tuple[dict, int, int] | None = None  # (metrics, epoch, step) of the last logged step
        self._restored: dict | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        connector = trainer._logger_connector  # what update_train_step_metrics is about to log, and when
        accumulating = trainer.fit_loop._should_accumulate() and pl_module.automatic_optimization
        metrics = connector.metrics["log"] if connector.should_update_logs and not accumulating else {}
        self._row = (dict(metrics), trainer.current_epoch, trainer.fit_loop.epoch_loop._batches_that_stepped) \
            if metrics else None

    def state_dict(self) -> dict:
        if self._row is None:
            return {"row": None}
        metrics, epoch, step = self._row  # to numbers only here: a checkpoint, not every step, waits for the GPU
        return {"row": {**convert_tensors_to_scalars(metrics), "epoch": epoch, "step": step}}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict.get("row")

    def on_train_start(self, trainer, pl_module) -> None:
        if self._restored and trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, ResumingCSVLogger):
                    logger.experiment.restore_row(dict(self._restored))
        self._restored = None


def logger_callbacks(loggers: list) -> list[L.Callback]:
    """The callbacks the loggers need: the checkpointed log row when metrics.csv carries on across resumes."""
    return [LogRowInCheckpoint()] if any(isinstance(lg, ResumingCSVLogger) for lg in loggers) else []

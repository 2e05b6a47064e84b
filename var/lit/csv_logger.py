"""Lightning's CSV logger, made to survive a resume.

Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, so a run that is preempted and
resumed in the same directory keeps only the metrics of its last leg. This one keeps the earlier rows and
drops only those the resumed leg logs again: the steps a killed leg ran past its last checkpoint belong
to a trajectory that was abandoned, and the resumed leg replaces them. The file then reads as one run.
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


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
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
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

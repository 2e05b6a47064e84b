"""Writes the run's record.json and evaluates the test split at points spaced evenly in log-compute.

For a fixed model, compute is proportional to steps, so evaluation points are log-spaced steps ending at
the last one; every point carries tokens and FLOPs seen (under each FLOP convention) so analysis can put
any run on a loss-vs-compute plot. The final point of a decayed schedule is marked ``annealed``.
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np

from var.lit.schedules import is_annealed
from var.record import RunRecord

log = logging.getLogger(__name__)


def log_spaced_steps(max_steps: int, num_points: int, first_fraction: float = 0.01) -> list[int]:
    """``num_points`` distinct steps from ``first_fraction * max_steps`` to ``max_steps``, log-spaced."""
    first = max(1, round(first_fraction * max_steps))
    steps = np.unique(np.round(np.geomspace(first, max_steps, max(num_points, 1))).astype(int))
    return [int(s) for s in steps if 1 <= s <= max_steps]


class ScalingRecordCallback(L.Callback):
    def __init__(self, run_dir: str, static_fields: dict, flops_per_image: dict[str, float],
                 tokens_per_image: int, global_batch: int, num_eval_points: int = 8,
                 first_eval_fraction: float = 0.01, schedule_kind: str = "official",
                 eval_steps: list[int] | None = None, start_ckpt: str | None = None):
        self.run_dir = run_dir
        self.static_fields = static_fields
        self.flops_per_image = flops_per_image
        self.tokens_per_image = tokens_per_image
        self.global_batch = global_batch
        self.num_eval_points = num_eval_points
        self.first_eval_fraction = first_eval_fraction
        self.schedule_kind = schedule_kind
        # Explicit evaluation steps replace the log-spaced ones (a cooldown branch evaluates its end only).
        self.fixed_eval_steps = list(eval_steps) if eval_steps else None
        # A fit that starts from this checkpoint is a branch starting, not a resume.
        self.start_ckpt = str(start_ckpt) if start_ckpt else None
        self.record: RunRecord | None = None
        self.eval_steps: set[int] = set()
        self.train_started = False

    # ---------------------------------------------------------------------------------------- helpers
    def progress(self, step: int) -> dict:
        images = step * self.global_batch
        return {"step": step, "images_seen": images, "tokens_seen": images * self.tokens_per_image,
                "flops_seen": {k: float(v) * images for k, v in self.flops_per_image.items()}}

    def _save(self, trainer) -> None:
        if trainer.is_global_zero and self.record is not None:
            self.record.save()

    def evaluate(self, trainer, pl_module, step: int) -> dict:
        metrics = pl_module.evaluate_split("test")
        prog = self.progress(step)
        entry = {"step": step, "images_seen": prog["images_seen"], "tokens_seen": prog["tokens_seen"],
                 "flops": prog["flops_seen"], "split": "test",
                 "annealed": is_annealed(step, trainer.max_steps, self.schedule_kind),
                 "lr": _current_lr(trainer), **metrics}
        # Straight to the loggers: this also runs from on_train_end, where LightningModule.log is refused.
        if trainer.is_global_zero:
            values = {f"test/{k}": metrics[k] for k in ("L_mean", "L_last", "err_mean", "err_last")}
            values["test/tokens_seen"] = float(prog["tokens_seen"])
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
        if self.record is not None:
            self.record.add_eval(entry)
            self.record.update(progress=prog)
            if step >= trainer.max_steps:
                self.record.update(final={k: entry[k] for k in ("step", "L_mean", "L_last", "err_mean",
                                                                "err_last", "per_scale_loss", "per_scale_err",
                                                                "n_images")})
        self._save(trainer)
        return entry

    # ------------------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        self.eval_steps = set(self.fixed_eval_steps or
                              log_spaced_steps(trainer.max_steps, self.num_eval_points, self.first_eval_fraction))
        self.record, self.train_started = RunRecord(self.run_dir, **self.static_fields), False
        self.record.update(status="running", error=None, tokens_per_image=self.tokens_per_image,
                           flops_per_image=self.flops_per_image, batch_size=self.global_batch,
                           eval_steps=sorted(self.eval_steps), progress=self.progress(trainer.global_step))
        self._save(trainer)

    def _count_resume(self, trainer) -> bool:
        """Count a fit that resumed (after a kill, a preemption or a requeue); a branch's start is not one."""
        if not trainer.ckpt_path or str(trainer.ckpt_path) == self.start_ckpt:
            return False
        self.record.update(resumes=self.record.data.get("resumes", 0) + 1,
                           progress=self.progress(trainer.global_step))
        return True

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_started = True
        # Not in on_fit_start: under FSDP2 (ModelParallelStrategy) the checkpoint is restored after it.
        if self._count_resume(trainer):
            self._save(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.eval_steps and not any(e["step"] == step for e in self.record["evals"]):
            self.evaluate(trainer, pl_module, step)
        elif step % max(trainer.log_every_n_steps, 1) == 0:
            prog = self.progress(step)
            pl_module.log("progress/tokens_seen", float(prog["tokens_seen"]), rank_zero_only=True)
            for name, value in prog["flops_seen"].items():
                pl_module.log(f"progress/flops_{name}", value, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.record is None:
            return
        step = trainer.global_step
        preempted = any(getattr(cb, "preempted", False) for cb in trainer.callbacks)
        if preempted:
            self.record.update(status="preempted", preemptions=self.record.data.get("preemptions", 0) + 1,
                               progress=self.progress(step))
        elif step >= trainer.max_steps:
            if not any(e["step"] == step for e in self.record["evals"]):
                self.evaluate(trainer, pl_module, step)
            self.record.update(status="complete", progress=self.progress(step))
        self._save(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        # A run killed after its final checkpoint, before its record said complete, resumes at max_steps:
        # Lightning then skips the training loop (no on_train_start / on_train_end), so finish it here.
        if self.record is None or self.train_started:
            return
        self._count_resume(trainer)
        self.on_train_end(trainer, pl_module)  # saves the record

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.record is None or isinstance(exception, KeyboardInterrupt):
            return
        msg = str(exception).strip().splitlines()
        self.record.update(status="failed", error=f"{type(exception).__name__}: {msg[0] if msg else ''}",
                           progress=self.progress(trainer.global_step))
        self._save(trainer)


def _current_lr(trainer) -> float | None:
    """The learning rate the next step would use (the scheduler has already stepped)."""
    opts = getattr(trainer, "optimizers", None) or []
    return float(opts[0].param_groups[0]["lr"]) if opts and opts[0].param_groups else None

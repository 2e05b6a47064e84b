"""Stopping well when things go wrong: non-finite values and preemption signals.

NonFiniteGuard: the first non-finite gradient stops the run *before* the optimizer applies it, with one
line naming the step and the last good checkpoint (which is kept). The loss itself is checked in the
training step, before backward.

PreemptionHandler: SIGTERM (what schedulers send before killing a job) and SIGUSR1 (SLURM's warning
signal with --signal) set a flag; at the end of the current step every rank agrees to stop, an atomic
``last.ckpt`` is written and the run exits cleanly. Re-running the same command resumes from it; the
record counts the preemptions.
"""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import torch

from var.errors import TrainingDiverged


def last_good_checkpoint(trainer) -> str:
    cb = trainer.checkpoint_callback
    path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "") if cb else ""
    return path or "none (no checkpoint written yet)"


class NonFiniteGuard(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bad = False
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                local = g._local_tensor if hasattr(g, "_local_tensor") else g  # FSDP2 DTensor shards
                if not torch.isfinite(local).all():
                    bad = True
                    break
            if bad:
                break
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise TrainingDiverged(f"non-finite gradient at step {trainer.global_step}; "
                                   f"last good checkpoint: {last_good_checkpoint(trainer)}")


class PreemptionHandler(L.Callback):
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, checkpoint_dir: str):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.requested = False
        self.preempted = False
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def _install(self) -> None:
        for sig in self.SIGNALS:
            try:
                previous = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: the launcher handles signals
                continue
            self._previous.setdefault(sig, previous)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._install()

    def on_train_start(self, trainer, pl_module) -> None:
        # After on_fit_start Lightning chains its own SIGTERM handler in front of this one; with several
        # ranks it broadcasts from inside the handler, at whatever point each rank was interrupted, and the
        # ranks deadlock. Only the flag is wanted, acted on by all ranks together at the end of a step.
        self._install()

    def on_fit_end(self, trainer, pl_module) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        # Atomic through the training task's checkpoint IO and strategy (var/lit/checkpoint_io.py), also
        # for a folder of FSDP2 shards, which a rename cannot put over an existing folder.
        trainer.save_checkpoint(self.checkpoint_dir / "last.ckpt")
        self.preempted = True
        trainer.should_stop = True
        # Lightning also notes SIGTERM and would raise at the end of this step; the checkpoint is written,
        # so stop through should_stop instead and exit cleanly.
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None:
            connector.received_sigterm = False

"""Stopping well when things go wrong: non-finite values and preemption signals.

NonFiniteGuard: the first non-finite loss or gradient stops the run *before* the optimizer applies it, with
one line naming the step and the last good checkpoint (which is kept). Both are checked on the device and read
back once per step: a read-back per parameter (~200 per d16 step), or one of the loss between forward and
backward, waits for the GPU each time and leaves it idle while the next work is queued.

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
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [g._local_tensor if hasattr(g, "_local_tensor") else g for g in grads]  # FSDP2 DTensor shards
        grads = [g for g in grads if g.numel()]  # a rank's shard of a small tensor can be empty
        loss = getattr(pl_module, "last_loss", None)  # the training step's, kept on the device
        flags = [torch.zeros((), dtype=torch.bool, device=pl_module.device)] * 2
        if loss is not None:
            flags[0] = ~torch.isfinite(loss.to(pl_module.device)).all()
        if grads:  # the largest |g| of all: inf or nan if any is (max-norms propagate nan; 2-norms could overflow)
            largest = torch._foreach_norm(grads, float("inf"))
            flags[1] = ~torch.isfinite(torch.stack([n.to(pl_module.device) for n in largest]).amax())
        bad_loss, bad_grad = torch.stack(flags).tolist()  # the one read-back of the step
        if trainer.strategy.reduce_boolean_decision(bad_loss or bad_grad, all=False):  # any rank
            what = f"training loss {loss.item()}" if bad_loss else "gradient"
            raise TrainingDiverged(f"non-finite {what} at step {trainer.global_step}; "
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

"""The training step inside Lightning's loop, as ``task=train`` runs it, against the bare step of
bench/train_throughput.py: what the loop, its callbacks and its read-backs from the GPU cost per step.

    python -m bench.train_loop --depth 16 --batch 64 --variant fast_bf16res --out l.jsonl

Each case is a fresh process running ``Trainer.fit`` for ``--warmup`` + ``--steps`` steps on random tokens
(bf16-mixed, clipping at 2.0, the module's fused AdamW and schedule), timed from the end of the warm-up to the
end of the last step; cases differ in what reads values back from the GPU while the steps are queued:

- ``bare``: no callbacks, no progress bar: the loop itself.
- ``task``: what ``task=train`` adds that touches every step: the non-finite guard (one read-back per step),
  the throughput meter and the progress bar refreshing every 10 steps (conf/callbacks/default.yaml).
- ``before``: the guard as it was until 2026-12-08 (one read-back per gradient tensor and the loss read back
  between forward and backward) and the bar refreshing every step.

The same variants as bench/train_throughput.py; that bench's step (no Lightning) is the floor. Never run in
CI (``--device cpu`` is a smoke test of the script).
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch

from bench.common import emit, environment, run_points
from bench.train_throughput import VARIANTS, setup_module
from var.callbacks.fault_guard import NonFiniteGuard
from var.callbacks.throughput import ThroughputCallback
from var.models.flops import flops_per_image

CASES = ("bare", "task", "before")


class PerTensorGuard(L.Callback):
    """The guard as it was: each gradient tensor checked and read back on its own, and the loss read back in
    the training step (here, as soon as the step returns it: before backward, as there)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    raise RuntimeError("non-finite gradient")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not torch.isfinite(loss):
            raise RuntimeError("non-finite loss")


class StepClock(L.Callback):
    """Wall time from the end of step ``warmup`` to the end of the last step, the GPU drained at both ends."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.steps = warmup, None, None, 0

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.t0 = self._now(pl_module)
        elif self.t0 is not None:
            self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self.t1 = self._now(pl_module)


def measure(depth: int, batch: int, variant: str, case: str, steps: int, warmup: int, device: str) -> dict:
    cfg, module = setup_module(depth, variant, device=device)
    g = torch.Generator().manual_seed(0)
    n = batch * (warmup + steps)  # one epoch: no epoch boundary inside the timed steps
    tokens = torch.randint(0, cfg.vocab_size, (n, cfg.seq_len), generator=g)
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, labels), batch_size=batch,
                                         shuffle=True, drop_last=True, pin_memory=device == "cuda")
    clock = StepClock(warmup)
    callbacks = [clock]
    if case == "task":
        callbacks += [NonFiniteGuard(), ThroughputCallback(flops_per_image(cfg)["official_mfu"], cfg.seq_len, batch),
                      L.pytorch.callbacks.TQDMProgressBar(refresh_rate=10)]
    elif case == "before":
        callbacks += [PerTensorGuard(), ThroughputCallback(flops_per_image(cfg)["official_mfu"], cfg.seq_len, batch),
                      L.pytorch.callbacks.TQDMProgressBar(refresh_rate=1)]
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        precision="bf16-mixed" if device == "cuda" else "32-true", max_steps=warmup + steps,
                        max_epochs=-1, gradient_clip_val=2.0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=case != "bare", enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=loader)
    step_s = (clock.t1 - clock.t0) / max(clock.steps, 1)
    record = {"bench": "train_loop", "depth": depth, "batch": batch, "variant": variant, "case": case,
              "steps_timed": clock.steps, "step_ms": round(step_s * 1e3, 2), "img_per_s": round(batch / step_s, 2)}
    if device == "cuda":
        record.update(peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), **environment())
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", action="store_true", help="measure one case in this process")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--variant", default="fast_bf16res", choices=sorted(VARIANTS))
    ap.add_argument("--case", default="task", choices=CASES)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=int, default=420)
    a = ap.parse_args()
    common = ["--depth", str(a.depth), "--batch", str(a.batch), "--variant", a.variant, "--steps", str(a.steps),
              "--warmup", str(a.warmup), "--device", a.device]
    if a.one:
        emit(measure(a.depth, a.batch, a.variant, a.case, a.steps, a.warmup, a.device))
        return
    run_points("bench.train_loop", [[*common, "--case", case] for case in a.cases], a.out, a.timeout)


if __name__ == "__main__":
    main()

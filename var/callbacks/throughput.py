"""Images/s, tokens/s, achieved TFLOP/s and MFU, from wall time between optimizer steps.

MFU divides achieved FLOP/s by the device's dense peak from the project's own table
(var/models/peak_flops.py; Lightning's has no H200). FLOPs per image use the ``official_mfu``
convention by default, the formula of the GPU-performance reference; any convention can be chosen.
On CPU, or on a GPU missing from the table, MFU is not logged.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from var.models.peak_flops import peak_flops


class ThroughputCallback(L.Callback):
    def __init__(self, flops_per_image: float, tokens_per_image: int, global_batch: int, window: int = 20,
                 precision: str = "bf16"):
        self.flops_per_image = flops_per_image
        self.tokens_per_image = tokens_per_image
        self.global_batch = global_batch
        self.window = window
        self.precision = precision
        self._t0: float | None = None
        self._steps = 0
        self.last: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._sync(pl_module)
            self._t0, self._steps = time.perf_counter(), 0

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._steps += 1
        if self._steps < self.window:
            return
        self._sync(pl_module)
        dt = time.perf_counter() - self._t0
        images_per_s = self._steps * self.global_batch / dt
        flops_per_s = images_per_s * self.flops_per_image
        world = max(trainer.world_size, 1)
        self.last = {"perf/images_per_s": images_per_s,
                     "perf/tokens_per_s": images_per_s * self.tokens_per_image,
                     "perf/tflops_per_gpu": flops_per_s / world / 1e12}
        if pl_module.device.type == "cuda":
            peak = peak_flops(self.precision, torch.cuda.get_device_name(pl_module.device))
            if peak:
                self.last["perf/mfu"] = flops_per_s / world / peak
            self.last["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(self.last, rank_zero_only=True)
        self._t0 = None

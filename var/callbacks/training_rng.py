"""Randomness of training that a resumed run replays exactly.

Class dropout (CFG) and drop path draw from torch's global generator. Before every training batch it is
re-seeded from (seed, epoch, batch index, rank), so a step's random draws depend on where the step is in
training and not on everything that ran before it in this process (evaluations, data-loader set-up and
checkpoint loading all touch the global generator, and differently after a resume). Ranks draw
differently from one another; a resume on another world size therefore draws differently too.

The global states of torch, CUDA, numpy and Python are saved in each checkpoint (rank 0's, as plain
tensors and numbers so the file still loads with ``weights_only=True``) and restored before the first
batch after a resume, for anything else that draws from them.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, batch_idx, rank]).generate_state(1, np.uint64)[0] >> 1)


def collect_rng_states() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class TrainingRNG(L.Callback):
    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._pending: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None
        torch.manual_seed(step_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rng": collect_rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict.get("rng")

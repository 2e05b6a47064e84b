"""A callback the resume tests add to a training subprocess (``+callbacks.probe._target_=...``): before
the first step it runs, it gathers the full model (and a resumed optimizer) from every rank, FSDP2 or not,
and rank 0 saves them with the step counter; at the end it saves the losses of the steps it ran."""

from __future__ import annotations

import lightning as L
import torch


class StateProbe(L.Callback):
    def __init__(self, out: str):
        self.out = out
        self.start: dict | None = None
        self.losses: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is not None:
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer = trainer.optimizers[0]
        state = {"model": get_model_state_dict(pl_module, options=opts), "optimizer": None}
        if optimizer.state:  # on a fresh optimizer torch would first take a zero step, changing the run
            state["optimizer"] = get_optimizer_state_dict(pl_module, optimizer, options=opts)
        # On one CPU rank the "gathered" tensors can be the live parameters themselves: copy them now.
        state = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, state)
        self.start = {"step": trainer.global_step, "world": trainer.world_size, **state}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            torch.save({**self.start, "losses": self.losses, "end_step": trainer.global_step}, self.out)

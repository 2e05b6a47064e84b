"""The training order of the token cache: a pure function of (seed, epoch), resumable at any step.

Epoch ``e`` is one permutation of the training samples drawn from ``(seed, e)`` and cut to whole global
batches; global batch ``k`` is its positions ``[k*G, (k+1)*G)`` and rank ``r`` reads every ``world``-th
index of it. So every optimizer step sees the same images whatever the number of ranks, and a resumed run
(even on another world size) skips exactly the global batches of the epoch it has already trained on.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import DistributedSampler

from var.errors import DataError


class ResumableSampler(DistributedSampler):
    """Subclassing DistributedSampler only keeps Lightning from swapping in its own under DDP/FSDP."""

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0):
        super().__init__(range(num_samples), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        if global_batch <= 0 or global_batch % world:
            raise DataError(f"global batch {global_batch} does not split over {world} ranks")
        self.n = int(num_samples)
        self.global_batch = int(global_batch)
        self.batches_per_epoch = self.n // self.global_batch
        if self.batches_per_epoch == 0:
            raise DataError(f"{self.n} training samples do not fill one global batch of {global_batch}")
        self._resume: tuple[int, int] | None = None  # (epoch, global batches of it already trained on)

    def __len__(self) -> int:
        # Always the whole epoch, also when resuming: Lightning counts the batches already done itself.
        return self.batches_per_epoch * self.global_batch // self.num_replicas

    def order(self, epoch: int):
        """The global order of one epoch (whole global batches only)."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return perm[: self.batches_per_epoch * self.global_batch]

    def resume(self, epoch: int, batches: int) -> None:
        self._resume = (int(epoch), int(batches))
        self.epoch = int(epoch)  # with workers, the first iterator is built before Lightning sets the epoch

    def __iter__(self):
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        rest = self.order(self.epoch)[skip * self.global_batch:]
        return iter(rest[self.rank::self.num_replicas].tolist())

    def position(self, batches_done: int) -> dict:
        """What a checkpoint records: the next global batch, and what it depends on (checked on resume)."""
        epoch, done = self.epoch, int(batches_done)
        if done >= self.batches_per_epoch:
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches": done, "samples": self.n, "global_batch": self.global_batch,
                "seed": self.seed}

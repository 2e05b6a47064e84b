"""Per-depth rules of the scaling sweeps, exposed to the sweep YAML files as resolvers.

A sweep axis is the single ``model.depth``; batch size, training length and parallelism follow from it:

- batch: 768 images up to d24 and 1024 from d30, as the official README commands;
- epochs: 200 up to d16, 250 up to d20, 350 above (the paper's 200-350 epochs; d30 reaches 305B tokens);
- parallelism: FSDP2 full sharding from ``fsdp_min_depth`` (d24 = 1.0B params), DDP below.
"""

from __future__ import annotations

import math

from omegaconf import OmegaConf

IMAGENET_TRAIN_IMAGES = 1_281_167


def batch_for_depth(depth: int) -> int:
    return 1024 if int(depth) >= 30 else 768


def epochs_for_depth(depth: int) -> int:
    d = int(depth)
    return 200 if d <= 16 else 250 if d <= 20 else 350


def steps_for(epochs: float, images: int, batch: int) -> int:
    return int(math.ceil(float(epochs) * int(images) / int(batch)))


def parallelism_for(depth: int, fsdp_min_depth: int) -> str:
    return "fsdp" if int(depth) >= int(fsdp_min_depth) else "ddp"


def register() -> None:
    for name, fn in (("batch_for_depth", batch_for_depth), ("epochs_for_depth", epochs_for_depth),
                     ("steps_for", steps_for), ("parallelism_for", parallelism_for)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)

"""Generated-sample side of the distribution metrics: sample N class-conditional images over all ranks.

Image j (of N = len(classes) * per_class, class-major) is class ``classes[j // per_class]`` with the seed
task=sample gives it (``image_seed``), so an evaluated set is exactly the set task=sample writes with the
same settings, whatever the batch size or number of GPUs. Rank r draws j = r, r + world, ...; ranks are
padded to equal batch counts so each batch's features (and, when kept, images) are all-gathered in step,
and rank 0 ends with everything in j order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from var.eval.features import FeatureNet
from var.eval.images import rank_indices, rank_world


def _gather_batch(x: torch.Tensor, device) -> torch.Tensor | None:
    """(b, ...) per rank -> rank 0: (b * world, ...) in global order (row s of rank r is sample r + s * world)."""
    rank, world = rank_world()
    if world == 1:
        return x.cpu()
    parts = [torch.empty_like(x, device=device) for _ in range(world)]
    torch.distributed.all_gather(parts, x.to(device).contiguous())
    if rank != 0:
        return None
    return torch.stack([p.cpu() for p in parts], dim=1).reshape(-1, *x.shape[1:])


@torch.no_grad()
def generate_features(sampler: Callable, net: FeatureNet, classes: list[int], per_class: int, sampling,
                      batch_size: int, device, keep_images: bool = False, progress: bool = True) -> dict | None:
    """Sample and featurise; rank 0 gets {features, logits, labels, images (uint8 NHWC or None)}, others None.

    ``sampler(labels, seeds, **sampling.kwargs())`` returns float images in [0, 1] (a
    var.sampling.fast.ImageSampler); ``sampling`` is a var.sampling.config.SamplingConfig (its seed is the
    base seed).
    """
    from var.sampling.files import image_seed
    from var.sampling.sampler import unit_to_uint8

    rank, world = rank_world()
    n = len(classes) * per_class
    jobs = [(c, i) for c in classes for i in range(per_class)]
    idx, _ = rank_indices(n, rank, world)
    steps = range(0, len(idx), batch_size)
    if progress and rank == 0:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"sample+features x{world}", unit="batch")
    feats, logits, images = [], [], []
    for s in steps:
        chunk = [int(j) for j in idx[s:s + batch_size]]
        labels = torch.tensor([jobs[j][0] for j in chunk])
        seeds = [image_seed(sampling.seed, *jobs[j], per_class) for j in chunk]
        x = sampler(labels, seeds, **sampling.kwargs())
        x8 = unit_to_uint8(x)  # kept NCHW for the feature network
        f, lg = net(x8.to(device))
        f, lg = _gather_batch(f.float(), device), _gather_batch(lg.float(), device)
        x8 = _gather_batch(x8.permute(0, 2, 3, 1), device) if keep_images else None
        if rank == 0:
            feats.append(f)
            logits.append(lg)
            if keep_images:
                images.append(x8)
    if rank != 0:
        return None
    return {"features": torch.cat(feats)[:n].numpy(), "logits": torch.cat(logits)[:n].numpy(),
            "labels": np.asarray([c for c, _ in jobs], dtype=np.int64),
            "images": torch.cat(images)[:n].numpy() if keep_images else None}

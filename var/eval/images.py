"""Image plumbing for evaluation: image-shard splits as uint8 batches, rank splitting, gathering."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from var.data.shards import read_manifest
from var.errors import DataError


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def signed_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (the datamodule's range) -> uint8 [0, 255], exact for images decoded from PNG."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def dataset_manifest(root: str | Path) -> dict:
    manifest = read_manifest(root)
    if manifest is None or "splits" not in manifest:
        raise DataError(f"no image dataset at {root} (manifest.json missing): run `python run.py task=prepare` "
                        f"with the same data config first")
    return manifest


def iter_split(root: str | Path, split: str, batch_size: int, rank: int = 0, world: int = 1,
               num_workers: int = 0, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 (B,3,H,W), labels (B,)) batches of this rank's share of an image-shard split.

    Each sample is read by exactly one rank; ``limit`` keeps the first samples of each rank's share.
    """
    from var.data.datamodule import ImageShardDataModule

    manifest = dataset_manifest(root)
    if split not in manifest["splits"] or not manifest["splits"][split].get("count"):
        raise DataError(f"dataset {root} has no '{split}' split")
    dm = ImageShardDataModule(str(root), int(manifest["resolution"]), batch_size, eval_batch_size=batch_size,
                              num_workers=num_workers, rank=rank, world_size=world)
    dm.setup()
    seen = 0
    for x, y, _ in dm._loader(dm.eval_pipeline(split)):
        if limit is not None and seen >= limit:
            break
        if limit is not None:
            x, y = x[: limit - seen], y[: limit - seen]
        seen += len(y)
        yield signed_to_uint8(x), y


def load_split(root: str | Path, split: str, batch_size: int = 256, limit: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole (small) split in memory: uint8 (N,3,H,W), labels (N,)."""
    xs, ys = [], []
    for x, y in iter_split(root, split, batch_size, limit=limit):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def rank_indices(n: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices i = rank, rank + world, ... padded to ceil(n / world) with masked repeats (equal collectives)."""
    per_rank = math.ceil(n / world)
    idx = torch.arange(rank, n, world)
    keep = torch.ones(per_rank, dtype=torch.bool)
    if len(idx) < per_rank:
        pad = per_rank - len(idx)
        idx = torch.cat([idx, idx[-1:].repeat(pad)]) if len(idx) else torch.zeros(per_rank, dtype=torch.long)
        keep[-pad:] = False
    return idx, keep


def gather_interleaved(x: torch.Tensor, n: int, device) -> torch.Tensor:
    """Undo ``rank_indices``: (per_rank, ...) on every rank -> (n, ...) in the original order, on CPU."""
    rank, world = rank_world()
    if world == 1:
        return x[:n].cpu()
    parts = [torch.empty_like(x, device=device) for _ in range(world)]
    torch.distributed.all_gather(parts, x.to(device).contiguous())
    stacked = torch.stack([p.cpu() for p in parts], dim=1)  # (per_rank, world, ...): row-major = i order
    return stacked.reshape(-1, *x.shape[1:])[:n]


def gather_concat(x: torch.Tensor, device) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) rows, of possibly different n_r, on CPU."""
    rank, world = rank_world()
    if world == 1:
        return x.cpu()
    n = torch.tensor([len(x)], device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: len(x)] = x.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())].cpu() for p, s in zip(parts, sizes)])


"""Test loss of a transformer on a token split: the scaling-law metric.

One function serves training (evaluation points in log-compute) and ``task=evaluate``, so the number a
run logs at a step is the number a later evaluation of that step's checkpoint reports. Every rank runs
the same number of forward passes (needed under FSDP, where a forward is a collective): ranks take
samples i = rank, rank + world, ... and pad with a masked repeat of their last sample.
"""

from __future__ import annotations

import contextlib
import math

import torch

from var.lit.token_metrics import TokenMetricSums


def split_scales(tokens_BL: torch.Tensor, patch_nums: list[int]) -> list[torch.Tensor]:
    out, start = [], 0
    for p in patch_nums:
        out.append(tokens_BL[:, start:start + p * p])
        start += p * p
    return out


@torch.no_grad()
def evaluate_token_loss(model, quantizer, tokens: torch.Tensor, labels: torch.Tensor, patch_nums: list[int],
                        batch_size: int, device, rank: int = 0, world: int = 1,
                        autocast=contextlib.nullcontext, progress: bool = False) -> dict:
    """Metrics of ``model`` over all samples of (tokens (N, L), labels (N,)), exact across ranks."""
    n = len(labels)
    per_rank = math.ceil(n / world)
    idx = torch.arange(rank, n, world)
    keep = torch.ones(per_rank, dtype=torch.bool)
    if len(idx) < per_rank:  # pad this rank to the common length with masked repeats
        pad = per_rank - len(idx)
        idx = torch.cat([idx, idx[-1:].repeat(pad)]) if len(idx) else torch.zeros(per_rank, dtype=torch.long)
        keep[-pad:] = False
    sums = TokenMetricSums(patch_nums, device=device)
    was_training = model.training
    model.eval()
    steps = range(0, per_rank, batch_size)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="test loss", unit="batch")
    for s in steps:
        b = idx[s:s + batch_size]
        tok = tokens[b].to(device, non_blocking=True)
        lab = labels[b].to(device, non_blocking=True)
        x = quantizer.idxBl_to_var_input(split_scales(tok, patch_nums))
        with autocast():
            logits = model(lab, x)
        sums.update(logits, tok, keep[s:s + batch_size].to(device))
    model.train(was_training)
    sums.all_reduce()
    return sums.compute()

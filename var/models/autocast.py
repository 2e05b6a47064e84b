"""The dtype a tensor's matmuls run in: autocast's where it is on for the tensor's device, else the tensor's own.
For code that casts once itself where autocast would cast at every op (custom ops, fused kernels)."""

from __future__ import annotations

import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype

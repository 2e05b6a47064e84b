"""Loading a trained transformer: from a run directory, one of its Lightning checkpoints, or a released file.

Our training checkpoints are Lightning checkpoints whose ``hyper_parameters["model"]`` holds the VAR
config and whose ``state_dict`` keys start with ``var.``; the frozen quantizer is stored beside it
(``quantizer.*``). Everything goes through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from var.checkpoints import CheckpointError, load_strict, safe_load, strip_prefix
from var.models.transformer import VAR
from var.models.zoo import VARConfig, build_var, load_released_var


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory means its ``checkpoints/last.ckpt``."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoints" / "last.ckpt").exists():
        return path / "checkpoints" / "last.ckpt"
    return path


def load_var(path: str | os.PathLike, device: str | torch.device = "cpu", depth: int | None = None
             ) -> tuple[VAR, VARConfig, dict]:
    """(model in eval mode, its config, the checkpoint's hyper-parameters) from any accepted file.

    A released ``var_d{depth}.pth`` needs ``depth`` (its file holds no config).
    """
    ckpt = resolve_checkpoint(path)
    if ckpt.is_dir() and not (ckpt / ".metadata").exists():
        raise CheckpointError(f"{ckpt}: a run directory without checkpoints/last.ckpt")
    if ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: a sharded (distributed) checkpoint; consolidate it first with "
                              "torch.distributed.checkpoint.format_utils.dcp_to_torch_save")
    obj = safe_load(ckpt, "VAR checkpoint")
    if isinstance(obj, dict) and "hyper_parameters" in obj and "state_dict" in obj:
        hp = dict(obj["hyper_parameters"])
        m = dict(hp["model"])
        cfg = VARConfig(**{**m, "patch_nums": tuple(m["patch_nums"])})
        model = build_var(cfg)
        load_strict(model, strip_prefix(obj["state_dict"], "var."), f"VAR checkpoint {ckpt}")
        return model.to(device).eval(), cfg, hp
    if depth is None:
        raise CheckpointError(f"{ckpt}: a bare state dict (released weights?); pass its depth")
    model = load_released_var(ckpt, depth, device=device)
    return model.eval(), VARConfig(depth=depth) if depth != 36 else None, {}


def load_quantizer_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The frozen quantizer weights a training checkpoint carries (keys without the ``quantizer.`` prefix)."""
    obj = safe_load(resolve_checkpoint(path), "VAR checkpoint")
    return strip_prefix(obj.get("state_dict", {}), "quantizer.")

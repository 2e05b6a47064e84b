"""Loading weights from disk: the released official checkpoints and our own.

Everything goes through ``torch.load(weights_only=True)``: a file that would run code when unpickled is
refused instead of executed. Nothing is ever downloaded; a missing file is one clear error that says where
the file comes from.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from var.errors import UserError

# Where each released file comes from, for the error message when it is absent.
RELEASED_SOURCES = {
    "vae_ch160v4096z32.pth": "https://huggingface.co/FoundationVision/var/resolve/main/vae_ch160v4096z32.pth",
    "var_d16.pth": "https://huggingface.co/FoundationVision/var/resolve/main/var_d16.pth",
    "var_d20.pth": "https://huggingface.co/FoundationVision/var/resolve/main/var_d20.pth",
    "var_d24.pth": "https://huggingface.co/FoundationVision/var/resolve/main/var_d24.pth",
    "var_d30.pth": "https://huggingface.co/FoundationVision/var/resolve/main/var_d30.pth",
}


class CheckpointError(UserError):
    """A weight file is missing, unsafe, or does not match the model (a one-line error for the user)."""


def safe_load(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """``torch.load`` restricted to tensors and plain containers; one-line errors for the usual faults."""
    path = Path(path)
    if not path.is_file():
        hint = RELEASED_SOURCES.get(path.name)
        where = f"; download it from {hint} and point the config at it" if hint else ""
        raise CheckpointError(f"{what} not found: {path}{where}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (truncated zip), ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what} {path} cannot be loaded safely (weights_only=True): {first}") from None


def unwrap_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """Accept a bare state dict, a Lightning checkpoint, or the official trainer checkpoint layout."""
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"]
    trainer = obj.get("trainer") if isinstance(obj.get("trainer"), dict) else None
    if trainer is not None and isinstance(trainer.get("var_wo_ddp"), dict):
        return trainer["var_wo_ddp"]
    return obj


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep the keys under ``prefix`` (e.g. ``"model."`` of a LightningModule) with the prefix removed."""
    if not prefix:
        return dict(sd)
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Strict load that names every missing, unexpected and mis-shaped key in one error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shape = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        if shape:
            parts.append(f"shape mismatches {shape[:10]}")
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def load_weights(model: nn.Module, path: str | os.PathLike, what: str = "checkpoint", prefix: str = "") -> nn.Module:
    """Load a weight file into ``model`` strictly and safely; returns the model."""
    sd = unwrap_state_dict(safe_load(path, what))
    load_strict(model, strip_prefix(sd, prefix) if prefix else sd, f"{what} {path}")
    return model

"""The tokenizer file: weights with their config beside them, so any task can rebuild the model.

Our format is a dict ``{"kind": "vqvae", "config": {...VQVAEConfig...}, "state_dict": {...},
"meta": {...}}`` saved atomically. ``load_tokenizer`` also accepts the released
``vae_ch160v4096z32.pth`` (a bare state dict with the official key names). Both go through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict
from pathlib import Path

import torch

from var.checkpoints import CheckpointError, load_strict, safe_load
from var.data.shards import atomic_write_bytes, sha256_file
from var.models.vqvae import PRESETS, VQVAE, VQVAEConfig, load_released_vqvae

KIND = "vqvae"


def save_tokenizer(path: str | os.PathLike, model: VQVAE, meta: dict | None = None) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"kind": KIND, "config": {k: list(v) if isinstance(v, tuple) else v
                                     for k, v in asdict(model.config).items()},
            "state_dict": state, "meta": dict(meta or {})}
    buf = io.BytesIO()
    torch.save(blob, buf)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu", frozen: bool = True,
                   patch_nums: tuple[int, ...] | None = None) -> VQVAE:
    """A trained (our format) or released tokenizer, strictly loaded; frozen (eval, no grad) by default."""
    obj = safe_load(path, "tokenizer")
    if isinstance(obj, dict) and obj.get("kind") == KIND:
        cfg = dict(obj["config"])
        if patch_nums is not None:
            cfg["patch_nums"] = tuple(patch_nums)
        model = VQVAE(VQVAEConfig(**cfg))
        load_strict(model, obj["state_dict"], f"tokenizer {path}")
        model = model.to(device)
        if frozen:
            model.eval().requires_grad_(False)
        return model
    if isinstance(obj, dict) and "quantize.embedding.weight" in obj:
        cfg = PRESETS["vae_ch160v4096z32"]
        if patch_nums is not None:
            cfg = VQVAEConfig(**{**asdict(cfg), "patch_nums": tuple(patch_nums)})
        return load_released_vqvae(path, cfg, device=device, frozen=frozen)
    raise CheckpointError(f"tokenizer {path}: neither a tokenizer file of this project nor the released VQVAE")


def tokenizer_id(path: str | os.PathLike) -> dict:
    """What a token cache records about the tokenizer that made it."""
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}

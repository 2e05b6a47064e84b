"""Shared plumbing of task=sample and task=edit: load the transformer and its tokenizer, pick devices.

A training run records its whole config in ``<run_dir>/record.json``; its ``task.tokens`` token cache names
the tokenizer file in ``manifest.json`` (``tokenizer.path``). So ``task.ckpt=<run dir>`` alone is enough;
``task.tokenizer_path`` overrides that (and is needed for released weights).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from var.checkpoints import CheckpointError
from var.data.shards import read_manifest
from var.errors import ConfigError, DataError
from var.record import read_record
from var.tokenizer_file import load_tokenizer
from var.var_file import load_quantizer_state, load_var, resolve_checkpoint


def run_dir_of_checkpoint(ckpt: str | os.PathLike) -> Path:
    """A run directory, or the run a ``<run>/checkpoints/*.ckpt`` file belongs to."""
    p = Path(ckpt)
    if p.is_dir():
        return p
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def find_tokenizer_path(ckpt: str | os.PathLike, given: str | None) -> Path:
    """task.tokenizer_path if set, else the tokenizer the run was trained with (record.json -> token cache)."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise DataError(f"task.tokenizer_path={given}: no such file")
        return path
    run_dir = run_dir_of_checkpoint(ckpt)
    record = read_record(run_dir / "record.json") or {}
    task = (record.get("config") or {}).get("task") or {}
    if task.get("tokenizer_path"):
        return find_tokenizer_path(ckpt, task["tokenizer_path"])
    manifest = read_manifest(task["tokens"]) if task.get("tokens") else None
    path = ((manifest or {}).get("tokenizer") or {}).get("path")
    if not path:
        where = f"token cache {task['tokens']}" if task.get("tokens") else f"{run_dir}/record.json"
        raise ConfigError(f"task.tokenizer_path: not set, and {where} does not name the tokenizer; set it")
    if not Path(path).is_file():
        raise DataError(f"tokenizer {path} (named by the run's token cache) is missing; set task.tokenizer_path")
    return Path(path)


def load_models(task: DictConfig, device: torch.device):
    """(VAR in eval mode, tokenizer in eval mode, VARConfig) for ``task.ckpt`` / ``task.tokenizer_path``."""
    ckpt = task.get("ckpt")
    if not ckpt:
        raise ConfigError("task.ckpt: required (a training run directory or a checkpoint file)")
    if not Path(ckpt).exists():
        raise DataError(f"task.ckpt={ckpt}: no such file or directory")
    if Path(ckpt).is_dir() and not resolve_checkpoint(ckpt).exists():
        raise DataError(f"task.ckpt={ckpt}: no checkpoints/last.ckpt in this run directory")
    try:
        model, var_cfg, _ = load_var(ckpt, device=device, depth=task.get("depth"))
        tok_path = find_tokenizer_path(ckpt, task.get("tokenizer_path"))
        vqvae = load_tokenizer(tok_path, device=device, patch_nums=tuple(model.patch_nums))
        trained_with = load_quantizer_state(ckpt).get("embedding.weight")
    except CheckpointError as e:
        raise DataError(str(e)) from None
    # The transformer's tokens mean nothing with another codebook: refuse rather than decode noise.
    if trained_with is not None and not torch.equal(trained_with.float().cpu(),
                                                    vqvae.quantize.embedding.weight.float().cpu()):
        raise ConfigError(f"task.tokenizer_path: {tok_path} is not the tokenizer {resolve_checkpoint(ckpt)} "
                          "was trained with (its codebook differs)")
    if model.Cvae != vqvae.Cvae or model.V != vqvae.V:
        raise ConfigError(f"task.tokenizer_path: {tok_path} has vocab {vqvae.V} / Cvae {vqvae.Cvae}, the "
                          f"transformer {model.V} / {model.Cvae}")
    return model, vqvae, var_cfg


def pick_device(spec: str | None, local_rank: int = 0) -> torch.device:
    spec = str(spec or "auto")
    if spec == "auto":
        spec = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"task.device={spec}: no CUDA device here")
    device = torch.device(spec)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of task.precision (None: fp32, no autocast); auto is bf16 on CUDA, fp32 elsewhere."""
    precision = str(precision)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return None
    if precision not in _DTYPES:
        raise ConfigError(f"task.precision={precision}: expected auto | fp32 | bf16 | fp16")
    return _DTYPES[precision]


def autocast_for(precision: str, device: torch.device) -> Callable:
    """A zero-argument context factory for the transformer (see autocast_dtype)."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class Ranks:
    """Rank, world and device of this process; several GPUs through Fabric (trainer=ddp, or torchrun)."""

    def __init__(self, cfg: DictConfig):
        self.fabric = None
        t = cfg.trainer
        multi = (t.get("parallelism") or {}).get("kind", "none") != "none"
        external = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            self.device = pick_device(cfg.task.get("device"), int(os.environ.get("LOCAL_RANK", 0)))
        elif multi or external:
            from lightning.fabric import Fabric

            devices = int(os.environ["LOCAL_WORLD_SIZE"]) if external and "LOCAL_WORLD_SIZE" in os.environ \
                else t.devices
            accel = t.accelerator if multi else ("gpu" if torch.cuda.is_available() else "cpu")
            self.fabric = Fabric(accelerator=accel, devices=devices, num_nodes=t.get("num_nodes", 1),
                                 strategy="ddp", precision="32-true")
            self.fabric.launch()
            self.rank, self.world, self.device = self.fabric.global_rank, self.fabric.world_size, self.fabric.device
        else:
            self.rank, self.world, self.device = 0, 1, pick_device(cfg.task.get("device"))

    def barrier(self) -> None:
        if self.fabric is not None:
            self.fabric.barrier()
        elif self.world > 1:
            torch.distributed.barrier()

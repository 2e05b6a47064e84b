"""Where task=train gets its tokens: ``task.source=tokens`` (a token cache, ``task.tokens``) or
``task.source=images`` (the image shards of ``data.*``, encoded on the fly by the frozen tokenizer; see
var/data/image_tokens.py). Both give the training step the same (tokens, labels) batches.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from var.data.datamodule import ImageShardDataModule
from var.data.image_tokens import ImageTokenDataModule
from var.data.shards import read_manifest
from var.errors import ConfigError
from var.tokenizer_file import tokenizer_id

SOURCES = ("tokens", "images")


def source_of(cfg: DictConfig) -> str:
    """task.source, checked to be usable: one line naming what is missing and how to make it."""
    task, data = cfg.task, cfg.data
    source = task.get("source") or "tokens"
    if source not in SOURCES:
        raise ConfigError(f"task.source={source}: expected tokens | images")
    if source == "tokens":
        manifest = read_manifest(task.tokens)
        if manifest is None or manifest.get("kind") != "token_shards":
            raise ConfigError(f"task.source=tokens: no token cache at task.tokens={task.tokens}; run `python run.py "
                              f"task=encode`, or train from the images with task.source=images")
    elif read_manifest(data.root) is None:
        raise ConfigError(f"task.source=images: no image dataset at data.root={data.root}; run `python run.py "
                          f"task=prepare`, or train from a token cache with task.source=tokens")
    return source


def image_source(cfg: DictConfig, world: int) -> tuple[ImageTokenDataModule, torch.nn.Module, dict, Path]:
    """(datamodule, the tokenizer's quantizer, what the record says of the source, tokenizer path)."""
    from var.tasks.encode import load_checked, tokenizer_path  # the checks task=encode makes

    task = cfg.task
    path = tokenizer_path(cfg)
    tokenizer = load_checked(cfg, path, torch.device("cpu"))
    data = OmegaConf.to_container(cfg.data, resolve=True)
    images = ImageShardDataModule(**{**data, "batch_size": task.batch_size // world,
                                     "eval_batch_size": task.eval_batch_size})
    dm = ImageTokenDataModule(images, tokenizer, num_classes=int(data["num_classes"]), eval_limit=task.eval_limit)
    dm.setup()
    info = {"kind": "images", "root": str(data["root"]), "fingerprint": dm.manifest.get("fingerprint"),
            "hflip": bool(data.get("hflip", True)), "tokenizer": tokenizer_id(path)}
    return dm, tokenizer.quantize, info, path

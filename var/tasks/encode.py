"""task=encode: run a frozen tokenizer over the image shards and cache the multi-scale tokens.

Every image of each split is encoded twice, as is (variant 0) and flipped left-right (variant 1), into
token shards in the format of var/data/tokens.py. Several ranks (trainer=ddp, or torchrun) each write
their own shards ``{split}-r{rank:03d}-NNNNNN.tar`` from a disjoint part of the split. Rank 0 then proves
the cache complete (every source key exactly once per variant) and writes manifest.json last; a
directory without one is incomplete. A cache made from the same source data by the same tokenizer file
(sha256) is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from var.checkpoints import CheckpointError
from var.data.datamodule import ImageShardDataModule
from var.data.image_tokens import images_to_tokens
from var.data.shards import MANIFEST, ShardWriter, atomic_write_json, read_manifest, sha256_file, split_urls
from var.data.tokens import VARIANTS, token_sample
from var.errors import ConfigError, DataError
from var.tasks.train_tokenizer import default_tokenizer_path, vqvae_config
from var.tokenizer_file import load_tokenizer, tokenizer_id

# Fields that fix what the tokens mean; a tokenizer file must agree with cfg.tokenizer on them.
_ARCH_FIELDS = ("vocab_size", "z_channels", "ch", "ch_mult", "num_res_blocks", "patch_nums", "quant_resi",
                "share_quant_resi")


# ------------------------------------------------------------------------------------------ tokenizer
def tokenizer_path(cfg: DictConfig) -> Path:
    path = Path(cfg.task.get("tokenizer_path") or default_tokenizer_path(cfg))
    if not path.is_file():
        hint = ("download it (see conf/tokenizer/" + str(cfg.tokenizer.preset) + ".yaml)"
                if cfg.tokenizer.get("released") else
                "run `python run.py task=train_tokenizer` with the same data/tokenizer overrides first")
        raise DataError(f"no tokenizer at {path}: {hint}, or set task.tokenizer_path")
    return path


def load_checked(cfg: DictConfig, path: Path, device: torch.device):
    """Load the tokenizer and check it matches cfg.tokenizer (the cache is named after that preset)."""
    want = vqvae_config(cfg.tokenizer)
    try:
        model = load_tokenizer(path, device=device, frozen=True,
                               patch_nums=want.patch_nums if cfg.tokenizer.get("released") else None)
    except CheckpointError as e:
        raise DataError(str(e)) from None
    have = model.config
    for name in _ARCH_FIELDS:
        if tuple(np.atleast_1d(getattr(have, name))) != tuple(np.atleast_1d(getattr(want, name))):
            raise ConfigError(f"tokenizer {path} has {name}={getattr(have, name)} but tokenizer={cfg.tokenizer.preset} "
                              f"says {getattr(want, name)}: pass the tokenizer=PRESET it was trained with")
    res = int(cfg.data.resolution)
    if res // have.downsample != have.patch_nums[-1] or res % have.downsample:
        raise ConfigError(f"data.resolution={res}: tokenizer {path} tiles "
                          f"{have.patch_nums[-1] * have.downsample} px images")
    if have.vocab_size > 65536:
        raise ConfigError(f"tokenizer {path}: vocab_size {have.vocab_size} does not fit the uint16 token shards")
    return model


# --------------------------------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_split(model, dm: ImageShardDataModule, split: str, out: Path, variants: list[int], rank: int,
                 world: int, device: torch.device, samples_per_shard: int) -> int:
    """Write this rank's share of ``split``; returns the number of source images encoded."""
    loader = dm._loader(dm.eval_pipeline(split))  # skips and counts corrupt images, fails past the limit
    total = math.ceil(dm.split_size(split) / world)
    n = 0
    with ShardWriter(out, f"{split}-r{rank:03d}", samples_per_shard) as writer, \
            tqdm(total=total, desc=f"encode {split}", unit="img", disable=rank != 0, leave=False) as bar:
        for x, labels, keys in loader:
            x = x.to(device)
            # The flip is explicit (width axis), never the datamodule's random train augmentation.
            views = torch.cat([torch.flip(x, dims=[3]) if v else x for v in variants])
            tokens = images_to_tokens(model, views).cpu().numpy()
            B = len(keys)
            for i, key in enumerate(keys):
                for j, v in enumerate(variants):
                    writer.write(token_sample(key, v, tokens[j * B + i], int(labels[i])))
            n += B
            bar.update(B)
    return n


def _tar_keys(path: Path | str) -> list[str]:
    """Sample keys of a tar shard from its member names only (no payload is read).

    A truncated shard gives the keys before the damage; the encoder counted what it lost."""
    names = []
    try:
        with tarfile.open(path, "r") as tar:
            names += [m.name.partition(".")[0] for m in tar if m.isfile()]
    except (tarfile.TarError, EOFError, OSError):
        pass
    return [k for i, k in enumerate(names) if i == 0 or names[i - 1] != k]


def check_complete(out: Path, src_root: str, src_manifest: dict, split: str, variants: list[int],
                   skipped: int = 0) -> dict:
    """Prove every source key of ``split`` appears exactly once per variant, but for at most ``skipped``
    images the reader skipped as corrupt (each then has no variant); return the split's manifest entry."""
    source = [k for url in split_urls(src_root, split, src_manifest) for k in _tar_keys(url)]
    expected_count = int(src_manifest["splits"][split]["count"])
    lost = expected_count - len(source)  # keys past the damage of a truncated source shard
    if not 0 <= lost <= skipped or len(set(source)) != len(source):
        raise DataError(f"source dataset {src_root} split {split}: {len(source)} samples ({len(set(source))} "
                        f"distinct) but its manifest says {expected_count}; re-run task=prepare")
    shards = sorted(out.glob(f"{split}-r*.tar"))
    seen = Counter(k for s in shards for k in _tar_keys(s))
    want = {f"{k}_v{v}" for k in source for v in variants}
    missing, extra = want - seen.keys(), seen.keys() - want
    dups = [k for k, c in seen.items() if c > 1]
    unread = {k.rsplit("_v", 1)[0] for k in missing}
    whole = all(f"{k}_v{v}" in missing for k in unread for v in variants)
    if extra or dups or not whole or len(unread) + lost > skipped:
        example = next(iter(missing or extra or dups))
        raise DataError(f"token cache {out} split {split} is incomplete: {len(missing)} missing, {len(extra)} "
                        f"unexpected, {len(dups)} duplicated samples (e.g. {example}); re-run with task.force=true")
    return {"count": sum(seen.values()), "images": len(source) - len(unread), "skipped": len(unread) + lost,
            "shards": [s.name for s in shards], "shard_counts": [len(_tar_keys(s)) for s in shards],
            "sha256": [sha256_file(s) for s in shards]}


def _clear(out: Path) -> None:
    """Remove a previous cache (manifest first, so an interrupted re-encode never looks complete)."""
    (out / MANIFEST).unlink(missing_ok=True)
    for pattern in ("*-r[0-9][0-9][0-9]-*.tar", "*.tmp", "*.npz"):
        for p in out.glob(pattern):
            p.unlink()


def _up_to_date(old: dict | None, src: dict, tok: dict, variants: list[int], splits: list[str],
                patch_nums: list[int]) -> bool:
    return (old is not None and old.get("kind") == "token_shards"
            and old.get("source", {}).get("fingerprint") == src.get("fingerprint")
            and old.get("tokenizer", {}).get("sha256") == tok["sha256"]
            and old.get("patch_nums") == patch_nums  # the released weights serve several schedules
            and old.get("variants") == [VARIANTS[v] for v in variants]
            and set(splits) <= set(old.get("splits", {})))


def _fabric(cfg: DictConfig):
    """One process per device of cfg.trainer (a no-op launch on one device) for data-parallel encoding."""
    from lightning.fabric import Fabric

    t = cfg.trainer
    multi = (t.get("parallelism") or {}).get("kind", "none") != "none"
    fabric = Fabric(accelerator=t.accelerator, devices=t.devices if multi else 1, num_nodes=t.get("num_nodes", 1),
                    strategy="ddp" if multi else "auto", precision="32-true")
    fabric.launch()
    return fabric


# ------------------------------------------------------------------------------------------------ task
def run(cfg: DictConfig) -> dict:
    task, data = cfg.task, cfg.data
    src = read_manifest(data.root)
    if src is None:
        raise DataError(f"no dataset at {data.root} (manifest.json missing): run `python run.py task=prepare` first")
    variants = sorted({int(v) for v in task.variants})
    if not variants or any(v not in (0, 1) for v in variants):
        raise ConfigError(f"task.variants={list(task.variants)}: choose from 0 (the image) and 1 (its flip)")
    splits = [s for s in task.splits if s in src["splits"]]
    if not splits:
        raise ConfigError(f"task.splits={list(task.splits)}: dataset {data.root} has {list(src['splits'])}")
    path = tokenizer_path(cfg)
    tok = tokenizer_id(path)
    out = Path(task.out)
    old = read_manifest(out)
    if not task.force and _up_to_date(old, src, tok, variants, splits, list(cfg.tokenizer.patch_nums)):
        print(f"found token cache {out} made from this data by this tokenizer; skipping (task.force=true re-encodes)")
        return old

    fabric = _fabric(cfg)
    rank, world = fabric.global_rank, fabric.world_size
    model = load_checked(cfg, path, fabric.device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _clear(out)
    fabric.barrier()
    dm = ImageShardDataModule(**{**OmegaConf.to_container(data, resolve=True), "rank": rank, "world_size": world})
    dm.setup()
    for split in splits:
        encode_split(model, dm, split, out, variants, rank, world, fabric.device, int(task.samples_per_shard))
    faults = dm.fault_summary()  # summed over ranks: every rank takes part
    fabric.barrier()
    manifest = None
    if rank == 0:
        manifest = write_manifest(cfg, out, src, splits, variants, model, tok, faults)
        counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
        print(f"token cache written to {out}: {counts} samples ({len(variants)} per image), "
              f"{manifest['seq_len']} tokens each")
    fabric.barrier()
    return manifest or read_manifest(out)


def write_manifest(cfg: DictConfig, out: Path, src: dict, splits: list[str], variants: list[int], model,
                   tok: dict, faults: dict | None = None) -> dict:
    skipped = {s: v["skipped"] for s, v in (faults or {}).get("splits", {}).items()}
    entries = {s: check_complete(out, cfg.data.root, src, s, variants, skipped.get(s, 0)) for s in splits}
    fp = hashlib.sha256(tok["sha256"].encode())
    for s in sorted(entries):
        for digest in entries[s]["sha256"]:
            fp.update(digest.encode())
    c = model.config
    manifest = {
        "kind": "token_shards",
        "patch_nums": list(c.patch_nums),
        "vocab_size": int(c.vocab_size),
        "seq_len": int(c.num_tokens),
        "resolution": int(cfg.data.resolution),
        "num_classes": int(src.get("num_classes", cfg.data.num_classes)),
        "classes": src.get("classes", []),
        "variants": [VARIANTS[v] for v in variants],
        "source": {"root": str(cfg.data.root), "name": src.get("name"), "fingerprint": src.get("fingerprint")},
        "tokenizer": {**tok, "preset": str(cfg.tokenizer.preset),
                      "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(c).items()}},
        "splits": entries,
        "fingerprint": fp.hexdigest()[:16],
        "data_faults": faults,  # corrupt source images skipped while encoding
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest

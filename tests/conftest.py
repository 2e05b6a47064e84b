"""Shared fixtures: composing the real configs, and small generated datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from var.config import setup

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

setup()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def compose_cfg(overrides: list[str] | None = None, root: Path | None = None):
    """Compose conf/config.yaml like run.py does, with the hydra node resolvable (run dir, etc.)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides or []), return_hydra_config=True)
    if root is not None:
        with open_dict(cfg):
            cfg.paths.root_dir = str(root)
    # The hydra: resolver reads the runtime node, which a real run fills in.
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(root / "run") if root else str(REPO / "runs" / "test-output")
        cfg.hydra.job.override_dirname = ",".join(overrides or [])
    HydraConfig.instance().set_config(cfg)
    return cfg


def resolved(cfg):
    """A resolved copy without the hydra node (what a task sees)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("hydra", None)
    return OmegaConf.create(c)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A small synthetic dataset (10 classes, 32 px), generated once per test session."""
    from var.data.prepare import prepare_synthetic

    root = tmp_path_factory.mktemp("synthetic32")
    data = OmegaConf.create(dict(name="synthetic", root=str(root), seed=0, resolution=32, num_classes=10,
                                 samples_per_shard=100, splits=dict(train=400, val=60, test=60)))
    return prepare_synthetic(data), root


def write_token_cache(root: Path, image_root: Path, tokenizer, patch_nums, num_classes: int = 10,
                      splits=("train", "val", "test")) -> dict:
    """Encode an image-shard dataset with ``tokenizer`` into token shards (both variants), for tests
    of the transformer that should not depend on the encode task."""
    import numpy as np

    from var.data.datamodule import decode_sample
    from var.data.prepare import _finish
    from var.data.shards import ShardWriter, iter_tar_samples, read_manifest, split_urls
    from var.data.tokens import token_sample
    from var.tokenizer_file import save_tokenizer, tokenizer_id

    root.mkdir(parents=True, exist_ok=True)
    tok_path = root / "tokenizer.pt"
    save_tokenizer(tok_path, tokenizer)
    src = read_manifest(image_root)
    writers = {}
    for split in splits:
        with ShardWriter(root, split, 10_000) as w:
            for url in split_urls(image_root, split, src):
                samples = list(iter_tar_samples(url))
                for s in samples:
                    s["__url__"] = url
                x = torch.stack([decode_sample(s, src["resolution"])[0] for s in samples])
                for variant, imgs in ((0, x), (1, torch.flip(x, dims=[3]))):
                    with torch.no_grad():
                        idx = torch.cat(tokenizer.img_to_idxBl(imgs), dim=1).numpy()
                    for s, t in zip(samples, idx):
                        w.write(token_sample(s["__key__"], variant, t.astype(np.uint16), int(s["cls"])))
        writers[split] = w
    manifest = {"kind": "token_shards", "patch_nums": list(patch_nums), "vocab_size": tokenizer.vocab_size,
                "num_classes": num_classes, "variants": [0, 1],
                "source": {"root": str(image_root), "fingerprint": src["fingerprint"]},
                "tokenizer": tokenizer_id(tok_path)}
    return _finish(root, manifest, writers)


@pytest.fixture(scope="session")
def small_token_cache(small_dataset, tmp_path_factory):
    """Tokens of the small dataset under a random vq_test32 tokenizer (4 scales, 64 codes)."""
    from var.models.vqvae import PRESETS, VQVAE

    _, image_root = small_dataset
    torch.manual_seed(0)
    tokenizer = VQVAE(PRESETS["vq_test32"]).eval()
    root = tmp_path_factory.mktemp("tokens32")
    manifest = write_token_cache(root, image_root, tokenizer, PRESETS["vq_test32"].patch_nums)
    return manifest, root


def train_tiny_run(root: Path, tokens_root, steps: int = 4, depth: int = 1) -> Path:
    """A few steps of a tiny transformer on the small token cache; returns its run directory."""
    from var.tasks import train

    overrides = ["task=train", "logger=none", "trainer=cpu", f"task.tokens={tokens_root}", f"task.max_steps={steps}",
                 f"model.depth={depth}", "model.patch_nums=[1,2,3,4]", "model.vocab_size=64", "model.cvae=8",
                 "task.batch_size=16", "task.eval_batch_size=64", "task.eval_limit=16", "task.val_every_n_steps=1000",
                 "task.record.num_eval_points=2", "trainer.enable_progress_bar=false", "data.resolution=32"]
    cfg = resolved(compose_cfg(overrides, root=root))
    torch.manual_seed(0)
    train.run(cfg)
    return root / "run"


@pytest.fixture(scope="session")
def tiny_trained_run(small_token_cache, tmp_path_factory):
    """One 4-step depth-1 run shared by the sampling and editing tests."""
    return train_tiny_run(tmp_path_factory.mktemp("tiny_run"), small_token_cache[1])

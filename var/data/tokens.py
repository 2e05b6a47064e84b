"""Token shards: the cached multi-scale indices the transformer trains on, and their datamodule.

``task=encode`` writes ``<root>/{train,val,test}-NNNNNN.tar``; each sample is one image *variant*
(``v0`` the image, ``v1`` its horizontal flip) with fields

  ``tokens.npy``  uint16 (L,), the per-scale indices of patch_nums concatenated, coarsest first
  ``cls``         the class index
  ``json``        {"source": source sample key, "variant": 0|1}

and ``manifest.json`` (kind ``token_shards``) records patch_nums, vocab size, classes, variants, the
source dataset's fingerprint and the tokenizer it came from. Keys are ``<source key>_v<variant>``, so a
completeness check can prove every source image appears once per variant.

The whole token set of a split is small (ImageNet: 1.28M x 2 x 680 x 2 bytes = 3.5 GB), so the
datamodule loads it into one array (cached as ``<split>.npz`` beside the shards, keyed by the
manifest's fingerprint) and serves a map-style dataset: exact epochs, a distributed sampler, and a
position that can be restored exactly on resume.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from var.data.shards import atomic_write_bytes, iter_tar_samples, read_manifest, split_urls
from var.errors import DataError

VARIANTS = ("v0", "v1")  # the image and its horizontal flip


def token_sample(source_key: str, variant: int, tokens: np.ndarray, label: int) -> dict:
    buf = io.BytesIO()
    np.save(buf, tokens.astype(np.uint16), allow_pickle=False)
    return {"__key__": f"{source_key}_v{variant}", "tokens.npy": buf.getvalue(), "cls": str(int(label)),
            "json": json.dumps({"source": source_key, "variant": variant})}


def decode_tokens(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def read_split(root: str | Path, split: str, manifest: dict | None = None):
    """All samples of a split: tokens (N, L) uint16, labels (N,) int64, variants (N,) int8, keys."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    if manifest is None or manifest.get("kind") != "token_shards":
        raise DataError(f"no token shards at {root} (manifest.json missing): run `python run.py task=encode`")
    seq_len = sum(p * p for p in manifest["patch_nums"])
    vocab = int(manifest["vocab_size"])
    tokens, labels, variants, keys = [], [], [], []
    for url in split_urls(root, split, manifest):
        for sample in iter_tar_samples(url):
            t = decode_tokens(sample["tokens.npy"])
            if t.shape != (seq_len,):
                raise DataError(f"{url}: sample {sample['__key__']} has {t.shape} tokens, expected ({seq_len},)")
            if t.size and int(t.max()) >= vocab:
                raise DataError(f"{url}: sample {sample['__key__']} has token {int(t.max())} >= vocab {vocab}")
            tokens.append(t)
            labels.append(int(sample["cls"]))
            variants.append(json.loads(sample["json"])["variant"])
            keys.append(sample["__key__"])
    if not tokens:
        raise DataError(f"token shards at {root} have no '{split}' samples")
    return (np.stack(tokens), np.asarray(labels, dtype=np.int64), np.asarray(variants, dtype=np.int8), keys)


def load_split_cached(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, labels, variants) of a split, through a one-file cache keyed by the manifest fingerprint."""
    root = Path(root)
    manifest = read_manifest(root)
    cache = root / f"{split}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["fingerprint"]) == manifest.get("fingerprint"):
                return z["tokens"], z["labels"], z["variants"]
    tokens, labels, variants, _ = read_split(root, split, manifest)
    buf = io.BytesIO()
    np.savez(buf, tokens=tokens, labels=labels, variants=variants, fingerprint=manifest.get("fingerprint"))
    atomic_write_bytes(cache, buf.getvalue())
    return tokens, labels, variants


class TokenDataset(Dataset):
    """(tokens int64 (L,), label) pairs from an in-memory split."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray):
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.tokens[i], self.labels[i]


class TokenDataModule(L.LightningDataModule):
    """Train on both variants; validate and test on the unflipped images only (the scaling metric)."""

    def __init__(self, root: str, batch_size: int, eval_batch_size: int | None = None, num_workers: int = 0,
                 train_variants: tuple[int, ...] = (0, 1), eval_limit: int | None = None, **_unused):
        super().__init__()
        self.root = Path(root)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_variants = tuple(train_variants)
        self.eval_limit = eval_limit
        self.manifest: dict | None = None
        self._sets: dict[str, TokenDataset] = {}

    @property
    def patch_nums(self) -> list[int]:
        return list(self.manifest["patch_nums"])

    def setup(self, stage: str | None = None) -> None:
        self.manifest = read_manifest(self.root)
        if self.manifest is None or self.manifest.get("kind") != "token_shards":
            raise DataError(f"no token shards at {self.root} (manifest.json missing): run "
                            f"`python run.py task=encode` first")

    def dataset(self, split: str) -> TokenDataset:
        if split not in self._sets:
            if self.manifest is None:
                self.setup()
            tokens, labels, variants = load_split_cached(self.root, split)
            keep = np.isin(variants, self.train_variants if split == "train" else (0,))
            tokens, labels = tokens[keep], labels[keep]
            if split != "train" and self.eval_limit:
                tokens, labels = tokens[: self.eval_limit], labels[: self.eval_limit]
            self._sets[split] = TokenDataset(tokens, labels)
        return self._sets[split]

    def train_dataloader(self) -> DataLoader:
        # drop_last keeps every step's batch the same size, so FLOP and token accounting stay exact.
        return DataLoader(self.dataset("train"), batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

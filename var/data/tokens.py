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
position that can be restored exactly on resume. Loading checks every row (length, token range, label) and
drops, counts and logs bad ones; a split with more than ``max_bad_fraction`` bad samples is refused.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from var.data.faults import FaultCounter, combine, fraction_error, one_line
from var.data.sampler import ResumableSampler
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
    """All good samples of a split: tokens (N, L) uint16, labels (N,) int64, variants (N,) int8, keys, and
    the split's fault summary (var/data/faults.py).

    A bad sample (undecodable, wrong length, a token outside the vocabulary, a label outside the classes) or
    the lost tail of a truncated shard is skipped, counted and logged; the caller decides whether the bad
    fraction is acceptable.
    """
    root = Path(root)
    manifest = manifest or read_manifest(root)
    if manifest is None or manifest.get("kind") != "token_shards":
        raise DataError(f"no token shards at {root} (manifest.json missing): run `python run.py task=encode`")
    seq_len = sum(p * p for p in manifest["patch_nums"])
    vocab, num_classes = int(manifest["vocab_size"]), int(manifest.get("num_classes") or 0)
    urls = split_urls(root, split, manifest)
    info = manifest["splits"].get(split) or {}
    counts = info.get("shard_counts")
    faults = FaultCounter(split, urls, dict(zip(urls, counts)) if counts else None)
    rows, labels, variants, keys, row_url = [], [], [], [], []
    total, damaged = 0, None
    for url in urls:
        delivered, last, error = 0, None, None
        try:
            for sample in iter_tar_samples(url):
                delivered, last = delivered + 1, sample["__key__"]
                row = _decode_row(sample, seq_len, vocab, num_classes)
                if isinstance(row[0], str):  # (kind, detail)
                    faults.bad(url, last, *row)
                    continue
                rows.append(row[0])
                labels.append(row[1])
                variants.append(row[2])
                keys.append(last)
                row_url.append(url)
        except (tarfile.TarError, EOFError, OSError) as e:  # a truncated or unreadable shard: keep what came
            error, damaged = one_line(e), url
        faults.shard_ended(url, delivered, last, error)
        total += delivered
    if not counts and info.get("count") is not None and total < int(info["count"]):
        # No per-shard counts to tell which shard came up short (a tar cut at a member boundary reads as
        # complete): count the split's shortfall.
        faults.bad(damaged or f"{root}/{split}-*.tar", f"{split} split", "bad_shard",
                   f"{total} of the manifest's {info['count']} samples readable", n=int(info["count"]) - total)
    tokens = np.stack(rows) if rows else np.zeros((0, seq_len), np.uint16)
    # Range check over the whole split at once; uint16 rows cannot be negative.
    bad = np.flatnonzero((tokens >= vocab).any(axis=1)) if vocab < 65536 else np.zeros(0, np.int64)
    for i in bad:
        faults.bad(row_url[i], keys[i], "out_of_range", f"token {int(tokens[i].max())} >= vocab {vocab}")
    keep = np.ones(len(tokens), dtype=bool)
    keep[bad] = False
    for url, n in Counter(u for u, ok in zip(row_url, keep) if ok).items():
        faults.seen(url, n)
    if not keep.any():
        raise DataError(f"token shards at {root} have no readable '{split}' samples")
    return (tokens[keep], np.asarray(labels, dtype=np.int64)[keep], np.asarray(variants, dtype=np.int8)[keep],
            [k for k, ok in zip(keys, keep) if ok], faults.summary())


def _decode_row(sample: dict, seq_len: int, vocab: int, num_classes: int):
    """(tokens uint16, label, variant) of one sample, or (kind, detail) saying why it is skipped."""
    try:
        t = decode_tokens(sample["tokens.npy"])
        label = int(sample["cls"])
        variant = int(json.loads(sample["json"])["variant"])
    except Exception as e:  # numpy, json and a missing field each raise their own types
        return "undecodable", one_line(e)
    if t.ndim != 1 or t.shape[0] != seq_len:
        return "wrong_length", f"{tuple(t.shape)} tokens, expected ({seq_len},)"
    if t.dtype != np.uint16:  # written by another tool: check its range here, exactly
        if t.dtype.kind not in "iu":
            return "undecodable", f"tokens of dtype {t.dtype}"
        if t.size and (int(t.min()) < 0 or int(t.max()) >= vocab):
            return "out_of_range", f"tokens span [{int(t.min())}, {int(t.max())}], vocab {vocab}"
        t = t.astype(np.uint16)
    if num_classes and not 0 <= label < num_classes:
        return "bad_label", f"label {label} outside [0, {num_classes})"
    return t, label, variant


CACHE_FORMAT = 2  # 2: the cache keeps the split's fault summary


def load_split_cached(root: str | Path, split: str, max_bad_fraction: float | None = None):
    """(tokens, labels, variants, faults) of a split, through a one-file cache keyed by the manifest fingerprint.

    With ``max_bad_fraction`` a split whose skipped fraction exceeds it raises a one-line DataError naming
    the worst shard (its ``data_faults`` attribute holds the counts for the run's record).
    """
    root = Path(root)
    manifest = read_manifest(root)
    cache = root / f"{split}.npz"
    loaded = None
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["fingerprint"]) == manifest.get("fingerprint") and "format" in z.files and int(z["format"]) == CACHE_FORMAT:
                loaded = z["tokens"], z["labels"], z["variants"], json.loads(str(z["faults"]))
    if loaded is None:
        tokens, labels, variants, _, faults = read_split(root, split, manifest)
        buf = io.BytesIO()
        np.savez(buf, tokens=tokens, labels=labels, variants=variants, fingerprint=manifest.get("fingerprint"),
                 format=CACHE_FORMAT, faults=json.dumps(faults))
        atomic_write_bytes(cache, buf.getvalue())
        loaded = tokens, labels, variants, faults
    faults = loaded[3]
    if max_bad_fraction is not None and faults["skipped"] > max_bad_fraction * faults["seen"]:
        raise fraction_error(combine([faults], max_bad_fraction), max_bad_fraction, split)
    return loaded


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
                 train_variants: tuple[int, ...] = (0, 1), eval_limit: int | None = None,
                 max_bad_fraction: float = 0.01, seed: int = 0, **_unused):
        super().__init__()
        self.root = Path(root)
        self.seed = int(seed)  # the training order is a function of (seed, epoch): see var/data/sampler.py
        self._sampler: ResumableSampler | None = None
        self._resume_position: dict | None = None  # from a checkpoint, applied when the loader is built
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_variants = tuple(train_variants)
        self.eval_limit = eval_limit
        self.manifest: dict | None = None
        self._sets: dict[str, TokenDataset] = {}
        self.max_bad_fraction = max_bad_fraction
        self.faults: dict[str, dict] = {}  # per split, filled as splits load

    def fault_summary(self) -> dict:
        """Skipped and seen samples of the splits loaded so far, for record.json's ``data_faults``."""
        return combine(list(self.faults.values()), self.max_bad_fraction)

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
            tokens, labels, variants, self.faults[split] = load_split_cached(self.root, split, self.max_bad_fraction)
            keep = np.isin(variants, self.train_variants if split == "train" else (0,))
            tokens, labels = tokens[keep], labels[keep]
            if split != "train" and self.eval_limit:
                tokens, labels = tokens[: self.eval_limit], labels[: self.eval_limit]
            self._sets[split] = TokenDataset(tokens, labels)
        return self._sets[split]

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        ds = self.dataset("train")
        self._sampler = ResumableSampler(len(ds), self.batch_size * world, rank, world, self.seed)
        if self._resume_position is not None:
            self._check_position(self._resume_position)
            self._sampler.resume(self._resume_position["epoch"], self._resume_position["batches"])
        # Whole batches only, so every step has the same size and FLOP and token accounting stay exact. The
        # loader's own generator keeps its per-iterator seed draw off the global RNG that training uses. Pinned
        # batches copy to the GPU without the host waiting for the work already queued there.
        return DataLoader(ds, batch_size=self.batch_size, sampler=self._sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed), pin_memory=torch.cuda.is_available())

    # The position in the training order travels in the checkpoint (Lightning saves a datamodule's state).
    def state_dict(self) -> dict:
        if self._sampler is None or self.trainer is None:
            return {}
        # Batches this epoch whose step has run: checkpoints are written after a step, never inside one.
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return {"train_position": self._sampler.position(done)}

    def load_state_dict(self, state: dict) -> None:
        self._resume_position = state.get("train_position")

    def _check_position(self, pos: dict) -> None:
        ds = self.dataset("train")
        now = {"samples": len(ds), "global_batch": self._sampler.global_batch, "seed": self.seed}
        then = {k: pos.get(k) for k in now}
        if then != now:
            raise DataError(f"checkpoint's training order was for {then}, but {self.root} and the config now "
                            f"give {now}: resume with the same token cache, task.batch_size and seed")

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

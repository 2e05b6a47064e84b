"""LightningDataModule over image shards: (image in [-1, 1], class label, sample key) batches.

Training reads *resampled* shards with a fixed number of batches per epoch, so every rank runs the same
number of steps whatever the shard sizes (uneven ranks would hang a collective). Each rank resamples from
its own disjoint subset of shards when there are enough of them, so ranks see different samples.
Evaluation reads every sample exactly once across all ranks and workers: by shard when there are enough
shards, else by sample index (small splits with a single shard still spread over ranks).

Corrupt data never stops a pass: a truncated or unreadable shard and an undecodable image are skipped,
counted per shard and kind (var/data/faults.py) and logged in one line each; the loaders fail the run with
one DataError line once the bad fraction of a split exceeds ``max_bad_fraction``.
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from var.data.faults import FaultCounter, combine, one_line
from var.data.prepare import resize_center_crop
from var.data.shards import read_manifest, split_urls
from var.errors import DataError


def dist_rank_world(trainer=None) -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    return 0, 1


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def decode_sample(sample: dict, resolution: int) -> tuple[torch.Tensor, int, str]:
    blob = sample.get("png") or sample.get("jpg") or sample.get("jpeg") or sample.get("webp")
    if blob is None:
        raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')}: no image field")
    with Image.open(io.BytesIO(blob)) as img:
        img = img.convert("RGB")
        if img.size != (resolution, resolution):
            img = resize_center_crop(img, resolution)
        x = image_to_tensor(img)
    return x, int(sample["cls"]), sample["__key__"]


def collate(samples: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images, labels, keys = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), list(keys)


class _RandomFlip:
    """Horizontal flip with a per-worker generator, so augmentation is reproducible for a given seed."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank, self.rng = seed, rank, None

    def __call__(self, item):
        if self.rng is None:
            # A string seed goes through SHA-512: the same in every process. hash() of a tuple holding a
            # string is salted per process (PYTHONHASHSEED), which made every run flip differently.
            self.rng = random.Random(f"flip/{self.seed}/{self.rank}/{_worker()[0]}")
        x, y, key = item
        return (torch.flip(x, dims=[2]) if self.rng.random() < 0.5 else x), y, key


class _TakeByIndex:
    """Keep sample i of the stream when i falls to this (rank, worker)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, src):
        wid, nw = _worker()
        slot, stride = self.rank * nw + wid, self.world * nw
        for i, sample in enumerate(src):
            if i % stride == slot:
                yield sample


class _ShardsOfRank:
    """Shard-level split across ranks (workers are split after this by webdataset)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, src):
        for i, url in enumerate(src):
            if i % self.world == self.rank:
                yield url


class _WorkerSeed:
    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def __call__(self) -> int:
        return self.seed * 1_000_003 + self.rank * 1009 + _worker()[0]


class _ReadShards:
    """webdataset's tar reader, one shard at a time, with a handler that skips the rest of a bad shard and
    counts the samples it lost (replaces ``wds.tarfile_to_samples``)."""

    def __init__(self, faults: FaultCounter, shared_by: int | None = None):
        # shared_by=RANK: every (rank, worker) reads every shard and keeps a share of its samples, so only
        # worker 0 of rank 0 counts a shard's losses.
        self.faults, self.shared_by = faults, shared_by

    def __call__(self, src):
        counts_losses = self.shared_by is None or (self.shared_by == 0 and _worker()[0] == 0)
        for item in src:
            errors: list[str] = []

            def skip_rest(exn, errors=errors) -> bool:
                errors.append(one_line(exn).split(" @ ")[0])  # webdataset appends the stream's repr
                return True  # go on with the next shard

            delivered, last = 0, None
            for sample in wds.tariterators.tarfile_samples([dict(item)], handler=skip_rest):
                delivered, last = delivered + 1, sample["__key__"]
                yield sample
            if counts_losses:
                self.faults.shard_ended(item["url"], delivered, last, errors[0] if errors else None)


class _Decode:
    """Decode each sample; an unreadable one is counted, logged and dropped."""

    def __init__(self, faults: FaultCounter, resolution: int, num_classes: int | None):
        self.faults, self.resolution, self.num_classes = faults, resolution, num_classes

    def __call__(self, src):
        for sample in src:
            url, key = sample.get("__url__"), sample.get("__key__")
            try:
                item = decode_sample(sample, self.resolution)
            except Exception as e:  # PIL raises many types for bad bytes; a missing field is a DataError
                self.faults.bad(url, key, "undecodable", one_line(e))
                continue
            if self.num_classes and not 0 <= item[1] < self.num_classes:
                self.faults.bad(url, key, "bad_label", f"label {item[1]} outside [0, {self.num_classes})")
                continue
            self.faults.seen(url)
            yield item


class _CheckedLoader(DataLoader):
    """A DataLoader that fails with one DataError line once too many samples of its split were skipped.

    Mid-pass it judges only after enough samples (faults.min_seen); at the end of a pass, always.
    """

    def __iter__(self):
        faults, limit = self.dataset.faults, self.dataset.max_bad_fraction
        for batch in super().__iter__():
            faults.check(limit, final=False)
            yield batch
        faults.check(limit, final=True)


class FixedLengthStream(IterableDataset):
    """An iterable with a known length (batches per rank per epoch), so progress bars and schedulers know it."""

    def __init__(self, pipeline, length: int):
        self.pipeline, self.length = pipeline, length

    def __iter__(self):
        return iter(self.pipeline)

    def __len__(self) -> int:
        return self.length


class ImageShardDataModule(L.LightningDataModule):
    def __init__(self, root: str, resolution: int, batch_size: int, eval_batch_size: int | None = None,
                 num_workers: int = 2, train_batches_per_epoch: int = 100, shuffle_buffer: int = 1000,
                 hflip: bool = True, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 max_bad_fraction: float = 0.01, **_unused):
        super().__init__()
        self.root = Path(root)
        self.resolution = resolution
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_batches_per_epoch = train_batches_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.hflip = hflip
        self.seed = seed
        self._rank, self._world = rank, world_size
        self.manifest: dict | None = None
        self.max_bad_fraction = max_bad_fraction
        self.faults: dict[str, FaultCounter] = {}

    # ----------------------------------------------------------------------------------------- setup
    def rank_world(self) -> tuple[int, int]:
        if self._rank is not None:
            return self._rank, self._world or 1
        return dist_rank_world(self.trainer if self._trainer_attached() else None)

    def _trainer_attached(self) -> bool:
        try:
            return self.trainer is not None
        except RuntimeError:
            return False

    def setup(self, stage: str | None = None) -> None:
        self.manifest = read_manifest(self.root)
        if self.manifest is None:
            raise DataError(f"no dataset at {self.root} (manifest.json missing): run "
                            f"`python run.py task=prepare` with the same data config first")

    def urls(self, split: str) -> list[str]:
        if self.manifest is None:
            self.setup()
        urls = split_urls(self.root, split, self.manifest)
        if not urls:
            raise DataError(f"dataset {self.root} has no '{split}' split")
        return urls

    def fault_counter(self, split: str) -> FaultCounter:
        """The split's counter, shared by every loader and worker that reads the split."""
        if split not in self.faults:
            urls = self.urls(split)
            counts = self.manifest["splits"][split].get("shard_counts")
            self.faults[split] = FaultCounter(split, urls, dict(zip(urls, counts)) if counts else None,
                                              workers=max(self.num_workers, 1), shared=True)
        return self.faults[split]

    def fault_summary(self, reduce: bool = True) -> dict:
        """Skipped and seen samples of every split read so far; ``reduce`` sums over ranks (a collective)."""
        return combine([self.faults[s].summary(reduce=reduce) for s in sorted(self.faults)], self.max_bad_fraction)

    def _stages(self, split: str, shared_by: int | None = None) -> tuple[list, list]:
        faults = self.fault_counter(split)
        num_classes = (self.manifest or {}).get("num_classes")
        return ([_ReadShards(faults, shared_by)],
                [_Decode(faults, self.resolution, int(num_classes) if num_classes else None)])

    def split_size(self, split: str) -> int:
        if self.manifest is None:
            self.setup()
        return int(self.manifest["splits"].get(split, {}).get("count", 0))

    # -------------------------------------------------------------------------------------- pipelines
    def train_pipeline(self) -> FixedLengthStream:
        rank, world = self.rank_world()
        urls = self.urls("train")
        own = urls[rank::world] if len(urls) >= world else urls
        nw = max(self.num_workers, 1)
        per_worker = math.ceil(self.train_batches_per_epoch / nw)
        read, decode = self._stages("train")
        stages = [
            wds.ResampledShards(own, seed=self.seed, worker_seed=_WorkerSeed(self.seed, rank), deterministic=True),
            *read,
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100),
                        rng=random.Random(self.seed * 7919 + rank)),
            *decode,
        ]
        if self.hflip:
            stages.append(wds.map(_RandomFlip(self.seed, rank)))
        stages.append(wds.batched(self.batch_size, collation_fn=collate, partial=False))
        return self._checked(FixedLengthStream(wds.DataPipeline(*stages).with_epoch(per_worker), per_worker * nw),
                             "train")

    def _checked(self, pipeline, split: str):
        """Tag a pipeline with its split's counter, so ``_loader`` can fail on too many bad samples."""
        pipeline.faults, pipeline.max_bad_fraction = self.fault_counter(split), self.max_bad_fraction
        return pipeline

    def eval_pipeline(self, split: str) -> wds.DataPipeline:
        rank, world = self.rank_world()
        urls = self.urls(split)
        nw = max(self.num_workers, 1)
        by_shard = len(urls) >= world * nw
        read, decode = self._stages(split, shared_by=None if by_shard else rank)
        if by_shard:
            stages = [wds.SimpleShardList(urls), _ShardsOfRank(rank, world), wds.split_by_worker, *read]
        else:
            stages = [wds.SimpleShardList(urls), *read, _TakeByIndex(rank, world)]
        stages += [*decode, wds.batched(self.eval_batch_size, collation_fn=collate, partial=True)]
        return self._checked(wds.DataPipeline(*stages), split)

    def _loader(self, pipeline) -> DataLoader:
        cls = _CheckedLoader if getattr(pipeline, "faults", None) is not None else DataLoader
        return cls(pipeline, batch_size=None, num_workers=self.num_workers,
                   persistent_workers=False, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_pipeline())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_pipeline("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_pipeline("test"))

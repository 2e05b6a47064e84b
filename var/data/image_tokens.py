"""Training from images through a frozen tokenizer, without a token cache.

``images_to_tokens`` is the one image -> multi-scale indices function: ``task=encode`` writes its output
to token shards, and ``ImageTokenDataModule`` applies it to each training batch on the fly, so a batch
gets exactly the tokens the cache would hold for the same images.

- **Training** streams image shards through ``ImageShardDataModule`` (resampled shards, random horizontal
  flip with probability 1/2: the same images the cache's two variants hold, ``v1`` being the flip along
  the width axis). Each batch is encoded after it reaches the device (``on_after_batch_transfer``), so the
  training step receives ``(tokens, labels)`` as from the cache.
- **Val and test** are encoded once, unflipped (variant 0, as the cache's evaluation), on first use and
  held in memory as a ``TokenDataset``. Evaluation then runs through the same exact, rank-striding
  ``evaluate_token_loss`` as a cached run: the tokenizer is frozen, so encoding once gives the very tokens
  re-encoding would, at one encoder pass instead of one per evaluation point.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from var.data.datamodule import ImageShardDataModule
from var.data.tokens import TokenDataset
from var.errors import DataError


@torch.no_grad()
def images_to_tokens(tokenizer, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, L) int64 indices of every scale, coarsest first."""
    return torch.cat(tokenizer.img_to_idxBl(images), dim=1)


def is_image_batch(batch) -> bool:
    return isinstance(batch, list | tuple) and len(batch) == 3 and torch.is_tensor(batch[0]) \
        and batch[0].dim() == 4 and batch[0].is_floating_point()


class ImageTokenDataModule(L.LightningDataModule):
    """(tokens, label) batches computed from image shards by a frozen tokenizer (see the module doc)."""

    def __init__(self, images: ImageShardDataModule, tokenizer, num_classes: int, eval_limit: int | None = None):
        super().__init__()
        self.images = images
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.num_classes = num_classes
        self.eval_limit = eval_limit
        self.batch_size = images.batch_size
        self.eval_batch_size = images.eval_batch_size
        self.num_workers = images.num_workers
        self.manifest: dict | None = None
        self._sets: dict[str, TokenDataset] = {}

    @property
    def patch_nums(self) -> list[int]:
        return list(self.tokenizer.config.patch_nums)

    def setup(self, stage: str | None = None) -> None:
        self.images.setup()
        c = self.tokenizer.config
        # What model_config checks against, as a token cache's manifest would say it.
        self.manifest = {"kind": "images", "patch_nums": list(c.patch_nums), "vocab_size": int(c.vocab_size),
                         "num_classes": int(self.images.manifest.get("num_classes", self.num_classes)),
                         "fingerprint": self.images.manifest.get("fingerprint")}

    def fault_summary(self) -> dict:
        """Skipped samples as the image datamodule counts them, for record.json's ``data_faults``."""
        inner = getattr(self.images, "fault_summary", None)
        return inner() if callable(inner) else {}

    def _device(self) -> torch.device:
        try:
            return self.trainer.strategy.root_device
        except (AttributeError, RuntimeError):
            return torch.device("cpu")

    def _encoder_on(self, device: torch.device):
        if next(self.tokenizer.parameters()).device != device:
            self.tokenizer.to(device)
        return self.tokenizer

    # ---------------------------------------------------------------------------------------- batches
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if not is_image_batch(batch):
            return batch
        images, labels, _keys = batch
        return images_to_tokens(self._encoder_on(images.device), images), labels

    def dataset(self, split: str, device: torch.device | None = None) -> TokenDataset:
        """A whole split, unflipped, encoded once (every rank holds all of it, as with a token cache);
        encoded on ``device`` (default: the trainer's)."""
        if split not in self._sets:
            if self.manifest is None:
                self.setup()
            whole = ImageShardDataModule(self.images.root, self.images.resolution, self.images.batch_size,
                                         self.eval_batch_size, num_workers=0, rank=0, world_size=1)
            device = device or self._device()
            tokenizer = self._encoder_on(device)
            limit = self.eval_limit if split != "train" else None
            tokens, labels, n = [], [], 0
            for x, y, _ in whole.eval_pipeline(split):
                if limit and n >= limit:
                    break
                tokens.append(images_to_tokens(tokenizer, x.to(device)).cpu().numpy().astype(np.int32))
                labels.append(y.numpy())
                n += len(y)
            if not tokens:
                raise DataError(f"dataset {self.images.root} has no '{split}' samples")
            tokens, labels = np.concatenate(tokens)[:limit], np.concatenate(labels)[:limit]
            self._sets[split] = TokenDataset(tokens, labels)
        return self._sets[split]

    def train_dataloader(self) -> DataLoader:
        return self.images.train_dataloader()

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=self.eval_batch_size, shuffle=False, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

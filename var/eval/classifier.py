"""A small CNN classifier of the synthetic dataset: the feature network where no Inception applies.

Inception features mean little on generated 64 px scenes and its weights are a download, so the embedded
chain trains this network once (a CPU minute) on the synthetic *train* split and caches it, keyed by the
dataset's fingerprint. Its penultimate features give a Fréchet distance and its predictions the class
accuracy of generated samples: both real quality signals, but not comparable with ImageNet FID, which is
why every metric it produces is labelled ``synthetic_classifier``.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from var.checkpoints import safe_load
from var.data.shards import atomic_write_bytes
from var.eval.images import dataset_manifest, load_split

VERSION = 1  # bump when the architecture or recipe changes: old cached weights are then retrained


class SmallClassifier(nn.Module):
    """uint8 (N,3,H,W) -> (features (N, width*4), logits (N, K)); any H, W (global pooling)."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        w = width
        # A strided stem keeps a CPU epoch short at 64 px; three stages still see layout, objects and texture.
        self.body = nn.Sequential(block(3, w, 2), block(w, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
                                  block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1))
        self.head = nn.Linear(4 * w, num_classes)
        self.num_classes, self.width = num_classes, width
        self.feature_dim = 4 * w

    def forward(self, x_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x_uint8.float() / 127.5 - 1
        f = self.body(x).mean(dim=(2, 3))
        return f, self.head(f)


def classifier_path(cache_dir: str | Path, fingerprint: str, resolution: int) -> Path:
    return Path(cache_dir) / f"classifier_v{VERSION}_{fingerprint}_r{resolution}.pt"


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=gen) < 0.5  # the tokens are trained on flips too
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    hits = sum((model(x[s:s + batch])[1].argmax(1) == y[s:s + batch]).sum().item() for s in range(0, len(y), batch))
    return hits / max(len(y), 1)


def train_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int = 4, batch_size: int = 64,
                     lr: float = 3e-3, width: int = 32, seed: int = 0, progress: bool = True) -> SmallClassifier:
    """AdamW with a one-cycle cosine schedule over ``epochs`` passes of uint8 images ``x``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallClassifier(num_classes, width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.15)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc="classifier", unit="step")
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), batch_size):
            b = perm[s:s + batch_size]
            loss = F.cross_entropy(model(_augment(x[b], gen))[1], y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    return model.eval()


def load_or_train_classifier(data_root: str | Path, cache_dir: str | Path, epochs: int = 4, width: int = 32,
                             seed: int = 0, progress: bool = True) -> tuple[SmallClassifier, dict]:
    """The cached classifier of this dataset (trained now if absent or stale), and its meta."""
    manifest = dataset_manifest(data_root)
    fp, res, k = manifest["fingerprint"], int(manifest["resolution"]), int(manifest["num_classes"])
    path = classifier_path(cache_dir, fp, res)
    recipe = {"epochs": int(epochs), "width": int(width), "seed": int(seed)}
    if path.is_file():
        blob = safe_load(path, "synthetic classifier")
        if blob.get("meta", {}).get("recipe") == recipe:
            model = SmallClassifier(k, width)
            model.load_state_dict(blob["state_dict"])
            return model.eval().requires_grad_(False), blob["meta"]
    start = time.time()
    x, y = load_split(data_root, "train")
    model = train_classifier(x, y, k, epochs=epochs, width=width, seed=seed, progress=progress)
    meta = {"fingerprint": fp, "resolution": res, "num_classes": k, "recipe": recipe, "train_images": len(y),
            "train_seconds": round(time.time() - start, 1)}
    if manifest["splits"].get("val", {}).get("count"):
        xv, yv = load_split(data_root, "val")
        meta["val_accuracy"] = accuracy(model, xv, yv)
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "meta": meta}, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    print(f"trained the synthetic classifier in {meta['train_seconds']} s: val accuracy "
          f"{meta.get('val_accuracy', float('nan')):.3f} -> {path}")
    return model.requires_grad_(False), meta

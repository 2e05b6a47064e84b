"""task=edit: zero-shot in-painting, out-painting and class-conditional editing of one image.

The source is an image file (``task.source``) or an image of the dataset (``task.source_index`` into
``task.source_split`` of ``data.root``), resized and center-cropped to the tokenizer's resolution. The region
is a box of fractions (on the finest token grid, rounded like the official notebook) or a mask image (white
= the region). inpaint and class regenerate inside it, outpaint outside; inpaint and outpaint use the null
class. Writes ``edit_{mode}.png``: source | mask (white: regenerated, at the finest token grid) | results.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from var.data.datamodule import decode_sample, image_to_tensor
from var.data.prepare import resize_center_crop
from var.data.shards import iter_tar_samples, read_manifest, split_urls
from var.errors import ConfigError, DataError
from var.sampling.config import SamplingConfig
from var.sampling.edit import MODES, box_mask, edit_tokens, region_to_regenerate
from var.sampling.files import grid, save_image
from var.sampling.loading import autocast_for, load_models, pick_device
from var.sampling.sampler import decode_fhat, to_uint8_nhwc


def load_source(cfg: DictConfig, resolution: int) -> tuple[torch.Tensor, int | None, str]:
    """(image (3, R, R) in [-1, 1], its label if known, a description)."""
    task = cfg.task
    if task.get("source"):
        path = Path(task.source)
        if not path.is_file():
            raise DataError(f"task.source={path}: no such file")
        with Image.open(path) as img:
            return image_to_tensor(resize_center_crop(img, resolution)), None, str(path)
    if task.get("source_index") is None:
        raise ConfigError("task.source: required (an image file), or set task.source_index (a dataset image)")
    root, split, want = cfg.data.root, task.source_split, int(task.source_index)
    manifest = read_manifest(root)
    if manifest is None:
        raise DataError(f"no dataset at {root} (manifest.json missing): run `python run.py task=prepare` first")
    n = 0
    for url in split_urls(root, split, manifest):
        for sample in iter_tar_samples(url):
            if n == want:
                sample["__url__"] = url
                x, label, key = decode_sample(sample, resolution)
                return x, label, f"{split}/{key}"
            n += 1
    raise ConfigError(f"task.source_index={want}: split {split!r} of {root} has {n} images")


def load_region(task: DictConfig, resolution: int, last_pn: int) -> torch.Tensor:
    """The region, True inside: from the mask image at pixel resolution, else the box on the token grid."""
    if task.get("mask"):
        path = Path(task.mask)
        if not path.is_file():
            raise DataError(f"task.mask={path}: no such file")
        with Image.open(path) as img:
            arr = np.asarray(resize_center_crop(img, resolution).convert("L"))
        return torch.from_numpy(arr > 127)
    try:
        return box_mask(last_pn, list(task.box))
    except ValueError as e:
        raise ConfigError(f"task.box: {e}") from None


def label_for(task: DictConfig, num_classes: int) -> int:
    if task.mode not in MODES:
        raise ConfigError(f"task.mode={task.mode}: expected one of {', '.join(MODES)}")
    if task.mode != "class":
        return num_classes  # the paper injects no class label for in-/out-painting
    t = task.get("target_class")
    if t is None or not 0 <= int(t) < num_classes:
        raise ConfigError(f"task.target_class={t}: mode=class needs a class in [0, {num_classes})")
    return int(t)


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    node = OmegaConf.to_container(task.sampling, resolve=True) if task.get("sampling") is not None else {}
    scfg = SamplingConfig.from_node(node, seed=int(task.seed))
    scfg.validate("task.sampling.")
    n = int(task.num_samples)
    if n < 1:
        raise ConfigError(f"task.num_samples={n}: must be >= 1")
    device = pick_device(task.get("device"))
    model, vqvae, _ = load_models(task, device)
    label = label_for(task, model.num_classes)
    R = vqvae.config.resolution
    source, src_label, what = load_source(cfg, R)
    regen = region_to_regenerate(load_region(task, R, model.patch_nums[-1]), task.mode)

    images = source.unsqueeze(0).expand(n, -1, -1, -1)
    seeds = [scfg.seed + k for k in range(n)]
    labels = torch.full((n,), label, dtype=torch.long)
    _, f_hat, _, keep = edit_tokens(model, vqvae, images, regen, labels, seeds,
                                    autocast=autocast_for(task.precision, device), **scfg.kwargs())
    results = to_uint8_nhwc(decode_fhat(vqvae, f_hat))
    pn = model.patch_nums[-1]
    regen_last = (~keep[-1][0]).view(1, 1, pn, pn).float()
    mask_img = F.interpolate(regen_last, size=(R, R), mode="nearest").expand(1, 3, R, R)
    tiles = [to_uint8_nhwc(source.unsqueeze(0).add(1).mul(0.5))[0], to_uint8_nhwc(mask_img)[0], *results]

    out = Path(task.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"edit_{task.mode}.png"
    save_image(path, grid([tiles], scale=int(task.scale)))
    share = float(regen_last.mean())
    who = "null class" if label == model.num_classes else f"class {label}"
    print(f"{task.mode} of {what} (label {src_label}) with {who}: {share:.0%} of the finest tokens regenerated, "
          f"{scfg.tag()}")
    print(f"source | mask | {n} result(s) -> {path}")
    return {"out": str(path), "mode": str(task.mode), "label": label, "regenerated_fraction": share}

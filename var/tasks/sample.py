"""task=sample: class-conditional samples from a trained transformer -> PNGs, a grid and an ADM .npz.

    python run.py task=sample task.ckpt=runs/scaling_demo/model.depth=4 task.per_class=8
    python run.py task=sample task.ckpt=... task.per_class=50 trainer=ddp    # 50k FID set on all GPUs

Image i of class c (i < per_class) gets seed ``task.seed + c * per_class + i``, so it is the same whatever
the batch size, the number of ranks or which classes are listed. Images are numbered in (class, i) order;
rank r of w draws those with number % w == r and writes their PNGs, skipping PNGs that already exist (a
re-run finishes an interrupted one). After a barrier rank 0 reads every PNG back in order into
``samples_{tag}.npz`` (uint8 NHWC under ``arr_0``) and draws the grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from var.errors import ConfigError
from var.sampling.config import SamplingConfig
from var.sampling.fast import ImageSampler, resolve_fast
from var.sampling.files import (
    grid,
    image_seed,
    load_png,
    png_name,
    rank_share,
    save_image,
    save_npz,
    save_png,
)
from var.sampling.loading import Ranks, load_models
from var.sampling.sampler import to_uint8_nhwc


def class_list(classes, num_classes: int) -> list[int]:
    """``all`` -> 0..num_classes-1; else the listed ints (``num_classes`` itself: unconditional)."""
    if isinstance(classes, str):
        if classes != "all":
            raise ConfigError(f"task.classes={classes}: expected 'all' or a list of class indices")
        return list(range(num_classes))
    if isinstance(classes, int):
        classes = [classes]
    out = [int(c) for c in classes]
    bad = [c for c in out if not 0 <= c <= num_classes]
    if bad or not out or len(set(out)) != len(out):
        raise ConfigError(f"task.classes={out}: need distinct classes in [0, {num_classes}] "
                          f"({num_classes}: unconditional)")
    return out


def sampling_config(task: DictConfig) -> SamplingConfig:
    node = OmegaConf.to_container(task.sampling, resolve=True) if task.get("sampling") is not None else {}
    s = SamplingConfig.from_node(node, seed=int(task.seed))
    s.validate("task.sampling.")
    return s


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    for key in ("per_class", "batch_size"):
        if int(task[key]) < 1:
            raise ConfigError(f"task.{key}={task[key]}: must be >= 1")
    scfg = sampling_config(task)
    ranks = Ranks(cfg)
    model, vqvae, _ = load_models(task, ranks.device)
    # task.fast: compiled blocks in CUDA graphs per scale, decoder compiled under autocast (var/sampling/fast.py)
    sampler = ImageSampler(model, vqvae, str(task.precision), ranks.device,
                           resolve_fast(task.get("fast", "auto"), ranks.device, "task.fast"))
    classes = class_list(OmegaConf.to_container(task.classes) if OmegaConf.is_list(task.classes) else task.classes,
                         model.num_classes)
    per_class, tag = int(task.per_class), scfg.tag()
    out = Path(task.out)
    png_dir = out / tag
    png_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(c, i) for c in classes for i in range(per_class)]
    paths = [png_dir / png_name(c, i, tag) for c, i in jobs]
    mine = [j for j in rank_share(len(jobs), ranks.rank, ranks.world) if not paths[j].is_file()]

    bs = int(task.batch_size)
    with tqdm(total=len(mine), desc=f"sample {tag}", unit="img", disable=ranks.rank != 0) as bar:
        for start in range(0, len(mine), bs):
            chunk = mine[start:start + bs]
            labels = torch.tensor([jobs[j][0] for j in chunk])
            seeds = [image_seed(scfg.seed, *jobs[j], per_class) for j in chunk]
            imgs = to_uint8_nhwc(sampler(labels, seeds, **scfg.kwargs()))
            for j, arr in zip(chunk, imgs):
                save_png(paths[j], arr)
            bar.update(len(chunk))
    ranks.barrier()
    if ranks.rank != 0:
        return {"png_dir": str(png_dir)}

    arr = np.stack([load_png(p) for p in tqdm(paths, desc="npz", unit="img", disable=len(paths) < 2000)])
    npz = out / f"samples_{tag}.npz"
    save_npz(npz, arr)
    rows = [[arr[k * per_class + i] for i in range(min(per_class, int(task.grid_per_class)))]
            for k in range(min(len(classes), int(task.grid_max_classes)))]
    grid_path = out / f"grid_{tag}.png"
    save_image(grid_path, grid(rows, scale=int(task.grid_scale)))
    print(f"{len(paths)} samples ({len(classes)} classes x {per_class}) in {png_dir}")
    print(f"npz {npz} {tuple(arr.shape)} uint8; grid {grid_path}")
    return {"png_dir": str(png_dir), "npz": str(npz), "grid": str(grid_path), "count": len(paths), "tag": tag}

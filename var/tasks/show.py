"""task=show: a PNG grid with one row of samples per class, and the dataset's counts."""

from __future__ import annotations

import io
from pathlib import Path

from omegaconf import DictConfig
from PIL import Image

from var.data.shards import iter_tar_samples, read_manifest, split_urls
from var.errors import DataError


def collect_rows(root: str, split: str, per_class: int, max_classes: int) -> dict[int, list[Image.Image]]:
    """First ``per_class`` images of each of the first ``max_classes`` classes, reading shards in order."""
    rows: dict[int, list[Image.Image]] = {}
    for url in split_urls(root, split):
        for sample in iter_tar_samples(url):
            label = int(sample["cls"])
            if label >= max_classes or len(rows.setdefault(label, [])) >= per_class:
                continue
            blob = sample.get("png") or sample.get("jpg")
            rows[label].append(Image.open(io.BytesIO(blob)).convert("RGB"))
        if len(rows) >= max_classes and all(len(v) >= per_class for v in rows.values()):
            break
    return rows


def make_grid(rows: dict[int, list[Image.Image]], size: int, pad: int = 2) -> Image.Image:
    n_cols = max(len(v) for v in rows.values())
    grid = Image.new("RGB", (n_cols * (size + pad) + pad, len(rows) * (size + pad) + pad), (255, 255, 255))
    for r, label in enumerate(sorted(rows)):
        for c, img in enumerate(rows[label]):
            grid.paste(img.resize((size, size)), (pad + c * (size + pad), pad + r * (size + pad)))
    return grid


def run(cfg: DictConfig) -> dict:
    root, task = cfg.data.root, cfg.task
    manifest = read_manifest(root)
    if manifest is None:
        raise DataError(f"no dataset at {root} (manifest.json missing): run `python run.py task=prepare` first")
    if task.split not in manifest["splits"]:
        raise DataError(f"task.split={task.split}: dataset {root} has splits {list(manifest['splits'])}")
    rows = collect_rows(root, task.split, task.per_class, task.max_classes)
    out = Path(task.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, manifest["resolution"]).save(out)
    classes = manifest.get("classes", [])
    print(f"dataset {root}: {manifest['num_classes']} classes at {manifest['resolution']} px")
    for split, info in manifest["splits"].items():
        print(f"  {split:5s} {info['count']:7d} images in {len(info['shards'])} shards")
    per_class = manifest["splits"][task.split].get("class_counts", {})
    shown = ", ".join(f"{classes[int(k)] if int(k) < len(classes) else k}: {v}"
                      for k, v in list(per_class.items())[: task.max_classes])
    print(f"  {task.split} per class: {shown}")
    print(f"grid of {len(rows)} classes x {task.per_class} written to {out}")
    return {"grid": str(out)}

"""Building image-shard datasets: the embedded synthetic one and conversions of an image folder.

Both write ``<root>/{train,val,test}-NNNNNN.tar`` and, last, ``<root>/manifest.json``. Each sample holds
an encoded image (``png`` or ``jpg``), its class index (``cls``) and a small ``json`` (label, source).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections.abc import Iterable
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from var.data import synthetic
from var.data.shards import (
    MANIFEST,
    ShardWriter,
    atomic_write_json,
    read_manifest,
    remove_stale_temporaries,
    sha256_file,
)
from var.errors import DataError

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".jfif"}


def encode_image(arr: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if fmt == "png":
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    else:
        img.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to ``resolution`` (bicubic, antialiased), then the central square."""
    img = img.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    if scale != 1.0:
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                         Image.BICUBIC, reducing_gap=3.0)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def _finish(root: Path, manifest: dict, writers: dict[str, ShardWriter]) -> dict:
    manifest["splits"] = {}
    for split, w in writers.items():
        manifest["splits"][split] = {
            "count": int(sum(w.counts)),
            "shards": w.shards,
            "shard_counts": w.counts,
            "sha256": [sha256_file(root / s) for s in w.shards],
            "class_counts": {str(k): v for k, v in sorted(w.class_counts.items())},
        }
    # One hash that changes whenever any shard's bytes change: the key for caches built from this data.
    fp = hashlib.sha256()
    for split in sorted(manifest["splits"]):
        for digest in manifest["splits"][split]["sha256"]:
            fp.update(digest.encode())
    manifest["fingerprint"] = fp.hexdigest()[:16]
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def _clear(root: Path) -> None:
    """Remove a previous (possibly partial) dataset's shards and manifest before regenerating."""
    (root / MANIFEST).unlink(missing_ok=True)
    remove_stale_temporaries(root)
    for split in SPLITS:
        for p in root.glob(f"{split}-*.tar"):
            p.unlink()


# ------------------------------------------------------------------------------------------- synthetic
def synthetic_matches(manifest: dict | None, data) -> bool:
    if manifest is None or manifest.get("name") != "synthetic":
        return False
    want = {"seed": data.seed, "resolution": data.resolution, "num_classes": data.num_classes,
            "generator_version": synthetic.GENERATOR_VERSION}
    counts = {s: manifest["splits"].get(s, {}).get("count") for s in SPLITS}
    return all(manifest.get(k) == v for k, v in want.items()) and counts == {
        s: int(data.splits[s]) for s in SPLITS}


def _render_synthetic(args) -> tuple[bytes, int]:
    seed, split, i, num_classes, resolution = args
    arr, label = synthetic.generate(seed, split, i, num_classes, resolution, _recipes(num_classes))
    return encode_image(arr, "png"), label


@functools.cache
def _recipes(num_classes: int):
    return synthetic.class_recipes(num_classes)


def prepare_synthetic(data, force: bool = False, workers: int = 1) -> dict:
    """Generate the synthetic dataset into ``data.root`` unless an identical one is already there.

    Images are rendered by ``workers`` processes and written in index order, so the shards are the
    same bytes whatever the number of workers."""
    root = Path(data.root)
    existing = read_manifest(root)
    if not force and synthetic_matches(existing, data):
        return existing
    root.mkdir(parents=True, exist_ok=True)
    _clear(root)
    recipes = _recipes(int(data.num_classes))
    writers = {}
    total = sum(int(data.splits[s]) for s in SPLITS)
    with tqdm(total=total, desc=f"synthetic {data.resolution}px", unit="img", disable=total < 2000) as bar:
        for split in SPLITS:
            with ShardWriter(root, split, data.samples_per_shard) as w:
                n = int(data.splits[split])
                jobs = ((int(data.seed), split, i, int(data.num_classes), int(data.resolution)) for i in range(n))
                for i, (png, label) in enumerate(_ordered_map(_render_synthetic, jobs, workers)):
                    w.write({"__key__": f"{split}-{i:08d}", "png": png,
                             "cls": str(label), "json": f'{{"label": {label}}}'})
                    bar.update()
            writers[split] = w
    manifest = {
        "name": "synthetic", "kind": "image_shards", "generator_version": synthetic.GENERATOR_VERSION,
        "seed": int(data.seed), "resolution": int(data.resolution), "num_classes": int(data.num_classes),
        "classes": [r.name for r in recipes], "image_format": "png",
    }
    return _finish(root, manifest, writers)


# ----------------------------------------------------------------------------------------- imagefolder
def _list_class_folder(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = []
    for idx, name in enumerate(classes):
        for p in sorted((folder / name).rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                files.append((str(p), idx))
    return classes, files


def _hash_fraction(text: str) -> float:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def plan_imagefolder(src: Path, val_fraction: float, test_fraction: float) -> tuple[list[str], dict]:
    """Which file goes to which split.

    ImageNet layout (``src/train``, ``src/val``): ``val`` becomes the held-out *test* split (as in the
    paper's scaling study) and a hashed ``val_fraction`` of train becomes *val*. A plain class folder is
    split by a hash of each file's path, so the split never changes when files are added elsewhere.
    """
    if not src.is_dir():
        raise DataError(f"data.src={src}: not a directory")
    if (src / "train").is_dir():
        classes, train = _list_class_folder(src / "train")
        test = []
        if (src / "val").is_dir():
            val_classes, val_files = _list_class_folder(src / "val")
            unknown = sorted(set(val_classes) - set(classes))
            if unknown:
                raise DataError(f"data.src={src}: val/ has classes missing from train/: {unknown[:5]}")
            # Labels follow train/'s class order, whichever classes val/ happens to hold.
            index = {name: classes.index(name) for name in val_classes}
            test = [(path, index[val_classes[label]]) for path, label in val_files]
        plan = {"train": [], "val": [], "test": test}
        for path, label in train:
            plan["val" if _hash_fraction(path) < val_fraction else "train"].append((path, label))
    else:
        classes, files = _list_class_folder(src)
        plan = {s: [] for s in SPLITS}
        for path, label in files:
            f = _hash_fraction(os.path.relpath(path, src))
            split = "test" if f < test_fraction else "val" if f < test_fraction + val_fraction else "train"
            plan[split].append((path, label))
    if not classes or not any(plan.values()):
        raise DataError(f"data.src={src}: no class subfolders with files found")
    return classes, plan


def _convert_one(args) -> tuple[bytes | None, str | None]:
    path, resolution, fmt, quality = args
    if Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
        return None, "not an image file extension"
    try:
        with Image.open(path) as img:
            img.load()  # forces a full decode: truncated files fail here, not later in training
            arr = np.asarray(resize_center_crop(img, resolution))
        return encode_image(arr, fmt, quality), None
    except Exception as e:  # PIL raises many types for bad files
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()


def _ordered_map(fn, items: Iterable, workers: int):
    if workers <= 1:
        yield from map(fn, items)
        return
    with Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=16)


def convert_imagefolder(data, workers: int = 1) -> dict:
    """Convert ``data.src`` into shards at ``data.resolution``; bad files are skipped and listed."""
    if not data.src:
        raise DataError("data.src is not set: pass data.src=/path/to/class/folders")
    src = Path(data.src).expanduser()
    classes, plan = plan_imagefolder(src, data.val_fraction, data.test_fraction)
    root = Path(data.root)
    root.mkdir(parents=True, exist_ok=True)
    _clear(root)
    skipped, writers = [], {}
    total = sum(len(v) for v in plan.values())
    with tqdm(total=total, desc=f"convert {src.name} -> {data.resolution}px", unit="img") as bar:
        for split in SPLITS:
            items = [(p, data.resolution, data.image_format, data.jpeg_quality) for p, _ in plan[split]]
            with ShardWriter(root, split, data.samples_per_shard) as w:
                for i, ((path, label), (blob, err)) in enumerate(
                        zip(plan[split], _ordered_map(_convert_one, items, workers))):
                    bar.update()
                    if err is not None:
                        skipped.append({"path": path, "reason": err})
                        continue
                    rel = os.path.relpath(path, src).replace('"', "'")
                    w.write({"__key__": f"{split}-{i:08d}", data.image_format: blob, "cls": str(label),
                             "json": f'{{"label": {label}, "source": "{rel}"}}'})
            writers[split] = w
    manifest = {
        "name": str(data.name), "kind": "image_shards", "source": str(src), "resolution": int(data.resolution),
        "num_classes": len(classes), "classes": classes, "image_format": data.image_format,
        "skipped": skipped,
    }
    return _finish(root, manifest, writers)

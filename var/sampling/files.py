"""What sampling writes: one PNG per image, a grid, and the .npz the ADM evaluator reads.

The .npz holds uint8 NHWC images under ``arr_0``, the layout of guided-diffusion's ``evaluator.py`` and of
VAR's ``create_npz_from_sample_folder``. Files are written under a temporary name and renamed, so a killed
run never leaves a truncated PNG that a re-run would take as done.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from var.data.shards import atomic_write_bytes


def rank_share(n: int, rank: int, world: int) -> list[int]:
    """Indices 0..n-1 that ``rank`` of ``world`` handles: i % world == rank (no duplicates, no gaps)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world {world}")
    return list(range(rank, n, world))


def image_seed(base: int, cls: int, index: int, per_class: int) -> int:
    """Seed of image ``index`` of class ``cls``: base + cls * per_class + index (distinct for all images)."""
    return int(base) + int(cls) * int(per_class) + int(index)


def png_name(cls: int, index: int, tag: str) -> str:
    return f"{cls:04d}_{index:05d}_{tag}.png"


def png_bytes(arr_hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr_hwc).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | os.PathLike, arr_hwc: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(arr_hwc))


def load_png(path: str | os.PathLike) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def save_npz(path: str | os.PathLike, images_nhwc: np.ndarray) -> None:
    """``np.savez(path, arr_0=images)``, atomically."""
    if images_nhwc.dtype != np.uint8 or images_nhwc.ndim != 4 or images_nhwc.shape[-1] != 3:
        raise ValueError(f"need uint8 (N, H, W, 3), got {images_nhwc.dtype} {images_nhwc.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # 50k images are ~10 GB: stream, no copy in memory
    with open(tmp, "wb") as f:
        np.savez(f, arr_0=images_nhwc)
    os.replace(tmp, path)


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, scale: int = 1) -> Image.Image:
    """Rows of HWC uint8 images on a white background (rows may differ in length)."""
    first = next(img for row in rows for img in row)
    h, w = first.shape[0] * scale, first.shape[1] * scale
    n_cols = max(len(r) for r in rows)
    out = Image.new("RGB", (n_cols * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            tile = Image.fromarray(img)
            if scale != 1:
                tile = tile.resize((w, h), Image.NEAREST)
            out.paste(tile, (pad + c * (w + pad), pad + r * (h + pad)))
    return out


def save_image(path: str | os.PathLike, img: Image.Image) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())

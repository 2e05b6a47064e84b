"""Data: generator determinism, shard atomicity, the imagefolder converter, the datamodule."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from PIL import Image

from var.data import prepare as prep
from var.data.datamodule import ImageShardDataModule
from var.data.prepare import convert_imagefolder, prepare_synthetic
from var.data.shards import MANIFEST, iter_tar_samples, read_manifest
from var.data.synthetic import class_recipes, generate
from var.errors import DataError


def _synthetic_cfg(root, seed=0, resolution=32, train=120):
    return OmegaConf.create(dict(name="synthetic", root=str(root), seed=seed, resolution=resolution,
                                 num_classes=10, samples_per_shard=50, splits=dict(train=train, val=20, test=20)))


# ------------------------------------------------------------------------------------------- generator
def test_same_seed_gives_byte_identical_shards(tmp_path):
    a = prepare_synthetic(_synthetic_cfg(tmp_path / "a"))
    b = prepare_synthetic(_synthetic_cfg(tmp_path / "b"))
    c = prepare_synthetic(_synthetic_cfg(tmp_path / "c", seed=1))
    for split in ("train", "val", "test"):
        assert a["splits"][split]["sha256"] == b["splits"][split]["sha256"]
        for name in a["splits"][split]["shards"]:
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a["fingerprint"] == b["fingerprint"] != c["fingerprint"]


def test_manifest_describes_the_dataset(tmp_path):
    m = prepare_synthetic(_synthetic_cfg(tmp_path))
    assert m["num_classes"] == 10 and m["resolution"] == 32 and m["seed"] == 0
    assert len(m["classes"]) == 10 and m["generator_version"] >= 1
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 120, "val": 20, "test": 20}
    assert m["splits"]["train"]["class_counts"] == {str(c): 12 for c in range(10)}
    keys = [s["__key__"] for name in m["splits"]["train"]["shards"] for s in iter_tar_samples(tmp_path / name)]
    assert len(keys) == len(set(keys)) == 120


def test_classes_differ_and_images_have_structure_at_several_scales():
    recipes = class_recipes(10)
    assert len({r.name for r in recipes}) == 10
    imgs = np.stack([generate(0, "train", i, 10, 64, recipes)[0] for i in range(200)]).astype(np.float64)
    labels = np.arange(200) % 10
    # Coarse structure: class means differ clearly at 4x4 resolution.
    coarse = imgs.reshape(200, 4, 16, 4, 16, 3).mean((2, 4))
    means = np.stack([coarse[labels == c].mean(0) for c in range(10)])
    between = np.mean([np.abs(means[i] - means[j]).mean() for i in range(10) for j in range(i + 1, 10)])
    assert between > 10
    # Images within a class vary (a distribution, not a template) ...
    assert np.mean([imgs[labels == c].std(0).mean() for c in range(10)]) > 10
    # ... and carry fine detail: energy in the finest 2x2 differences.
    fine = np.abs(np.diff(imgs, axis=1)).mean()
    assert fine > 3


@pytest.mark.parametrize("res", [16, 48, 256])
def test_any_resolution_renders(res):
    img, label = generate(3, "val", 7, 12, res)
    assert img.shape == (res, res, 3) and img.dtype == np.uint8 and label == 7


def test_prepare_reuses_an_identical_dataset(tmp_path):
    cfg = _synthetic_cfg(tmp_path)
    prepare_synthetic(cfg)
    mtime = os.path.getmtime(tmp_path / MANIFEST)
    prepare_synthetic(cfg)
    assert os.path.getmtime(tmp_path / MANIFEST) == mtime
    cfg.splits.train = 130
    assert prepare_synthetic(cfg)["splits"]["train"]["count"] == 130


# ----------------------------------------------------------------------------------------- imagefolder
def _png_bytes(color, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(color, size=(50, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    src = tmp_path / "src"
    for c, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        d = src / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(6):
            (d / f"img{i}.png").write_bytes(_png_bytes(color))
        (d / "photo.jpg").write_bytes(_jpeg_bytes(color))
    (src / "class_0" / "truncated.jpg").write_bytes(_jpeg_bytes((1, 2, 3))[:200])
    (src / "class_1" / "notanimage.jpg").write_bytes(b"this is text, not a jpeg")
    (src / "class_2" / "readme.txt").write_text("hello")
    return src


def _folder_cfg(src, root, **kw):
    base = dict(name="imagefolder", src=str(src), root=str(root), resolution=16, image_format="png",
                jpeg_quality=90, val_fraction=0.2, test_fraction=0.2, samples_per_shard=5)
    base.update(kw)
    return OmegaConf.create(base)


def test_converter_skips_bad_files_and_keeps_good_ones(image_folder, tmp_path):
    m = convert_imagefolder(_folder_cfg(image_folder, tmp_path / "out"))
    skipped = {os.path.basename(s["path"]) for s in m["skipped"]}
    assert skipped == {"truncated.jpg", "notanimage.jpg", "readme.txt"}
    assert sum(v["count"] for v in m["splits"].values()) == 21
    assert m["classes"] == ["class_0", "class_1", "class_2"]
    for info in m["splits"].values():
        for name in info["shards"]:
            for s in iter_tar_samples(tmp_path / "out" / name):
                img = Image.open(io.BytesIO(s["png"]))
                assert img.size == (16, 16)
                assert json.loads(s["json"])["label"] == int(s["cls"])


def test_converter_imagenet_layout_uses_val_as_test(image_folder, tmp_path):
    root = tmp_path / "imagenet"
    (root / "train").mkdir(parents=True)
    os.rename(image_folder, root / "train" / "x")  # move class folders under train/
    for c in (root / "train" / "x").iterdir():
        os.rename(c, root / "train" / c.name)
    (root / "train" / "x").rmdir()
    (root / "val" / "class_0").mkdir(parents=True)
    (root / "val" / "class_0" / "v.png").write_bytes(_png_bytes((9, 9, 9)))
    m = convert_imagefolder(_folder_cfg(root, tmp_path / "out", val_fraction=0.3))
    assert m["splits"]["test"]["count"] == 1
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == 21


def test_converter_missing_or_empty_folder_is_one_line_error(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        convert_imagefolder(_folder_cfg(tmp_path / "nope", tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        convert_imagefolder(_folder_cfg(tmp_path / "empty", tmp_path / "out"))


def test_interrupted_conversion_leaves_no_partial_shard(image_folder, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = prep._convert_one

    def flaky(args):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt  # a kill in the middle of the second shard
        return real(args)

    monkeypatch.setattr(prep, "_convert_one", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_imagefolder(_folder_cfg(image_folder, out))
    assert not (out / MANIFEST).exists()
    assert not list(out.glob("*.tmp"))
    for shard in out.glob("*.tar"):  # finished shards are complete tar files
        assert len(list(iter_tar_samples(shard))) == 5
    monkeypatch.setattr(prep, "_convert_one", real)
    assert read_manifest(out) is None
    assert convert_imagefolder(_folder_cfg(image_folder, out))["splits"]["train"]["count"] > 0


# ------------------------------------------------------------------------------------------ datamodule
def test_datamodule_batches_with_two_workers(small_dataset):
    _, root = small_dataset
    dm = ImageShardDataModule(str(root), resolution=32, batch_size=8, eval_batch_size=16, num_workers=2,
                              train_batches_per_epoch=6, shuffle_buffer=50)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 6
    for x, y, keys in batches:
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and y.dtype == torch.long and len(keys) == 8
    val_keys = [k for _, _, ks in dm.val_dataloader() for k in ks]
    assert len(val_keys) == len(set(val_keys)) == 60
    # Upsampling from stored 32 px to a configured 48 px goes through resize + crop.
    dm48 = ImageShardDataModule(str(root), resolution=48, batch_size=4, num_workers=0)
    x, _, _ = next(iter(dm48.val_dataloader()))
    assert x.shape == (4, 3, 48, 48)


def test_flip_only_in_training(small_dataset):
    _, root = small_dataset
    dm = ImageShardDataModule(str(root), resolution=32, batch_size=60, num_workers=0, hflip=True)
    a = torch.cat([x for x, _, _ in dm.val_dataloader()])
    b = torch.cat([x for x, _, _ in dm.val_dataloader()])
    assert torch.equal(a, b)


def test_training_images_are_the_same_in_every_process(small_dataset):
    """Order and flips are functions of the seed: two processes with differently salted str hashes
    (PYTHONHASHSEED) read the same training images, flipped the same way."""
    _, root = small_dataset
    code = ("import sys, torch; from var.data.datamodule import ImageShardDataModule as D; "
            "dm = D(sys.argv[1], resolution=32, batch_size=8, num_workers=0, hflip=True); dm.setup('fit'); "
            "it = iter(dm.train_dataloader()); xs = torch.cat([next(it)[0] for _ in range(3)]).double(); "
            "print(repr(float((xs * torch.arange(xs.numel()).view_as(xs)).sum())), next(it)[2])")
    outs = [subprocess.run([sys.executable, "-c", code, str(root)], env={**os.environ, "PYTHONHASHSEED": salt},
                           capture_output=True, text=True, check=True).stdout for salt in ("1", "2")]
    assert outs[0] == outs[1]


def test_missing_dataset_is_a_clear_error(tmp_path):
    dm = ImageShardDataModule(str(tmp_path / "none"), resolution=32, batch_size=4)
    with pytest.raises(DataError, match="task=prepare"):
        dm.setup("fit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dm = ImageShardDataModule(root, resolution=32, batch_size=5, eval_batch_size=7, num_workers=2,
                              train_batches_per_epoch=8, shuffle_buffer=20)
    dm.setup("fit")
    train = [list(k) for _, _, k in dm.train_dataloader()]
    val = [k for _, _, ks in dm.val_dataloader() for k in ks]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"train": train, "val": val}, f)
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_split(small_dataset, tmp_path):
    _, root = small_dataset
    # Forked ranks skip re-importing torch; the gloo group is created after the fork, as in a real launch.
    ctx, port = mp.get_context("fork"), _free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, port, str(root), str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["train"]) == len(r1["train"]) == 8           # same number of batches: no rank hangs
    keys0 = {k for b in r0["train"] for k in b}
    keys1 = {k for b in r1["train"] for k in b}
    assert keys0 and keys1 and not keys0 & keys1               # disjoint shards per rank
    assert not set(r0["val"]) & set(r1["val"])                 # evaluation: each sample exactly once
    assert len(r0["val"]) + len(r1["val"]) == 60

"""Fault injection in data: truncated shards, undecodable images, bad token rows are skipped, counted,
logged and recorded; past data.max_bad_fraction a run fails with one line naming the shard."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from var.data.datamodule import ImageShardDataModule
from var.data.shards import ShardWriter, iter_tar_samples, read_manifest, split_urls
from var.data.tokens import TokenDataModule, load_split_cached, read_split
from var.errors import DataError


# ---------------------------------------------------------------------------------------------- helpers
def rewrite_shard(path: Path, change) -> list[str]:
    """Rewrite a shard in place with ``change(i, sample)`` applied to each sample; returns its keys."""
    samples = list(iter_tar_samples(path))
    for i, s in enumerate(samples):
        change(i, s)
    tmp = path.parent / "rewrite"
    with ShardWriter(tmp, "x", 10 ** 9) as w:
        for s in samples:
            w.write(s)
    os.replace(tmp / "x-000000.tar", path)
    tmp.rmdir()
    return [s["__key__"] for s in samples]


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def fault_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("data fault: skipped")]


@pytest.fixture
def token_copy(small_token_cache, tmp_path):
    """A private copy of the session's token cache (without its split caches) to corrupt."""
    _, root = small_token_cache
    dst = tmp_path / "tokens"
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns("*.npz"))
    return dst


@pytest.fixture
def image_copy(small_dataset, tmp_path):
    _, root = small_dataset
    dst = tmp_path / "images"
    shutil.copytree(root, dst)
    return dst


def corrupt_tokens(root: Path) -> dict[str, str]:
    """Four bad train rows: out of range, negative (int16), wrong length, undecodable. Returns key -> kind."""
    url = Path(split_urls(root, "train")[0])
    bad = {}

    def change(i, s):
        if i == 3:
            t = np.load(io.BytesIO(s["tokens.npy"]))
            t[5] = 64  # vocab of vq_test32 is 64
            s["tokens.npy"], bad[s["__key__"]] = npy(t), "out_of_range"
        elif i == 10:
            t = np.load(io.BytesIO(s["tokens.npy"])).astype(np.int16)
            t[-1] = -2
            s["tokens.npy"], bad[s["__key__"]] = npy(t), "out_of_range"
        elif i == 20:
            s["tokens.npy"], bad[s["__key__"]] = npy(np.zeros(29, np.uint16)), "wrong_length"
        elif i == 30:
            s["tokens.npy"], bad[s["__key__"]] = b"garbage", "undecodable"

    rewrite_shard(url, change)
    return bad


# ----------------------------------------------------------------------------------------------- tokens
def test_bad_token_rows_are_skipped_counted_logged_and_cached(token_copy, caplog):
    bad = corrupt_tokens(token_copy)
    caplog.set_level(logging.WARNING, logger="var.data.faults")
    tokens, labels, variants, keys, faults = read_split(token_copy, "train")
    assert len(tokens) == 800 - 4 and not set(keys) & set(bad)
    assert tokens.dtype == np.uint16 and int(tokens.max()) < 64
    assert faults["seen"] == 800 and faults["skipped"] == 4
    assert faults["by_kind"] == {"out_of_range": 2, "wrong_length": 1, "undecodable": 1}
    (shard,) = faults["files"]
    assert shard["file"].endswith("train-000000.tar") and shard["skipped"] == 4
    assert {e["key"]: e["kind"] for e in faults["examples"]} == bad
    lines = fault_lines(caplog)
    assert len(lines) == 4 and all("train-000000.tar" in ln and "\n" not in ln for ln in lines)
    assert all(any(k in ln for ln in lines) for k in bad)
    # The split cache keeps the counts: a second load reads no shard and reports the same faults.
    first = load_split_cached(token_copy, "train")
    assert (token_copy / "train.npz").is_file()
    caplog.clear()
    again = load_split_cached(token_copy, "train")
    assert again[3] == first[3] and again[3]["skipped"] == 4 and not fault_lines(caplog)
    np.testing.assert_array_equal(again[0], tokens)


def test_truncated_token_shard_counts_what_it_lost(token_copy):
    url = Path(split_urls(token_copy, "val")[0])
    truncate(url, 0.5)
    tokens, _, _, _, faults = read_split(token_copy, "val")
    assert faults["seen"] == 120  # the manifest's count of the shard
    assert faults["skipped"] == 120 - len(tokens) and 0 < len(tokens) < 120
    # A tar cut inside a member leaves a partial last sample (undecodable); the rest is the shard's loss.
    assert faults["by_kind"]["bad_shard"] >= faults["skipped"] - 1
    assert any("samples lost" in e["detail"] for e in faults["examples"])


def test_too_many_bad_token_rows_fail_with_one_line(token_copy):
    corrupt_tokens(token_copy)  # 4 of 800 = 0.5%
    dm = TokenDataModule(str(token_copy), batch_size=8, max_bad_fraction=0.01)
    assert len(dm.dataset("train")) == 796
    assert dm.fault_summary()["splits"]["train"]["skipped"] == 4
    strict = TokenDataModule(str(token_copy), batch_size=8, max_bad_fraction=0.004)
    with pytest.raises(DataError) as e:
        strict.dataset("train")
    msg = str(e.value)
    assert "\n" not in msg and "train-000000.tar" in msg and "0.50%" in msg and "data.max_bad_fraction=0.004" in msg
    assert e.value.data_faults["skipped"] == 4


def test_training_records_faults_and_fails_past_the_limit(token_copy, tmp_path):
    from tests.test_train import run_train

    corrupt_tokens(token_copy)
    record, _ = run_train(tmp_path / "ok", token_copy, steps=2, extra=("task.record.num_eval_points=1",
                                                                       "task.eval_limit=16"))
    assert record["status"] == "complete"
    faults = json.loads((tmp_path / "ok" / "run" / "record.json").read_text())["data_faults"]
    assert faults["skipped"] == 4 and faults["seen"] == 800 + 120 + 120
    assert faults["splits"]["train"]["by_kind"]["out_of_range"] == 2 and faults["max_bad_fraction"] == 0.01
    with pytest.raises(DataError, match=r"train-000000\.tar: 4 of 800 train samples bad"):
        run_train(tmp_path / "strict", token_copy, steps=2, extra=("data.max_bad_fraction=0.001",))
    failed = json.loads((tmp_path / "strict" / "run" / "record.json").read_text())
    assert failed["status"] == "failed" and failed["error"].startswith("DataError: ")
    assert "data.max_bad_fraction=0.001" in failed["error"] and failed["data_faults"]["skipped"] == 4


# ----------------------------------------------------------------------------------------------- images
def corrupt_images(root: Path) -> tuple[str, Path]:
    """A garbage image in val and a train shard truncated to 60% of its bytes."""
    val = Path(split_urls(root, "val")[0])
    keys = rewrite_shard(val, lambda i, s: s.update(png=b"\x89PNG not really") if i == 7 else None)
    train = Path(split_urls(root, "train")[1])
    truncate(train, 0.6)
    return keys[7], train


@pytest.mark.parametrize("workers", [0, 2])
def test_image_shards_skip_and_count_across_workers(image_copy, workers, caplog):
    bad_key, train_shard = corrupt_images(image_copy)
    caplog.set_level(logging.WARNING, logger="var.data.faults")
    dm = ImageShardDataModule(str(image_copy), resolution=32, batch_size=10, eval_batch_size=16,
                              num_workers=workers, max_bad_fraction=0.5)
    val_keys = [k for _, _, ks in dm.val_dataloader() for k in ks]
    assert len(val_keys) == 59 and bad_key not in val_keys
    # Reading every train shard once (the evaluation pipeline) meets the truncated one.
    train_keys = [k for _, _, ks in dm._loader(dm.eval_pipeline("train")) for k in ks]
    s = dm.fault_summary()
    assert s["splits"]["val"] == {"seen": 60, "skipped": 1, "by_kind": {"undecodable": 1}}
    train = s["splits"]["train"]
    assert train["seen"] == 400 and train["skipped"] == 400 - len(train_keys) > 0
    assert set(train["by_kind"]) <= {"bad_shard", "undecodable"} and train["by_kind"]["bad_shard"] > 0
    assert {f["file"] for f in s["files"]} == {str(train_shard), split_urls(image_copy, "val")[0]}
    if workers == 0:  # workers log in their own processes
        lines = fault_lines(caplog)
        assert any(bad_key in ln and "val-000000.tar" in ln for ln in lines)
        assert any(train_shard.name in ln and "bad_shard" in ln for ln in lines)


def test_image_loader_fails_past_the_limit(image_copy):
    corrupt_images(image_copy)
    dm = ImageShardDataModule(str(image_copy), resolution=32, batch_size=10, eval_batch_size=16, num_workers=2,
                              max_bad_fraction=0.01)
    with pytest.raises(DataError) as e:
        list(dm.val_dataloader())  # 1 of 60 = 1.7%
    msg = str(e.value)
    assert "\n" not in msg and "val-000000.tar" in msg and "1 of 60 val samples bad (1.67%" in msg


def test_encode_skips_a_corrupt_image_and_stays_complete(image_copy, tmp_path):
    from tests.test_encode import encode_cfg, random_tokenizer
    from var.tasks import encode

    val = Path(split_urls(image_copy, "val")[0])
    keys = rewrite_shard(val, lambda i, s: s.update(png=b"garbage") if i == 7 else None)
    cfg = encode_cfg(image_copy, tmp_path, random_tokenizer(tmp_path / "tok.pt"), "task.splits=[val]",
                     "data.max_bad_fraction=0.05")
    manifest = encode.run(cfg)
    entry = manifest["splits"]["val"]
    assert entry["images"] == 59 and entry["skipped"] == 1 and entry["count"] == 118
    assert manifest["data_faults"]["by_kind"] == {"undecodable": 1}
    written = {s["__key__"] for url in split_urls(tmp_path / "tokens", "val") for s in iter_tar_samples(url)}
    assert len(written) == 118 and not {f"{keys[7]}_v0", f"{keys[7]}_v1"} & written
    # A cache missing an image that the reader did not skip is still refused.
    with pytest.raises(DataError, match="incomplete"):
        encode.check_complete(tmp_path / "tokens", str(image_copy), read_manifest(image_copy), "val", [0, 1])


def test_split_shortfall_is_counted_without_per_shard_counts(token_copy):
    manifest = read_manifest(token_copy)
    del manifest["splits"]["val"]["shard_counts"]  # as an older cache's manifest
    (token_copy / "manifest.json").write_text(json.dumps(manifest))
    truncate(Path(split_urls(token_copy, "val")[0]), 0.5)
    tokens, _, _, _, faults = read_split(token_copy, "val")
    assert faults["seen"] == 120 and faults["skipped"] == 120 - len(tokens)
    assert any("of the manifest's 120 samples readable" in e["detail"] for e in faults["examples"])


def test_tokenizer_training_reports_skipped_images(image_copy, tmp_path, capsys):
    from tests.test_tokenizer_training import train_cfg
    from var.tasks import train_tokenizer

    bad_key, _ = corrupt_images(image_copy)
    cfg = train_cfg(image_copy, tmp_path, "task.max_steps=4", "task.val_every_n_steps=4",
                    "data.train_batches_per_epoch=4", "data.max_bad_fraction=0.5")
    res = train_tokenizer.run(cfg)
    faults = res["data_faults"]
    assert faults["splits"]["val"]["skipped"] == 1 and bad_key in {e["key"] for e in faults["examples"]}
    assert faults["max_bad_fraction"] == 0.5
    assert f"skipped {faults['skipped']} of {faults['seen']} samples read as corrupt" in capsys.readouterr().out
    from var.checkpoints import safe_load

    assert safe_load(res["tokenizer"], "tokenizer")["meta"]["data_faults"] == faults

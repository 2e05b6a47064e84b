"""Training from image shards through a frozen tokenizer (task.source=images), without a token cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import compose_cfg, resolved
from tests.test_encode import encode_cfg, random_tokenizer
from tests.test_train import train_overrides
from var.data.tokens import read_split
from var.errors import ConfigError
from var.tasks import encode
from var.tasks.train_source import image_source, source_of


def image_extra(root, tok):
    return ("task.source=images", "tokenizer=vq_test32", f"data.root={root}", "data.num_workers=0",
            "data.shuffle_buffer=200", f"task.tokenizer_path={tok}")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return random_tokenizer(tmp_path_factory.mktemp("imgtok") / "tok.pt")


@pytest.fixture(scope="module")
def image_run(small_dataset, tokenizer_file, tmp_path_factory):
    """60 steps from the images, with checkpoints (last.ckpt at step 60)."""
    from var.tasks import train

    _, root = small_dataset
    tmp = tmp_path_factory.mktemp("imgrun")
    overrides = [o for o in train_overrides(tmp / "no_cache", steps=60, extra=image_extra(root, tokenizer_file))
                 if o != "callbacks=none"]
    cfg = resolved(compose_cfg([*overrides, "callbacks.checkpoint.every_n_train_steps=30"], root=tmp))
    cfg.paths.output_dir = str(tmp / "run")
    cfg.callbacks.checkpoint.dirpath = str(tmp / "run" / "checkpoints")
    torch.manual_seed(0)
    return tmp / "run", train.run(cfg)


def test_a_short_run_from_images_lowers_the_loss_and_writes_a_complete_record(small_dataset, tokenizer_file,
                                                                             image_run):
    _, root = small_dataset
    run_dir, record = image_run
    assert record["status"] == "complete" and record["error"] is None
    evals = record["evals"]
    assert evals[-1]["L_mean"] < evals[0]["L_mean"] - 0.1
    on_disk = json.loads((run_dir / "record.json").read_text())
    src = on_disk["tokens_source"]
    assert src["kind"] == "images" and src["root"] == str(root) and src["tokenizer"]["path"] == str(tokenizer_file)
    assert on_disk["config"]["task"]["tokenizer_path"] == str(tokenizer_file)  # sampling finds it there
    final = on_disk["final"]
    assert final["step"] == 60 and final["n_images"] == 60 and len(final["per_scale_loss"]) == 4
    assert on_disk["progress"]["tokens_seen"] == 60 * 32 * 30


def test_evaluate_gives_the_test_loss_training_logged_without_a_token_cache(image_run, tmp_path):
    """task=evaluate on a run trained from images encodes the test split as training did."""
    from tests.test_eval_task import evaluate

    run_dir, record = image_run
    res = evaluate(run_dir, tmp_path, "task.what=[test_loss]")["test_loss"]
    assert res["step"] == record["final"]["step"] == 60
    assert res["settings"]["tokens"].startswith("images:")
    for key in ("L_mean", "L_last", "err_mean", "err_last"):
        assert res["metrics"][key] == pytest.approx(record["final"][key], abs=1e-6), key


def test_batches_get_the_tokens_task_encode_writes(small_dataset, tokenizer_file, tmp_path):
    _, root = small_dataset
    ecfg = encode_cfg(root, tmp_path, tokenizer_file, "task.splits=[train,test]")
    encode.run(ecfg)
    cache = read_split(tmp_path / "tokens", "train")
    by_key = {k: t for t, k in zip(cache[0], cache[3])}

    cfg = resolved(compose_cfg(train_overrides(tmp_path / "no_cache", extra=image_extra(root, tokenizer_file)),
                               root=tmp_path))
    dm, _, _, _ = image_source(cfg, world=1)
    torch.manual_seed(0)
    flips = []
    for batch, _ in zip(dm.train_dataloader(), range(2)):
        keys = batch[2]
        tokens, labels = dm.on_after_batch_transfer(batch, 0)
        assert tokens.shape == (32, 30) and torch.equal(labels, batch[1])
        for key, row in zip(keys, tokens.numpy()):
            as_is, flipped = (np.array_equal(row, by_key[f"{key}_v{v}"]) for v in (0, 1))
            assert as_is or flipped, key  # exactly the cached tokens of the image or of its flip
            if as_is != flipped:
                flips.append(flipped)
    assert any(flips) and not all(flips)  # the random flip gives both variants

    # Evaluation holds the unflipped test split, in full: the cache's variant 0.
    test = read_split(tmp_path / "tokens", "test")
    keep = test[2] == 0
    ds = dm.dataset("test")
    assert torch.equal(ds.tokens, torch.from_numpy(test[0][keep].astype(np.int64)))
    assert torch.equal(ds.labels, torch.from_numpy(test[1][keep]))


def test_an_unusable_source_is_one_config_error(small_dataset, tmp_path):
    _, root = small_dataset
    cases = [(["task.source=video"], "task.source=video: expected tokens | images"),
             ([f"task.tokens={tmp_path}/none"], "task.source=tokens: no token cache at"),
             (["task.source=images", f"data.root={tmp_path}/none"], "task.source=images: no image dataset at")]
    for overrides, message in cases:
        cfg = resolved(compose_cfg(["task=train", *overrides], root=tmp_path))
        with pytest.raises(ConfigError, match=message) as e:
            source_of(cfg)
        assert "\n" not in str(e.value)
    cfg = resolved(compose_cfg(["task=train", "task.source=images", f"data.root={root}"], root=tmp_path))
    assert source_of(cfg) == "images"

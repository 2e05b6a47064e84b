"""task=evaluate end to end on a tiny trained run: test loss equals training's, generation and tokenizer
evaluations write their record entries and metrics files."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import compose_cfg, resolved


@pytest.fixture(scope="module")
def trained_run(small_token_cache, tmp_path_factory):
    """A 40-step depth-2 run on the small token cache, with checkpoints (last.ckpt at step 40)."""
    from var.tasks import train

    _, tokens = small_token_cache
    root = tmp_path_factory.mktemp("evalrun")
    overrides = ["task=train", "logger=none", "trainer=cpu", f"task.tokens={tokens}", "task.max_steps=40",
                 "model.depth=2", "model.patch_nums=[1,2,3,4]", "model.vocab_size=64", "model.cvae=8",
                 "task.batch_size=32", "task.eval_batch_size=64", "task.val_every_n_steps=20",
                 "task.optim.lr=3e-3", "task.record.num_eval_points=3", "trainer.enable_progress_bar=false",
                 "data.resolution=32", "callbacks.checkpoint.every_n_train_steps=20"]
    cfg = resolved(compose_cfg(overrides, root=root))
    cfg.paths.output_dir = str(root / "run")
    cfg.callbacks.checkpoint.dirpath = str(root / "run" / "checkpoints")
    torch.manual_seed(0)
    record = train.run(cfg)
    assert record["status"] == "complete" and (root / "run" / "checkpoints" / "last.ckpt").is_file()
    return root / "run", record


def evaluate(run_dir, tmp_path, *extra):
    from var.tasks import evaluate as ev

    cfg = resolved(compose_cfg(["task=evaluate", f"task.ckpt={run_dir}", "data.resolution=32",
                                "tokenizer=vq_test32", *extra], root=tmp_path))
    return ev.run(cfg)


def test_missing_ckpt_is_one_line(tmp_path):
    from var.errors import ConfigError

    with pytest.raises(ConfigError, match="task.ckpt"):
        evaluate("null", tmp_path, "task.ckpt=null")


def test_test_loss_equals_what_training_logged(trained_run, tmp_path):
    run_dir, record = trained_run
    res = evaluate(run_dir, tmp_path, "task.what=[test_loss]")["test_loss"]
    final = record["final"]
    assert res["step"] == final["step"] == 40
    for key in ("L_mean", "L_last", "err_mean", "err_last"):
        assert res["metrics"][key] == pytest.approx(final[key], abs=1e-6), key
    assert res["metrics"]["per_scale_loss"] == pytest.approx(final["per_scale_loss"], abs=1e-6)
    on_disk = json.loads((run_dir / "record.json").read_text())
    entry = next(e for e in on_disk["evaluations"] if e["kind"] == "test_loss")
    assert entry["step"] == 40 and entry["metrics"]["L_mean"] == res["metrics"]["L_mean"]
    assert on_disk["final"] == record["final"] and on_disk["status"] == "complete"  # training's fields untouched
    assert (run_dir / "eval" / f"metrics_{entry['tag']}.json").is_file()
    # A re-run finds the entry and skips.
    again = evaluate(run_dir, tmp_path, "task.what=[test_loss]")["test_loss"]
    assert again["timestamp"] == res["timestamp"]


def test_generation_end_to_end_with_a_tiny_classifier(trained_run, small_dataset, tmp_path):
    run_dir, _ = trained_run
    _, data_root = small_dataset
    res = evaluate(run_dir, tmp_path, "task.what=[generation]", f"task.data_root={data_root}",
                   "task.generation.per_class=3", "task.generation.batch_size=16", "task.classifier.epochs=2",
                   "task.classifier.width=8", "task.generation.kid_subsets=5",
                   f"task.cache_dir={tmp_path / 'cache'}")["generation"]
    m = res["metrics"]
    assert res["num_samples"] == 30 and res["feature_extractor"] == "synthetic_classifier"
    for key in ("fd_synthetic_classifier", "kid_synthetic_classifier", "precision_synthetic_classifier",
                "recall_synthetic_classifier", "is_synthetic_classifier", "class_accuracy_synthetic_classifier"):
        assert isinstance(m[key], float), key
    assert m["fd_synthetic_classifier"] > 0 and 0 <= m["class_accuracy_synthetic_classifier"] <= 1
    assert res["settings"]["cfg"] == 1.5 and res["reference"]["kind"] == "split"
    assert res["baseline"]["n"] == 60 and "fd_synthetic_classifier" in res["baseline"]
    import numpy as np

    with np.load(res["samples"]) as z:
        assert z["arr_0"].shape == (30, 32, 32, 3) and z["arr_0"].dtype == np.uint8
    on_disk = json.loads((run_dir / "record.json").read_text())
    assert any(e["tag"] == res["tag"] for e in on_disk["evaluations"])
    assert json.loads((run_dir / "eval" / f"metrics_{res['tag']}.json").read_text())["metrics"] == m

    # The evaluated samples are the images task=sample writes with the same settings (on a GPU both take
    # the fast path; the same batches, so the same kernels).
    from var.tasks import sample

    cfg = resolved(compose_cfg(["task=sample", f"task.ckpt={run_dir}", "task.per_class=3", "task.batch_size=16",
                                "data.resolution=32", "tokenizer=vq_test32"], root=tmp_path))
    cfg.task.out = str(tmp_path / "sampled")
    assert res["settings"]["fast"] == torch.cuda.is_available()
    with np.load(res["samples"]) as z, np.load(sample.run(cfg)["npz"]) as w:
        diff = np.abs(z["arr_0"].astype(int) - w["arr_0"].astype(int))
    assert diff.max() == 0 if not torch.cuda.is_available() else diff.mean() < 0.5


def test_fast_generation_needs_cuda(trained_run, tmp_path):
    from var.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("the fast path is there on a GPU")
    with pytest.raises(ConfigError, match=r"task.generation.fast=true needs a CUDA device"):
        evaluate(trained_run[0], tmp_path, "task.what=[generation]", "task.generation.fast=true")


def test_tokenizer_evaluation(trained_run, small_dataset, tmp_path):
    from var.errors import UserError

    run_dir, _ = trained_run
    _, data_root = small_dataset
    common = ["task.what=[tokenizer]", f"task.data_root={data_root}", "task.tokenizer.limit=20",
              f"task.cache_dir={tmp_path / 'cache'}", "task.classifier.epochs=1", "task.classifier.width=8"]
    res = evaluate(run_dir, tmp_path, *common, "task.tokenizer.lpips=false")["tokenizer"]
    m = res["metrics"]
    assert m["n_images"] == 20 and m["psnr"] > 0 and -1 <= m["ssim"] <= 1 and m["rfd_synthetic_classifier"] >= 0
    # LPIPS requested without its weights: one line naming the files and the way out.
    with pytest.raises(UserError) as e:
        evaluate(run_dir, tmp_path, *common, f"task.tokenizer.lpips_weights={tmp_path / 'none'}", "task.force=true")
    assert "lpips_vgg16.pth" in str(e.value) and "lpips=false" in str(e.value) and "\n" not in str(e.value)

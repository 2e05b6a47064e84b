"""Transformer training on cached tokens: loss falls, record.json is complete and valid, re-runs skip."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import compose_cfg, resolved
from var.callbacks.scaling_record import log_spaced_steps
from var.lit.schedules import lr_factor, progressive_scale


def train_overrides(tokens_root, steps=40, depth=2, extra=()):
    return ["task=train", "logger=none", "callbacks=none", "trainer=cpu", f"task.tokens={tokens_root}",
            f"task.max_steps={steps}", f"model.depth={depth}", "model.patch_nums=[1,2,3,4]", "model.vocab_size=64",
            "model.cvae=8", "task.batch_size=32", "task.eval_batch_size=64", "task.val_every_n_steps=20",
            "task.optim.lr=3e-3", "task.record.num_eval_points=4", "trainer.enable_progress_bar=false",
            "data.resolution=32", *extra]


def run_train(tmp_path, tokens_root, **kw):
    from var.tasks import train

    overrides = train_overrides(tokens_root, **kw)
    cfg = resolved(compose_cfg(overrides, root=tmp_path))
    cfg.paths.output_dir = str(tmp_path / "run")
    torch.manual_seed(0)
    return train.run(cfg), cfg


def test_short_cpu_run_lowers_test_loss_and_writes_a_complete_record(small_token_cache, tmp_path):
    _, tokens_root = small_token_cache
    record, _ = run_train(tmp_path, tokens_root, steps=60)
    assert record["status"] == "complete" and record["error"] is None
    evals = record["evals"]
    assert [e["step"] for e in evals] == log_spaced_steps(60, 4, 0.01)
    assert evals[-1]["L_mean"] < evals[0]["L_mean"] - 0.1
    assert evals[-1]["annealed"] and not evals[0]["annealed"]
    # Every field analysis relies on (docs/record_format.md).
    on_disk = json.loads((tmp_path / "run" / "record.json").read_text())
    for key in ("schema", "run_name", "run_dir", "status", "config", "model", "tokens_per_image",
                "flops_per_image", "batch_size", "progress", "evals", "final", "started_at", "updated_at"):
        assert key in on_disk, key
    assert on_disk["tokens_per_image"] == 1 + 4 + 9 + 16
    assert set(on_disk["flops_per_image"]) >= {"6NL", "exact", "exact_dense_attn"}
    m = on_disk["model"]
    assert m["depth"] == 2 and m["width"] == 128 and m["params_total"] > m["params_non_embedding"] > 0
    final = on_disk["final"]
    assert final["step"] == 60 and len(final["per_scale_loss"]) == 4 and final["n_images"] == 60
    assert on_disk["progress"]["tokens_seen"] == 60 * 32 * 30
    assert on_disk["progress"]["flops_seen"]["exact"] == pytest.approx(60 * 32 * on_disk["flops_per_image"]["exact"])
    assert evals[-1]["tokens_seen"] == on_disk["progress"]["tokens_seen"]
    # L_mean is token-weighted: the per-scale losses weighted by tokens per scale give it back.
    w = torch.tensor([1.0, 4, 9, 16])
    assert final["L_mean"] == pytest.approx(float((torch.tensor(final["per_scale_loss"]) * w).sum() / w.sum()), rel=1e-6)
    assert final["L_last"] == pytest.approx(final["per_scale_loss"][-1])
    # A re-run of the same command skips the complete run.
    again, _ = run_train(tmp_path, tokens_root, steps=60)
    assert again["updated_at"] == record["updated_at"]


def test_schedules():
    assert lr_factor(0, 100, "official", warmup_steps=10) == pytest.approx(0.005)
    assert lr_factor(10, 100, "official", warmup_steps=10) == 1.0
    assert lr_factor(100, 100, "official", warmup_steps=10, end_ratio=0.01) == pytest.approx(0.01)
    assert lr_factor(50, 100, "wsd", cooldown_fraction=0.2) == 1.0
    assert lr_factor(100, 100, "wsd", cooldown_fraction=0.2, end_ratio=0.0) == pytest.approx(0.0)
    assert lr_factor(90, 100, "wsd", cooldown_fraction=0.2, end_ratio=0.0) == pytest.approx(1 - 0.5 ** 0.5)
    assert progressive_scale(0, 100, 10, 0.0) is None
    assert progressive_scale(0, 100, 10, 0.5, start_scale=4) == 4
    assert progressive_scale(49, 100, 10, 0.5, start_scale=4) == 9
    assert progressive_scale(60, 100, 10, 0.5) is None


def test_log_spaced_eval_steps():
    steps = log_spaced_steps(10_000, 8, 0.01)
    assert steps[0] == 100 and steps[-1] == 10_000 and len(steps) == 8
    ratios = [b / a for a, b in zip(steps, steps[1:])]
    assert max(ratios) / min(ratios) < 1.05  # evenly spaced in log-compute

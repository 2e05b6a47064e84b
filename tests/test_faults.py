"""Fault injection in training: non-finite loss and gradients, and preemption signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO
from tests.test_train import run_train, train_overrides
from var.errors import TrainingDiverged
from var.lit.var_module import VARTrainingModule


def _inject(monkeypatch, at_step: int, where: str):
    real = VARTrainingModule.training_step

    def faulty(self, batch, batch_idx):
        loss = real(self, batch, batch_idx) if where != "loss" or self.global_step != at_step else None
        if where == "loss" and self.global_step == at_step:
            tokens, labels = batch
            self.var.word_embed.weight.data[0, 0] = float("nan")  # poisons this forward
            loss = real(self, batch, batch_idx)
        if where == "grad" and self.global_step == at_step:
            self.var.head.weight.register_hook(lambda g: g * float("nan"))
        return loss

    monkeypatch.setattr(VARTrainingModule, "training_step", faulty)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_stops_with_step_and_checkpoint_and_marks_failed(small_token_cache, tmp_path, monkeypatch,
                                                                     where):
    _, tokens = small_token_cache
    _inject(monkeypatch, at_step=6, where=where)
    with pytest.raises(TrainingDiverged) as e:
        run_train(tmp_path, tokens, steps=20, extra=("callbacks=default", "callbacks.checkpoint.every_n_train_steps=4",
                                                   "callbacks.lr_monitor=null"))
    msg = str(e.value)
    assert "step 6" in msg and "checkpoints/last.ckpt" in msg and "\n" not in msg
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "failed" and "step 6" in record["error"]
    good = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert good["global_step"] == 4
    weights = {k: v for k, v in good["state_dict"].items() if v.is_floating_point() and "attn_bias" not in k}
    assert all(torch.isfinite(v).all() for v in weights.values())  # the mask buffer holds -inf by design


# SIGUSR1 (what SLURM sends before a preemption) runs the same handler as SIGTERM: the slow tier covers it.
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_preemption_signal_checkpoints_exits_cleanly_and_resumes(small_token_cache, tmp_path, sig):
    _, tokens = small_token_cache
    cmd = [sys.executable, str(REPO / "run.py"), *train_overrides(tokens, steps=3000),
           "tokenizer=vq_test32", f"paths.root_dir={tmp_path}", "hydra.run.dir=" + str(tmp_path / "run"),
           "task.record.num_eval_points=2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    record_path = tmp_path / "run" / "record.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if record_path.exists() and json.loads(record_path.read_text()).get("evals"):
            break  # the first evaluation is done: training is under way
        time.sleep(0.1)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    record = json.loads(record_path.read_text())
    assert record["status"] == "preempted" and record["preemptions"] == 1
    stopped_at = record["progress"]["step"]
    assert 0 < stopped_at < 3000
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    # Re-running the same command resumes from the checkpoint (shortened here by lowering max_steps).
    cmd_short = [c if not c.startswith("task.max_steps=") else f"task.max_steps={stopped_at + 5}" for c in cmd]
    res = subprocess.run(cmd_short, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads(record_path.read_text())
    assert record["status"] == "complete" and record["resumes"] == 1 and record["preemptions"] == 1
    assert record["final"]["step"] == stopped_at + 5


@pytest.mark.parametrize("poison", [None, "inf_grad", "nan_grad", "nan_loss"])
def test_non_finite_guard_finds_one_bad_value_among_all_gradients(poison):
    """The guard's one device-side check per step (the norms of all gradients, and the loss): a single inf or
    nan anywhere stops the run; finite values, however large, do not; an empty gradient (a rank's FSDP2 shard
    of a small tensor) is no error."""
    from types import SimpleNamespace

    from var.callbacks.fault_guard import NonFiniteGuard

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 1000, 0, 7)]
    for p in params:
        p.grad = torch.full_like(p, 1e30)  # large, finite
    loss = torch.tensor(2.5)
    if poison == "inf_grad":
        params[1].grad[517] = float("inf")
    elif poison == "nan_grad":
        params[3].grad[6] = float("nan")
    elif poison == "nan_loss":
        loss = torch.tensor(float("nan"))
    trainer = SimpleNamespace(global_step=9, checkpoint_callback=None,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all: d))
    module = SimpleNamespace(device=torch.device("cpu"), last_loss=loss)
    optimizer = SimpleNamespace(param_groups=[{"params": params[:2]}, {"params": params[2:]}])
    if poison is None:
        NonFiniteGuard().on_before_optimizer_step(trainer, module, optimizer)
        return
    with pytest.raises(TrainingDiverged, match="at step 9") as e:
        NonFiniteGuard().on_before_optimizer_step(trainer, module, optimizer)
    assert ("training loss nan" in str(e.value)) == (poison == "nan_loss")


def test_progress_bar_refreshes_every_ten_steps_and_goes_with_the_bar():
    """A refresh reads the logged loss back from the GPU: the default callbacks refresh every 10 steps, and
    drop the bar where the trainer has none (Lightning refuses a bar callback then)."""
    from lightning.pytorch.callbacks import TQDMProgressBar
    from omegaconf import OmegaConf

    from var.callbacks import configured_callbacks

    cfg = OmegaConf.load(REPO / "conf" / "callbacks" / "default.yaml")
    cfg = OmegaConf.create({"callbacks": cfg, "trainer": {"enable_progress_bar": True},
                            "paths": {"output_dir": "/tmp/unused"}})
    bars = [c for c in configured_callbacks(cfg, loggers=[]) if isinstance(c, TQDMProgressBar)]
    assert [b.refresh_rate for b in bars] == [10]
    cfg.trainer.enable_progress_bar = False
    assert not [c for c in configured_callbacks(cfg, loggers=[]) if isinstance(c, TQDMProgressBar)]

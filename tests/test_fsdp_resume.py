"""FSDP2 checkpoints are sharded (torch.distributed.checkpoint folders) and resume on the same and on a
different number of ranks: 2 -> 2, 2 -> 1 and 1 -> 2 CPU processes over gloo. The state a resumed run
starts from, gathered in full from its ranks, equals the saved one bit for bit, and training goes on."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO

STEPS = 12


def _cmd(tokens, run_dir, devices, probe=None):
    cmd = [sys.executable, str(REPO / "run.py"), "task=train", "trainer=fsdp", "trainer.accelerator=cpu",
           f"trainer.devices={devices}", "trainer.precision=32-true", f"task.tokens={tokens}", "tokenizer=vq_test32",
           "data.resolution=32", "model.depth=2", "model.patch_nums=[1,2,3,4]", "model.vocab_size=64",
           "model.cvae=8", f"task.max_steps={STEPS}", "task.batch_size=16", "task.eval_batch_size=64",
           "task.eval_limit=16", "task.val_every_n_steps=1000", "task.record.num_eval_points=2", "logger=none",
           "callbacks=default", "callbacks.lr_monitor=null", "callbacks.checkpoint.every_n_train_steps=2",
           "trainer.enable_progress_bar=false", f"paths.root_dir={run_dir.parent}", f"hydra.run.dir={run_dir}"]
    if probe:
        cmd += ["+callbacks.probe._target_=tests.resume_probe.StateProbe", f"+callbacks.probe.out={probe}"]
    return cmd


def _run(cmd, cwd):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _preempted(tokens, run_dir, devices, cwd) -> int:
    """Train on ``devices`` ranks and preempt (SIGTERM to every rank) once a checkpoint exists."""
    proc = subprocess.Popen(_cmd(tokens, run_dir, devices), cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while not (run_dir / "checkpoints" / "step00000004.ckpt").exists() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        assert proc.wait(timeout=120) == 0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{devices} ranks did not stop after SIGTERM") from None
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "preempted", record.get("error")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file()  # sharded, not one gathered file
    assert len(list(last.glob("*.distcp"))) == devices
    return record["progress"]["step"]


def _full(sharded, tmp_path) -> dict:
    """The whole model and optimizer of a sharded checkpoint, assembled offline in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{sharded.parent.parent.name}_full.pt"
    dcp_to_torch_save(sharded, out)
    return torch.load(out, weights_only=True)


def _assert_resumed_from(probe_path, saved: dict, step: int, world: int) -> dict:
    probe = torch.load(probe_path, weights_only=True)
    assert probe["step"] == step and probe["world"] == world
    model, opt = probe["model"], probe["optimizer"]
    assert set(model) == set(saved["state_dict"])
    assert all(torch.equal(model[k], saved["state_dict"][k]) for k in model)
    for name, state in saved["optimizer_0"]["state"].items():
        for key, value in state.items():  # AdamW moments and step counters
            assert torch.equal(torch.as_tensor(opt["state"][name][key]), torch.as_tensor(value)), (name, key)
    assert [g["lr"] for g in opt["param_groups"]] == [g["lr"] for g in saved["optimizer_0"]["param_groups"]]
    assert probe["end_step"] == STEPS and sorted(probe["losses"]) == list(range(step + 1, STEPS + 1))
    assert all(math.isfinite(v) for v in probe["losses"].values())
    return probe


@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_and_resume_on_2_1_and_2_ranks(small_token_cache, tmp_path):
    _, tokens = small_token_cache
    two = tmp_path / "two"
    step2 = _preempted(tokens, two, 2, tmp_path)
    saved2 = _full(two / "checkpoints" / "last.ckpt", tmp_path)
    assert saved2["state_dict"]["var.head.weight"].shape == (64, 128)  # shards assembled to whole tensors
    shutil.copytree(two, tmp_path / "two_to_one")

    # 2 -> 2: the same command again; on CPU it continues bit for bit as if never stopped.
    _run(_cmd(tokens, two, 2, probe=tmp_path / "p22.pt"), tmp_path)
    resumed = _assert_resumed_from(tmp_path / "p22.pt", saved2, step2, 2)
    _run(_cmd(tokens, tmp_path / "whole", 2, probe=tmp_path / "whole.pt"), tmp_path)
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)["losses"]
    assert all(resumed["losses"][s] == whole[s] for s in resumed["losses"])

    # 2 -> 1: the sharded checkpoint reshards onto one rank.
    _run(_cmd(tokens, tmp_path / "two_to_one", 1, probe=tmp_path / "p21.pt"), tmp_path)
    _assert_resumed_from(tmp_path / "p21.pt", saved2, step2, 1)

    # 1 -> 2.
    one = tmp_path / "one"
    step1 = _preempted(tokens, one, 1, tmp_path)
    saved1 = _full(one / "checkpoints" / "last.ckpt", tmp_path)
    _run(_cmd(tokens, one, 2, probe=tmp_path / "p12.pt"), tmp_path)
    _assert_resumed_from(tmp_path / "p12.pt", saved1, step1, 2)
    for run in (two, tmp_path / "two_to_one", one):
        record = json.loads((run / "record.json").read_text())
        assert record["status"] == "complete" and record["final"]["step"] == STEPS
        assert record["preemptions"] == record["resumes"] == 1
        assert not list((run / "checkpoints").glob("*.tmp"))

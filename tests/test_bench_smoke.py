"""The multi-GPU benchmarks (gloo, 2 processes) and the Lightning-loop one run end to end on the CPU, so that a
GPU session does not spend its time on a broken script. Their numbers here mean nothing; the records' shape and
the runs' outcome do."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_train_distributed_measures_ddp_and_fsdp_and_their_scaling():
    res = subprocess.run([sys.executable, "-m", "bench.train_distributed", "--device", "cpu", "--depths", "2",
                          "--gpus", "1", "2", "--wraps", "ddp", "fsdp", "--batch", "2", "--steps", "1",
                          "--warmup", "1", "--variant", "plain"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = _json_lines(res.stdout)
    assert not [r for r in lines if "error" in r]
    points = [r for r in lines if r.get("bench") == "train_distributed"]
    assert [(r["wrap"], r["gpus"]) for r in points] == [("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)]
    assert all(r["global_batch"] == 2 * r["gpus"] and r["img_per_s"] > 0 for r in points)
    # Same model, same random tokens on rank 0: one step from the same initialisation gives one loss.
    assert len({r["loss_last"] for r in points if r["gpus"] == 1}) == 1
    efficiency = {(r["wrap"], r["gpus"]): r["scaling_efficiency"] for r in lines if "scaling_efficiency" in r}
    assert efficiency[("ddp", 1)] == efficiency[("fsdp", 1)] == 1.0 and ("fsdp", 2) in efficiency


def test_fsdp_resume_preempts_and_resumes_on_another_world_size(small_token_cache, tmp_path):
    _, tokens = small_token_cache
    run_dir = tmp_path / "run"
    overrides = ["trainer.accelerator=cpu", "trainer.precision=32-true", f"task.tokens={tokens}",
                 "tokenizer=vq_test32", "data.resolution=32", "model.patch_nums=[1,2,3,4]", "model.vocab_size=64",
                 "model.cvae=8", "task.eval_batch_size=64", "task.eval_limit=16", "task.record.num_eval_points=2",
                 f"paths.root_dir={tmp_path}"]
    res = subprocess.run([sys.executable, "-m", "bench.fsdp_resume", "--depth", "2", "--batch", "16", "--steps", "40",
                          "--preempt-at", "4", "--devices", "2", "--resume-devices", "1", "--run-dir", str(run_dir),
                          "--", *overrides], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (record,) = _json_lines(res.stdout)
    assert record["status_after_sigterm"] == "preempted" and record["checkpoint_shards"] == 2
    assert record["status"] == "complete" and record["preemptions"] == 1 and record["final_step"] == 40
    assert record["leg2_exit"] == 0 and record["L_mean"][-1][0] == 40


def test_train_loop_times_the_lightning_loop_in_each_case():
    res = subprocess.run([sys.executable, "-m", "bench.train_loop", "--device", "cpu", "--depth", "2", "--batch", "2",
                          "--steps", "2", "--warmup", "1", "--variant", "plain"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = _json_lines(res.stdout)
    assert [r.get("case") for r in lines] == ["bare", "task", "before"], lines
    assert all(r["steps_timed"] == 2 and r["step_ms"] > 0 for r in lines)

"""Sweeps run from the CLI: the ImageNet grid shrunk to CPU (DDP and FSDP2 with 2 gloo processes), and
an interrupted demo sweep that a re-run finishes without redoing complete grid points."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

RUN = [sys.executable, str(REPO / "run.py")]


def _records(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/record.json")}


def test_scaling_imagenet_debug_runs_two_points_on_cpu_with_fsdp(small_token_cache, tmp_path):
    _, tokens = small_token_cache
    res = subprocess.run([*RUN, "-m", "sweep=scaling_imagenet", "debug=sweep_cpu", f"paths.root_dir={tmp_path}",
                          f"task.tokens={tokens}", "tokenizer=vq_test32", "data.resolution=32"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    records = _records(tmp_path / "runs" / "scaling_imagenet")
    assert len(records) == 2
    kinds = sorted(r["config"]["trainer"]["parallelism"]["kind"] for r in records.values())
    assert kinds == ["ddp", "fsdp"]
    for r in records.values():
        assert r["status"] == "complete", r.get("error")
        assert r["config"]["trainer"]["devices"] == 2 and r["sweep"] == "scaling_imagenet"
        assert r["final"]["step"] == 4


def _demo_sweep(tmp_path, tokens, depths, steps):
    return [*RUN, "-m", "sweep=scaling_demo", f"model.depth={depths}", f"task.max_steps={steps}",
            f"paths.root_dir={tmp_path}", f"task.tokens={tokens}", "tokenizer=vq_test32", "data.resolution=32",
            "callbacks.checkpoint.every_n_train_steps=2", "task.record.num_eval_points=3", "logger=none"]


# slow tier (~55 s on 2 cores): the fast tier keeps a killed grid point's re-run (the last-checkpoint test)
@pytest.mark.slow
def test_killed_demo_sweep_rerun_finishes_only_what_is_missing(small_token_cache, tmp_path):
    _, tokens = small_token_cache
    sweep_dir = tmp_path / "runs" / "scaling_demo"
    done = subprocess.run(_demo_sweep(tmp_path, tokens, "1", 8), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (d1_name, d1), = _records(sweep_dir).items()
    assert d1["status"] == "complete"

    # Start the 2-point sweep and kill it (SIGKILL, no cleanup) once the new point has a checkpoint.
    proc = subprocess.Popen(_demo_sweep(tmp_path, tokens, "1,2", 40), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        ckpts = [p for p in sweep_dir.glob("*/checkpoints/last.ckpt") if d1_name not in str(p)]
        if ckpts:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpts, "the second grid point never wrote a checkpoint"
    d2_dir = ckpts[0].parents[1]
    assert json.loads((d2_dir / "record.json").read_text())["status"] == "running"

    # The same command again: d1 is skipped, d2 resumes from its checkpoint and completes.
    again = subprocess.run(_demo_sweep(tmp_path, tokens, "1,2", 40), cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    records = _records(sweep_dir)
    assert records[d1_name]["updated_at"] == d1["updated_at"]          # not redone
    assert records[d2_dir.name]["status"] == "complete"
    assert records[d2_dir.name].get("resumes", 0) == 1                # resumed, not restarted
    assert records[d2_dir.name]["final"]["step"] == 40


def test_a_run_killed_after_its_last_checkpoint_completes_on_rerun(small_token_cache, tmp_path):
    """Killed between its final checkpoint and its final evaluation, a run's record says running while
    last.ckpt is at max_steps; Lightning then skips the training loop on resume. The re-run must still
    evaluate, count the resume and mark the record complete (else the sweep never finishes the point)."""
    _, tokens = small_token_cache
    cmd = _demo_sweep(tmp_path, tokens, "1", 8)
    assert subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=300).returncode == 0
    (path,) = (tmp_path / "runs" / "scaling_demo").glob("*/record.json")
    done = json.loads(path.read_text())
    killed = {**done, "status": "running", "evals": [e for e in done["evals"] if e["step"] < 8]}
    killed.pop("final")
    path.write_text(json.dumps(killed))  # the record as that kill leaves it
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    record = json.loads(path.read_text())
    assert record["status"] == "complete" and record.get("resumes", 0) == 1
    assert record["final"]["step"] == 8 and record["evals"][-1]["step"] == 8
    assert record["final"]["L_mean"] == pytest.approx(done["final"]["L_mean"], abs=1e-6)  # same weights


def test_a_crashing_grid_point_is_recorded_and_the_sweep_goes_on(small_token_cache, tmp_path):
    """The first point diverges at run time (lr 1e30: a non-finite loss), which config validation cannot
    see; it is recorded failed with its error, the next point still trains, and a re-run redoes neither."""
    _, tokens = small_token_cache
    cmd = [*_demo_sweep(tmp_path, tokens, "1", 4), "task.optim.lr=1e30,3e-3"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    records = _records(tmp_path / "runs" / "scaling_demo")
    status = {r["config"]["task"]["optim"]["lr"]: r["status"] for r in records.values()}
    assert status == {1e30: "failed", 3e-3: "complete"}
    failed = next(r for r in records.values() if r["status"] == "failed")
    assert failed["error"].startswith("TrainingDiverged: non-finite training loss") and "\n" not in failed["error"]
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _records(tmp_path / "runs" / "scaling_demo") == records  # failed is not retried, complete not redone


# slow tier (~40 s on 2 cores): the fast tier keeps the pool launcher's killed-job test
@pytest.mark.slow
def test_pool_launcher_runs_points_in_parallel_each_on_its_own_device(small_token_cache, tmp_path):
    """launcher=pool: two grid points at once, pinned to devices 0 and 1 (CUDA_VISIBLE_DEVICES; on a CPU
    machine the pin is all there is to see), each giving exactly the record the in-process launcher gives."""
    _, tokens = small_token_cache
    serial = subprocess.run(_demo_sweep(tmp_path / "serial", tokens, "1,2", 8), cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert serial.returncode == 0, serial.stderr[-2000:]
    pooled = subprocess.run([*_demo_sweep(tmp_path / "pool", tokens, "1,2", 8), "launcher=pool",
                             "hydra.launcher.devices=[0,1]"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert pooled.returncode == 0, pooled.stderr[-2000:]
    sweep_dir = tmp_path / "pool" / "runs" / "scaling_demo"
    records, reference = _records(sweep_dir), _records(tmp_path / "serial" / "runs" / "scaling_demo")
    assert records.keys() == reference.keys() and len(records) == 2
    for name, r in records.items():
        assert r["status"] == "complete"
        assert r["final"] == reference[name]["final"]  # same job, other process
    jobs = [json.loads((sweep_dir / name / "launcher.json").read_text()) for name in records]
    assert sorted(j["device"] for j in jobs) == ["0", "1"] and {j["exitcode"] for j in jobs} == {0}
    a, b = jobs
    assert a["started"] < b["ended"] and b["started"] < a["ended"]  # they ran at the same time


@pytest.mark.slow  # ~40 s: keeps the fast tier within CI's time
def test_pool_launcher_reports_a_killed_job_and_finishes_the_others(small_token_cache, tmp_path):
    """A job process killed outright (as the OOM killer would) fails that point only: the other point
    completes, the sweep exits non-zero naming the job, and a re-run resumes the killed point."""
    _, tokens = small_token_cache
    cmd = [*_demo_sweep(tmp_path, tokens, "1,2", 40), "launcher=pool", "hydra.launcher.workers=2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sweep_dir = tmp_path / "runs" / "scaling_demo"
    deadline, victim = time.time() + 240, None
    while time.time() < deadline and victim is None:
        # Kill the depth-2 job in mid-training: it has a checkpoint, and launcher.json names its process.
        d2 = [p.parent for p in sweep_dir.glob("*model.depth=2*/launcher.json")]
        if d2 and (d2[0] / "checkpoints" / "last.ckpt").is_file():
            victim = json.loads((d2[0] / "launcher.json").read_text())["pid"]
        time.sleep(0.1)
    assert victim is not None, "the depth-2 job never wrote a checkpoint"
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "exited with code -9 before returning" in out, out[-2000:]
    records = _records(sweep_dir)
    status = {r["config"]["model"]["depth"]: r["status"] for r in records.values()}
    assert status == {1: "complete", 2: "running"}
    killed = d2[0].name
    info = json.loads((sweep_dir / killed / "launcher.json").read_text())
    assert info["exitcode"] == -9 and info["status"] == "FAILED" and info["pid"] == victim
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _records(sweep_dir)[killed].get("resumes", 0) == 1  # resumed from its checkpoint
    assert {r["status"] for r in _records(sweep_dir).values()} == {"complete"}


def test_pool_slots_and_visible_gpus(monkeypatch):
    from hydra_plugins.var_pool_launcher.pool_launcher import slots_for, visible_gpus

    assert slots_for([0, 1], 2, None) == ["0", "0", "1", "1"]  # two jobs per GPU
    assert slots_for([], 1, None) == [None, None] and slots_for([], 1, 3) == [None] * 3
    with pytest.raises(ValueError, match="hydra.launcher.jobs_per_device=0"):
        slots_for([0], 0, None)
    with pytest.raises(ValueError, match="hydra.launcher.workers=0"):
        slots_for([], 1, 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]  # the child is pinned to physical GPU 2 or 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2a,GPU-11c0")
    assert visible_gpus() == ["GPU-8f2a", "GPU-11c0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []

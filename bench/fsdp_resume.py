"""FSDP2 training, preempted and resumed, possibly on another number of GPUs: does it hold up at scale?

Trains ``task=train trainer=fsdp`` from the synthetic token cache, sends SIGTERM to every rank once the
checkpoint of step ``--preempt-at`` exists (as a cluster's preemption would), then runs the same command
again on ``--resume-devices`` GPUs, which must resume from the sharded checkpoint and finish. Prints one
JSON line: wall time of each leg, the record's status and preemption count, the test loss at each
evaluation point, the checkpoint's shard count, and the throughput / MFU / peak memory the run logged.

    python -m bench.fsdp_resume --depth 24 --batch 64 --steps 300 --preempt-at 200 --devices 1
    python -m bench.fsdp_resume --depth 30 --devices 4 --resume-devices 2 --ac 1 -- task.tokenizer_path=...

Arguments after ``--`` are passed to run.py as overrides. Never run in CI (needs GPUs; the CPU version of
this check is tests/test_fsdp_resume.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import MULTICAST_OFF, REPO, emit


def command(a, devices: int) -> list[str]:
    return [sys.executable, str(REPO / "run.py"), "task=train", "trainer=fsdp", f"trainer.devices={devices}",
            f"model.depth={a.depth}", f"task.batch_size={a.batch}", f"task.max_steps={a.steps}",
            f"trainer.parallelism.activation_checkpointing={a.ac}", "logger=csv", "callbacks=default",
            f"callbacks.checkpoint.every_n_train_steps={a.preempt_at}", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=10", f"hydra.run.dir={a.run_dir}", *a.overrides]


def first_leg(a, env) -> float:
    """Train until the checkpoint of step ``preempt_at`` exists, then SIGTERM every rank."""
    ckpt = Path(a.run_dir) / "checkpoints" / f"step{a.preempt_at:08d}.ckpt"
    t0 = time.perf_counter()
    with open(Path(a.run_dir).parent / f"{Path(a.run_dir).name}_leg1.log", "w") as log:
        proc = subprocess.Popen(command(a, a.devices), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        while not ckpt.exists() and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is not None:
            raise SystemExit(f"the first leg ended (exit {proc.returncode}) before {ckpt} was written")
        os.killpg(proc.pid, signal.SIGTERM)
        if proc.wait(timeout=600) != 0:
            raise SystemExit(f"the first leg exited {proc.returncode} after SIGTERM; see its log")
    return time.perf_counter() - t0


def logged_perf(run_dir: Path) -> dict:
    """The last throughput row the run's CSV logger wrote."""
    rows = []
    for path in run_dir.glob("csv/**/metrics.csv"):
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r.get("perf/images_per_s")]
    if not rows:
        return {}
    last = rows[-1]
    return {k.split("/", 1)[1]: round(float(v), 4) for k, v in last.items() if k.startswith("perf/") and v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--preempt-at", type=int, default=200)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--resume-devices", type=int, default=None, help="default: --devices")
    ap.add_argument("--ac", type=int, default=0, help="checkpoint every K-th block (0: off)")
    ap.add_argument("--run-dir", default="runs/bench_fsdp_resume")
    ap.add_argument("overrides", nargs="*", help="run.py overrides (after --)")
    a = ap.parse_args()
    if not 0 < a.preempt_at < a.steps:
        raise SystemExit(f"--preempt-at must lie inside (0, --steps={a.steps}), not {a.preempt_at}")
    a.resume_devices = a.resume_devices or a.devices
    run_dir = REPO / a.run_dir
    a.run_dir = str(run_dir)
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: pick another --run-dir (this check starts from scratch)")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **MULTICAST_OFF}

    leg1 = first_leg(a, env)
    record = json.loads((run_dir / "record.json").read_text())
    preempted = record["status"]
    shards = len(list((run_dir / "checkpoints" / "last.ckpt").glob("*.distcp")))
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}_leg2.log", "w") as log:
        res = subprocess.run(command(a, a.resume_devices), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    leg2 = time.perf_counter() - t0
    record = json.loads((run_dir / "record.json").read_text())
    emit({"bench": "fsdp_resume", "depth": a.depth, "batch": a.batch, "steps": a.steps, "preempt_at": a.preempt_at,
          "devices": a.devices, "resume_devices": a.resume_devices, "activation_checkpointing": a.ac,
          "leg1_s": round(leg1, 1), "leg2_s": round(leg2, 1), "leg2_exit": res.returncode,
          "status_after_sigterm": preempted, "checkpoint_shards": shards, "status": record["status"],
          "preemptions": record.get("preemptions"), "final_step": record.get("progress", {}).get("step"),
          "L_mean": [(e["step"], round(e["L_mean"], 4)) for e in record.get("evals", []) if e.get("split") == "test"],
          "perf_last": logged_perf(run_dir), "overrides": a.overrides})


if __name__ == "__main__":
    main()

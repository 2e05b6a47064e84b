"""Exact resume: a run killed with SIGKILL and re-run continues bit for bit as if never stopped; the
training order is a pure function of (seed, epoch) and its position travels in the checkpoint."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Checkpoint

from tests.conftest import REPO
from var.data.sampler import ResumableSampler
from var.errors import DataError

STEPS, EVERY = 60, 4


def _cmd(tokens, run_dir):
    return [sys.executable, str(REPO / "run.py"), "task=train", "trainer=cpu", f"task.tokens={tokens}",
            "tokenizer=vq_test32", "data.resolution=32", "model.depth=2", "model.patch_nums=[1,2,3,4]",
            "model.vocab_size=64", "model.cvae=8", f"task.max_steps={STEPS}", "task.batch_size=32",
            "task.eval_batch_size=64", "task.eval_limit=32", "task.val_every_n_steps=20", "task.optim.lr=3e-3",
            "task.record.num_eval_points=3", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
            "logger=csv", "+logger.csv.flush_logs_every_n_steps=1", "callbacks=default", "callbacks.lr_monitor=null",
            f"callbacks.checkpoint.every_n_train_steps={EVERY}", f"paths.root_dir={run_dir.parent}",
            f"hydra.run.dir={run_dir}"]


def _losses(run_dir) -> dict[int, str]:
    """Per-step training loss as the CSV logger wrote it (repr of the float: equal text is equal bits)."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len({s for s, _ in rows}) == len(rows), "a step logged twice"
    return dict(rows)


def _run(cmd, cwd):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(small_token_cache, tmp_path_factory):
    """The reference: the same run never stopped (its directory and per-step losses)."""
    whole = tmp_path_factory.mktemp("uninterrupted") / "whole"
    _run(_cmd(small_token_cache[1], whole), whole.parent)
    reference = _losses(whole)
    assert sorted(reference) == list(range(STEPS))
    return whole, reference


class ExitAfterCheckpoint(Checkpoint):
    """Ends the process the moment the checkpoint callbacks have saved step ``step``: Lightning orders
    Checkpoint callbacks last, so this runs after ModelCheckpoint and before the step's metrics are logged."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os._exit(9)


def test_sigkilled_run_resumes_bitwise_equal_to_an_uninterrupted_one(small_token_cache, uninterrupted, tmp_path):
    """400 images x 2 variants in batches of 32 give 25 steps per epoch, so the 60 steps cross two epoch
    boundaries and the kill lands mid-epoch; class dropout and drop path (0.008 at d2) are both on."""
    _, tokens = small_token_cache
    whole, reference = uninterrupted
    killed = tmp_path / "killed"

    proc = subprocess.Popen(_cmd(tokens, killed), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = killed / "checkpoints" / f"step{2 * EVERY:08d}.ckpt"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.05))  # anywhere between checkpoints, even inside a checkpoint write
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    record = json.loads((killed / "record.json").read_text())
    assert record["status"] == "running", "the run finished before it was killed"
    ckpt = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    resumed_at = ckpt["global_step"]
    assert EVERY <= resumed_at < STEPS and resumed_at % EVERY == 0
    assert ckpt["TokenDataModule"]["train_position"]["batches"] == resumed_at % 25
    assert set(ckpt["callbacks"]["TrainingRNG"]["rng"]) >= {"torch", "numpy", "python"}

    _run(_cmd(tokens, killed), tmp_path)  # the same command again
    record = json.loads((killed / "record.json").read_text())
    assert record["status"] == "complete" and record["resumes"] == 1
    after = _losses(killed)  # the whole history: the first leg's steps up to the checkpoint, then the second's
    assert sorted(after) == list(range(STEPS))
    mismatched = [s for s in after if after[s] != reference[s]]
    assert not mismatched, f"losses differ after resuming at step {resumed_at}: steps {mismatched}"
    # The end states too: weights and AdamW moments bit for bit.
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert not list((killed / "checkpoints").glob("*.tmp"))  # a kill mid-write leaves no litter behind


def test_a_kill_between_a_checkpoint_and_its_steps_log_row_loses_no_row(small_token_cache, uninterrupted,
                                                                         tmp_path):
    """Lightning saves the checkpoint of step 8 before it logs the row of the step just run (7): a leg
    killed in between resumes at 8, so that row comes back from the checkpoint (var/loggers.py)."""
    _, tokens = small_token_cache
    _, reference = uninterrupted
    run_dir = tmp_path / "killed"
    killer = [f"+callbacks.exit_after.{k}={v}" for k, v in
              {"_target_": "tests.test_resume.ExitAfterCheckpoint", "step": 2 * EVERY}.items()]
    res = subprocess.run(_cmd(tokens, run_dir) + killer, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 9, res.stderr[-3000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * EVERY
    assert sorted(_losses(run_dir)) == list(range(2 * EVERY - 1)), "the kill did not fall before the row"

    _run(_cmd(tokens, run_dir), tmp_path)
    after = _losses(run_dir)
    assert after == reference


def _global_batches(n, global_batch, world, epoch, skip=0):
    """Each step's images over all ranks, in rank order, as batch-of-(G/world) loaders would give them."""
    b = global_batch // world
    per_rank = []
    for rank in range(world):
        s = ResumableSampler(n, global_batch, rank, world, seed=7)
        s.set_epoch(epoch)
        if skip:
            s.resume(epoch, skip)
        idx = list(s)
        assert len(idx) == len(s) - skip * b
        per_rank.append([idx[i:i + b] for i in range(0, len(idx), b)])
    return [sorted(sum((per_rank[r][k] for r in range(world)), [])) for k in range(len(per_rank[0]))]


def test_training_order_is_a_function_of_seed_and_epoch_and_the_same_on_any_world_size():
    one = _global_batches(103, 8, 1, epoch=3)
    assert len(one) == 103 // 8
    assert _global_batches(103, 8, 2, epoch=3) == one == _global_batches(103, 8, 4, epoch=3)
    assert _global_batches(103, 8, 2, epoch=3, skip=5) == one[5:]            # resume 2 ranks
    assert _global_batches(103, 8, 1, epoch=3, skip=5) == one[5:]            # resume on 1 rank
    assert _global_batches(103, 8, 1, epoch=4) != one                        # a new epoch reshuffles
    flat = sum(one, [])
    assert len(set(flat)) == len(flat)                                       # no image twice in an epoch
    s = ResumableSampler(103, 8, 0, 1, seed=7)
    s.resume(3, 5)
    s.set_epoch(4)
    assert len(list(s)) == len(s)                                            # the skip is for its epoch only
    assert s.position(11) == {"epoch": 4, "batches": 11, "samples": 103, "global_batch": 8, "seed": 7}
    assert s.position(12) == {**s.position(0), "epoch": 5}                   # a finished epoch moves on
    with pytest.raises(DataError, match="one global batch"):
        ResumableSampler(5, 8)
    assert np.array_equal(ResumableSampler(103, 8, seed=7).order(3), ResumableSampler(103, 8, seed=7).order(3))


def test_resuming_with_other_data_or_batch_is_one_clear_error(small_token_cache):
    from var.data.tokens import TokenDataModule

    _, tokens = small_token_cache
    dm = TokenDataModule(str(tokens), batch_size=16, seed=0)
    dm.load_state_dict({"train_position": {"epoch": 1, "batches": 3, "samples": 800, "global_batch": 32,
                                           "seed": 0}})
    with pytest.raises(DataError) as e:
        dm.train_dataloader()
    assert "task.batch_size" in str(e.value) and "\n" not in str(e.value)
    dm = TokenDataModule(str(tokens), batch_size=32, seed=0)
    dm.load_state_dict({"train_position": {"epoch": 1, "batches": 3, "samples": 800, "global_batch": 32,
                                           "seed": 0}})
    assert len(dm.train_dataloader()) == 25 and len(list(dm.train_dataloader())) == 22

"""Atomic files: record.json, whole-file checkpoints and folders of shards survive a kill at any moment
as either the previous or the new version, whole; a resume finds a whole checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.test_checkpoints import _RunsCode
from var.checkpoints import CheckpointError
from var.lit import checkpoint_io
from var.lit.checkpoint_io import AtomicCheckpointIO, check_shard_metadata, promote, resume_checkpoint

# Writes version v of all three kinds of file, forever, through the project's own code.
WRITER = r"""
import pickle, shutil, sys, torch
from pathlib import Path
from var.record import RunRecord
from var.lit.checkpoint_io import AtomicCheckpointIO, promote

d, v = Path(sys.argv[1]), int(sys.argv[2])
io = AtomicCheckpointIO()
(d / "sharded").mkdir(exist_ok=True)
first = v == 0  # a first writer starts the kills once every kind of file exists whole (seconds on a loaded machine)
if not first:
    print("ready", flush=True)
while True:
    v += 1
    record = RunRecord(d)
    record.update(version=v, payload=[v] * 100_000)
    record.save()
    io.save_checkpoint({"version": v, "w": torch.full((8_000_000,), float(v))}, d / "last.ckpt")
    tmp = d / "sharded" / "last.ckpt.tmp"   # like an FSDP2 save: a folder of shards and an index
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for r in range(2):
        torch.save(torch.full((4_000_000,), float(v)), tmp / f"__{r}_0.distcp")
    (tmp / ".metadata").write_bytes(pickle.dumps({"version": v}))
    promote(tmp, d / "sharded" / "last.ckpt")
    if first:
        print("ready", flush=True)
        first = False
"""


def _versions(d: Path) -> dict[str, int]:
    """The version each file holds, after checking it is whole and self-consistent."""
    record = json.loads((d / "record.json").read_text())
    assert set(record["payload"]) == {record["version"]}
    ckpt = torch.load(d / "last.ckpt", weights_only=True)
    assert torch.equal(ckpt["w"], torch.full_like(ckpt["w"], float(ckpt["version"])))
    sharded = resume_checkpoint(d / "sharded")
    assert sharded is not None
    v = pickle.loads((sharded / ".metadata").read_bytes())["version"]
    for r in range(2):
        assert torch.equal(torch.load(sharded / f"__{r}_0.distcp", weights_only=True), torch.full((4_000_000,), float(v)))
    return {"record": record["version"], "ckpt": ckpt["version"], "sharded": v}


@pytest.mark.slow  # ~60 s of kills; the fast tier keeps the single-kill cases below
def test_sigkill_at_random_moments_leaves_every_file_whole(tmp_path):
    seen = {"record": 0, "ckpt": 0, "sharded": 0}
    mid_write, litter = 0, {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for kill in range(10):
        if kill >= 4 and mid_write >= 2:
            break
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(max(seen.values()))],
                                stdout=subprocess.PIPE, env=env, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(random.uniform(0.3, 0.8) if kill == 0 else random.uniform(0.02, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # A kill inside a write leaves a temporary file or folder (or a parked .old) newer than the last one.
        now_litter = {p: p.stat().st_mtime_ns for p in [*tmp_path.glob("*.tmp"), *tmp_path.glob("sharded/*.tmp"),
                                                        *tmp_path.glob("sharded/*.old")]}
        mid_write += any(litter.get(p) != t for p, t in now_litter.items())
        litter = now_litter
        now = _versions(tmp_path)
        for k in seen:  # never an older version than one already seen whole
            assert now[k] >= seen[k], (k, now, seen)
        seen = now
    assert min(seen.values()) > 0
    assert mid_write >= 2, "too few kills landed inside a write to prove anything"


def test_a_checkpoint_write_that_dies_half_way_keeps_the_previous_file(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def dies_half_way(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        Path(f).write_bytes(Path(f).read_bytes()[:500])  # half a file on disk ...
        raise KeyboardInterrupt                            # ... and the process goes away

    monkeypatch.setattr(checkpoint_io.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    io.save_checkpoint({"step": 3, "w": torch.zeros(1000)}, path)  # the next save replaces the litter
    assert torch.load(path, weights_only=True)["step"] == 3 and not list(tmp_path.glob("*.tmp"))


def _folder(path: Path, version: int) -> Path:
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(pickle.dumps({"version": version}))
    return path


def test_a_kill_between_the_two_renames_of_a_folder_swap_resumes_from_the_previous_one(tmp_path, monkeypatch):
    promote(_folder(tmp_path / "last.ckpt.tmp", 1), tmp_path / "last.ckpt")
    calls = []
    real_replace = os.replace

    def dies_on_second(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(checkpoint_io.os, "replace", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        promote(_folder(tmp_path / "last.ckpt.tmp", 2), tmp_path / "last.ckpt")
    monkeypatch.undo()
    found = resume_checkpoint(tmp_path)
    assert found == tmp_path / "last.ckpt.old"
    assert pickle.loads((found / ".metadata").read_bytes())["version"] == 1
    promote(_folder(tmp_path / "last.ckpt.tmp2", 3), tmp_path / "last.ckpt")  # the next save cleans up
    assert resume_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    assert not (tmp_path / "last.ckpt.old").exists()


def test_a_sharded_checkpoint_whose_index_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _folder(tmp_path / "checkpoints" / "last.ckpt", 0)
    (evil / ".metadata").write_bytes(pickle.dumps({"plan": _RunsCode(marker)}))
    with pytest.raises(CheckpointError, match="cannot be loaded safely") as e:
        resume_checkpoint(tmp_path / "checkpoints")
    assert not marker.exists() and "\n" not in str(e.value)
    (evil / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        check_shard_metadata(evil)


def test_a_kill_while_metrics_csv_gains_a_column_keeps_its_rows(tmp_path, monkeypatch):
    """A new metric makes the CSV writer rewrite metrics.csv with a wider header; a kill mid-rewrite (here
    the rows' write raising) leaves the earlier rows whole, and the resumed run's writer carries on from them."""
    import csv

    from var.loggers import ResumingExperimentWriter

    writer = ResumingExperimentWriter(log_dir=str(tmp_path))
    writer.log_metrics({"loss": 1.0}, step=0)
    writer.log_metrics({"loss": 0.5}, step=1)
    writer.save()
    before = (tmp_path / "metrics.csv").read_text()

    def killed(self, rows):
        raise OSError("killed")

    real = csv.DictWriter.writerows
    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    writer.log_metrics({"loss": 0.25, "val_loss": 0.3}, step=2)
    with pytest.raises(OSError, match="killed"):
        writer.save()
    assert (tmp_path / "metrics.csv").read_text() == before

    monkeypatch.setattr(csv.DictWriter, "writerows", real)
    resumed = ResumingExperimentWriter(log_dir=str(tmp_path))
    resumed.log_metrics({"loss": 0.25, "val_loss": 0.3}, step=2)
    resumed.save()
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["loss"], r["val_loss"]) for r in rows] == [("0", "1.0", ""), ("1", "0.5", ""),
                                                                     ("2", "0.25", "0.3")]

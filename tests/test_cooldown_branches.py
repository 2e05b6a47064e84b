"""WSD cooldown branches: one constant-LR run gives several annealed records, each loaded as a data point."""

from __future__ import annotations

import csv
import json

import pytest

from analysis.compute import annealed_points
from analysis.records import load_dir
from tests.test_train import run_train
from var.errors import ConfigError, DataError
from var.lit.schedules import lr_factor, wsd_branch_length
from var.tasks.branches import plan_branches

LR, END, BATCH, TOKENS = 3e-3, 0.01, 32, 1 + 4 + 9 + 16


def lr_log(run_dir):
    """(step, lr) rows the LR monitor wrote to the CSV log of a run."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["lr-AdamW/pg1"])) for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")]


def test_branch_plan_and_its_errors():
    wsd = {"kind": "wsd", "warmup_steps": 2, "cooldown_fraction": 0.2, "cooldown_branches": [0.25, 50]}
    plan = plan_branches(wsd, 100)
    assert [(b["step"], b["max_steps"]) for b in plan] == [(25, 31), (50, 62)]
    # The branch is the wsd run of its own length: constant up to the branch step, then the cooldown.
    assert lr_factor(50, 62, "wsd", 2, END, 0.2) == 1.0 and lr_factor(51, 62, "wsd", 2, END, 0.2) < 1.0
    assert lr_factor(62, 62, "wsd", 2, END, 0.2) == pytest.approx(END)
    assert wsd_branch_length(40, 0, 0.2) == 50
    assert plan_branches({"kind": "wsd"}, 100) == []
    bad = [({**wsd, "kind": "official"}, "kind=wsd"), ({**wsd, "cooldown_branches": [90]}, "constant phase"),
           ({**wsd, "cooldown_branches": [1]}, "constant phase"), ({**wsd, "cooldown_branches": [1.5]}, "fraction"),
           ({**wsd, "cooldown_branches": [0.5, 50]}, "same step"), ({**wsd, "cooldown_branches": ["x"]}, "expected")]
    for schedule, match in bad:
        with pytest.raises(ConfigError, match=match):
            plan_branches(schedule, 100)
    with pytest.raises(ConfigError, match="progressive"):
        plan_branches(wsd, 100, progressive_fraction=0.5)


def test_one_run_with_two_branches_gives_three_annealed_records(small_token_cache, tmp_path):
    _, tokens_root = small_token_cache
    extra = ("task.schedule.kind=wsd", "task.schedule.cooldown_branches=[0.25,20]", f"task.schedule.end_ratio={END}",
             "logger=csv", "callbacks=default", "callbacks.checkpoint.every_n_train_steps=5",
             "trainer.log_every_n_steps=1")
    main, _ = run_train(tmp_path, tokens_root, steps=40, extra=extra)
    run_dir = tmp_path / "run"
    assert main["status"] == "complete"
    # warmup round(0.02 * 40) = 1 step; branches at 10 and 20 cool down to 1 + ceil(9 / 0.8) and 1 + ceil(19 / 0.8).
    assert [(b["step"], b["max_steps"]) for b in main["cooldown_branches"]] == [(10, 13), (20, 25)]
    assert main["evals"][-1]["annealed"] and main["evals"][-1]["lr"] == pytest.approx(END * LR)
    assert all(e["lr"] == pytest.approx(LR) for e in main["evals"] if 1 <= e["step"] <= 32)  # constant phase
    for step, length in ((10, 13), (20, 25)):
        assert (run_dir / "checkpoints" / f"branch_step{step}.ckpt").is_file()
        bdir = run_dir / "branches" / f"step{step}"
        rec = json.loads((bdir / "record.json").read_text())
        assert rec["status"] == "complete" and rec["branch"]["step"] == step and not rec.get("resumes")
        assert [e["step"] for e in rec["evals"]] == [length]  # one evaluation: the annealed end
        end = rec["evals"][0]
        assert end["annealed"] and end["lr"] == pytest.approx(END * LR)
        assert rec["final"]["step"] == length and rec["progress"]["tokens_seen"] == length * BATCH * TOKENS
        # The branch continued the main run from its checkpoint, at the peak LR, then cooled down.
        lrs = lr_log(bdir)
        assert min(s for s, _ in lrs) == step and max(s for s, _ in lrs) == length - 1
        assert lrs[0][1] == pytest.approx(LR) and [lr for _, lr in lrs] == sorted((lr for _, lr in lrs), reverse=True)
        assert (bdir / "checkpoints" / "last.ckpt").is_file()  # its own checkpoints, not the main run's
    assert min(s for s, _ in lr_log(run_dir)) == 0

    table = load_dir(run_dir)
    assert len(table) == 3 and table.status_counts() == {"complete": 3}
    assert sorted((r.branch or {}).get("step", 0) for r in table.runs) == [0, 10, 20]
    points = annealed_points(table, "L_mean")
    assert sorted(p["tokens"] for p in points) == [n * BATCH * TOKENS for n in (13, 25, 40)]

    # A re-run skips the main run and both branches.
    stamps = {p: json.loads(p.read_text())["updated_at"] for p in run_dir.rglob("record.json")}
    run_train(tmp_path, tokens_root, steps=40, extra=extra)
    assert {p: json.loads(p.read_text())["updated_at"] for p in run_dir.rglob("record.json")} == stamps

    # A branch whose checkpoint is gone cannot be made up: one line naming the file.
    (run_dir / "branches" / "step20" / "record.json").unlink()
    (run_dir / "checkpoints" / "branch_step20.ckpt").unlink()
    with pytest.raises(DataError, match="branch_step20.ckpt is missing"):
        run_train(tmp_path, tokens_root, steps=40, extra=extra)

"""WSD cooldown branches: several annealed points for L(N, D) from one constant-learning-rate run.

With ``task.schedule.kind=wsd`` and ``task.schedule.cooldown_branches`` (fractions of ``max_steps`` in
(0, 1), or integer steps), the main run keeps a checkpoint at each branch step ``s``
(``checkpoints/branch_step<s>.ckpt``). Once the main run is complete, each branch resumes from its
checkpoint as the wsd run of ``S = W + ceil((s - W) / (1 - f))`` steps (``W`` the main run's warmup, ``f``
``cooldown_fraction``; Hägele et al. 2024): the LR stays at its peak up to ``s``, as it did in the main run,
then decays to ``end_ratio`` at ``S``. The branch writes its own ``record.json`` in
``<run>/branches/step<s>/``, with one test evaluation, at ``S``, marked annealed and counting the tokens and
FLOPs of all S steps; analysis loads it as one more run of the same size.

Re-running the command skips complete branches, resumes an interrupted one from its own last checkpoint
and retries a failed one only with ``task.force=true``, as for the main run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from var.errors import ConfigError, DataError
from var.lit.checkpoint_io import remove_path
from var.lit.schedules import warmup_steps_of, wsd_branch_length
from var.record import read_record

KEY = "task.schedule.cooldown_branches"


def branch_checkpoint(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"branch_step{step}.ckpt"


def plan_branches(schedule: dict, max_steps: int, progressive_fraction: float = 0.0) -> list[dict]:
    """The branches of a main run of ``max_steps``: [{step, max_steps, warmup_steps, dir, checkpoint}], by step.

    Each branch must start in the constant phase (after warmup, before the main cooldown) and be shorter
    than the main run; anything else is a ConfigError naming the entry.
    """
    points = list(schedule.get("cooldown_branches") or [])
    if not points:
        return []
    kind, f = schedule.get("kind"), float(schedule.get("cooldown_fraction", 0.2))
    if kind != "wsd":
        raise ConfigError(f"{KEY}={points}: branches need task.schedule.kind=wsd (it is {kind})")
    if not 0 < f < 1:
        raise ConfigError(f"task.schedule.cooldown_fraction={f}: must be in (0, 1) for cooldown branches")
    if progressive_fraction > 0:
        raise ConfigError(f"{KEY}: not with task.progressive.fraction > 0 (a shorter branch would change "
                          f"the progressive schedule it was trained under)")
    warmup = warmup_steps_of(schedule, max_steps)
    main_cooldown = warmup + (1 - f) * (max_steps - warmup)
    plan = []
    for p in points:
        if isinstance(p, bool) or not isinstance(p, int | float):
            raise ConfigError(f"{KEY}: {p!r}: expected a fraction in (0, 1) or an integer step")
        if isinstance(p, float) and not 0 < p < 1:
            raise ConfigError(f"{KEY}: {p}: a fraction must be in (0, 1); give steps as integers")
        step = round(p * max_steps) if isinstance(p, float) else int(p)
        length = wsd_branch_length(step, warmup, f)
        if not warmup < step < main_cooldown or length >= max_steps:
            raise ConfigError(f"{KEY}: {p} is step {step}: a branch must start in the constant phase, after "
                              f"the {warmup} warmup steps and before the main cooldown at step "
                              f"{math.ceil(main_cooldown)}")
        plan.append({"step": step, "max_steps": length, "warmup_steps": warmup, "dir": f"branches/step{step}",
                     "checkpoint": f"checkpoints/branch_step{step}.ckpt"})
    steps = [b["step"] for b in plan]
    if len(set(steps)) != len(steps):
        raise ConfigError(f"{KEY}={points}: two entries give the same step ({sorted(steps)})")
    return sorted(plan, key=lambda b: b["step"])


class BranchCheckpoints(L.Callback):
    """The main run keeps a checkpoint at each branch step, written atomically by the training task's
    checkpoint IO and strategy (var/lit/checkpoint_io.py: a temporary name, then renamed into place).

    A re-run that passes the step again (after a resume from an earlier checkpoint, or with task.force)
    overwrites it: the branch must continue the trajectory the main run's record describes.
    """

    def __init__(self, run_dir: str | Path, steps: list[int]):
        self.run_dir, self.steps = Path(run_dir), set(steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            final = branch_checkpoint(self.run_dir, trainer.global_step)
            final.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(final)


def _rebase(node, old: str, new: str):
    """Every string under ``node`` that starts with the main run's directory, moved to the branch's."""
    if isinstance(node, dict):
        return {k: _rebase(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old + os.sep)):
        return new + node[len(old):]
    return node


def branch_config(cfg: DictConfig, run_dir: Path, branch: dict) -> DictConfig:
    """The main run's config with the branch's length, the main warmup pinned, and its own directory."""
    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("hydra", None)
    bdir = str(Path(run_dir) / branch["dir"])
    for group in ("callbacks", "logger", "trainer"):  # checkpoint dirs, logger save dirs
        if c.get(group) is not None:
            c[group] = _rebase(c[group], str(run_dir), bdir)
    c["paths"]["output_dir"] = bdir
    wandb = (c.get("logger") or {}).get("wandb")
    if wandb and wandb.get("name"):
        wandb["name"] = f"{wandb['name']}/cooldown@{branch['step']}"
    task = c["task"]
    task.update(max_steps=branch["max_steps"], flop_budget=None)
    task["schedule"].update(warmup_steps=branch["warmup_steps"], cooldown_branches=[])
    return OmegaConf.create(c)


def run_branches(cfg: DictConfig, run_dir: Path, main: dict, train_one) -> dict:
    """Train the branches the complete main record plans; returns the main record.

    ``train_one(cfg, run_dir, branch)`` trains one branch and returns its record (task=train's guarded
    ``train``). A branch that stops preempted ends the loop: re-running the command goes on from there.
    """
    plan = main.get("cooldown_branches") or []
    if main.get("status") != "complete" or not plan:
        return main
    force = bool(cfg.task.get("force", False))
    for b in plan:
        bdir = Path(run_dir) / b["dir"]
        old = read_record(bdir / "record.json")
        status = (old or {}).get("status")
        if status in ("complete", "failed") and not force:
            why = "" if status == "complete" else f" ({old.get('error')}); pass task.force=true to retry"
            print(f"skip cooldown branch {bdir}: record.json says {status}{why}")
            continue
        start = Path(run_dir) / b["checkpoint"]
        if not start.exists():
            raise DataError(f"cooldown branch at step {b['step']}: checkpoint {start} is missing; re-run the "
                            f"main run with task.force=true")
        last = bdir / "checkpoints" / "last.ckpt"
        if last.exists() and last.stat().st_mtime < start.stat().st_mtime:
            remove_path(last)  # left by a branch of an earlier main trajectory: never resume it
        info = {"of": main.get("run_name"), "of_dir": str(run_dir), "step": b["step"],
                "checkpoint": str(start), "name": f"{main.get('run_name')}/cooldown@{b['step']}"}
        record = train_one(branch_config(cfg, run_dir, b), bdir, info)
        if (record or {}).get("status") != "complete":
            break
    return main

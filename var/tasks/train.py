"""task=train: one VAR transformer on cached tokens (or images encoded on the fly, var/tasks/train_source.py),
with record.json, checkpoints and resume; then its WSD cooldown branches, if any (var/tasks/branches.py).

Re-running the same command finds the same run directory: a complete record is skipped, an interrupted
run resumes from its last checkpoint, a failed one is retried only with task.force=true.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from var.callbacks import configured_callbacks
from var.callbacks.fault_guard import NonFiniteGuard, PreemptionHandler
from var.callbacks.scaling_record import ScalingRecordCallback
from var.callbacks.throughput import ThroughputCallback
from var.callbacks.training_rng import TrainingRNG
from var.checkpoints import CheckpointError
from var.config import world_size
from var.data.tokens import TokenDataModule
from var.errors import ConfigError
from var.lit.checkpoint_io import AtomicCheckpointIO, resume_checkpoint
from var.lit.var_module import VARTrainingModule
from var.loggers import build_loggers, logger_callbacks
from var.models.flops import describe
from var.models.zoo import VARConfig
from var.record import read_record
from var.tasks.branches import BranchCheckpoints, plan_branches, run_branches
from var.tasks.train_source import image_source, source_of
from var.tokenizer_file import load_tokenizer

log = logging.getLogger(__name__)


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def build_strategy(parallelism: dict, world: int):
    kind = parallelism.get("kind", "none")
    if kind == "none":
        return "auto"
    if kind == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=bool(parallelism.get("find_unused_parameters", False)))
    if kind == "fsdp":
        from var.lit.checkpoint_io import AtomicModelParallelStrategy

        # Pure data parallel: every rank is one shard of the mesh ("auto" would mean one per node).
        return AtomicModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    raise ConfigError(f"trainer.parallelism.kind={kind}: expected none | ddp | fsdp")


def model_config(cfg: DictConfig, manifest: dict, source: str = "the token cache") -> dict:
    m = OmegaConf.to_container(cfg.model, resolve=True)
    if list(m["patch_nums"]) != list(manifest["patch_nums"]):
        raise ConfigError(f"model.patch_nums={m['patch_nums']}: {source} has {manifest['patch_nums']}")
    if int(m["vocab_size"]) != int(manifest["vocab_size"]):
        raise ConfigError(f"model.vocab_size={m['vocab_size']}: {source} has {manifest['vocab_size']}")
    if int(m["num_classes"]) < int(manifest["num_classes"]):
        raise ConfigError(f"model.num_classes={m['num_classes']}: {source} has {manifest['num_classes']}")
    return m


def launched_externally() -> bool:
    """Ranks started by torchrun or SLURM (one task per GPU) need no local process launching."""
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ or \
        int(os.environ.get("SLURM_NTASKS", "1")) > 1


def relaunch_as_single_run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """A multirun grid point that needs several local processes runs as a single run in its own dir.

    Lightning starts ranks 1.. by re-running the command line; inside a multirun that would start the
    whole sweep again in every rank, so the grid point becomes a plain run of its own overrides first.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    if world_size(cfg) <= 1 or launched_externally():
        return None
    overrides = [o for o in HydraConfig.get().overrides.task]
    cmd = [sys.executable, os.path.abspath(sys.argv[0]), *overrides, "hydra.mode=RUN", f"hydra.run.dir='{run_dir}'"]
    print(f"{run_dir.name}: {world_size(cfg)} local processes, launched as a single run")
    proc = subprocess.run(cmd, check=False)
    record = read_record(run_dir / "record.json")
    if record is None or (proc.returncode != 0 and record.get("status") != "failed"):
        mark_failed(run_dir, RuntimeError(f"single-run relaunch exited with status {proc.returncode}"))
        record = read_record(run_dir / "record.json")
    return record


def run(cfg: DictConfig) -> dict:
    task = cfg.task
    run_dir = run_dir_of(cfg)
    old = read_record(run_dir / "record.json")
    if old is not None and old.get("status") == "complete" and not task.get("force", False):
        print(f"skip {run_dir}: record.json says complete")
        return run_branches(cfg, run_dir, old, train_guarded)
    if old is not None and old.get("status") == "failed" and not task.get("force", False):
        print(f"skip {run_dir}: record.json says failed ({old.get('error')}); pass task.force=true to retry")
        return old

    relaunched = relaunch_as_single_run(cfg, run_dir)
    if relaunched is not None:
        return relaunched  # the single run trained the cooldown branches too
    return run_branches(cfg, run_dir, train_guarded(cfg, run_dir), train_guarded)


def train_guarded(cfg: DictConfig, run_dir: Path, branch: dict | None = None) -> dict:
    """``train``; a failure is recorded (by rank 0) before it propagates."""
    try:
        return train(cfg, run_dir, branch)
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt) and int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0:
            mark_failed(run_dir, e)
        raise


def mark_failed(run_dir: Path, error: BaseException) -> None:
    """Keep what the record already holds (evaluations so far) and add the failure, atomically."""
    from var.record import RunRecord

    record = RunRecord(run_dir, run_dir=str(run_dir))
    record.data.setdefault("run_name", run_dir.name)  # a cooldown branch keeps its own name
    if record["status"] != "failed":
        first = str(error).strip().splitlines()
        record.update(status="failed", error=f"{type(error).__name__}: {first[0] if first else ''}")
        if getattr(error, "data_faults", None) is not None:  # too many bad samples: keep the counts
            record.update(data_faults=error.data_faults)
        record.save()


def train(cfg: DictConfig, run_dir: Path, branch: dict | None = None) -> dict:
    """One run; ``branch`` (from run_branches) makes it a cooldown branch starting from the main checkpoint."""
    task = cfg.task
    world = world_size(cfg)
    if task.batch_size % world:
        raise ConfigError(f"task.batch_size={task.batch_size}: not divisible by the {world} devices")
    import lightning as L

    # Same initial weights on every rank (FSDP2 shards each rank's own copy) and in every re-run.
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if source_of(cfg) == "images":
        dm, quantizer, tokens_source, tok_path = image_source(cfg, world)
        model_dict = model_config(cfg, dm.manifest, f"tokenizer {tok_path}")
    else:
        dm = TokenDataModule(task.tokens, batch_size=task.batch_size // world, eval_batch_size=task.eval_batch_size,
                             num_workers=task.num_workers, eval_limit=task.eval_limit,
                             max_bad_fraction=float(cfg.data.get("max_bad_fraction", 0.01)), seed=int(cfg.seed))
        dm.setup()
        for split in ("train", "val", "test"):  # read and check every split now: bad data fails before any model
            dm.dataset(split)
        model_dict = model_config(cfg, dm.manifest)
        tok_path = task.tokenizer_path or dm.manifest["tokenizer"]["path"]
        quantizer = load_tokenizer(tok_path, patch_nums=tuple(model_dict["patch_nums"])).quantize
        tokens_source = {"kind": "tokens", "root": str(task.tokens), "fingerprint": dm.manifest.get("fingerprint")}

    parallelism = OmegaConf.to_container(cfg.trainer.parallelism, resolve=True)
    module = VARTrainingModule(model_dict, quantizer, OmegaConf.to_container(task.optim, resolve=True),
                               OmegaConf.to_container(task.schedule, resolve=True),
                               OmegaConf.to_container(task.loss, resolve=True),
                               OmegaConf.to_container(task.progressive, resolve=True), parallelism,
                               global_batch=task.batch_size,
                               speed=OmegaConf.to_container(task.get("speed") or {}, resolve=True))
    info = describe(VARConfig(**{**model_dict, "patch_nums": tuple(model_dict["patch_nums"])}))
    params = info["params"]
    static = {
        "run_name": run_dir.name, "run_dir": str(run_dir),
        "sweep": cfg.get("sweep_name"),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "model": {"depth": module.model_cfg.depth, "width": module.model_cfg.width,
                  "heads": module.model_cfg.num_heads, "params_total": params["total"],
                  "params_non_embedding": params["non_embedding"], "params_core": info["core_params_paper"]},
        "tokens_source": tokens_source,
        "data_faults": dm.fault_summary(),
    }
    # Sampling and evaluation find a run's tokenizer through its recorded config.
    static["config"]["task"]["tokenizer_path"] = str(tok_path)
    fpi = info["train_flops_per_image"]
    max_steps = task.max_steps
    if task.get("flop_budget"):  # iso-FLOP grids: the budget fixes the steps of each size
        max_steps = max(1, math.ceil(float(task.flop_budget) / (fpi[task.flop_convention] * task.batch_size)))
        static["flop_budget"] = {"flops": float(task.flop_budget), "convention": task.flop_convention}
    if not max_steps:
        raise ConfigError("task.max_steps: must be set (or task.flop_budget)")
    plan = plan_branches(OmegaConf.to_container(task.schedule, resolve=True), max_steps,
                         float(task.progressive.get("fraction") or 0))
    if plan:
        static["cooldown_branches"] = plan
    if branch:
        static.update(run_name=branch["name"], branch=branch)
    loggers = build_loggers(cfg, run_dir)
    callbacks = configured_callbacks(cfg, loggers)
    callbacks += [
        ScalingRecordCallback(str(run_dir), static, fpi, info["tokens_per_image"], task.batch_size,
                              task.record.num_eval_points, task.record.first_eval_fraction, task.schedule.kind,
                              eval_steps=[max_steps] if branch else None,  # a branch: its annealed end only
                              start_ckpt=branch["checkpoint"] if branch else None),
        ThroughputCallback(fpi[task.mfu_convention], info["tokens_per_image"], task.batch_size),
        NonFiniteGuard(),
        PreemptionHandler(str(run_dir / "checkpoints")),
        TrainingRNG(int(cfg.seed)),
        *logger_callbacks(loggers),
    ]
    if plan:
        callbacks.append(BranchCheckpoints(run_dir, [b["step"] for b in plan]))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs.pop("parallelism", None)
    trainer_kwargs.pop("_target_", None)
    trainer_kwargs.update(max_steps=max_steps, max_epochs=-1, check_val_every_n_epoch=None,
                          val_check_interval=task.val_every_n_steps, default_root_dir=str(run_dir))
    # Every checkpoint is written under a temporary name and renamed (var/lit/checkpoint_io.py).
    trainer = L.Trainer(**trainer_kwargs, callbacks=callbacks, logger=loggers or False,
                        strategy=build_strategy(parallelism, world), plugins=[AtomicCheckpointIO()])
    last = resume_checkpoint(run_dir / "checkpoints")  # a file, or a folder of FSDP2 shards
    start = branch["checkpoint"] if branch else None  # a branch starts from the main run's checkpoint
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(last) if last else start, weights_only=True)
    except pickle.UnpicklingError as e:  # only loading a checkpoint unpickles during fit
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {last or start} cannot be loaded safely (weights_only=True): "
                              f"{first}") from None
    record = read_record(run_dir / "record.json") or {}
    if record.get("status") == "preempted":
        print(f"{run_dir.name}: preempted at step {trainer.global_step}; checkpoint saved, re-run the same "
              f"command to resume")
        return record
    final = record.get("final") or {}
    if trainer.is_global_zero and final:
        print(f"{static['run_name']}: d{module.model_cfg.depth} {params['total'] / 1e6:.2f}M params, "
              f"test L_mean {final['L_mean']:.4f} L_last {final['L_last']:.4f} after {final['step']} steps")
    return record

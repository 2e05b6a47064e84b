"""task=train: one VAR transformer on cached tokens, with record.json, checkpoints and resume.

Re-running the same command finds the same run directory: a complete record is skipped, an interrupted
run resumes from its last checkpoint, a failed one is retried only with task.force=true.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from var.callbacks.fault_guard import NonFiniteGuard, PreemptionHandler
from var.callbacks.scaling_record import ScalingRecordCallback
from var.callbacks.throughput import ThroughputCallback
from var.data.tokens import TokenDataModule
from var.errors import ConfigError
from var.lit.var_module import VARTrainingModule
from var.models.flops import describe
from var.models.zoo import VARConfig
from var.record import read_record
from var.tokenizer_file import load_tokenizer

log = logging.getLogger(__name__)


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def world_size_of(trainer_cfg: DictConfig) -> int:
    devices = trainer_cfg.get("devices", 1)
    if devices in (-1, "auto"):
        devices = torch.cuda.device_count() if trainer_cfg.get("accelerator") == "gpu" else 1
    n = len(devices) if isinstance(devices, list | tuple) or OmegaConf.is_list(devices) else int(devices)
    return max(n, 1) * int(trainer_cfg.get("num_nodes", 1))


def build_strategy(parallelism: dict, world: int):
    kind = parallelism.get("kind", "none")
    if kind == "none":
        return "auto"
    if kind == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=bool(parallelism.get("find_unused_parameters", False)))
    if kind == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # Pure data parallel: every rank is one shard of the mesh ("auto" would mean one per node).
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    raise ConfigError(f"trainer.parallelism.kind={kind}: expected none | ddp | fsdp")


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if name == "wandb" and node.get("id") is None:
            # A stable id derived from the run directory: a requeued or re-run job resumes its W&B run.
            node = OmegaConf.merge(node, {"id": hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16],
                                          "resume": "allow"})
        loggers.append(hydra.utils.instantiate(node))
    return loggers


def model_config(cfg: DictConfig, manifest: dict) -> dict:
    m = OmegaConf.to_container(cfg.model, resolve=True)
    if list(m["patch_nums"]) != list(manifest["patch_nums"]):
        raise ConfigError(f"model.patch_nums={m['patch_nums']}: the token cache has {manifest['patch_nums']}")
    if int(m["vocab_size"]) != int(manifest["vocab_size"]):
        raise ConfigError(f"model.vocab_size={m['vocab_size']}: the token cache has {manifest['vocab_size']}")
    if int(m["num_classes"]) < int(manifest["num_classes"]):
        raise ConfigError(f"model.num_classes={m['num_classes']}: the token cache has {manifest['num_classes']}")
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
    if world_size_of(cfg.trainer) <= 1 or launched_externally():
        return None
    overrides = [o for o in HydraConfig.get().overrides.task]
    cmd = [sys.executable, os.path.abspath(sys.argv[0]), *overrides, "hydra.mode=RUN", f"hydra.run.dir='{run_dir}'"]
    print(f"{run_dir.name}: {world_size_of(cfg.trainer)} local processes, launched as a single run")
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
        return old
    if old is not None and old.get("status") == "failed" and not task.get("force", False):
        print(f"skip {run_dir}: record.json says failed ({old.get('error')}); pass task.force=true to retry")
        return old

    relaunched = relaunch_as_single_run(cfg, run_dir)
    if relaunched is not None:
        return relaunched
    try:
        return train(cfg, run_dir)
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt) and int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0:
            mark_failed(run_dir, e)
        raise


def mark_failed(run_dir: Path, error: BaseException) -> None:
    """Keep what the record already holds (evaluations so far) and add the failure, atomically."""
    from var.record import RunRecord

    record = RunRecord(run_dir, run_name=run_dir.name, run_dir=str(run_dir))
    if record["status"] != "failed":
        first = str(error).strip().splitlines()
        record.update(status="failed", error=f"{type(error).__name__}: {first[0] if first else ''}")
        record.save()


def train(cfg: DictConfig, run_dir: Path) -> dict:
    task = cfg.task
    world = world_size_of(cfg.trainer)
    if task.batch_size % world:
        raise ConfigError(f"task.batch_size={task.batch_size}: not divisible by the {world} devices")
    dm = TokenDataModule(task.tokens, batch_size=task.batch_size // world, eval_batch_size=task.eval_batch_size,
                         num_workers=task.num_workers, eval_limit=task.eval_limit)
    dm.setup()
    model_dict = model_config(cfg, dm.manifest)
    tok_path = task.tokenizer_path or dm.manifest["tokenizer"]["path"]
    quantizer = load_tokenizer(tok_path, patch_nums=tuple(model_dict["patch_nums"])).quantize

    parallelism = OmegaConf.to_container(cfg.trainer.parallelism, resolve=True)
    module = VARTrainingModule(model_dict, quantizer, OmegaConf.to_container(task.optim, resolve=True),
                               OmegaConf.to_container(task.schedule, resolve=True),
                               OmegaConf.to_container(task.loss, resolve=True),
                               OmegaConf.to_container(task.progressive, resolve=True), parallelism,
                               global_batch=task.batch_size)
    info = describe(VARConfig(**{**model_dict, "patch_nums": tuple(model_dict["patch_nums"])}))
    params = info["params"]
    static = {
        "run_name": run_dir.name, "run_dir": str(run_dir),
        "sweep": cfg.get("sweep_name"),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "model": {"depth": module.model_cfg.depth, "width": module.model_cfg.width,
                  "heads": module.model_cfg.num_heads, "params_total": params["total"],
                  "params_non_embedding": params["non_embedding"], "params_core": info["core_params_paper"]},
        "tokens_source": {"root": str(task.tokens), "fingerprint": dm.manifest.get("fingerprint")},
    }
    fpi = info["train_flops_per_image"]
    max_steps = task.max_steps
    if task.get("flop_budget"):  # iso-FLOP grids: the budget fixes the steps of each size
        max_steps = max(1, math.ceil(float(task.flop_budget) / (fpi[task.flop_convention] * task.batch_size)))
        static["flop_budget"] = {"flops": float(task.flop_budget), "convention": task.flop_convention}
    if not max_steps:
        raise ConfigError("task.max_steps: must be set (or task.flop_budget)")
    loggers = build_loggers(cfg, run_dir)
    callbacks = [hydra.utils.instantiate(c) for name, c in (cfg.get("callbacks") or {}).items()
                 if c is not None and (loggers or name != "lr_monitor")]  # the LR monitor refuses a trainer without loggers
    callbacks += [
        ScalingRecordCallback(str(run_dir), static, fpi, info["tokens_per_image"], task.batch_size,
                              task.record.num_eval_points, task.record.first_eval_fraction, task.schedule.kind),
        ThroughputCallback(fpi[task.mfu_convention], info["tokens_per_image"], task.batch_size),
        NonFiniteGuard(),
        PreemptionHandler(str(run_dir / "checkpoints")),
    ]
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs.pop("parallelism", None)
    trainer_kwargs.pop("_target_", None)
    trainer_kwargs.update(max_steps=max_steps, max_epochs=-1, check_val_every_n_epoch=None,
                          val_check_interval=task.val_every_n_steps, default_root_dir=str(run_dir))
    import lightning as L

    trainer = L.Trainer(**trainer_kwargs, callbacks=callbacks, logger=loggers or False,
                        strategy=build_strategy(parallelism, world))
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if last.exists() else None)
    record = read_record(run_dir / "record.json") or {}
    if record.get("status") == "preempted":
        print(f"{run_dir.name}: preempted at step {trainer.global_step}; checkpoint saved, re-run the same "
              f"command to resume")
        return record
    final = record.get("final") or {}
    if trainer.is_global_zero and final:
        print(f"{run_dir.name}: d{module.model_cfg.depth} {params['total'] / 1e6:.2f}M params, "
              f"test L_mean {final['L_mean']:.4f} L_last {final['L_last']:.4f} after {final['step']} steps")
    return record

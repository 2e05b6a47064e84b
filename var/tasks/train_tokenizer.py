"""task=train_tokenizer: train the multi-scale VQVAE on the image shards and write the tokenizer file.

The file goes to the run directory and to ``task.out``, a path that depends only on the dataset and the
preset, which is where task=encode looks by default. Re-running skips when ``out`` was made by the same
settings from the same data, and refuses (naming what differs) when it was not, unless task.force=true.
An interrupted run resumes from its last Lightning checkpoint (run directories are deterministic).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from var.callbacks import configured_callbacks
from var.checkpoints import CheckpointError, safe_load
from var.config import world_size
from var.config_checks import validate_train_tokenizer
from var.data.datamodule import ImageShardDataModule
from var.data.shards import read_manifest
from var.errors import ConfigError, DataError
from var.loggers import build_loggers, logger_callbacks
from var.models.vqvae import VQVAEConfig

# Task keys that do not change the trained weights; they stay out of the "same settings?" check.
_NOT_TRAINING = ("name", "force", "out", "val_every_n_steps", "grid_images", "lpips_weights")


# ------------------------------------------------------------------------------------------ shared helpers
def vqvae_config(tok: DictConfig) -> VQVAEConfig:
    """The ``tokenizer`` config node as a checked VQVAEConfig (extra keys like preset/released ignored)."""
    names = {f.name for f in dataclasses.fields(VQVAEConfig)}
    plain = OmegaConf.to_container(tok, resolve=True)
    cfg = VQVAEConfig(**{k: v for k, v in plain.items() if k in names})
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"tokenizer={plain.get('preset')}: {e}") from None
    return cfg


def default_tokenizer_path(cfg: DictConfig) -> str:
    """Where task=encode finds a tokenizer when task.tokenizer_path is null (= train_tokenizer's `out`)."""
    released = cfg.tokenizer.get("released")
    if released:
        return str(released)
    return f"{cfg.paths.runs_dir}/tokenizer/{cfg.data.name}_r{cfg.data.resolution}_{cfg.tokenizer.preset}.pt"


def build_trainer(cfg: DictConfig, max_steps: int, val_every: int) -> L.Trainer:
    """Lightning Trainer from cfg.trainer, with the strategy from its `parallelism` node.

    Manual optimisation (two optimisers) clips gradients itself and cannot accumulate, so those two
    Trainer arguments are taken out; fp16 is refused because its loss scaler does not fit the two steps.
    """
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    kind = (t.pop("parallelism", None) or {}).get("kind", "none")
    t.pop("gradient_clip_val", None)
    if int(t.pop("accumulate_grad_batches", 1) or 1) != 1:
        raise ConfigError("trainer.accumulate_grad_batches: the tokenizer trains without accumulation; "
                          "raise data.batch_size instead")
    if str(t.get("precision", "32")).startswith("16"):
        raise ConfigError(f"trainer.precision={t['precision']}: use bf16-mixed or 32-true for the tokenizer")
    if kind == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # Unused parameters: D before disc_start, and each side is frozen during the other's step.
        strategy = DDPStrategy(find_unused_parameters=True)
    elif kind == "fsdp":
        raise ConfigError("trainer=fsdp: the tokenizer is small and trains data-parallel; use trainer=ddp")
    else:
        strategy = "auto"
    loggers = build_loggers(cfg, cfg.paths.output_dir)
    callbacks = configured_callbacks(cfg, loggers)
    callbacks += logger_callbacks(loggers)
    t.update(max_steps=max_steps, val_check_interval=min(val_every, max_steps), check_val_every_n_epoch=None)
    from var.lit.checkpoint_io import AtomicCheckpointIO  # checkpoints written beside the target, renamed

    return hydra.utils.instantiate(t, strategy=strategy, callbacks=callbacks, logger=loggers or False,
                                   plugins=[AtomicCheckpointIO()])


# ------------------------------------------------------------------------------------------------ task
def training_key(cfg: DictConfig, data_manifest: dict, vq: VQVAEConfig) -> dict:
    """Everything that determines the trained weights; recorded in the file, compared on re-runs."""
    task = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k not in _NOT_TRAINING}
    task["batch_size"] = global_batch(cfg)
    return {"data": {"fingerprint": data_manifest.get("fingerprint"), "hflip": bool(cfg.data.hflip)},
            "tokenizer": json.loads(json.dumps(dataclasses.asdict(vq))), "train": task, "seed": int(cfg.seed)}


def global_batch(cfg: DictConfig) -> int:
    return int(cfg.task.get("batch_size") or cfg.data.batch_size)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a} -> {b}")
    return out


def _existing(out: Path, key: dict) -> bool:
    """True if `out` holds a tokenizer trained with `key`; ConfigError if it was trained otherwise."""
    try:
        meta = safe_load(out, "tokenizer").get("meta", {})
    except CheckpointError as e:
        raise DataError(f"{e}; pass task.force=true to replace it") from None
    diff = _differences(meta.get("training_key", {}), key)
    if not diff:
        return True
    raise ConfigError(f"task.out={out} was trained with other settings ({'; '.join(diff[:3])}"
                      f"{'; ...' if len(diff) > 3 else ''}): pass task.force=true to replace it or task.out=PATH")


def run(cfg: DictConfig) -> dict:
    task, data, tok = cfg.task, cfg.data, cfg.tokenizer
    if tok.get("released"):
        print(f"tokenizer={tok.preset} loads released weights ({tok.released}); nothing to train. "
              f"task=encode uses them; set tokenizer.released=null to train this architecture instead.")
        return {"tokenizer": str(tok.released), "skipped": True}
    vq = vqvae_config(tok)
    validate_train_tokenizer(cfg)  # also when called directly, not through run_task
    manifest = read_manifest(data.root)
    if manifest is None:
        raise DataError(f"no dataset at {data.root} (manifest.json missing): run `python run.py task=prepare` "
                        f"with the same data config first")
    out, run_dir = Path(task.out), Path(cfg.paths.output_dir)
    key = training_key(cfg, manifest, vq)
    if out.is_file() and not task.force and _existing(out, key):
        print(f"found tokenizer {out} trained with these settings on this data; skipping "
              f"(task.force=true retrains)")
        return {"tokenizer": str(out), "skipped": True}

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    try:
        module = _make_module(cfg, vq, run_dir)
    except CheckpointError as e:  # the LPIPS weights are missing or unusable
        raise DataError(f"task.lpips_weights={task.lpips_weights}: {e}") from None
    parallel = (cfg.trainer.get("parallelism") or {}).get("kind", "none") != "none"
    batch, world = global_batch(cfg), world_size(cfg) if parallel else 1
    if batch % world:
        raise ConfigError(f"task.batch_size={batch}: not divisible by the {world} devices")
    dm = ImageShardDataModule(**{**OmegaConf.to_container(data, resolve=True), "batch_size": batch // world})
    trainer = build_trainer(cfg, int(task.max_steps), int(task.val_every_n_steps))
    last = _last_checkpoint(cfg)
    resume = str(last) if last is not None and not task.force else None
    if resume:
        print(f"resuming from {resume}")
    start = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
    if module.val_results.get("step") != trainer.global_step:  # the last interval did not end on a val
        trainer.validate(module, datamodule=dm, verbose=False)
    seconds = time.time() - start
    res = module.val_results
    faults = dm.fault_summary()  # corrupt samples skipped, summed over ranks: every rank takes part
    if trainer.is_global_zero:
        from var.tokenizer_file import save_tokenizer

        meta = {"preset": tok.preset, "training_key": key, "steps": int(trainer.global_step),
                "val": res, "data_root": str(data.root), "run_dir": str(run_dir), "data_faults": faults}
        save_tokenizer(run_dir / "tokenizer.pt", module.vqvae, meta)
        save_tokenizer(out, module.vqvae, meta)
        _print_summary(module, res, seconds, out, run_dir)
        if faults["skipped"]:
            print(f"  skipped {faults['skipped']} of {faults['seen']} samples read as corrupt "
                  f"({', '.join(f'{k} {n}' for k, n in faults['by_kind'].items())})")
    hist = module.loss_history
    k = max(1, min(10, len(hist) // 4))
    return {"tokenizer": str(out), "skipped": False, "val": res, "seconds": seconds,
            "loss_start": sum(hist[:k]) / k if hist else math.nan,
            "loss_end": sum(hist[-k:]) / k if hist else math.nan, "reseeded": module.reseeded,
            "data_faults": faults}


def _make_module(cfg: DictConfig, vq: VQVAEConfig, run_dir: Path):
    from var.lit.tokenizer_module import TokenizerModule

    task = cfg.task
    plain = OmegaConf.to_container(task, resolve=True)
    return TokenizerModule(
        vqvae=json.loads(json.dumps(dataclasses.asdict(vq))), loss=plain["loss"], optim=plain["optim"],
        disc=plain["disc"], reseed=plain["reseed"], lpips_weights=plain.get("lpips_weights"),
        lpips_random=bool(plain.get("lpips_random", False)), grid_dir=str(run_dir / "recon"),
        grid_images=int(plain.get("grid_images", 16)), channels_last=bool(plain.get("channels_last", False)),
        seed=int(cfg.seed))


def _last_checkpoint(cfg: DictConfig) -> Path | None:
    ckpt = OmegaConf.select(cfg, "callbacks.checkpoint.dirpath")
    path = Path(ckpt) / "last.ckpt" if ckpt else None
    return path if path is not None and path.is_file() else None


def _print_summary(module, res: dict, seconds: float, out: Path, run_dir: Path) -> None:
    pns = module.patch_nums
    usage = ", ".join(f"{pn}x{pn} {res.get(f'val/usage_s{i}_{pn}', float('nan')):.0f}%" for i, pn in enumerate(pns))
    print(f"trained {module.trainer.global_step} steps in {seconds:.0f} s: val PSNR {res.get('val/psnr', 0):.2f} dB, "
          f"SSIM {res.get('val/ssim', 0):.3f}, L1 {res.get('val/l1', 0):.4f}")
    print(f"  codebook usage on val (% of {module.vqvae.V} codes): {usage}")
    if module.reseeded:
        print(f"  re-seeded {module.reseeded} dead codes")
    print(f"  reconstructions: {run_dir / 'recon'}")
    print(f"tokenizer written to {out} (and {run_dir / 'tokenizer.pt'})")

"""Per-task config rules, called by ``var.config.validate`` before any data is read or model built.

Each rule names the key it refuses in one line. The names of schedules, FLOP conventions and attention
kernels are listed here so validation needs no torch import; tests/test_config_properties.py checks they
match the code that uses them.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from var.config import _UNSET, _choice, _int_list, _number, device_count
from var.errors import ConfigError

SCHEDULES = ("official", "wsd", "cosine", "constant")          # var/lit/schedules.py lr_factor
COOLDOWN_SHAPES = ("1-sqrt", "linear")
FLOP_CONVENTIONS = ("6NL", "exact", "exact_dense_attn", "official_mfu")  # var/models/flops.py
# torch.compile modes for task.speed.compile_mode (None: torch's default). The CUDA-graph modes
# ("reduce-overhead", "max-autotune") are left out: per-block graphs break under FSDP2 and activation
# checkpointing, and a step of a training-size batch is not launch-bound.
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")
RESIDUAL_DTYPES = ("param", "autocast")  # var/models/transformer.py
FFN_IMPLS = ("plain", "fused")  # var/models/ffn.py
ADALN_IMPLS = ("plain", "fused")  # var/models/block.py


def validate_task(cfg: DictConfig) -> None:
    task = OmegaConf.select(cfg, "task.name")
    if task == "train":
        validate_train(cfg)
    elif task == "train_tokenizer":
        validate_train_tokenizer(cfg)


def _world(cfg: DictConfig, parallel_only: bool) -> int | None:
    """Processes of the run when the config alone fixes them (None for devices=-1 / auto)."""
    if parallel_only and OmegaConf.select(cfg, "trainer.parallelism.kind") in (None, "none"):
        return 1
    n = device_count(cfg)
    nodes = OmegaConf.select(cfg, "trainer.num_nodes") or 1
    return None if n is None else n * nodes


def _divisible(cfg: DictConfig, key: str, batch: int | None, world: int | None) -> None:
    if batch is not None and world and batch % world:
        raise ConfigError(f"{key}={batch}: not divisible by the {world} devices (trainer.devices x trainer.num_nodes)")


def validate_train(cfg: DictConfig) -> None:
    t = "task."
    batch = _number(cfg, t + "batch_size", 1, integer=True, nullable=False)
    _divisible(cfg, t + "batch_size", batch, _world(cfg, parallel_only=False))
    _number(cfg, t + "eval_batch_size", 1, integer=True, nullable=False)
    _number(cfg, t + "num_workers", 0, integer=True)
    _number(cfg, t + "eval_limit", 1, integer=True)
    _number(cfg, t + "val_every_n_steps", 1, integer=True, nullable=False)
    budget = _number(cfg, t + "flop_budget", 0, lo_open=True)
    max_steps = _number(cfg, t + "max_steps", 1, integer=True)
    if max_steps is None and budget is None:
        raise ConfigError("task.max_steps=null: must be set (or task.flop_budget)")
    _choice(cfg, t + "flop_convention", FLOP_CONVENTIONS)
    _choice(cfg, t + "mfu_convention", FLOP_CONVENTIONS)
    # Optimiser.
    _number(cfg, t + "optim.base_lr", 0, lo_open=True, nullable=False)
    _number(cfg, t + "optim.lr", 0, lo_open=True)
    _number(cfg, t + "optim.weight_decay", 0)
    _number(cfg, t + "optim.eps", 0, lo_open=True)
    betas = OmegaConf.select(cfg, t + "optim.betas", default=_UNSET)
    if betas is not _UNSET:
        if not (OmegaConf.is_list(betas) or isinstance(betas, list | tuple)) or len(betas) != 2:
            raise ConfigError(f"task.optim.betas={betas}: expected two numbers in [0, 1)")
        for b in betas:
            _number(cfg, t + "optim.betas", 0, 1, hi_open=True, nullable=False, value=b)
    # Schedule.
    _choice(cfg, t + "schedule.kind", SCHEDULES)
    _number(cfg, t + "schedule.warmup_fraction", 0, 1, hi_open=True)
    warmup = _number(cfg, t + "schedule.warmup_steps", 0, integer=True)
    if warmup and max_steps is not None and warmup >= max_steps:
        raise ConfigError(f"task.schedule.warmup_steps={warmup}: leaves no steps of task.max_steps={max_steps} "
                          f"after warmup")
    _number(cfg, t + "schedule.end_ratio", 0, 1)
    _number(cfg, t + "schedule.cooldown_fraction", 0, 1, lo_open=True)
    _choice(cfg, t + "schedule.cooldown_shape", COOLDOWN_SHAPES)
    # Loss, progressive training, record.
    _number(cfg, t + "loss.label_smoothing", 0, 1, hi_open=True)
    _number(cfg, t + "progressive.fraction", 0, 1)
    _number(cfg, t + "progressive.start_scale", 0, integer=True)
    _number(cfg, t + "record.num_eval_points", 1, integer=True)
    _number(cfg, t + "record.first_eval_fraction", 0, 1, lo_open=True)
    _choice(cfg, t + "speed.compile_mode", COMPILE_MODES)
    _validate_model_fits_tokenizer(cfg)
    _choice(cfg, "model.residual_dtype", RESIDUAL_DTYPES)
    _choice(cfg, "model.ffn_impl", FFN_IMPLS)
    _choice(cfg, "model.adaln_impl", ADALN_IMPLS)
    impl = OmegaConf.select(cfg, "model.attn_impl")
    if impl is not None:
        from var.models.attention import ATTENTION_IMPLS  # the one list of kernels; imports torch

        _choice(cfg, "model.attn_impl", tuple(ATTENTION_IMPLS))


def _validate_model_fits_tokenizer(cfg: DictConfig) -> None:
    """The transformer predicts the tokenizer's tokens: same scales, vocabulary and latent channels."""
    if OmegaConf.select(cfg, "tokenizer") is None:
        return
    model_pn = _int_list(cfg, "model.patch_nums", increasing=True)
    tok_pn = _int_list(cfg, "tokenizer.patch_nums", increasing=True)
    if model_pn is not None and tok_pn is not None and model_pn != tok_pn:
        raise ConfigError(f"model.patch_nums={model_pn}: the tokenizer ({OmegaConf.select(cfg, 'tokenizer.preset')}) "
                          f"has {tok_pn}")
    for key, tok_key in (("model.vocab_size", "tokenizer.vocab_size"), ("model.cvae", "tokenizer.z_channels")):
        a, b = OmegaConf.select(cfg, key), OmegaConf.select(cfg, tok_key)
        if a is not None and b is not None and a != b:
            raise ConfigError(f"{key}={a}: the tokenizer has {tok_key}={b}")
    classes, data_classes = OmegaConf.select(cfg, "model.num_classes"), OmegaConf.select(cfg, "data.num_classes")
    if classes is not None and data_classes is not None and classes < data_classes:
        raise ConfigError(f"model.num_classes={classes}: fewer than the data's {data_classes} classes")


def validate_train_tokenizer(cfg: DictConfig) -> None:
    t = "task."
    batch = _number(cfg, t + "batch_size", 1, integer=True)
    if batch is None:
        batch = OmegaConf.select(cfg, "data.batch_size")
    _divisible(cfg, t + "batch_size" if OmegaConf.select(cfg, t + "batch_size") else "data.batch_size", batch,
               _world(cfg, parallel_only=True))
    _number(cfg, t + "max_steps", 1, integer=True, nullable=False)
    _number(cfg, t + "val_every_n_steps", 1, integer=True, nullable=False)
    _number(cfg, t + "optim.lr", 0, lo_open=True, nullable=False)
    _number(cfg, t + "optim.disc_lr", 0, lo_open=True)
    _number(cfg, t + "optim.min_lr_ratio", 0, 1)
    _number(cfg, t + "optim.warmup_steps", 0, integer=True)
    _choice(cfg, t + "optim.schedule", ("constant", "cosine"))
    _choice(cfg, t + "loss.pixel", ("l1", "l2"))
    _choice(cfg, t + "disc.norm", ("group", "batch"))
    for key in ("loss.w_pixel", "loss.w_lpips", "loss.w_gan"):
        _number(cfg, t + key, 0)
    # The tokenizer trains with manual optimisation (two optimisers) and data parallel only.
    if OmegaConf.select(cfg, "trainer.parallelism.kind") == "fsdp":
        raise ConfigError("trainer.parallelism.kind=fsdp: the tokenizer is small and trains data-parallel; "
                          "use trainer=ddp")
    if str(OmegaConf.select(cfg, "trainer.precision")).startswith("16"):
        raise ConfigError(f"trainer.precision={OmegaConf.select(cfg, 'trainer.precision')}: use bf16-mixed or "
                          f"32-true for the tokenizer")
    if (OmegaConf.select(cfg, "trainer.accumulate_grad_batches") or 1) != 1:
        raise ConfigError("trainer.accumulate_grad_batches: the tokenizer trains without accumulation; raise "
                          "data.batch_size instead")

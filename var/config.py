"""Config plumbing shared by run.py and the tests: resolvers, structured schemas, validation.

Hydra's struct mode already rejects unknown keys and the dataclass schemas below reject wrong types; the
checks in ``validate`` catch impossible values (negative sizes, resolutions the tokenizer cannot tile) at
start, with one line naming the key, instead of deep inside torch minutes later.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from var.errors import ConfigError

_UNSAFE = re.compile(r"[^A-Za-z0-9=,._+\-]")


def run_dirname(override_dirname: str, max_len: int = 120) -> str:
    """A directory name that is a pure function of the overrides.

    The same command always maps to the same directory (so a re-run finds and resumes or skips it) and
    different commands never collide, however close in time they start. Characters that are unsafe in a
    path (``/`` of ``data.src=/x/y``) are replaced; long names are cut and suffixed with a hash of the
    full string so they stay unique.
    """
    if not override_dirname:
        return "default"
    name = _UNSAFE.sub("_", override_dirname)
    if len(name) > max_len or name != override_dirname:
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
        name = f"{name[: max_len - 9]}-{digest}"
    return name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_dirname"):
        OmegaConf.register_new_resolver("run_dirname", run_dirname)
    if not OmegaConf.has_resolver("if_null"):
        OmegaConf.register_new_resolver("if_null", lambda value, default: default if value is None else value)
    if not OmegaConf.has_resolver("eval_int"):
        # Small integer arithmetic in YAML (e.g. per-depth batch sizes); only digits and + - * // ( ).
        OmegaConf.register_new_resolver("eval_int", _eval_int)


def _eval_int(expr: str) -> int:
    expr = str(expr)
    if not re.fullmatch(r"[0-9+\-*/() ]+", expr):
        raise ConfigError(f"eval_int: refusing expression {expr!r}")
    return int(eval(expr, {"__builtins__": {}}, {}))  # noqa: S307 - charset checked above


# ---------------------------------------------------------------------------------------------- schemas
@dataclass
class SplitSizes:
    train: int = 5000
    val: int = 500
    test: int = 500


@dataclass
class ImageDataSchema:
    """Fields every image-shard dataset config has; the dataset-specific ones extend it."""

    name: str = "synthetic"
    root: str = "data/synthetic"
    resolution: int = 64
    num_classes: int = 10
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 2
    train_batches_per_epoch: int = 100
    shuffle_buffer: int = 1000
    hflip: bool = True
    samples_per_shard: int = 500
    seed: int = 0
    # Largest fraction of a split's samples that may be corrupt (skipped and counted) before a run fails.
    max_bad_fraction: float = 0.01


@dataclass
class SyntheticDataSchema(ImageDataSchema):
    splits: SplitSizes = field(default_factory=SplitSizes)


@dataclass
class ImageFolderDataSchema(ImageDataSchema):
    src: str | None = None
    image_format: str = "jpg"
    jpeg_quality: int = 95
    # Used only when src holds class folders directly (no train/ val/ subfolders).
    val_fraction: float = 0.02
    test_fraction: float = 0.02


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(group="data", name="synthetic_schema", node=SyntheticDataSchema)
    cs.store(group="data", name="imagefolder_schema", node=ImageFolderDataSchema)


def setup() -> None:
    from var import sweep_rules

    sweep_rules.register()
    register_resolvers()
    register_schemas()


# ------------------------------------------------------------------------------------------- validation
_UNSET = object()


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _number(cfg: DictConfig, key: str, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
            integer: bool = False, nullable: bool = True, value=_UNSET):
    """Check a numeric key (absent or null passes when ``nullable``); returns its value."""
    value = OmegaConf.select(cfg, key) if value is _UNSET else value
    if value is None:
        if not nullable and OmegaConf.select(cfg, key, default=_UNSET) is not _UNSET:
            raise ConfigError(f"{key}=null: must be set")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{key}={value!r}: expected {'an integer' if integer else 'a number'}")
    if not math.isfinite(value) or (lo is not None and (value < lo or (lo_open and value == lo))) or \
            (hi is not None and (value > hi or (hi_open and value == hi))):
        raise ConfigError(f"{key}={value}: must be {_interval(lo, hi, lo_open, hi_open)}")
    return value


def _positive(cfg: DictConfig, key: str, allow_zero: bool = False, integer: bool = False) -> None:
    _number(cfg, key, lo=0, lo_open=not allow_zero, integer=integer)


def _choice(cfg: DictConfig, key: str, allowed) -> None:
    value = OmegaConf.select(cfg, key, default=_UNSET)
    if value is not _UNSET and not any(type(value) is type(a) and value == a for a in allowed):
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, allowed))}")


def _int_list(cfg: DictConfig, key: str, increasing: bool = False) -> list[int] | None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return None
    items = list(value) if OmegaConf.is_list(value) or isinstance(value, list | tuple) else None
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise ConfigError(f"{key}={value}: expected a non-empty list of positive integers")
    if increasing and items != sorted(set(items)):
        raise ConfigError(f"{key}={items}: must be strictly increasing")
    return items


def validate(cfg: DictConfig) -> None:
    """Check values that no type can express; raise ConfigError naming the key.

    Runs before any data is read or model built (run.py's preflight and every task), so a bad value stops
    the run at start instead of deep inside torch.
    """
    _validate_data(cfg)
    _validate_tokenizer_fit(cfg)
    _validate_trainer(cfg)
    _validate_launcher(cfg)
    if OmegaConf.select(cfg, "model") is not None:
        _validate_model(cfg)
    from var import config_checks  # the per-task rules

    config_checks.validate_task(cfg)


def _validate_launcher(cfg: DictConfig) -> None:
    """launcher=pool's settings (hydra_plugins/var_pool_launcher); the composed hydra node is only there
    in preflight, where a bad value must stop the sweep before its first job."""
    if not str(OmegaConf.select(cfg, "hydra.launcher._target_", default="")).endswith(".PoolLauncher"):
        return
    _number(cfg, "hydra.launcher.jobs_per_device", lo=1, integer=True, nullable=False)
    _number(cfg, "hydra.launcher.workers", lo=1, integer=True)
    devices = OmegaConf.select(cfg, "hydra.launcher.devices")
    if devices is not None and (not OmegaConf.is_list(devices) or len(devices) == 0):
        raise ConfigError(f"hydra.launcher.devices={devices}: expected a non-empty list of GPU ids, or null "
                          f"for every visible GPU")
    if OmegaConf.select(cfg, "trainer.accelerator") in ("gpu", "cuda") and (device_count(cfg) or 1) > 1:
        gpus = OmegaConf.select(cfg, "trainer.devices")
        raise ConfigError(f"trainer.devices={gpus}: launcher=pool gives each job one GPU; use trainer.devices=1, "
                          f"or launcher=local for multi-GPU grid points")


def _validate_data(cfg: DictConfig) -> None:
    for key in ("data.resolution", "data.num_classes", "data.batch_size", "data.eval_batch_size",
                "data.train_batches_per_epoch", "data.samples_per_shard", "data.splits.train"):
        _positive(cfg, key, integer=True)
    for key in ("data.num_workers", "data.shuffle_buffer", "data.splits.val", "data.splits.test"):
        _positive(cfg, key, allow_zero=True, integer=True)
    res = OmegaConf.select(cfg, "data.resolution")
    if res is not None and res > 4096:
        raise ConfigError(f"data.resolution={res}: larger than 4096 px is not supported")
    if OmegaConf.select(cfg, "data.name") == "synthetic" and res is not None and not 16 <= res <= 256:
        raise ConfigError(f"data.resolution={res}: the synthetic generator renders 16..256 px")
    for key in ("data.val_fraction", "data.test_fraction"):
        _number(cfg, key, 0, 0.5, hi_open=True)
    _number(cfg, "data.jpeg_quality", 1, 100, integer=True)
    _number(cfg, "data.max_bad_fraction", 0, 1)
    _choice(cfg, "data.image_format", ("jpg", "png"))


# Tasks that only touch images: any resolution goes, whatever tokenizer the config names.
IMAGE_ONLY_TASKS = ("prepare", "show", "sample", "edit")  # sample/edit take the tokenizer of the run


def _validate_tokenizer_fit(cfg: DictConfig) -> None:
    """The image resolution must tile into the tokenizer's latent grid, whose side is the last patch num."""
    tok = OmegaConf.select(cfg, "tokenizer")
    res = OmegaConf.select(cfg, "data.resolution")
    if tok is None or res is None or OmegaConf.select(cfg, "task.name") in IMAGE_ONLY_TASKS:
        return
    ch_mult = OmegaConf.select(cfg, "tokenizer.ch_mult")
    patch_nums = _int_list(cfg, "tokenizer.patch_nums", increasing=True)
    if ch_mult is None or patch_nums is None:
        return
    down = 2 ** (len(ch_mult) - 1)
    if res % down != 0:
        raise ConfigError(
            f"data.resolution={res}: not divisible by the tokenizer's downsampling factor {down} "
            f"(tokenizer.ch_mult has {len(ch_mult)} levels)"
        )
    if patch_nums[-1] != res // down:
        raise ConfigError(
            f"tokenizer.patch_nums={list(patch_nums)}: the last scale must equal the latent size "
            f"{res // down} (data.resolution {res} / downsampling {down})"
        )


# Lightning's precision names (lightning.fabric.connector._PRECISION_INPUT).
PRECISIONS = (64, 32, 16, "64", "32", "16", "bf16", "64-true", "32-true", "16-true", "bf16-true", "16-mixed",
              "bf16-mixed", "transformer-engine", "transformer-engine-float16")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
PARALLELISM = ("none", "ddp", "fsdp")


def device_count(cfg: DictConfig) -> int | None:
    """Processes per node that trainer.devices asks for; None when only the machine knows (-1, auto)."""
    value = OmegaConf.select(cfg, "trainer.devices")
    if OmegaConf.is_list(value) or isinstance(value, list | tuple):
        return len(value)
    if isinstance(value, str) and "," in value:
        return len([v for v in value.split(",") if v.strip()])
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def world_size(cfg: DictConfig) -> int:
    """Processes of a run: trainer.devices x trainer.num_nodes, with -1 / auto counting this node's GPUs."""
    n = device_count(cfg)
    if n is None:
        import torch

        n = torch.cuda.device_count() if OmegaConf.select(cfg, "trainer.accelerator") == "gpu" else 1
    return max(n, 1) * int(OmegaConf.select(cfg, "trainer.num_nodes") or 1)


def _validate_trainer(cfg: DictConfig) -> None:
    if OmegaConf.select(cfg, "trainer") is None:
        return
    _choice(cfg, "trainer.accelerator", ACCELERATORS)
    _choice(cfg, "trainer.precision", PRECISIONS)
    _choice(cfg, "trainer.parallelism.kind", PARALLELISM)
    for key in ("trainer.parallelism.param_dtype", "trainer.parallelism.reduce_dtype"):
        _choice(cfg, key, ("bf16", "fp16", "fp32"))
    _number(cfg, "trainer.num_nodes", 1, integer=True)
    _number(cfg, "trainer.accumulate_grad_batches", 1, integer=True)
    _number(cfg, "trainer.log_every_n_steps", 1, integer=True)
    _number(cfg, "trainer.gradient_clip_val", 0)
    _number(cfg, "trainer.max_steps", -1, integer=True)
    value = OmegaConf.select(cfg, "trainer.devices")
    cpu = OmegaConf.select(cfg, "trainer.accelerator") == "cpu"
    if value is not None and not _devices_ok(value, cpu):
        want = "an int > 0 or 'auto'" if cpu else "an int > 0, -1 (all), 'auto' or a list of device indices"
        raise ConfigError(f"trainer.devices={value!r}: expected {want} with trainer.accelerator="
                          f"{OmegaConf.select(cfg, 'trainer.accelerator')}")


def _devices_ok(value, cpu: bool) -> bool:
    """Lightning's forms of ``devices``; the CPU accelerator takes a count only."""
    if OmegaConf.is_list(value) or isinstance(value, list | tuple):
        return not cpu and len(value) > 0 and len(set(value)) == len(value) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    if isinstance(value, str):
        v = value.strip()
        if v in ("auto", "-1"):
            return v == "auto" or not cpu
        parts = [x.strip() for x in v.split(",") if x.strip()]
        if "," in v:  # GPU indices
            return not cpu and bool(parts) and all(x.isdigit() for x in parts) and len(set(parts)) == len(parts)
        return v.isdigit() and int(v) > 0
    return isinstance(value, int) and not isinstance(value, bool) and (value > 0 or (value == -1 and not cpu))


def _validate_model(cfg: DictConfig) -> None:
    for key in ("model.depth", "model.num_classes", "model.vocab_size", "model.cvae"):
        _number(cfg, key, 1, integer=True)
    _int_list(cfg, "model.patch_nums", increasing=True)
    _number(cfg, "model.drop_path_rate", 0, 1, hi_open=True)
    _number(cfg, "model.cond_drop_rate", 0, 1, hi_open=True)
    _number(cfg, "model.mlp_ratio", 0, lo_open=True)
    _number(cfg, "model.norm_eps", 0, lo_open=True)
    _number(cfg, "model.init_adaln_gamma", 0)
    for key in ("model.init_adaln", "model.init_head", "model.init_std"):
        _number(cfg, key)
    for key in ("model.shared_aln", "model.cos_attn", "model.defer_residual"):
        value = OmegaConf.select(cfg, key, default=_UNSET)
        if value is not _UNSET and not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")


# -------------------------------------------------------------------------------------------- preflight
MAX_PREFLIGHT_COMPOSES = 32  # trial composes of a command-line sweep (one per swept value)


def _sweep_trials(overrides: list[str]) -> list[list[str]]:
    """Override lists for trial composes: every swept value (``a=1,2``, ``range(...)``) once, the other
    sweeps at their first value, so each value is checked without composing the whole grid."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
              else [raw] for raw, o in zip(overrides, parsed)]
    first = [v[0] if v else raw for v, raw in zip(values, overrides)]
    trials = [first]
    for i, vs in enumerate(values):
        trials += [first[:i] + [v] + first[i + 1:] for v in vs[1:]]
    return trials[:MAX_PREFLIGHT_COMPOSES]


def preflight(config_dir: str, argv: list[str]) -> str | None:
    """Compose the config once with the command line's overrides before Hydra starts.

    Returns None when it composes and validates, else one line naming the culprit (Hydra's own message
    spans several lines and is printed after a launch has begun). Each value of a command-line sweep is
    checked (up to MAX_PREFLIGHT_COMPOSES composes); each grid point is validated again when its task starts.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides, skip = [], False
    for a in argv:
        if skip:  # the value of -cp / -cn / -c
            skip = False
        elif a in ("-cp", "-cn", "-c", "--config-path", "--config-name", "--config-dir", "-cd", "--info", "-i"):
            skip = a not in ("--info", "-i")
        elif not a.startswith("-"):
            overrides.append(a)
    try:
        for trial in _sweep_trials(overrides):
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
                cfg = compose("config", overrides=trial, return_hydra_config=True)
            validate(cfg)  # impossible values stop here, before Hydra creates a run directory or a launch
    except Exception as e:  # Hydra/OmegaConf raise many types; all are config problems here
        return _one_line(e)
    finally:
        GlobalHydra.instance().clear()
    return None


def _one_line(e: BaseException) -> str:
    """Hydra's message and its cause (which names the key) folded into one line, without the search path."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for ln in str(e).splitlines():
            ln = ln.strip()
            if ln.startswith("Config search path"):
                break
            if ln and "$VALUE" not in ln and not ln.startswith(("object_type", "To append")) and ln not in parts:
                parts.append(ln.rstrip(":"))
        e = e.__cause__ or e.__context__
    return "; ".join(parts)

"""Config plumbing shared by run.py and the tests: resolvers, structured schemas, validation.

Hydra's struct mode already rejects unknown keys and the dataclass schemas below reject wrong types; the
checks in ``validate`` catch impossible values (negative sizes, resolutions the tokenizer cannot tile) at
start, with one line naming the key, instead of deep inside torch minutes later.
"""

from __future__ import annotations

import hashlib
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
def _positive(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected a number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value}: must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: DictConfig) -> None:
    """Check values that no type can express; raise ConfigError naming the key."""
    for key in ("data.resolution", "data.num_classes", "data.batch_size", "data.eval_batch_size",
                "data.train_batches_per_epoch", "data.samples_per_shard"):
        _positive(cfg, key)
    for key in ("data.num_workers", "data.shuffle_buffer", "data.splits.val", "data.splits.test"):
        _positive(cfg, key, allow_zero=True)
    _positive(cfg, "data.splits.train")
    res = OmegaConf.select(cfg, "data.resolution")
    if res is not None and res > 4096:
        raise ConfigError(f"data.resolution={res}: larger than 4096 px is not supported")
    if OmegaConf.select(cfg, "data.name") == "synthetic" and res is not None and not 16 <= res <= 256:
        raise ConfigError(f"data.resolution={res}: the synthetic generator renders 16..256 px")
    for key in ("data.val_fraction", "data.test_fraction"):
        frac = OmegaConf.select(cfg, key)
        if frac is not None and not 0 <= frac < 0.5:
            raise ConfigError(f"{key}={frac}: must be in [0, 0.5)")
    fmt = OmegaConf.select(cfg, "data.image_format")
    if fmt is not None and fmt not in ("jpg", "png"):
        raise ConfigError(f"data.image_format={fmt!r}: expected 'jpg' or 'png'")
    _validate_tokenizer_fit(cfg)


# Tasks that only touch images: any resolution goes, whatever tokenizer the config names.
IMAGE_ONLY_TASKS = ("prepare", "show", "sample", "edit")  # sample/edit take the tokenizer of the run


def _validate_tokenizer_fit(cfg: DictConfig) -> None:
    """The image resolution must tile into the tokenizer's latent grid, whose side is the last patch num."""
    tok = OmegaConf.select(cfg, "tokenizer")
    res = OmegaConf.select(cfg, "data.resolution")
    if tok is None or res is None or OmegaConf.select(cfg, "task.name") in IMAGE_ONLY_TASKS:
        return
    ch_mult = OmegaConf.select(cfg, "tokenizer.ch_mult")
    patch_nums = OmegaConf.select(cfg, "tokenizer.patch_nums")
    if ch_mult is None or patch_nums is None:
        return
    down = 2 ** (len(ch_mult) - 1)
    if res % down != 0:
        raise ConfigError(
            f"data.resolution={res}: not divisible by the tokenizer's downsampling factor {down} "
            f"(tokenizer.ch_mult has {len(ch_mult)} levels)"
        )
    if list(patch_nums) != sorted(set(patch_nums)):
        raise ConfigError(f"tokenizer.patch_nums={list(patch_nums)}: must be strictly increasing")
    if patch_nums[-1] != res // down:
        raise ConfigError(
            f"tokenizer.patch_nums={list(patch_nums)}: the last scale must equal the latent size "
            f"{res // down} (data.resolution {res} / downsampling {down})"
        )


# -------------------------------------------------------------------------------------------- preflight
def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """Replace each sweep override (``a=1,2``, ``range(...)``) by its first value, for one trial compose."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    out = []
    for raw, o in zip(overrides, parsed):
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()), None)
            out.append(f"{o.get_key_element()}={first}")
        else:
            out.append(raw)
    return out


def preflight(config_dir: str, argv: list[str]) -> str | None:
    """Compose the config once with the command line's overrides before Hydra starts.

    Returns None when it composes, else one line naming the culprit (Hydra's own message spans several
    lines and is printed after a launch has begun).
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
        overrides = _first_of_sweeps(overrides)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            compose("config", overrides=overrides, return_hydra_config=True)
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

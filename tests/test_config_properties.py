"""Property tests of config validation: every impossible model, data, trainer or task value stops the run
at start with one line naming its key; every valid combination passes. No model is built, no data read."""

from __future__ import annotations

import copy
import functools
import math
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from tests.conftest import CONF, compose_cfg, resolved
from var import config_checks
from var.config import PRECISIONS, preflight, validate
from var.errors import ConfigError

FAST = settings(max_examples=60, deadline=None)
BASE = ["task=train", "tokenizer=vq_test32", "trainer=cpu", "task.batch_size=64"]


@functools.cache
def _base():
    # The vq_test32 tokenizer: 32 px, scales 1,2,3,4, 64 codes, 8 latent channels; 10 classes, one CPU device.
    return resolved(compose_cfg(BASE))


def base():
    return copy.deepcopy(_base())


def with_values(values: dict):
    cfg = base()
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def assert_names_key(cfg, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert key in msg and "\n" not in msg, msg


# ------------------------------------------------------------------------------------ value strategies
def non_integer_numbers():
    return st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: x != int(x))


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=12)
non_positive = st.integers(max_value=0)
below_zero = st.one_of(st.integers(max_value=-1), st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False))
not_positive = st.one_of(non_positive, st.floats(max_value=0.0, allow_nan=False, allow_infinity=False))
outside_unit_open = st.one_of(below_zero, st.floats(1.0, 1e6))                              # not in [0, 1)
outside_unit_closed = st.one_of(below_zero, st.floats(1.0, 1e6).filter(lambda x: x > 1))  # not in [0, 1]
outside_half_open = st.one_of(not_positive, st.floats(1.0, 1e6).filter(lambda x: x > 1))  # not in (0, 1]
bad_count = st.one_of(non_positive, non_integer_numbers(), words)                          # not an int >= 1
not_increasing = st.lists(st.integers(1, 20), min_size=2, max_size=8).filter(lambda xs: xs != sorted(set(xs)))
increasing_other = st.lists(st.integers(1, 20), min_size=1, max_size=8, unique=True).map(sorted).filter(
    lambda xs: xs != [1, 2, 3, 4])

# (key in the message, {key: invalid value}) for one bad value on the valid base.
INVALID = [
    ("model.depth", bad_count.map(lambda v: {"model.depth": v})),
    ("model.num_classes", st.integers(-5, 9).map(lambda v: {"model.num_classes": v})),  # data has 10 classes
    ("model.vocab_size", st.integers(-5, 500).filter(lambda v: v != 64).map(lambda v: {"model.vocab_size": v})),
    ("model.cvae", st.integers(-5, 64).filter(lambda v: v != 8).map(lambda v: {"model.cvae": v})),
    ("model.patch_nums", st.one_of(not_increasing, increasing_other,
                                   st.lists(st.integers(-3, 0), min_size=1, max_size=4), st.just([]))
     .map(lambda v: {"model.patch_nums": v})),
    ("model.cond_drop_rate", outside_unit_open.map(lambda v: {"model.cond_drop_rate": v})),
    ("model.drop_path_rate", outside_unit_open.map(lambda v: {"model.drop_path_rate": v})),
    ("model.mlp_ratio", not_positive.map(lambda v: {"model.mlp_ratio": v})),
    ("model.norm_eps", not_positive.map(lambda v: {"model.norm_eps": v})),
    ("model.attn_impl", words.filter(lambda w: w not in ("sdpa", "flex", "scalewise", "math")).map(
        lambda v: {"model.attn_impl": v})),
    ("data.batch_size", bad_count.map(lambda v: {"data.batch_size": v})),
    ("data.num_workers", st.integers(max_value=-1).map(lambda v: {"data.num_workers": v})),
    ("data.max_bad_fraction", outside_unit_closed.map(lambda v: {"data.max_bad_fraction": v})),
    ("data.resolution", st.integers(-64, 0).map(lambda v: {"data.resolution": v})),
    ("data.resolution", st.integers(17, 256).filter(lambda r: r % 8).map(lambda v: {"data.resolution": v})),
    ("task.batch_size", bad_count.map(lambda v: {"task.batch_size": v})),
    ("task.batch_size", st.tuples(st.integers(2, 8), st.integers(1, 64)).filter(lambda d: d[1] % d[0]).map(
        lambda d: {"trainer.devices": d[0], "task.batch_size": d[1]})),
    ("task.eval_batch_size", bad_count.map(lambda v: {"task.eval_batch_size": v})),
    ("task.max_steps", st.one_of(non_positive, non_integer_numbers()).map(lambda v: {"task.max_steps": v})),
    ("task.optim.lr", not_positive.map(lambda v: {"task.optim.lr": v})),
    ("task.optim.base_lr", not_positive.map(lambda v: {"task.optim.base_lr": v})),
    ("task.optim.weight_decay", below_zero.map(lambda v: {"task.optim.weight_decay": v})),
    ("task.optim.betas", outside_unit_open.map(lambda v: {"task.optim.betas": [0.9, v]})),
    ("task.loss.label_smoothing", outside_unit_open.map(lambda v: {"task.loss.label_smoothing": v})),
    ("task.schedule.kind", words.filter(lambda w: w not in config_checks.SCHEDULES).map(
        lambda v: {"task.schedule.kind": v})),
    ("task.schedule.cooldown_fraction", outside_half_open.map(lambda v: {"task.schedule.cooldown_fraction": v})),
    ("task.schedule.warmup_fraction", outside_unit_open.map(lambda v: {"task.schedule.warmup_fraction": v})),
    ("task.schedule.warmup_steps", st.integers(1000, 5000).map(lambda v: {"task.schedule.warmup_steps": v})),
    ("task.schedule.cooldown_shape", words.filter(lambda w: w not in ("1-sqrt", "linear")).map(
        lambda v: {"task.schedule.cooldown_shape": v})),
    ("task.record.num_eval_points", non_positive.map(lambda v: {"task.record.num_eval_points": v})),
    ("task.flop_convention", words.filter(lambda w: w not in config_checks.FLOP_CONVENTIONS).map(
        lambda v: {"task.flop_convention": v})),
    ("task.speed.compile_mode", words.filter(lambda w: w not in config_checks.COMPILE_MODES).map(
        lambda v: {"task.speed.compile_mode": v})),
    ("model.residual_dtype", words.filter(lambda w: w not in config_checks.RESIDUAL_DTYPES).map(
        lambda v: {"model.residual_dtype": v})),
    ("model.ffn_impl", words.filter(lambda w: w not in config_checks.FFN_IMPLS).map(
        lambda v: {"model.ffn_impl": v})),
    ("model.adaln_impl", words.filter(lambda w: w not in config_checks.ADALN_IMPLS).map(
        lambda v: {"model.adaln_impl": v})),
    ("trainer.precision", words.filter(lambda w: w not in PRECISIONS).map(lambda v: {"trainer.precision": v})),
    ("trainer.parallelism.kind", words.filter(lambda w: w not in ("none", "ddp", "fsdp")).map(
        lambda v: {"trainer.parallelism.kind": v})),
    ("trainer.accelerator", words.filter(lambda w: w not in ("cpu", "gpu", "cuda", "mps", "tpu", "auto")).map(
        lambda v: {"trainer.accelerator": v})),
    ("trainer.devices", st.one_of(non_positive, st.just([0, 1]), st.just("0,1"), words.filter(
        lambda w: w != "auto" and not w.isdigit())).map(lambda v: {"trainer.devices": v})),  # accelerator=cpu
    ("trainer.devices", st.one_of(st.integers(max_value=-2), st.just(0), st.just([0, 0]), st.just([])).map(
        lambda v: {"trainer.accelerator": "gpu", "trainer.devices": v})),
    ("trainer.num_nodes", bad_count.map(lambda v: {"trainer.num_nodes": v})),
    ("trainer.accumulate_grad_batches", bad_count.map(lambda v: {"trainer.accumulate_grad_batches": v})),
]


@st.composite
def one_invalid(draw):
    key, values = draw(st.sampled_from(INVALID))
    return key, draw(values)


@FAST
@given(one_invalid())
def test_every_invalid_value_fails_with_one_line_naming_its_key(case):
    key, values = case
    assert_names_key(with_values(values), key)


@st.composite
def valid_values(draw):
    devices = draw(st.integers(1, 8))
    accelerator = draw(st.sampled_from(["cpu", "gpu"]))
    return {
        "model.depth": draw(st.integers(1, 40)),
        "model.num_classes": draw(st.integers(10, 1000)),
        "model.cond_drop_rate": draw(st.floats(0, 0.99)),
        "model.drop_path_rate": draw(st.one_of(st.none(), st.floats(0, 0.99))),
        "model.mlp_ratio": draw(st.floats(0.25, 8)),
        "model.attn_impl": draw(st.sampled_from(["sdpa", "flex", "scalewise", "math"])),
        "data.batch_size": draw(st.integers(1, 512)),
        "data.num_workers": draw(st.integers(0, 16)),
        "data.max_bad_fraction": draw(st.floats(0, 1)),
        "task.batch_size": devices * draw(st.integers(1, 64)),
        "task.max_steps": draw(st.integers(1, 10 ** 6)),
        "task.optim.lr": draw(st.one_of(st.none(), st.floats(1e-7, 1.0))),
        "task.optim.base_lr": draw(st.floats(1e-7, 1.0)),
        "task.optim.betas": [draw(st.floats(0, 0.999)), draw(st.floats(0, 0.999))],
        "task.loss.label_smoothing": draw(st.floats(0, 0.99)),
        "task.schedule.kind": draw(st.sampled_from(config_checks.SCHEDULES)),
        "task.speed.compile_mode": draw(st.sampled_from(config_checks.COMPILE_MODES)),
        "model.residual_dtype": draw(st.sampled_from(config_checks.RESIDUAL_DTYPES)),
        "model.ffn_impl": draw(st.sampled_from(config_checks.FFN_IMPLS)),
        "model.adaln_impl": draw(st.sampled_from(config_checks.ADALN_IMPLS)),
        "task.schedule.cooldown_fraction": draw(st.floats(1e-3, 1.0)),
        "task.schedule.warmup_fraction": draw(st.floats(0, 0.99)),
        "task.progressive.fraction": draw(st.floats(0, 1)),
        "trainer.accelerator": accelerator,
        "trainer.devices": devices if accelerator == "cpu" else draw(st.sampled_from(
            [devices, list(range(devices)), ",".join(map(str, range(devices))) + ","])),  # "0," is GPU 0, "0" none
        "trainer.precision": draw(st.sampled_from(PRECISIONS)),
        "trainer.parallelism.kind": draw(st.sampled_from(["none", "ddp", "fsdp"])),
    }


@FAST
@given(valid_values())
def test_valid_combinations_pass(values):
    validate(with_values(values))


# ------------------------------------------------------------------ the command line: compose + validate
@settings(max_examples=15, deadline=None)
@given(st.one_of(st.integers(-3, 30), st.floats(-2, 30, allow_nan=False).filter(lambda x: x != int(x))))
def test_depth_on_the_command_line(depth):
    cfg = resolved(compose_cfg([*BASE, f"model.depth={depth}"]))
    if isinstance(depth, int) and depth >= 1:
        validate(cfg)
    else:
        assert_names_key(cfg, "model.depth")


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(["cpu", "ddp", "fsdp"]), st.integers(1, 4), st.integers(1, 40))
def test_batch_must_split_over_devices(trainer, devices, batch):
    cfg = resolved(compose_cfg([*BASE, f"trainer={trainer}", "trainer.accelerator=cpu", f"trainer.devices={devices}",
                                f"task.batch_size={batch}"]))
    if batch % devices:
        assert_names_key(cfg, "task.batch_size")
    else:
        validate(cfg)


@pytest.mark.parametrize("args, key", [
    (["model.depth=0"], "model.depth"),
    (["task.loss.label_smoothing=1.0"], "task.loss.label_smoothing"),
    (["task.schedule.kind=warmup_cosine"], "task.schedule.kind"),
    (["trainer.precision=fp16"], "trainer.precision"),
    (["model.width=100"], "model.width"),  # width and heads follow depth (64 x depth, depth): not settable
    (["model.num_heads=3"], "model.num_heads"),
    (["-m", "model.depth=1,0"], "model.depth"),  # every value of a sweep is checked
    (["-m", "model.depth=1,2", "task.optim.lr=1e-3,-1e-3"], "task.optim.lr"),
    (["-m", "launcher=pool", "hydra.launcher.jobs_per_device=0"], "hydra.launcher.jobs_per_device"),
    (["-m", "launcher=pool", "hydra.launcher.workers=0"], "hydra.launcher.workers"),
    (["-m", "launcher=pool", "hydra.launcher.devices=[]"], "hydra.launcher.devices"),
    (["-m", "launcher=pool", "trainer=gpu", "trainer.devices=2"], "trainer.devices"),
])
def test_preflight_stops_before_hydra_starts(args, key):
    problem = preflight(str(CONF), [*BASE, *args])
    assert problem is not None and key in problem and "\n" not in problem


def test_preflight_passes_a_valid_sweep():
    assert preflight(str(CONF), ["-m", "sweep=scaling_demo", "model.depth=1,2,3"]) is None
    assert preflight(str(CONF), ["-m", "sweep=scaling_demo", "launcher=pool", "hydra.launcher.devices=[0,1]"]) is None


def test_invalid_config_never_reaches_the_task(monkeypatch, capsys):
    import var.tasks as tasks

    monkeypatch.setattr(tasks, "dispatch", lambda cfg: pytest.fail("the task ran on an invalid config"))
    with pytest.raises(SystemExit) as e:
        tasks.run_task(with_values({"task.schedule.cooldown_fraction": 0.0}))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: task.schedule.cooldown_fraction=0.0") and "\n" not in err


def test_tokenizer_training_refuses_what_its_trainer_cannot_do():
    cfg = resolved(compose_cfg(["task=train_tokenizer", "tokenizer=vq_test32"]))
    validate(cfg)
    for values, key in (({"trainer.parallelism.kind": "fsdp"}, "trainer.parallelism.kind"),
                        ({"trainer.precision": "16-mixed"}, "trainer.precision"),
                        ({"trainer.accumulate_grad_batches": 2}, "trainer.accumulate_grad_batches"),
                        ({"task.loss.pixel": "l3"}, "task.loss.pixel"),
                        ({"trainer.parallelism.kind": "ddp", "trainer.devices": 3, "task.batch_size": 16},
                         "task.batch_size")):
        bad = copy.deepcopy(cfg)
        for k, v in values.items():
            OmegaConf.update(bad, k, v, merge=False)
        assert_names_key(bad, key)


# ------------------------------------------------------- the lists validation keeps match the code using them
def test_validated_names_match_the_code():
    from lightning.fabric.connector import _PRECISION_INPUT

    from var.lit.schedules import lr_factor
    from var.models.flops import FLOP_CONVENTIONS

    lightning_precisions = {v for part in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(part)}
    assert set(PRECISIONS) == lightning_precisions
    assert set(config_checks.FLOP_CONVENTIONS) == set(FLOP_CONVENTIONS)
    for kind in config_checks.SCHEDULES:
        for shape in config_checks.COOLDOWN_SHAPES:
            assert math.isfinite(lr_factor(50, 100, kind, warmup_steps=5, cooldown_shape=shape))
    with pytest.raises(ValueError):
        lr_factor(50, 100, "warmup_cosine")
    import torch._inductor

    from var.models.block import ADALN_IMPLS
    from var.models.ffn import FFN_IMPLS
    from var.models.transformer import RESIDUAL_DTYPES

    assert config_checks.RESIDUAL_DTYPES == RESIDUAL_DTYPES
    assert config_checks.FFN_IMPLS == FFN_IMPLS
    assert config_checks.ADALN_IMPLS == ADALN_IMPLS
    modes = set(torch._inductor.list_mode_options())
    assert {m for m in config_checks.COMPILE_MODES if m} <= modes

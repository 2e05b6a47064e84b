"""Every config file composes and validates; run directories are deterministic; bad values fail fast."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF, REPO, compose_cfg, resolved
from var.config import run_dirname, validate
from var.errors import ConfigError

GROUP_FILES = sorted(p for p in CONF.glob("*/*.yaml") if p.parent.name != "hydra")


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_config_file_composes(path: Path, tmp_path):
    group, option = path.parent.name, path.stem
    overrides = [f"{group}={option}"]
    if group == "tokenizer":  # pair each tokenizer with a resolution its latent grid tiles
        tok = OmegaConf.load(path)
        tok = tok.tokenizer if "tokenizer" in tok else tok  # some presets also set data.resolution
        overrides.append(f"data.resolution={tok.patch_nums[-1] * 2 ** (len(tok.ch_mult) - 1)}")
    if group == "data":  # image datasets are prepared at any resolution
        overrides.append("task=prepare")
    cfg = compose_cfg(overrides, root=tmp_path)
    plain = resolved(cfg)  # every interpolation resolves
    validate(plain)
    if group not in ("experiment", "debug", "launcher", "sweep", "speed"):
        assert OmegaConf.select(cfg, group) is not None


def test_root_config_defaults(tmp_path):
    cfg = resolved(compose_cfg([], root=tmp_path))
    assert cfg.task.name == "demo" and cfg.data.name == "synthetic"
    assert cfg.task.stages[0] == "prepare"
    assert cfg.data.root.startswith(str(tmp_path))


def test_run_dirname_is_deterministic_and_unique():
    a = run_dirname("data.resolution=32,seed=1")
    assert a == run_dirname("data.resolution=32,seed=1")
    assert a != run_dirname("data.resolution=32,seed=2")
    assert run_dirname("") == "default"
    # Path separators never create nested directories; long names stay unique through a hash.
    p1, p2 = run_dirname("data.src=/a/b"), run_dirname("data.src=/a_b")
    assert "/" not in p1 and p1 != p2
    long1, long2 = run_dirname("x=" + "a" * 300 + "1"), run_dirname("x=" + "a" * 300 + "2")
    assert len(long1) <= 120 and long1 != long2


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.resolution=-8", "data.resolution"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.splits.train=0", "data.splits.train"),
        ("data.resolution=300", "data.resolution"),
        ("data.num_workers=-1", "data.num_workers"),
    ],
)
def test_impossible_values_name_the_key(override, key, tmp_path):
    cfg = resolved(compose_cfg([override], root=tmp_path))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_resolution_must_tile_into_the_tokenizer_grid(tmp_path):
    cfg = resolved(compose_cfg([], root=tmp_path))
    cfg.tokenizer = {"ch_mult": [1, 2, 2, 4], "patch_nums": [1, 2, 4, 8]}
    cfg.data.resolution = 60
    with pytest.raises(ConfigError, match="not divisible"):
        validate(cfg)
    cfg.data.resolution = 96
    with pytest.raises(ConfigError, match="latent size 12"):
        validate(cfg)
    cfg.data.resolution = 64
    validate(cfg)


def _run(args, cwd):
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["data.resolutoin=32"], "data.resolutoin"),          # typo'd key
        (["data.resolution=abc"], "data.resolution"),         # wrong type
        (["data.resolution=-4", "task=show"], "data.resolution"),  # impossible value
        (["task=nosuchtask"], "task"),
    ],
)
def test_cli_rejects_bad_config_briefly(args, needle, tmp_path):
    res = _run([*args, f"paths.root_dir={tmp_path}"], tmp_path)
    assert res.returncode != 0
    assert needle in res.stderr
    assert "Traceback" not in res.stderr


def test_rerun_finds_the_same_run_directory(tmp_path):
    args = ["task=prepare", "debug=small_data", "data.resolution=32", f"paths.root_dir={tmp_path}"]
    first = _run(args, tmp_path)
    assert first.returncode == 0, first.stderr
    dirs = sorted((tmp_path / "runs" / "prepare").iterdir())
    second = _run(args, tmp_path)
    assert second.returncode == 0 and "found synthetic dataset" in second.stdout
    assert sorted((tmp_path / "runs" / "prepare").iterdir()) == dirs and len(dirs) == 1
    other = _run([*args, "data.seed=3"], tmp_path)
    assert other.returncode == 0
    assert len(list((tmp_path / "runs" / "prepare").iterdir())) == 2

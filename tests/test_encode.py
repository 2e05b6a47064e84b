"""The token cache: complete and unique, equal to the tokenizer's own tokens, idempotent, readable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, compose_cfg, resolved
from var.data.datamodule import decode_sample
from var.data.shards import iter_tar_samples, read_manifest, split_urls
from var.data.tokens import TokenDataModule, decode_tokens
from var.errors import ConfigError, DataError
from var.models.vqvae import PRESETS, VQVAE
from var.tasks import encode
from var.tasks.train_tokenizer import default_tokenizer_path
from var.tokenizer_file import load_tokenizer, save_tokenizer


def random_tokenizer(path: Path, seed: int = 0) -> Path:
    """vq_test32 with random weights and a codebook spread like its encoder output (many codes in use)."""
    torch.manual_seed(seed)
    m = VQVAE(PRESETS["vq_test32"]).eval()
    with torch.no_grad():
        f = m.img_to_f(torch.rand(8, 3, 32, 32) * 2 - 1)
        m.quantize.embedding.weight.normal_(0, float(f.std()))
    save_tokenizer(path, m)
    return path


def encode_cfg(root: Path, tmp: Path, tok: Path, *overrides):
    return resolved(compose_cfg(["task=encode", "tokenizer=vq_test32", f"data.root={root}", "data.num_workers=0",
                                 "data.eval_batch_size=48", f"task.tokenizer_path={tok}", f"task.out={tmp}/tokens",
                                 "task.samples_per_shard=250", *overrides], root=tmp))


@pytest.fixture(scope="module")
def encoded(small_dataset, tmp_path_factory):
    _, root = small_dataset
    tmp = tmp_path_factory.mktemp("enc")
    tok = random_tokenizer(tmp / "tok.pt")
    cfg = encode_cfg(root, tmp, tok)
    return cfg, encode.run(cfg), root, tok


def source_images(root: Path, split: str):
    samples = [s for url in split_urls(root, split) for s in iter_tar_samples(url)]
    x, y, keys = zip(*(decode_sample(s, 32) for s in samples))
    return torch.stack(x), list(y), list(keys)


def token_samples(out: Path, split: str) -> dict[str, dict]:
    return {s["__key__"]: s for url in split_urls(out, split) for s in iter_tar_samples(url)}


def test_every_source_key_once_per_variant(encoded):
    cfg, manifest, root, _ = encoded
    src = read_manifest(root)
    out = Path(cfg.task.out)
    for split in ("train", "val", "test"):
        _, _, keys = source_images(root, split)
        names = [s["__key__"] for url in split_urls(out, split) for s in iter_tar_samples(url)]
        assert len(names) == len(set(names)) == 2 * src["splits"][split]["count"]
        assert set(names) == {f"{k}_v{v}" for k in keys for v in (0, 1)}
        assert manifest["splits"][split]["count"] == len(names)
    assert manifest["splits"]["train"]["shards"] == ["train-r000-000000.tar", "train-r000-000001.tar",
                                                     "train-r000-000002.tar", "train-r000-000003.tar"]


def test_tokens_equal_the_tokenizer_on_image_and_flip(encoded):
    cfg, manifest, root, tok = encoded
    model = load_tokenizer(tok)
    x, labels, keys = source_images(root, "val")
    cached = token_samples(Path(cfg.task.out), "val")
    for variant, img in ((0, x), (1, torch.flip(x, dims=[3]))):
        ref = torch.cat(model.img_to_idxBl(img), dim=1).numpy()
        got = np.stack([decode_tokens(cached[f"{k}_v{variant}"]["tokens.npy"]) for k in keys])
        assert got.dtype == np.uint16 and got.shape == (len(keys), 30)
        assert int(got.max()) < 64
        assert (got == ref).all()
        for k, label in zip(keys, labels):
            s = cached[f"{k}_v{variant}"]
            assert int(s["cls"]) == label and json.loads(s["json"]) == {"source": k, "variant": variant}
    # The flip changes tokens (the test would pass trivially otherwise).
    assert not all((decode_tokens(cached[f"{k}_v0"]["tokens.npy"]) == decode_tokens(cached[f"{k}_v1"]["tokens.npy"])).all()
                   for k in keys)


def test_manifest_fields(encoded):
    cfg, manifest, root, tok = encoded
    src = read_manifest(root)
    assert read_manifest(cfg.task.out) == manifest
    assert manifest["kind"] == "token_shards" and manifest["patch_nums"] == [1, 2, 3, 4]
    assert manifest["vocab_size"] == 64 and manifest["num_classes"] == 10 and manifest["classes"] == src["classes"]
    assert manifest["variants"] == ["v0", "v1"]
    assert manifest["source"]["fingerprint"] == src["fingerprint"] and manifest["source"]["root"] == str(root)
    assert manifest["tokenizer"]["path"] == str(tok.resolve()) and len(manifest["tokenizer"]["sha256"]) == 64
    assert all(len(v["sha256"]) == len(v["shards"]) for v in manifest["splits"].values())
    assert len(manifest["fingerprint"]) == 16


def test_token_datamodule_reads_the_cache(encoded):
    cfg, manifest, _, _ = encoded
    dm = TokenDataModule(cfg.task.out, batch_size=16)
    dm.setup()
    assert len(dm.dataset("train")) == 800 and len(dm.dataset("val")) == 60  # val: unflipped only
    tokens, labels = next(iter(dm.train_dataloader()))
    assert tokens.shape == (16, 30) and labels.shape == (16,)


def test_rerun_is_skipped_and_a_new_tokenizer_reencodes(encoded, tmp_path, capsys):
    cfg, manifest, root, tok = encoded
    out = Path(cfg.task.out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert encode.run(cfg) == manifest
    assert "skipping" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    # Another tokenizer file (another sha256) into another cache directory: encoded afresh.
    other = random_tokenizer(tmp_path / "other.pt", seed=1)
    cfg2 = encode_cfg(root, tmp_path, other, "task.splits=[val]", "task.variants=[0]")
    m2 = encode.run(cfg2)
    assert m2["tokenizer"]["sha256"] != manifest["tokenizer"]["sha256"]
    assert list(m2["splits"]) == ["val"] and m2["splits"]["val"]["count"] == 60 and m2["variants"] == ["v0"]


def test_completeness_check_catches_duplicates(encoded, tmp_path):
    cfg, _, root, _ = encoded
    out = tmp_path / "copy"
    shutil.copytree(cfg.task.out, out)
    shutil.copy(out / "val-r000-000000.tar", out / "val-r001-000000.tar")  # a rank wrote the same samples
    with pytest.raises(DataError, match="120 duplicated"):
        encode.check_complete(out, str(root), read_manifest(root), "val", [0, 1])
    (out / "val-r001-000000.tar").unlink()
    (out / "val-r000-000000.tar").unlink()
    with pytest.raises(DataError, match="120 missing"):
        encode.check_complete(out, str(root), read_manifest(root), "val", [0, 1])


def test_user_errors_name_the_culprit(small_dataset, tmp_path):
    _, root = small_dataset
    missing = encode_cfg(root, tmp_path, tmp_path / "nope.pt")
    with pytest.raises(DataError, match=r"nope\.pt.*task=train_tokenizer"):
        encode.run(missing)
    wrong = encode_cfg(root, tmp_path, random_tokenizer(tmp_path / "t.pt"), "tokenizer.vocab_size=128")
    with pytest.raises(ConfigError, match="vocab_size"):
        encode.run(wrong)
    # With no tokenizer_path, encode reads where train_tokenizer writes.
    plain = resolved(compose_cfg(["task=encode"], root=tmp_path))
    trained = resolved(compose_cfg(["task=train_tokenizer"], root=tmp_path))
    assert default_tokenizer_path(plain) == trained.task.out


@pytest.mark.slow
def test_cli_chain_prepare_train_encode(tmp_path):
    """The three stages through run.py on a tiny dataset, then the same commands again (all skipped)."""
    common = ["debug=small_data", "tokenizer=vq_test32", f"paths.root_dir={tmp_path}"]
    stages = [["task=prepare"],
              ["task=train_tokenizer", "task.max_steps=6", "task.val_every_n_steps=6", "task.loss.disc_start=3",
               "trainer.enable_progress_bar=false"],
              ["task=encode"]]
    for again in (False, True):
        for stage in stages:
            res = subprocess.run([sys.executable, str(REPO / "run.py"), *stage, *common], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, res.stderr[-2000:]
            if again and stage[0] != "task=prepare":
                assert "skipping" in res.stdout
    manifest = read_manifest(tmp_path / "data" / "tokens_synthetic_r32_vq_test32")
    assert manifest["splits"]["train"]["count"] == 400 and manifest["patch_nums"] == [1, 2, 3, 4]

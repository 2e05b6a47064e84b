"""Tokenizer training: a short CPU run learns and keeps its codebook alive; files, skips and errors."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_cfg, resolved
from var.errors import ConfigError, DataError
from var.lit.tokenizer_module import TokenizerModule, reseed_dead_codes, scale_inputs
from var.models.vqvae import PRESETS, VQVAE
from var.tasks import train_tokenizer
from var.tokenizer_file import load_tokenizer


def train_cfg(root, tmp_path, *overrides):
    """vq_test32 on the session's 32 px dataset, small batches, GAN on early; written under tmp_path."""
    return resolved(compose_cfg([
        "task=train_tokenizer", "tokenizer=vq_test32", f"data.root={root}", "task.batch_size=16",
        "data.eval_batch_size=30", "data.num_workers=0", "data.train_batches_per_epoch=20",
        "task.max_steps=80", "task.val_every_n_steps=40", "task.loss.disc_start=10", "task.reseed.every=20",
        "trainer.enable_progress_bar=false", *overrides], root=tmp_path))


@pytest.fixture(scope="module")
def trained(small_dataset, tmp_path_factory):
    _, root = small_dataset
    tmp = tmp_path_factory.mktemp("tok")
    cfg = train_cfg(root, tmp)
    return cfg, train_tokenizer.run(cfg)


def test_short_run_learns_and_keeps_every_scale_in_use(trained):
    """80 steps at batch 16 (vq_test32, 64 codes, scales 1,2,3,4; GAN from step 10, re-seeding on).

    The pixel (L2) loss falls by a fifth (measured: 0.19 -> 0.09). Codebook threshold, over the 60 val images:
    the 1x1 scale uses more than one code (a collapsed scale uses 1; measured 6 on one CPU and 2 on another,
    where float rounding differs over 80 GAN steps) and each finer scale at least 16 of the 64 codes, 25%
    (measured 56-89%).
    """
    cfg, res = trained
    assert not res["skipped"]
    assert res["loss_end"] < 0.8 * res["loss_start"], res
    val = res["val"]
    assert val["step"] == 80 and val["val/psnr"] > 14
    usage = [val[f"val/usage_s{i}_{pn}"] for i, pn in enumerate((1, 2, 3, 4))]
    assert usage[0] >= 100 * 2 / 64 and min(usage[1:]) >= 25, usage


def test_files_reload_to_the_same_model(trained):
    """tokenizer.pt (run dir and task.out) and the Lightning checkpoint, with its config, agree exactly."""
    cfg, res = trained
    from pathlib import Path

    run_dir = Path(cfg.paths.output_dir)
    out = load_tokenizer(res["tokenizer"])
    copy = load_tokenizer(run_dir / "tokenizer.pt")
    module = TokenizerModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.hparams.vqvae["patch_nums"] == [1, 2, 3, 4]  # the config travels with the weights
    vq = module.vqvae.eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    ref = vq.img_to_reconstructed_img(x)
    assert torch.equal(out.img_to_reconstructed_img(x), ref)
    assert torch.equal(copy.img_to_reconstructed_img(x), ref)
    assert [t.tolist() for t in out.img_to_idxBl(x)] == [t.tolist() for t in vq.img_to_idxBl(x)]
    assert sorted(p.name for p in (run_dir / "recon").glob("*.png")) == ["recon_step0000040.png",
                                                                       "recon_step0000080.png"]


def test_rerun_skips_and_other_settings_are_refused(trained, capsys):
    cfg, _ = trained
    assert train_tokenizer.run(cfg)["skipped"]
    assert "skipping" in capsys.readouterr().out
    other = cfg.copy()
    other.task.max_steps = 81
    with pytest.raises(ConfigError, match=r"task\.out=.*max_steps: 80 -> 81.*task\.force=true"):
        train_tokenizer.run(other)


def test_perceptual_path_with_random_lpips(small_dataset, tmp_path):
    _, root = small_dataset
    cfg = train_cfg(root, tmp_path, "task.max_steps=4", "task.val_every_n_steps=4", "task.loss.w_lpips=0.5",
                    "task.lpips_random=true", "task.loss.w_gan=0", "task.batch_size=8", "logger=none",
                    "callbacks=none")
    res = train_tokenizer.run(cfg)
    assert torch.isfinite(torch.tensor(res["val"]["val/lpips"])) and res["val"]["val/lpips"] >= 0


def test_missing_lpips_weights_is_one_line_error(small_dataset, tmp_path):
    _, root = small_dataset
    cfg = train_cfg(root, tmp_path, "task.loss.w_lpips=1.0", f"task.lpips_weights={tmp_path}/nowhere")
    with pytest.raises(DataError) as e:
        train_tokenizer.run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and f"{tmp_path}/nowhere" in msg and "vgg16-397923af.pth" in msg and "https://" in msg


def test_released_preset_is_loaded_not_trained(tmp_path, capsys):
    cfg = resolved(compose_cfg(["task=train_tokenizer", "tokenizer=vae_ch160v4096z32"], root=tmp_path))
    assert train_tokenizer.run(cfg)["skipped"]
    assert "released" in capsys.readouterr().out


def test_dead_codes_are_reseeded_from_each_scale():
    """Dead codes take distinct quantizer inputs, dealt round-robin over the scales (coarsest first)."""
    torch.manual_seed(0)
    q = VQVAE(PRESETS["vq_test32"]).quantize
    f = torch.randn(8, q.Cvae, 4, 4)
    q.ema_vocab_hit_SV.fill_(100.0)
    q.ema_vocab_hit_SV[:, :8] = 0  # codes 0..7 unused at every scale
    inputs = scale_inputs(q, f)  # before: the finer scales' residuals depend on the codebook
    dead = reseed_dead_codes(q, f, torch.tensor([8 * pn * pn for pn in q.patch_nums]),
                             torch.Generator().manual_seed(0))
    assert dead.nonzero().flatten().tolist() == list(range(8))
    new = q.embedding.weight[:8]
    sources = []
    for code in new:
        hits = [k for k, inp in enumerate(inputs) if (inp - code).abs().amax(1).min() < 1e-6]
        assert hits, "every re-seeded code is one of the inputs"
        sources.append(hits[0])
    assert sorted(sources) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert (q.ema_vocab_hit_SV[:, :8] > 0).all()  # a grace count, so they are not dead at the next check

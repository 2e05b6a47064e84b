"""Zero-shot editing: tokens outside the edit region are the source's at every scale; task=edit output."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.conftest import compose_cfg, resolved
from var.models.vqvae import PRESETS, VQVAE
from var.models.zoo import VARConfig, build_var
from var.sampling.edit import box_mask, edit_image, edit_tokens, region_to_regenerate, scale_keep_masks

NULL = 10
PATCH_NUMS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    var = build_var(VARConfig(depth=1, num_classes=10, patch_nums=PATCH_NUMS, vocab_size=64, cvae=8,
                              init_head=1.0, init_adaln_gamma=1.0)).double().eval()
    vq = VQVAE(PRESETS["vq_test32"]).eval()
    return var, vq


@pytest.fixture(scope="module")
def images():
    """Smooth random images in [-1, 1] (B, 3, 32, 32)."""
    g = torch.Generator().manual_seed(1)
    low = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)


def test_box_and_scale_masks():
    m = box_mask(16, (0.1, 0.1, 0.8, 0.8))  # the notebook's box on the 16x16 grid: rows/cols 2..12
    assert m.sum() == 11 * 11 and m[2, 2] and m[12, 12] and not m[13, 13] and not m[1, 5]
    keep = scale_keep_masks(box_mask(4, (0.25, 0.25, 0.75, 0.75)), PATCH_NUMS)
    assert [k.shape for k in keep] == [(1, 1), (1, 4), (1, 9), (1, 16)]
    assert keep[0].all()  # 1x1 is always forced to the source
    assert keep[-1].view(4, 4)[1:3, 1:3].logical_not().all() and keep[-1].sum() == 12
    # A pixel-resolution mask is area-averaged to the token grid first: the same box gives the same masks.
    keep_px = scale_keep_masks(box_mask(32, (0.25, 0.25, 0.75, 0.75)), PATCH_NUMS)
    assert all(torch.equal(a, b) for a, b in zip(keep, keep_px))
    assert all(k.all() for k in scale_keep_masks(torch.zeros(4, 4, dtype=torch.bool), PATCH_NUMS))
    region = box_mask(4, (0, 0, 0.5, 1))
    assert torch.equal(region_to_regenerate(region, "outpaint"), ~region)
    assert torch.equal(region_to_regenerate(region, "class"), region)
    with pytest.raises(ValueError):
        box_mask(4, (0.5, 0, 0.2, 1))


@pytest.mark.parametrize("mode,label,gumbel", [("inpaint", NULL, 0.0), ("outpaint", NULL, 0.27), ("class", 3, 0.0)])
def test_tokens_outside_the_mask_are_the_sources_at_every_scale(models, images, mode, label, gumbel):
    var, vq = models
    regen = region_to_regenerate(box_mask(4, (0.1, 0.1, 0.8, 0.8)), mode)
    B = images.shape[0]
    tokens, f_hat, src, keep = edit_tokens(var, vq, images, regen, torch.full((B,), label), list(range(B)),
                                           cfg=3.0, top_k=900, top_p=0.95, gumbel_smooth=gumbel)
    assert f_hat.shape == (B, 8, 4, 4)
    assert torch.equal(src[0], tokens[0])
    changed = 0
    for t, s, k in zip(tokens, src, keep):
        assert t.shape == s.shape == k.shape
        assert torch.equal(t[k], s[k])
        changed += int((t[~k] != s[~k]).sum())
    assert changed > 0  # the region really was sampled
    assert 0 < int((~keep[-1]).sum()) < keep[-1].numel()


def test_edit_image_shape_range_and_nothing_to_regenerate(models, images):
    var, vq = models
    img = images[0]
    out = edit_image(var, vq, img, box_mask(32, (0.25, 0.25, 0.75, 0.75)), NULL, seed=0)
    assert out.shape == (3, 32, 32) and out.min() >= -1 and out.max() <= 1
    # An empty mask regenerates nothing: the result is the source's reconstruction.
    same = edit_image(var, vq, img, torch.zeros(32, 32, dtype=torch.bool), 4, seed=0)
    with torch.no_grad():
        recon = vq.idxBl_to_img(vq.img_to_idxBl(img.unsqueeze(0)))[0]
    torch.testing.assert_close(same, recon, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- task=edit
@pytest.fixture
def trained_run(tiny_trained_run):
    return tiny_trained_run


def test_task_edit_writes_source_mask_result(trained_run, small_dataset, tmp_path):
    from var.errors import ConfigError
    from var.tasks import edit

    _, data_root = small_dataset

    def cfg_for(*extra):
        cfg = resolved(compose_cfg(["task=edit", f"task.ckpt={trained_run}", "task.source_index=3",
                                    f"data.root={data_root}", "data.resolution=32", *extra], root=tmp_path))
        cfg.task.out = str(tmp_path / "out")
        return cfg

    r = edit.run(cfg_for("task.num_samples=2", "task.scale=2"))
    with Image.open(r["out"]) as img:
        assert img.size == (4 * (64 + 2) + 2, 64 + 4)
    assert r["label"] == NULL and 0 < r["regenerated_fraction"] < 1 and r["out"].endswith("edit_inpaint.png")
    # A mask image and outpainting; class editing with a target class.
    mask = tmp_path / "mask.png"
    Image.fromarray((box_mask(32, (0, 0, 0.5, 1)).numpy() * 255).astype("uint8")).save(mask)
    r = edit.run(cfg_for("task.mode=outpaint", f"task.mask={mask}"))
    assert r["regenerated_fraction"] == pytest.approx(0.5) and r["out"].endswith("edit_outpaint.png")
    assert edit.run(cfg_for("task.mode=class", "task.target_class=2"))["label"] == 2
    with pytest.raises(ConfigError, match="task.target_class"):
        edit.run(cfg_for("task.mode=class"))

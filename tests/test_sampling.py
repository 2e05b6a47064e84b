"""Sampling: KV cache == block-causal full forward, per-image seeds, CFG, filters, task=sample files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import compose_cfg, resolved
from var.models.vqvae import PRESETS, VQVAE
from var.models.zoo import VARConfig, build_var
from var.sampling.config import SamplingConfig
from var.sampling.files import rank_share
from var.sampling.loading import pick_device
from var.sampling.sampler import (
    guidance_scale,
    run_scales,
    sample_images,
    sample_tokens,
    to_uint8_nhwc,
    top_k_top_p_filter,
)

NULL = 10


@pytest.fixture(scope="module")
def models():
    """A tiny VAR in float64 (tight tolerances) with large head/AdaLN gains, so logits are far from uniform."""
    torch.manual_seed(0)
    var = build_var(VARConfig(depth=2, num_classes=10, patch_nums=(1, 2, 3, 4), vocab_size=64, cvae=8,
                              init_head=1.0, init_adaln_gamma=1.0)).double().eval()
    vq = VQVAE(PRESETS["vq_test32"]).eval()
    return var, vq


def test_kv_cache_logits_equal_the_block_causal_full_forward(models):
    var, vq = models
    labels = torch.tensor([0, 3, 7, NULL, 9])
    for cfg in (0.0, 2.0):
        logits = []
        tokens, _ = sample_tokens(var, vq, labels, [11, 12, 13, 14, 15], cfg=cfg, logits_out=logits)
        x = vq.idxBl_to_var_input(tokens)
        with torch.no_grad():
            full = var(labels, x)
            full_null = var(torch.full_like(labels, NULL), x)
        B = len(labels)
        for si, (bg, ed) in enumerate(var.begin_ends):
            assert logits[si].shape == ((2 * B if cfg else B), ed - bg, 64)
            torch.testing.assert_close(logits[si][:B], full[:, bg:ed], rtol=0, atol=1e-10)
            if cfg:  # the null-class rows of the doubled batch
                torch.testing.assert_close(logits[si][B:], full_null[:, bg:ed], rtol=0, atol=1e-10)
        assert logits[-1].std() > 0.1  # not a degenerate near-uniform model


def test_same_seed_same_image_whatever_the_batch(models):
    var, vq = models
    labels, seeds = torch.tensor([1, 2, 3, 4, 5, 6, 7, NULL]), [100, 101, 102, 103, 104, 105, 106, 107]
    kw = dict(cfg=1.5, top_k=20, top_p=0.9)
    t8, _ = sample_tokens(var, vq, labels, seeds, **kw)
    img8 = sample_images(var, vq, labels, seeds, **kw)
    for i in (0, 4, 7):
        t1, _ = sample_tokens(var, vq, labels[i:i + 1], seeds[i:i + 1], **kw)
        assert all(torch.equal(a[i:i + 1], b) for a, b in zip(t8, t1))
        torch.testing.assert_close(sample_images(var, vq, labels[i:i + 1], seeds[i:i + 1], **kw), img8[i:i + 1],
                                   rtol=0, atol=1e-5)
    perm = [7, 2, 5, 0, 1, 6, 3, 4]  # another position in the batch
    tp, _ = sample_tokens(var, vq, labels[perm], [seeds[p] for p in perm], **kw)
    assert all(torch.equal(a[perm], b) for a, b in zip(t8, tp))
    # Different seeds give different images.
    t_other, _ = sample_tokens(var, vq, labels, [s + 1000 for s in seeds], **kw)
    assert not all(torch.equal(a, b) for a, b in zip(t8, t_other))


def test_cfg0_equals_plain_conditional_sampling(models):
    var, vq = models
    labels, seeds = torch.tensor([0, 5, 9]), [7, 8, 9]
    plain_logits, doubled_logits = [], []
    plain, f_plain = sample_tokens(var, vq, labels, seeds, cfg=0, top_p=0.95, logits_out=plain_logits)
    doubled, f_doubled = run_scales(var, vq, labels, seeds, cfg=0, top_p=0.95, guided=True,
                                    logits_out=doubled_logits)
    assert all(torch.equal(a, b) for a, b in zip(plain, doubled))
    torch.testing.assert_close(f_plain, f_doubled)
    for p, d in zip(plain_logits, doubled_logits):  # the plain path really skipped the null rows
        assert d.shape[0] == 2 * p.shape[0]
        torch.testing.assert_close(p, d[:3], rtol=0, atol=1e-12)


def test_unconditional_through_the_null_class(models):
    var, vq = models
    labels = torch.full((3,), NULL)
    tokens, f_hat = sample_tokens(var, vq, labels, [1, 2, 3], cfg=0)
    assert [t.shape for t in tokens] == [(3, 1), (3, 4), (3, 9), (3, 16)] and f_hat.shape == (3, 8, 4, 4)
    # Guidance of the null class against itself changes nothing.
    guided, _ = sample_tokens(var, vq, labels, [1, 2, 3], cfg=4.0)
    assert all(torch.equal(a, b) for a, b in zip(tokens, guided))
    with pytest.raises(ValueError):
        sample_tokens(var, vq, torch.tensor([NULL + 1]), [0])
    with pytest.raises(ValueError):
        sample_tokens(var, vq, torch.tensor([1, 2]), [0])


def test_state_and_cache_are_restored(models):
    var, vq = models
    var.train()
    try:
        sample_tokens(var, vq, torch.tensor([1]), [0], gumbel_smooth=0.27)
        assert var.training and not vq.training
        assert all(not b.attn.caching and b.attn.cached_k is None for b in var.blocks)
    finally:
        var.eval()


def test_gumbel_smoothing_is_seeded_and_changes_f_hat(models):
    var, vq = models
    labels, seeds = torch.tensor([2, 3]), [5, 6]
    t_a, f_a = sample_tokens(var, vq, labels, seeds, gumbel_smooth=0.27)
    t_b, f_b = sample_tokens(var, vq, labels, seeds, gumbel_smooth=0.27)
    t_c, f_c = sample_tokens(var, vq, labels, seeds)
    torch.testing.assert_close(f_a, f_b, rtol=0, atol=0)
    assert torch.equal(t_a[0], t_c[0])  # scale 0's hard draw comes first, unchanged
    assert not torch.allclose(f_a, f_c)


def test_images_and_uint8():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    out = to_uint8_nhwc(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 5, 3)
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255, 0]


def test_top_k_top_p_filters():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.isinf(top_k_top_p_filter(logits, top_k=2))[0].tolist() == [True, True, False, False]
    assert torch.equal(top_k_top_p_filter(logits, top_k=4), logits)
    assert torch.equal(top_k_top_p_filter(logits, top_k=900), logits)  # k > V: a no-op
    p = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    kept = lambda x: (~torch.isinf(x))[0].tolist()  # noqa: E731
    assert kept(top_k_top_p_filter(p, top_p=0.5)) == [False, False, True, True]  # cum 0.1, 0.3 <= 0.5 dropped
    assert kept(top_k_top_p_filter(p, top_p=0.3)) == [False, False, False, True]
    assert kept(top_k_top_p_filter(p, top_p=1e-6)) == [False, False, False, True]  # the top token stays
    assert kept(top_k_top_p_filter(p, top_p=0.0)) == [True] * 4
    both = top_k_top_p_filter(torch.log(torch.tensor([[0.05, 0.15, 0.35, 0.45]])), top_k=3, top_p=0.5)
    assert kept(both) == [False, False, True, True]
    # Ties at the top-p boundary are all kept (the sort would split them arbitrarily): cum 0.1, 0.3 <= 0.35
    assert kept(top_k_top_p_filter(torch.log(torch.tensor([[0.2, 0.1, 0.5, 0.2]])), top_p=0.65)) == \
        [True, False, True, True]
    assert not torch.isinf(logits).any()  # inputs are not modified


def _two_sort_reference(logits, top_k, top_p):
    """The official order of operations: a top-k, then a full sort of the filtered logits for top-p."""
    kth = logits.topk(top_k, dim=-1)[0][..., -1:]
    logits = logits.masked_fill(logits < kth, -torch.inf)
    sorted_logits, idx = logits.sort(dim=-1)
    drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    drop[..., -1:] = False
    return logits.masked_fill(drop.scatter(-1, idx, drop), -torch.inf)


@pytest.mark.parametrize("top_k,top_p", [(900, 0.96), (5, 0.5), (300, 0.999), (2000, 0.1), (1, 0.9)])
def test_one_sort_top_k_top_p_equals_the_two_sort_reference(top_k, top_p):
    logits = torch.randn(6, 7, 2048, generator=torch.Generator().manual_seed(top_k)) * 3
    got = top_k_top_p_filter(logits, top_k=top_k, top_p=top_p)
    assert torch.equal(got, _two_sort_reference(logits, top_k, top_p))
    assert (~torch.isinf(got)).sum(-1).max() <= top_k


def test_guidance_schedule_and_tag():
    assert guidance_scale(1.5, "linear", 0, 10) == 0.0
    assert guidance_scale(1.5, "linear", 9, 10) == 1.5
    assert math.isclose(guidance_scale(1.5, "linear", 3, 10), 0.5)
    assert guidance_scale(1.5, "constant", 0, 10) == 1.5
    s = SamplingConfig(cfg=1.5, top_k=900, top_p=0.96)
    assert s.tag() == "cfg1.5-lin_topk900_topp0.96_t1.0_seed0"
    assert SamplingConfig(cfg=2, cfg_schedule="constant", gumbel_smooth=0.27, seed=3).tag() == \
        "cfg2.0-const_topk0_topp0.0_t1.0_gum0.27_seed3"
    assert set(s.kwargs()) == {"cfg", "cfg_schedule", "top_k", "top_p", "temperature", "gumbel_smooth"}
    assert [n for n, _ in SamplingConfig(cfg_schedule="cosine", temperature=0).problems()] == \
        ["cfg_schedule", "temperature"]


def test_rank_split_has_no_duplicates_and_no_gaps():
    for n in range(0, 14):
        for world in (1, 2, 3, 4):
            shares = [rank_share(n, r, world) for r in range(world)]
            flat = [i for s in shares for i in s]
            assert sorted(flat) == list(range(n)) and len(flat) == len(set(flat))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


# ------------------------------------------------------------------------------------------- task=sample
@pytest.fixture
def trained_run(tiny_trained_run):
    return tiny_trained_run


def sample_cfg(tmp_path, run_dir, extra=()):
    cfg = resolved(compose_cfg(["task=sample", f"task.ckpt={run_dir}", "task.per_class=2", "task.batch_size=3",
                                "task.classes=[0,3,10]", "data.resolution=32", *extra], root=tmp_path))
    cfg.task.out = str(tmp_path / "out")
    return cfg


def test_task_sample_writes_pngs_grid_and_npz(trained_run, tmp_path, monkeypatch):
    from var.tasks import sample

    result = sample.run(sample_cfg(tmp_path, trained_run))
    tag = "cfg1.5-lin_topk900_topp0.96_t1.0_seed0"
    assert result["tag"] == tag and result["count"] == 6
    pngs = sorted((tmp_path / "out" / tag).glob("*.png"))
    assert [p.name for p in pngs] == [f"{c:04d}_{i:05d}_{tag}.png" for c in (0, 3, 10) for i in range(2)]
    with np.load(result["npz"]) as f:
        assert list(f.keys()) == ["arr_0"]
        arr = f["arr_0"]
    assert arr.shape == (6, 32, 32, 3) and arr.dtype == np.uint8
    assert (tmp_path / "out" / f"grid_{tag}.png").is_file()

    # Two ranks split the same work: rank 1 writes its share, rank 0 the rest and the npz; same images.
    # They sample on the device the single run picked (on a GPU, its fast path).
    class FakeRanks:
        def __init__(self, cfg, rank):
            self.rank, self.world, self.device = rank, 2, pick_device(cfg.task.get("device"))

        def barrier(self):
            pass

    for rank in (1, 0):
        monkeypatch.setattr(sample, "Ranks", lambda cfg, rank=rank: FakeRanks(cfg, rank))
        cfg = sample_cfg(tmp_path, trained_run)
        cfg.task.out = str(tmp_path / "out2")
        split = sample.run(cfg)
        if rank == 1:
            assert len(list((tmp_path / "out2" / tag).glob("*.png"))) == 3
    with np.load(split["npz"]) as f:
        assert np.abs(f["arr_0"].astype(int) - arr.astype(int)).max() <= 1


def test_task_sample_needs_a_checkpoint(tmp_path):
    from var.errors import ConfigError
    from var.tasks import sample

    cfg = resolved(compose_cfg(["task=sample"], root=tmp_path))
    with pytest.raises(ConfigError, match="task.ckpt"):
        sample.run(cfg)

"""``attn_impl=fused`` (var/models/fused_attention.py) computes the attention SelfAttention computes with
cosine attention: its Triton kernels in Triton's CPU interpreter and on a GPU; its fallback everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.interpreter import assert_models_agree, run_probe
from tests.test_transformer_model import inputs, tiny
from var.models.attention import FusedMask, attention_mask, scale_bounds
from var.models.vqvae import PRESETS, VQVAE
from var.sampling.sampler import run_scales

pytest.importorskip("triton")


def _probe(*args: str) -> dict[str, dict]:
    return run_probe("tests.fused_attention_probe", *args)


def test_fused_kernels_equal_the_plain_path_in_the_interpreter():
    """Output, qkv gradient and temperature gradient against float64: in fp32 to float rounding (several
    tiles, tiles straddling scales, a zero q and k row; a prefix of the pyramid; one tile); in bf16 within a
    few times the plain path's own rounding. A tiny VAR with fused attention gives scalewise's loss and
    gradients, whole and over a prefix of its scales (progressive training). All of it also with q and k
    normalised by a kernel of their own before the forward (NORMALISE_FIRST)."""
    cases = _probe()
    assert len(cases) == 12
    for name in ("fp32_tiles16", "fp32_prefix55", "fp32_mixed_tiles_renormalised", "fp32_one_tile",
                 "fp32_normalised_first"):
        assert max(cases[name]["fused"]) < 1e-5, cases[name]
    for name in ("bf16_tiles16", "bf16_normalised_first"):
        for got, plain in zip(cases[name]["fused"], cases[name]["plain"]):
            assert got < 3 * plain + 2e-3, cases[name]
    # The same rounded q and k go into the same arithmetic either way: the same results to the bit.
    assert cases["bf16_normalised_first"]["fused"] == cases["bf16_tiles16"]["fused"]
    assert cases["fp32_normalised_first_same"]["max_diff"] == cases["bf16_normalised_first_same"]["max_diff"] == 0
    assert_models_agree(cases, "model_eager", "model_eager_prefix", "model_eager_normalised_first")


@pytest.mark.slow
def test_compiled_blocks_with_fused_attention_equal_scalewise_in_the_interpreter():
    """The kernels as torch.library ops inside torch.compile'd blocks (fake shapes, autograd) on the CPU."""
    assert_models_agree(_probe("compiled"), "model_compiled", "model_compiled_normalised_first")


def test_scale_bounds_are_each_tokens_scale_end_and_begin():
    ends, begins = scale_bounds((1, 2, 3), 14, "cpu")
    assert ends.tolist() == [1] + [5] * 4 + [14] * 9 and begins.tolist() == [0] + [1] * 4 + [5] * 9
    assert ends.dtype == torch.int32
    assert scale_bounds((1, 2, 3), 5, "cpu")[0].tolist() == [1, 5, 5, 5, 5]
    with pytest.raises(ValueError, match="15 tokens but the pyramid"):
        scale_bounds((1, 2, 3), 15, "cpu")


def test_fused_runs_as_scalewise_where_its_kernels_do_not():
    """On the CPU (no interpreter), in float64 and in the cached sampling steps the model takes the scalewise
    path: the same logits, gradients and sampled tokens."""
    ref, got = tiny(patch_nums=(1, 2, 3, 4)), tiny(patch_nums=(1, 2, 3, 4))
    ref.set_attn_impl("scalewise")
    got.set_attn_impl("fused")
    mask = attention_mask("fused", got.patch_nums, got.attn_bias_for_masking, got.L)
    assert isinstance(mask, FusedMask) and mask.bounds[0].tolist()[-1] == got.L
    labels, x = inputs(ref)
    for m in (ref, got):
        F.cross_entropy(m(labels, x).transpose(1, 2), torch.zeros(3, m.L, dtype=torch.long)).backward()
    for (name, a), b in zip(ref.named_parameters(), got.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
    vq = VQVAE(PRESETS["vq_test32"]).eval()  # scales 1..4, as the model
    a, _ = run_scales(ref, vq, labels, [1, 2, 3], cfg=1.5, top_k=10)
    b, _ = run_scales(got, vq, labels, [1, 2, 3], cfg=1.5, top_k=10)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_fused_attention_refuses_what_its_kernels_cannot_run_in_one_line():
    from var.models.fused_attention import fused_cos_attention, supports

    qkv = torch.zeros(2, 5, 3 * 64, dtype=torch.float64)
    assert not supports(qkv, 2)
    with pytest.raises(ValueError, match=r"fused attention needs .*float64 \(2, 5, 192\) on cpu with 2 heads"):
        fused_cos_attention(qkv, torch.ones(2), scale_bounds((1, 2), 5, "cpu"), 2)
    assert not supports(torch.zeros(2, 5, 3 * 48, device="meta"), 2)  # head size 24 is no power of two


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("depth,normalise_first", [(2, False), (16, False), (16, True)])
def test_fused_attention_equals_scalewise_on_gpu(depth, normalise_first, monkeypatch):
    """At the official 680-token pyramid and head size 64, bf16: output and gradients within bf16
    rounding of the scalewise path (cuDNN/flash kernels), relative to their largest values; also with q and k
    normalised by a kernel of their own before the forward."""
    from var.models import fused_attention
    from var.models.attention import (
        SCALEWISE_MERGE_TOKENS,
        block_causal_bias,
        scale_groups,
        scalewise_attention,
    )
    from var.models.fused_attention import fused_cos_attention
    from var.models.transformer import OFFICIAL_PATCH_NUMS as PN

    monkeypatch.setattr(fused_attention, "NORMALISE_FIRST", normalise_first)
    L, H, D, B = 680, depth, 64, 4
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, L, 3 * H * D, device="cuda", generator=g).bfloat16().requires_grad_()
    temp = (torch.rand(H, device="cuda", generator=g) * 20 + 1).requires_grad_()
    grad = torch.randn(B, L, H * D, device="cuda", generator=g).bfloat16()
    groups = scale_groups(PN, L, block_causal_bias(PN).cuda(), SCALEWISE_MERGE_TOKENS)

    def plain(x, t):
        q, k, v = x.view(B, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q.float(), dim=-1).mul(t.view(1, H, 1, 1)).to(v.dtype)
        k = F.normalize(k.float(), dim=-1).to(v.dtype)
        return scalewise_attention(q, k, v, 1.0, groups).transpose(1, 2).reshape(B, L, H * D)

    def fused(x, t):
        return fused_cos_attention(x, t, scale_bounds(PN, L, "cuda"), H)

    results = []
    for fn in (plain, fused):
        out = fn(qkv, temp)
        results.append((out, *torch.autograd.grad(out, (qkv, temp), grad)))
    for ref, got in zip(*results):
        err = (got.float() - ref.float()).abs().max() / ref.float().abs().max()
        assert err < 3e-2, (err, ref.shape)

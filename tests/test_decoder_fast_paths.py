"""The decoder's fast-path pieces (var/models/vqgan_blocks.py) equal the plain layers they stand for: the NCHW
output conv, GroupNorm from per-channel sums, the x2 upsampling as a transposed conv; and compiled on CUDA,
each is taken where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from var.models.vqgan_blocks import (
    GroupNorm,
    NarrowOutConv2d,
    Upsample2x,
    group_norm_by_channel_sums,
    upsample_conv_transposed,
)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_narrow_output_conv_is_a_conv2d_with_its_state_dict(device):
    conv = NarrowOutConv2d(16, 3, kernel_size=3, padding=1).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 9, 9, device=device).contiguous(memory_format=torch.channels_last)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # TF32 rounds differently per layout
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert isinstance(conv, nn.Conv2d) and list(conv.state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_norm_by_channel_sums_equals_group_norm(dtype):
    g = torch.Generator().manual_seed(0)
    # an offset mean: the shifted one-pass variance must not cancel
    x = (3 + 2 * torch.randn(3, 20, 7, 9, generator=g, dtype=dtype)).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(20, generator=g, dtype=dtype), torch.randn(20, generator=g, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(group_norm_by_channel_sums(x, 4, w, b, 1e-6), F.group_norm(x, 4, w, b, 1e-6),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(group_norm_by_channel_sums(x, 5, None, None, 1e-6), F.group_norm(x, 5, eps=1e-6),
                               rtol=tol, atol=tol)


def test_group_norm_by_channel_sums_keeps_precision_far_from_zero():
    x = (1000 + torch.randn(2, 20, 16, 16, generator=torch.Generator().manual_seed(1)))
    x = x.contiguous(memory_format=torch.channels_last)
    exact = F.group_norm(x.double(), 4, eps=1e-6)
    assert (group_norm_by_channel_sums(x, 4, None, None, 1e-6).double() - exact).abs().max() < 1e-4


def test_compiled_group_norm_takes_channel_sums_on_channels_last_input(monkeypatch):
    import var.models.vqgan_blocks as blocks

    calls = []
    monkeypatch.setattr(blocks, "group_norm_by_channel_sums",
                        lambda *a: calls.append(1) or group_norm_by_channel_sums(*a))
    norm = GroupNorm(4, 16, eps=1e-6)
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(norm, backend="aot_eager")  # traces forward as Inductor would, no C++ build
    torch.testing.assert_close(compiled(x), F.group_norm(x, 4, norm.weight, norm.bias, 1e-6), rtol=1e-5, atol=1e-5)
    assert calls, "the compiled channels-last path did not use the per-channel sums"
    calls.clear()
    torch.testing.assert_close(norm(x), F.group_norm(x, 4, norm.weight, norm.bias, 1e-6))  # eager: nn.GroupNorm
    assert not calls and list(norm.state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (8, 8)])
def test_upsample_as_transposed_conv_equals_nearest_then_conv(hw):
    torch.manual_seed(0)
    up = Upsample2x(6).double()
    x = torch.randn(2, 6, *hw, dtype=torch.float64, requires_grad=True)
    ref = up(x)  # eager: interpolate, then the 3x3 conv
    out = upsample_conv_transposed(x, up.conv.weight, up.conv.bias)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (x, up.conv.weight, up.conv.bias), grad)
    g_out = torch.autograd.grad(out, (x, up.conv.weight, up.conv.bias), grad)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_upsample_on_cuda_takes_the_transposed_conv(monkeypatch):
    import var.models.vqgan_blocks as blocks

    calls = []
    monkeypatch.setattr(blocks, "upsample_conv_transposed",
                        lambda *a: calls.append(1) or upsample_conv_transposed(*a))
    up = Upsample2x(32).cuda()
    x = torch.randn(2, 32, 8, 8, device="cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        torch.testing.assert_close(torch.compile(up, backend="aot_eager")(x), up(x), rtol=1e-5, atol=1e-5)
    assert calls, "the compiled CUDA path did not use the transposed conv"

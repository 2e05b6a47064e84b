"""ffn_impl=fused (var/models/fused_ffn.py, cublaslt.py) computes the plain feed-forward: forward and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.test_fast_paths import PN4, _assert_same, _loss_and_grads, compiled_against_plain
from tests.test_transformer_model import inputs, tiny
from var.models import cublaslt, fused_ffn
from var.models.ffn import FFN

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _ffn_grads(ffn: FFN, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().requires_grad_()
    y = ffn(x)
    return (y, *torch.autograd.grad(y, [x, *ffn.parameters()], grad))


@pytest.mark.parametrize("shape", [(3, 10, 16), (7, 16)])
def test_fused_ffn_equals_linear_gelu_linear(shape):
    torch.manual_seed(0)
    plain = FFN(16, 64).double()
    fused = FFN(16, 64, "fused").double()
    fused.load_state_dict(plain.state_dict())
    x, grad = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    for a, b in zip(_ffn_grads(fused, x, grad), _ffn_grads(plain, x, grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_ffn_under_cpu_autocast_rounds_as_autocast():
    """Under autocast the op runs in the autocast dtype and hands fp32 parameters fp32 gradients."""
    torch.manual_seed(0)
    plain, fused = FFN(16, 64), FFN(16, 64, "fused")
    fused.load_state_dict(plain.state_dict())
    x, grad = torch.randn(4, 16), torch.randn(4, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = _ffn_grads(fused, x, grad), _ffn_grads(plain, x, grad)
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_model_with_fused_ffn_gives_the_plain_loss_and_gradients():
    plain, fused = tiny(patch_nums=PN4), tiny(patch_nums=PN4, ffn_impl="fused")
    fused.load_state_dict(plain.state_dict())
    labels, x = inputs(plain)
    target = torch.randint(0, plain.V, (3, plain.L))
    _assert_same(_loss_and_grads(fused, labels, x, target, fused=True),
                 _loss_and_grads(plain, labels, x, target, fused=True), 1e-10)


@pytest.mark.slow
def test_inductor_compiled_fused_ffn_equals_plain():
    compiled_against_plain(ffn_impl="fused")


def test_unknown_ffn_impl_is_named():
    with pytest.raises(ValueError, match="ffn_impl='triton'"):
        FFN(16, 64, "triton")


# ------------------------------------------------------------------------------------------------ GPU
def _fp32_reference(x, w1, b1, g, w2):
    pre = torch.addmm(b1.float(), x.float(), w1.float().t())
    g_pre = torch.ops.aten.gelu_backward(g.float() @ w2.float(), pre, approximate="tanh")
    return F.gelu(pre, approximate="tanh"), pre, g_pre


@CUDA
@pytest.mark.parametrize("rows", [8, 37, 1360])
@pytest.mark.parametrize("offset", [0, 8])
@pytest.mark.parametrize("bias_grad", [True, False])
def test_cublaslt_epilogues_against_fp32_on_gpu(rows, offset, bias_grad):
    """The GELU_AUX_BIAS and DGELU(_BGRAD) GEMMs against fp32 math, within bf16 rounding; operands at an offset
    (less aligned) choose their own algorithm."""
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    C, N = 64, 256
    x = torch.randn(rows + 1, C, **bf)[1:] if offset else torch.randn(rows, C, **bf)
    w1, b1 = torch.randn(N, C, **bf) / 8, torch.randn(N, **bf)
    g, w2 = torch.randn(rows, C, **bf), torch.randn(C, N, **bf) / 16
    assert cublaslt.supported(x, w1, b1, g, w2)
    act, pre = cublaslt.linear_gelu_aux(x, w1, b1)
    act_ref, pre_ref, _ = _fp32_reference(x, w1, b1, g, w2)
    torch.testing.assert_close(pre.float(), pre_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(act.float(), act_ref, rtol=1e-2, atol=1e-2)
    g_pre, g_bias = cublaslt.matmul_dgelu(g, w2, pre, bias_grad=bias_grad)
    # The reference at the bf16 pre-activation the GEMM reads back.
    g_pre_ref = torch.ops.aten.gelu_backward(g.float() @ w2.float(), pre.float(), approximate="tanh")
    torch.testing.assert_close(g_pre.float(), g_pre_ref, rtol=1e-2, atol=1e-2)
    if bias_grad:
        torch.testing.assert_close(g_bias.float(), g_pre_ref.sum(0), rtol=2e-2, atol=2e-2 * rows**0.5)
    else:
        assert g_bias is None


@CUDA
def test_backward_ways_agree_and_the_fastest_is_kept_on_gpu():
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    g, w2, pre = torch.randn(1360, 64, **bf), torch.randn(64, 256, **bf) / 16, torch.randn(1360, 256, **bf)
    results = {way: fused_ffn._input_grad(way, g, w2, pre) for way in fused_ffn.BACKWARD_WAYS}
    ref_pre, ref_bias = (t.float() for t in results["torch"])
    for way, (g_pre, g_bias) in results.items():
        torch.testing.assert_close(g_pre.float(), ref_pre, rtol=2e-2, atol=2e-2, msg=way)
        torch.testing.assert_close(g_bias.float(), ref_bias, rtol=2e-2, atol=0.5, msg=way)
    assert fused_ffn._fastest_way(g, w2, pre) in fused_ffn.BACKWARD_WAYS
    assert fused_ffn.chosen_ways()["1360x256"] in fused_ffn.BACKWARD_WAYS


@CUDA
def test_fused_ffn_under_autocast_follows_autocast_on_gpu():
    torch.manual_seed(0)
    plain, fused = FFN(128, 512).cuda(), FFN(128, 512, "fused").cuda()
    fused.load_state_dict(plain.state_dict())
    x, grad = torch.randn(2, 680, 128, device="cuda"), torch.randn(2, 680, 128, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = _ffn_grads(fused, x, grad), _ffn_grads(plain, x, grad)
    for a, b in zip(got, want):
        rel = (a.float() - b.float()).norm() / b.float().norm()
        assert rel < 1e-2, rel.item()


@CUDA
def test_compiled_training_step_with_fused_ffn_equals_plain_on_gpu():
    plain, fused, (labels, x, target) = compiled_against_plain("cuda", 1e-3, ffn_impl="fused")
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the cuBLASLt path: bf16 GEMMs against autocast's
        a = _loss_and_grads(fused, labels, x, target, fused=True)
        b = _loss_and_grads(plain, labels, x, target, fused=True)
    torch.testing.assert_close(a[0], b[0], rtol=2e-2, atol=0)
    for name, g in b[1].items():
        assert (a[1][name] - g).norm() / g.norm().clamp_min(1e-12) < 0.05, name

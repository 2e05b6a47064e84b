"""``adaln_impl=fused`` (var/models/fused_adaln.py) computes the block's residual add, LayerNorm and modulation as
the plain block does: its Triton kernels in Triton's CPU interpreter, forward and backward."""

from __future__ import annotations

import pytest
import torch

from tests.interpreter import assert_models_agree, run_probe

pytest.importorskip("triton")


def _probe(*args: str) -> dict[str, dict]:
    return run_probe("tests.fused_adaln_probe", *args)


def test_fused_adaln_kernels_equal_the_plain_block_in_the_interpreter():
    """Against float64: the outputs (x + a*g, the modulated LayerNorm) and every gradient (x, a, g, scale,
    shift) to float rounding in fp32, with and without the residual, over several programs per image and a
    ragged last one; within bf16 rounding in bf16 and with bf16 output from an fp32 stream. A tiny VAR with
    the fused AdaLN gives the plain model's loss and gradients, also with each block's second residual add in
    the next block's first kernel (defer_residual)."""
    cases = _probe()
    assert len(cases) == 7
    for name in ("fp32_residual", "fp32_plain", "fp32_residual_pow2"):
        assert max(cases[name]["errors"]) < 1e-6, cases[name]
    for name in ("bf16_residual", "fp32_stream_bf16_out"):
        assert max(cases[name]["errors"]) < 1.6e-2, cases[name]  # two bf16 steps of the largest value
    assert_models_agree(cases, "model", "model_deferred")


@pytest.mark.slow
def test_compiled_blocks_with_fused_adaln_equal_plain_in_the_interpreter():
    """The kernels as torch.library ops inside torch.compile'd blocks (fake shapes, autograd) on the CPU."""
    assert_models_agree(_probe("compiled"), "model_compiled", "model_compiled_deferred")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("C", [1024, 1280, 1920])
def test_fused_adaln_kernels_on_gpu(C):
    """The official widths (d16, d20, d30) at the pyramid's 680 tokens, bf16 stream, against the plain block's
    arithmetic in fp32: within bf16 rounding, forward and every gradient."""
    from tests.fused_adaln_probe import plain
    from var.models import fused_adaln

    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, a = torch.randn(2, 680, C, **bf) * 3 + 1, torch.randn(2, 680, C, **bf)
    mods = [torch.randn(2, 1, C, **bf) * 0.5 for _ in range(3)]
    dx1, dh = torch.randn(2, 680, C, **bf), torch.randn(2, 680, C, **bf)
    results = []
    for fused in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, a, *mods)]
        if fused:
            outs = fused_adaln.residual_adaln(*leaves, 1e-6, torch.bfloat16)
        else:
            outs = plain(*[t.float() for t in leaves], 1e-6, torch.float32)
        grads = torch.autograd.grad(outs, leaves, [dx1.to(outs[0].dtype), dh.to(outs[1].dtype)])
        results.append([t.float() for t in (*outs, *grads)])
    for got, want in zip(*results):
        assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2


@CUDA
@pytest.mark.parametrize("defer", [False, True])
def test_compiled_training_step_with_fused_adaln_equals_plain_on_gpu(defer):
    from tests.test_fast_paths import compiled_against_plain

    compiled_against_plain("cuda", 1e-3, adaln_impl="fused", ffn_impl="fused", defer_residual=defer)

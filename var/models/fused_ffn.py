"""The feed-forward fc2(gelu_tanh(fc1(h))) with GELU and its derivative inside the GEMMs (``ffn_impl=fused``,
used by the blocks where grad is enabled: training; evaluation and sampling keep their own paths).

Autocast runs fc1, a GELU pass (reading the pre-activation, writing the activation), fc2; its backward a GELU
pass more (reading the pre-activation and the activation's gradient, writing the pre-activation's). Here, on
CUDA in bf16/fp16 (cublaslt.py): fc1's GEMM writes the activation and the pre-activation from its epilogue,
and fc2's input-gradient GEMM applies GELU's derivative in its epilogue (with fc1's bias gradient from the
epilogue too, or summed after it, or torch's three kernels instead: whichever ``BACKWARD_WAYS`` times fastest
for the shape). The other four GEMMs (fc2 forward, both weight gradients, fc1's input gradient) are torch's.
Elsewhere (CPU, fp32, odd sizes) the same steps run as torch ops, which is also what the CPU tests compare with
``nn.Linear`` + ``nn.GELU``: same values, forward and backward, up to float rounding.

What differs from autocast under bf16: GELU and its derivative are taken from the fp32 accumulators, where
autocast rounds the pre-activation and the activation's gradient to bf16 first (one rounding less each). Both
the activation (fc2's weight gradient) and the pre-activation (GELU's derivative) are kept for the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from var.models import cublaslt
from var.models.autocast import compute_dtype

# fc2's input gradient with GELU's derivative, three ways: the epilogue with fc1's bias gradient (DGELU_BGRAD),
# the epilogue and then a sum over the rows (DGELU), or torch's GEMM, GELU-backward pass and sum. The
# heuristic's algorithm for the first ran 2x slower than torch's three kernels on an H100 (bench/results note
# 62), so each shape times the three once on its first backward and keeps the fastest (as cudnn.benchmark
# does); BACKWARD_WAY fixes one instead (bench.ffn_speed).
BACKWARD_WAYS = ("epilogue_bias", "epilogue", "torch")
BACKWARD_WAY: str | None = None
_chosen: dict[tuple, str] = {}


@torch.library.custom_op("var::ffn_gelu", mutates_args=())
def _forward(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h (M, C) -> (fc2 output (M, C'), activation (M, N), pre-activation (M, N))."""
    if cublaslt.supported(h, w1, b1, w2):
        act, pre = cublaslt.linear_gelu_aux(h, w1, b1)
    else:
        pre = torch.addmm(b1, h, w1.t())
        act = F.gelu(pre, approximate="tanh")
    return torch.addmm(b2, act, w2.t()), act, pre


@_forward.register_fake
def _(h, w1, b1, w2, b2):
    return h.new_empty(h.shape[0], w2.shape[0]), h.new_empty(h.shape[0], w1.shape[0]), h.new_empty(h.shape[0],
                                                                                                 w1.shape[0])


@torch.library.custom_op("var::ffn_gelu_input_grad", mutates_args=())
def _pre_activation_grad(grad: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """fc2's output gradient (M, C') -> (the pre-activation's gradient (M, N), fc1's bias gradient (N))."""
    way = (BACKWARD_WAY or _fastest_way(grad, w2, pre)) if cublaslt.supported(grad, w2, pre) else "torch"
    return _input_grad(way, grad, w2, pre)


@_pre_activation_grad.register_fake
def _(grad, w2, pre):
    return torch.empty_like(pre), pre.new_empty(pre.shape[1])


def _input_grad(way: str, grad: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor):
    if way == "torch":
        g_pre, g_bias = torch.ops.aten.gelu_backward(grad @ w2, pre, approximate="tanh"), None
    else:
        g_pre, g_bias = cublaslt.matmul_dgelu(grad, w2, pre, bias_grad=way == "epilogue_bias")
    return g_pre, g_pre.sum(0) if g_bias is None else g_bias


def _fastest_way(grad: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, reps: int = 3) -> str:
    key = (tuple(grad.shape), tuple(w2.shape), grad.dtype, grad.device)
    if key not in _chosen:
        times = {}
        for way in BACKWARD_WAYS:
            try:
                _input_grad(way, grad, w2, pre)  # warm-up; the epilogue's plans pick their algorithm here
            except RuntimeError:  # cuBLASLt refused every algorithm for this epilogue: torch's way remains
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                _input_grad(way, grad, w2, pre)
            end.record()
            end.synchronize()
            times[way] = start.elapsed_time(end) / reps
        _chosen[key] = min(times, key=times.get)
    return _chosen[key]


def chosen_ways() -> dict[str, str]:
    """The backward way each (rows, width) shape chose so far, for benchmark records."""
    return {f"{k[0][0]}x{k[1][1]}": way for k, way in _chosen.items()}


def _setup(ctx, inputs, output):
    h, w1, _, w2, _ = inputs
    _, act, pre = output
    ctx.save_for_backward(h, w1, w2, act, pre)


def _backward(ctx, grad, _grad_act, _grad_pre):
    h, w1, w2, act, pre = ctx.saved_tensors
    grad = grad.contiguous()
    g_pre, g_b1 = _pre_activation_grad(grad, w2, pre)
    return g_pre @ w1, g_pre.t() @ h, g_b1, grad.t() @ act, grad.sum(0)


_forward.register_autograd(_backward, setup_context=_setup)


def fused_ffn(x: torch.Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> torch.Tensor:
    """fc2(gelu_tanh(fc1(x))) for x (..., C), in the autocast dtype where autocast is on (as autocast's Linear
    layers would compute it), else in x's dtype."""
    dtype = compute_dtype(x)
    h = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    y, _, _ = _forward(h, fc1.weight.to(dtype), fc1.bias.to(dtype), fc2.weight.to(dtype), fc2.bias.to(dtype))
    return y.view(*x.shape[:-1], y.shape[-1])

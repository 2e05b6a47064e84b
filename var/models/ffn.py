"""The blocks' feed-forward, fc2(gelu_tanh(fc1(x))), and the ways it runs: autocast's Linear-GELU-Linear, the
GELU inside fc1's GEMM for graphed sampling (``linear_tanh_gelu``), and ``ffn_impl=fused`` for training
(fused_ffn.py: GELU and its derivative in the GEMMs' epilogues)."""

from __future__ import annotations

import torch
from torch import nn

from var.models.fused_ffn import fused_ffn

FFN_IMPLS = ("plain", "fused")  # fused: fc1 + GELU and GELU's derivative in cuBLASLt GEMM epilogues (fused_ffn.py)


def linear_tanh_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """gelu_tanh(x @ weight^T + bias) in ``dtype`` as one CUDA GEMM with the activation in its epilogue
    (``torch._addmm_activation``, cuBLASLt's tanh GELU): the pre-activation is never written to memory and
    read back. The activation is taken from the fp32 accumulator and rounded once; autocast's two kernels
    round the pre-activation to ``dtype`` first. No backward: for inference only."""
    h = torch._addmm_activation(bias.to(dtype), x.reshape(-1, x.shape[-1]).to(dtype), weight.to(dtype).t(),
                                use_gelu=True)
    return h.view(*x.shape[:-1], h.shape[-1])


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, impl: str = "plain"):
        super().__init__()
        if impl not in FFN_IMPLS:
            raise ValueError(f"ffn_impl={impl!r}: expected one of {', '.join(FFN_IMPLS)}")
        self.impl = impl
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        # Set (to the autocast dtype) by graphed sampling while it runs: fc1 and GELU as one GEMM on CUDA
        # without grad. None everywhere else, so the test loss rounds as autocast does (training too, unless
        # impl is "fused": fused_ffn.py, with grad only).
        self.gelu_epilogue_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu_epilogue_dtype is not None and x.is_cuda and not torch.is_grad_enabled():
            return self.fc2(linear_tanh_gelu(x, self.fc1.weight, self.fc1.bias, self.gelu_epilogue_dtype))
        if self.impl == "fused" and torch.is_grad_enabled():  # training; evaluation and sampling round as before
            return fused_ffn(x, self.fc1, self.fc2)
        return self.fc2(self.act(self.fc1(x)))

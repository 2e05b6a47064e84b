"""The transformer's block: self-attention and a feed-forward, each behind a LayerNorm modulated by the class
condition (AdaLN), each added to the residual stream times a per-image gain; and the head's AdaLN.

    x1 = x  + drop_path(gamma1 * attn(LN(x)  * (1 + scale1) + shift1))
    x2 = x1 + drop_path(gamma2 * ffn(LN(x1) * (1 + scale2) + shift2))
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from var.models.attention import SelfAttention
from var.models.autocast import compute_dtype
from var.models.ffn import FFN

try:  # Triton: the fused AdaLN kernels (adaln_impl=fused)
    from var.models import fused_adaln
except ImportError:
    fused_adaln = None

Branch = tuple[torch.Tensor, torch.Tensor]  # a residual branch and its per-image gain, (B, l, C) and (B, 1, C)
ADALN_IMPLS = ("plain", "fused")  # fused: residual add + LayerNorm + modulation as Triton kernels (fused_adaln.py)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones by 1/keep."""

    RESOLUTION = 1 << 24  # the keep probability in steps of 2^-24, the resolution of an fp32 uniform draw

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.active = p > 0.0  # forward reads this bool, never p: a guard on p would also specialise
        # The keep probability as a tensor, not a Python float: torch.compile bakes a float attribute into
        # the graph and guards on it, so every block (each with its own rate) would compile a graph of its
        # own; a buffer is a graph input, and the blocks share one graph. An integer, so that casting the
        # model to bf16 cannot round it. Non-persistent: not in the state dict; reset_parameters refills
        # it after a model is materialised from the meta device.
        self.register_buffer("keep_threshold", torch.zeros((), dtype=torch.int64), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.keep_threshold.device.type != "meta":
            self.keep_threshold.fill_(round((1.0 - self.p) * self.RESOLUTION))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.active:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.randint(0, self.RESOLUTION, shape, device=x.device) < self.keep_threshold
        keep = self.keep_threshold.float() / self.RESOLUTION
        return x * (mask.float() / keep).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class SharedAdaLin(nn.Linear):
    """One AdaLN projection for all blocks (``shared_aln``): cond (B, D) -> (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.out_features // 6)


class AdaLNSelfAttn(nn.Module):
    """Transformer block whose LayerNorms are modulated by the class condition."""

    def __init__(self, embed_dim: int, cond_dim: int, num_heads: int, mlp_ratio: float, drop_path: float,
                 norm_eps: float, shared_aln: bool, cos_attn: bool, attn_impl: str, ffn_impl: str = "plain",
                 adaln_impl: str = "plain", defer_residual: bool = False):
        super().__init__()
        if adaln_impl not in ADALN_IMPLS:
            raise ValueError(f"adaln_impl={adaln_impl!r}: expected one of {', '.join(ADALN_IMPLS)}")
        self.C, self.adaln_impl = embed_dim, adaln_impl
        # The second residual add left to the next block, where it fuses with that block's first LayerNorm
        # (compiled blocks, adaln_impl=fused): the stream is then written and read once less per block.
        self.defer_residual = defer_residual
        self.attn = SelfAttention(embed_dim, num_heads, cos_attn=cos_attn, attn_impl=attn_impl)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio), ffn_impl)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.shared_aln = shared_aln
        self.grad_checkpointing = False  # recompute this block in backward instead of storing activations
        if shared_aln:
            # Per-block offset on top of the shared modulation.
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias, branch: Branch | None = None):
        """The stream after this block; with ``defer_residual``, (x1, (f, g)): the stream before the second
        residual add and that add's branch, which the caller hands to the next block as ``branch`` (the
        stream's input is then x + f * g) or adds itself after the last (``complete``)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cond_BD, attn_bias, branch, use_reentrant=False)
        return self._forward(x, cond_BD, attn_bias, branch)

    def _forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias, branch: Branch | None = None):
        if self.shared_aln:  # cond_BD is already the shared (B, 1, 6, C) modulation
            mods = (self.ada_gss + cond_BD).unbind(2)
        else:
            mods = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods
        if (self.adaln_impl == "fused" and torch.is_grad_enabled() and fused_adaln is not None
                and fused_adaln.supports(x)):
            x, f = self._fused_forward(x, branch, attn_bias, gamma1, scale1, scale2, shift1, shift2)
        else:
            x = complete(x, branch)
            h = self.ln_wo_grad(x) * (1 + scale1) + shift1
            x = x + self.drop_path(self.attn(h, attn_bias) * gamma1)
            h = self.ln_wo_grad(x) * (1 + scale2) + shift2
            f = self.ffn(h)
        if self.defer_residual:  # drop path scales whole samples: on the gain, as on the branch times it
            # contiguous: the gain is a view into the modulation where a block has no drop path, and the next
            # block's compiled graph would specialise on that layout
            return x, (f, self.drop_path(gamma2).contiguous())
        return x + self.drop_path(f * gamma2)

    def _fused_forward(self, x, branch, attn_bias, gamma1, scale1, scale2, shift1, shift2):
        """(x1, ffn branch) with the LayerNorms, modulation and the residual adds before them as Triton kernels
        (training): the first residual add, and the previous block's deferred one. Drop path scales whole
        samples, so it applies to gamma1 as well as to the branch times gamma1."""
        dtype, eps = compute_dtype(x), self.ln_wo_grad.eps
        if branch is None:
            h = fused_adaln.adaln(x, scale1, shift1, eps, dtype)
        else:
            x, h = fused_adaln.residual_adaln(x, *branch, scale1, shift1, eps, dtype)
        x, h = fused_adaln.residual_adaln(x, self.attn(h, attn_bias), self.drop_path(gamma1), scale2, shift2, eps,
                                          dtype)
        return x, self.ffn(h)


def complete(x: torch.Tensor, branch: Branch | None) -> torch.Tensor:
    """The stream with a deferred residual branch (f, g) added: x + f * g."""
    if branch is None:
        return x
    f, g = branch
    return x + f * g


class AdaLNBeforeHead(nn.Module):
    def __init__(self, embed_dim: int, cond_dim: int, norm_eps: float):
        super().__init__()
        self.C = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x) * (1 + scale) + shift

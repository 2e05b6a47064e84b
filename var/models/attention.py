"""Self-attention of the VAR transformer, and the block-causal mask over scales.

VAR predicts a whole scale (a pn x pn token map) at once, so attention is *block*-causal: a token sees every
token of its own scale and of all earlier scales, and none of the later ones. Teacher-forced training runs
all scales in one pass with that mask; sampling feeds one scale at a time and attends to a KV cache of the
earlier scales, which needs no mask at all (everything cached is visible, and so is the own scale).

The attention kernel itself is one function looked up by name in ``ATTENTION_IMPLS``; faster paths
(FlexAttention with a block mask, flash-attn for cached inference) slot in there without touching the
module. State-dict names (``mat_qkv``, ``q_bias``, ``v_bias``, ``zero_k_bias``, ``scale_mul_1H11``,
``proj``) are those of the official release so its checkpoints load strictly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def scale_ids(patch_nums: Sequence[int]) -> torch.Tensor:
    """(L,) int64: the scale index of every token of the flattened pyramid."""
    return torch.cat([torch.full((pn * pn,), si, dtype=torch.long) for si, pn in enumerate(patch_nums)])


def block_causal_bias(patch_nums: Sequence[int]) -> torch.Tensor:
    """(1, 1, L, L) additive mask: 0 where scale(query) >= scale(key), -inf elsewhere."""
    s = scale_ids(patch_nums)
    allowed = s.view(-1, 1) >= s.view(1, -1)
    return torch.where(allowed, 0.0, -torch.inf).view(1, 1, len(s), len(s))


def sdpa_attention(q, k, v, scale: float, attn_bias: torch.Tensor | None) -> torch.Tensor:
    """Reference path: torch SDPA with the dense additive mask. q, k, v: (B, H, L, c)."""
    if attn_bias is not None:
        attn_bias = attn_bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)


def math_attention(q, k, v, scale: float, attn_bias: torch.Tensor | None) -> torch.Tensor:
    """Explicit softmax(QK^T)V; slow, but every op is visible (debugging, FLOP counting)."""
    att = (q * scale) @ k.transpose(-2, -1)
    if attn_bias is not None:
        att = att + attn_bias.to(att.dtype)
    return att.softmax(dim=-1) @ v


# name -> fn(q, k, v, scale, attn_bias) with q, k, v of shape (B, H, L, c); returns (B, H, L, c).
ATTENTION_IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": sdpa_attention,
    "math": math_attention,
}


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional cosine (L2-normalised) attention and a KV cache.

    The fused qkv projection has no bias of its own: q and v get learnable biases and k a fixed zero one,
    as in the official model (a k bias only shifts every logit of a query by the same amount).
    """

    def __init__(self, embed_dim: int, num_heads: int, cos_attn: bool = True, attn_impl: str = "sdpa"):
        super().__init__()
        assert embed_dim % num_heads == 0, "embed_dim must be a multiple of num_heads"
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.cos_attn = cos_attn
        if cos_attn:
            # Per-head temperature on unit-norm q, k: starts at 4, capped at 100 (keeps fp16 logits bounded).
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.set_attn_impl(attn_impl)
        self.caching, self.cached_k, self.cached_v = False, None, None

    def set_attn_impl(self, name: str) -> None:
        if name not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attn_impl {name!r}; choose from {sorted(ATTENTION_IMPLS)}")
        self.attn_impl = name

    def kv_caching(self, enable: bool) -> None:
        """Switch the cache on or off; either way it starts empty."""
        self.caching, self.cached_k, self.cached_v = enable, None, None

    @property
    def cached_len(self) -> int:
        return 0 if self.cached_k is None else self.cached_k.shape[2]

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, c)
        if self.cos_attn:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            # normalize runs in fp32 under autocast; bring q, k back to v's dtype for the kernel.
            q = F.normalize(q, dim=-1).mul(scale_mul).to(v.dtype)
            k = F.normalize(k, dim=-1).to(v.dtype)
        if self.caching:
            if self.cached_k is not None:
                k = torch.cat((self.cached_k, k), dim=2)
                v = torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        out = ATTENTION_IMPLS[self.attn_impl](q, k, v, self.scale, attn_bias)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, cos_attn={self.cos_attn}, attn_impl={self.attn_impl}"

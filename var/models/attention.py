"""Self-attention of the VAR transformer, and the block-causal mask over scales.

VAR predicts a whole scale (a pn x pn token map) at once, so attention is *block*-causal: a token sees every
token of its own scale and of all earlier scales, and none of the later ones. Teacher-forced training runs
all scales in one pass with that mask; sampling feeds one scale at a time and attends to a KV cache of the
earlier scales, which needs no mask at all (everything cached is visible, and so is the own scale).

The attention kernel itself is one function looked up by name in ``ATTENTION_IMPLS``:

- ``sdpa``: torch SDPA with the dense additive mask (the reference; what the official code runs).
- ``flex``: FlexAttention with a ``BlockMask`` built from the scale ids. 128x128 tiles whose keys all lie
  in later scales are skipped (8 of 36 at 680 tokens; the allowed pairs are 62% of L^2) and fully
  visible tiles (19) run without evaluating the mask; dq, dk and dv come out whole (no partial sums).
  Without a mask (cached sampling) it falls through to SDPA, which then picks a flash kernel.
- ``scalewise``: one unmasked SDPA call per scale: the queries of scale k against the keys of scales 0..k.
  Exactly the block-causal attention, computed over the allowed pairs only and by the flash kernels,
  which take no mask. The small leading scales (``SCALEWISE_MERGE_TOKENS``) share one masked call.
- ``fused``: with ``cos_attn`` in teacher forcing on CUDA, the q/k normalisation, the block-causal attention
  and the qkv gradient as Triton kernels (fused_attention.py; ``speed=fast``): no normalised copies, partial
  key gradients or stacked gradient to assemble. Elsewhere (sampling's cached steps, the CPU, plain
  dot-product attention) it runs as ``scalewise``.
- ``math``: explicit softmax(QK^T)V, for debugging.

The mask argument is whatever ``attention_mask(impl, patch_nums, ...)`` built for that impl. State-dict names (``mat_qkv``, ``q_bias``, ``v_bias``, ``zero_k_bias``, ``scale_mul_1H11``,
``proj``) are those of the official release so its checkpoints load strictly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

try:  # Triton comes with torch's CUDA builds; without it ``fused`` runs as ``scalewise``
    from var.models import fused_attention
except ImportError:
    fused_attention = None


def scale_ids(patch_nums: Sequence[int]) -> torch.Tensor:
    """(L,) int64: the scale index of every token of the flattened pyramid."""
    return torch.cat([torch.full((pn * pn,), si, dtype=torch.long) for si, pn in enumerate(patch_nums)])


def block_causal_bias(patch_nums: Sequence[int]) -> torch.Tensor:
    """(1, 1, L, L) additive mask: 0 where scale(query) >= scale(key), -inf elsewhere."""
    s = scale_ids(patch_nums)
    allowed = s.view(-1, 1) >= s.view(1, -1)
    return torch.where(allowed, 0.0, -torch.inf).view(1, 1, len(s), len(s))


# FlexAttention's mask tiles and kernel options (None: torch's defaults). Measured on an H100 (d16, batch 64,
# forward + backward per block, bench/attention_speed.py): 128-token tiles with the default kernels 3.40 ms;
# 64-token tiles follow the pyramid's ragged edge closer and, with kernels picked by max-autotune, take
# 2.12 ms, but torch 2.11 finds no kernel for 64-token tiles without autotuning (with or without options).
FLEX_BLOCK_SIZE = 128
FLEX_KERNEL_OPTIONS: dict | None = None


def block_causal_block_mask(patch_nums: Sequence[int], length: int, device: torch.device,
                            block_size: int | None = None):
    """FlexAttention ``BlockMask`` of the first ``length`` tokens (same pattern as block_causal_bias), in tiles
    of ``block_size`` tokens (default FLEX_BLOCK_SIZE)."""
    from torch.nn.attention.flex_attention import create_block_mask

    ids = scale_ids(patch_nums)[:length].to(device)

    def visible(b, h, q_idx, kv_idx):
        return ids[q_idx] >= ids[kv_idx]

    return create_block_mask(visible, None, None, length, length, device=device,
                             BLOCK_SIZE=block_size or FLEX_BLOCK_SIZE)


# Scalewise attention merges the leading scales while they end within this many tokens into one masked call:
# their calls are tiny and launch-bound one by one, and each adds a partial key gradient to sum (0: one call
# per scale). 255 = scales 1..10x10 of the 256 px pyramid: d16 training step 179.2 -> 170.5 ms on an H100.
SCALEWISE_MERGE_TOKENS = 255


def attention_mask(impl: str, patch_nums: Sequence[int], bias: torch.Tensor, length: int,
                   merge_tokens: int | None = None):
    """The mask object ``impl`` expects for teacher forcing over the first ``length`` tokens.

    ``bias`` is the model's dense (1, 1, L, L) mask buffer; flex masks are built once per (length, device).
    merge_tokens: scalewise (and fused's fallback) only, default SCALEWISE_MERGE_TOKENS.
    """
    if impl in ("scalewise", "fused"):
        merge = SCALEWISE_MERGE_TOKENS if merge_tokens is None else merge_tokens
        groups = scale_groups(patch_nums, length, bias, merge)
        if impl == "scalewise":
            return groups
        key = ("fused", tuple(patch_nums), length, str(bias.device))
        if key not in _BLOCK_MASKS:
            _BLOCK_MASKS[key] = scale_bounds(patch_nums, length, bias.device)
        return FusedMask(_BLOCK_MASKS[key], groups)
    if impl != "flex":
        return bias[:, :, :length, :length]
    key = (tuple(patch_nums), length, str(bias.device), FLEX_BLOCK_SIZE)
    if key not in _BLOCK_MASKS:
        _BLOCK_MASKS[key] = block_causal_block_mask(patch_nums, length, bias.device)
    return _BLOCK_MASKS[key]


def scale_spans(patch_nums: Sequence[int], length: int) -> tuple[tuple[int, int], ...]:
    """(begin, end) token range of every scale within the first ``length`` tokens."""
    spans, begin = [], 0
    for pn in patch_nums:
        end = begin + pn * pn
        if end > length:
            break
        spans.append((begin, end))
        begin = end
    return tuple(spans)


def scale_bounds(patch_nums: Sequence[int], length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ends, begins), (length,) int32 each: where the scale of every one of the first ``length`` tokens ends
    and begins. A token sees exactly the keys before its scale's end (``fused`` attention's mask)."""
    ids = scale_ids(patch_nums)
    if length > len(ids):
        raise ValueError(f"{length} tokens but the pyramid {tuple(patch_nums)} has {len(ids)}")
    sizes = torch.tensor([pn * pn for pn in patch_nums])
    ends = sizes.cumsum(0)
    ids = ids[:length]
    return ends[ids].to(device, torch.int32), (ends - sizes)[ids].to(device, torch.int32)


def scale_groups(patch_nums: Sequence[int], length: int, bias: torch.Tensor, merge_tokens: int = 0
                 ) -> tuple[tuple[int, int, torch.Tensor | None], ...]:
    """(begin, end, mask) per call of scalewise attention: queries begin..end against keys 0..end.

    The leading scales that end within ``merge_tokens`` tokens form one call with the block-causal mask of
    their tokens (when that is more than one scale); every later scale is a call of its own with no mask.
    """
    spans = scale_spans(patch_nums, length)
    lead = [e for _, e in spans if e <= merge_tokens]
    if len(lead) < 2:
        return tuple((b, e, None) for b, e in spans)
    head = lead[-1]
    return ((0, head, bias[:, :, :head, :head]),) + tuple((b, e, None) for b, e in spans if b >= head)


def scalewise_attention(q, k, v, scale: float, groups) -> torch.Tensor:
    """Block-causal attention as one SDPA call per scale (see scale_groups): exactly the allowed pairs."""
    if groups is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, b:e], k[:, :, :e], v[:, :, :e], scale=scale,
                                                     attn_mask=None if m is None else m.to(q.dtype))
                      for b, e, m in groups], dim=2)


class FusedMask(NamedTuple):
    """What ``fused`` attention takes: the kernels' (ends, begins) token bounds, and the scalewise groups
    of its fallback."""

    bounds: tuple[torch.Tensor, torch.Tensor]
    groups: tuple


def fused_fallback_attention(q, k, v, scale: float, mask: FusedMask | None) -> torch.Tensor:
    """``fused`` where its kernels do not run (see SelfAttention.forward): scalewise attention."""
    return scalewise_attention(q, k, v, scale, None if mask is None else mask.groups)


_BLOCK_MASKS: dict = {}
_COMPILED_FLEX = None


def flex_attention(q, k, v, scale: float, block_mask) -> torch.Tensor:
    """FlexAttention with a block mask; plain SDPA when there is none (KV-cache steps see everything)."""
    if block_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        # Outside a compiled region flex must be compiled on its own: its eager fallback is dense and slow.
        global _COMPILED_FLEX
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex, dynamic=False)
        flex = _COMPILED_FLEX
    options = FLEX_KERNEL_OPTIONS if q.device.type == "cuda" else None
    return flex(q, k, v, block_mask=block_mask, scale=scale, kernel_options=options)


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
    "flex": flex_attention,
    "scalewise": scalewise_attention,
    "fused": fused_fallback_attention,
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
        self.static_k = self.static_v = None  # preallocated cache (rows, H, L, c): CUDA-graph sampling
        self.static_len = 0

    def set_attn_impl(self, name: str) -> None:
        if name not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attn_impl {name!r}; choose from {sorted(ATTENTION_IMPLS)}")
        self.attn_impl = name

    def kv_caching(self, enable: bool) -> None:
        """Switch the cache on or off; either way it starts empty."""
        self.caching, self.cached_k, self.cached_v = enable, None, None
        self.static_len = 0

    def use_static_cache(self, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        """Cache into fixed buffers (rows, H, L, c) instead of growing tensors: every scale then reads and
        writes the same addresses, which is what a captured CUDA graph needs. None switches back."""
        self.static_k, self.static_v, self.static_len = k, v, 0

    @property
    def cached_len(self) -> int:
        if self.static_k is not None:
            return self.static_len
        return 0 if self.cached_k is None else self.cached_k.shape[2]

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias)
        if (self.attn_impl == "fused" and self.cos_attn and attn_bias is not None and not self.caching
                and fused_attention is not None and fused_attention.supports(qkv, self.num_heads)):
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp().view(-1)
            return self.proj(fused_attention.fused_cos_attention(qkv, scale_mul, attn_bias.bounds, self.num_heads))
        qkv = qkv.view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, c)
        if self.cos_attn:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            # normalize runs in fp32 under autocast; bring q, k back to v's dtype for the kernel.
            q = F.normalize(q, dim=-1).mul(scale_mul).to(v.dtype)
            k = F.normalize(k, dim=-1).to(v.dtype)
        if self.caching and self.static_k is not None:
            begin, end = self.static_len, self.static_len + L
            self.static_k[:, :, begin:end] = k
            self.static_v[:, :, begin:end] = v
            k, v = self.static_k[:, :, :end], self.static_v[:, :, :end]
            self.static_len = end
        elif self.caching:
            if self.cached_k is not None:
                k = torch.cat((self.cached_k, k), dim=2)
                v = torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        out = ATTENTION_IMPLS[self.attn_impl](q, k, v, self.scale, attn_bias)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, cos_attn={self.cos_attn}, attn_impl={self.attn_impl}"

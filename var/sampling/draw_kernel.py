"""One scale's token draw as one Triton kernel: what ``sampler.draw_scale`` computes, one program per token.

The plain draw sorts each row of V logits to find the top-k and top-p thresholds (a radix sort of the
whole batch's logits, then the cumulative sum, the mask, the softmax and the inverse CDF: ~10 ms of a d16
batch of 64 on an H100, compiled). Neither threshold needs the order, only a value:

- top-k keeps the logits >= the k-th largest, which is the largest key T with count(key >= T) >= k;
- top-p keeps the logits >= the smallest one whose mass, together with all smaller kept ones, exceeds
  1 - top_p (``sampler.top_k_top_p_filter``), i.e. the first kept key above the largest T with
  mass(key <= T) <= 1 - top_p.

Both are found bit by bit, 32 halvings over the logits' order-preserving integer keys, each a count or a
sum over the row held in registers (the top-k search stops once exactly k keys lie at or above its threshold,
``TOPK_EARLY_STOP``). So the logits are read once, the guidance mix, the counter-stream
uniform and the draw happen in the same program, and nothing is sorted or written back but the token.
What may differ from the plain draw is the rounding of sums (a tree here, a sorted cumulative sum there)
and of exp, so a token can differ only where a threshold or the uniform falls within a few ulps of a
boundary (tests/test_draw_kernel.py compares the two).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from var.sampling.sampler import _GOLDEN, _MIX1, _MIX2

# The row must fit one program's registers: the official vocabulary is 4096.
MAX_VOCAB = 16384
# The top-k search stops once exactly k keys lie at or above its threshold: the same set, fewer passes over
# the row (all ten scales of a guided d16 batch of 64: 3.95 against 4.43 ms, H100; bench.draw_speed).
TOPK_EARLY_STOP = True
# With top-k, the top-p search starts from the bits the top-k threshold and the top key share: fewer passes,
# the same threshold (all ten scales of a guided d16 batch of 64: 3.10 against 3.96 ms, H100; bench.draw_speed).
TOPP_FROM_TOPK = True


@triton.jit
def _draw_kernel(logits, keys, out, tokens_per_image, uncond_offset, begin, cond_w, uncond_w, temperature,
                 top_k, drop_mass, golden, mix1, mix2, V: tl.constexpr, BLOCK: tl.constexpr,
                 GUIDED: tl.constexpr, TEMPERED: tl.constexpr, USE_K: tl.constexpr, USE_P: tl.constexpr,
                 LIBDEVICE_EXP: tl.constexpr, EARLY_STOP: tl.constexpr, TOPP_FROM_TOPK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    inside = offs < V
    base = row.to(tl.int64) * V
    x = tl.load(logits + base + offs, mask=inside, other=float("-inf"))
    if GUIDED:  # (1 + t) * cond - t * uncond, rounded as the two products and the difference eagerly are
        u = tl.load(logits + uncond_offset + base + offs, mask=inside, other=0.0)
        x = cond_w * x - uncond_w * u
    if TEMPERED:
        x = tl.math.div_rn(x, temperature)
    # Order-preserving unsigned keys of the float bits: flip every bit of a negative, the sign bit of the rest.
    bits = x.to(tl.uint32, bitcast=True)
    key = bits ^ tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    key = tl.where(inside, key, tl.full([BLOCK], 0, tl.uint32))  # below every logit's key (0 is a NaN's)
    one = tl.full([], 1, tl.uint32)
    kept = inside
    if USE_K and EARLY_STOP:
        # Once exactly k keys lie at or above the threshold they are the set the full search keeps (with
        # ties at the k-th key the count never equals k, and all 32 bits are found).
        kth = tl.full([], 0, tl.uint32)
        kept_count = tl.full([], BLOCK, tl.int32)
        bit = tl.full([], 31, tl.int32)
        while (bit >= 0) & (kept_count != top_k):
            cand = kth | (one << bit.to(tl.uint32))
            count = tl.sum((key >= cand).to(tl.int32), 0)
            kth = tl.where(count >= top_k, cand, kth)
            kept_count = tl.where(count >= top_k, count, kept_count)
            bit -= 1
        kept = key >= kth
    elif USE_K:
        kth = tl.full([], 0, tl.uint32)
        for i in tl.static_range(32):
            cand = kth | (one << (31 - i))
            count = tl.sum((key >= cand).to(tl.int32), 0)
            kth = tl.where(count >= top_k, cand, kth)
        kept = key >= kth
    top = tl.max(tl.where(kept, x, float("-inf")), 0)
    if LIBDEVICE_EXP:  # expf, as the eager softmax (tl.exp is an approximation); the CPU interpreter has none
        e = tl.where(kept, libdevice.exp(x - top), 0.0)
    else:
        e = tl.where(kept, tl.exp(x - top), 0.0)
    if USE_P:
        p = tl.math.div_rn(e, tl.sum(e, 0))
        top_key = tl.max(key, 0)
        if USE_K and TOPP_FROM_TOPK:
            # The threshold lies between kth - 1 (no mass at or below it) and the top key (all of it), so the
            # bits above the highest one where those two differ are its bits too: only the rest are searched.
            lo = tl.maximum(kth, one) - one
            diff = lo ^ top_key
            width = tl.full([], 0, tl.int32)  # bit length of diff, by halving
            for s in tl.static_range(5):
                shift = 16 >> s
                high = (diff >> shift) != 0
                width += tl.where(high, shift, 0)
                diff = tl.where(high, diff >> shift, diff)
            width += (diff != 0).to(tl.int32)
            shift_lo = tl.minimum(width, 31).to(tl.uint32)
            below = tl.where(width >= 32, tl.full([], 0, tl.uint32), (lo >> shift_lo) << shift_lo)
            bit = width - 1
            while bit >= 0:
                cand = below | (one << bit.to(tl.uint32))
                mass = tl.sum(tl.where(key <= cand, p, 0.0), 0)
                below = tl.where(mass <= drop_mass, cand, below)
                bit -= 1
        else:
            below = tl.full([], 0, tl.uint32)  # the largest key whose mass with all below it is <= drop_mass
            for i in tl.static_range(32):
                cand = below | (one << (31 - i))
                mass = tl.sum(tl.where(key <= cand, p, 0.0), 0)
                below = tl.where(mass <= drop_mass, cand, below)
        first = tl.min(tl.where(key > below, key, tl.full([BLOCK], 0xFFFFFFFF, tl.uint32)), 0)
        first = tl.minimum(first, top_key)  # the most likely token always stays
        e = tl.where(key >= first, e, 0.0)
    probs = tl.math.div_rn(e, tl.sum(e, 0))  # IEEE division, as eagerly (Triton's / may round otherwise)
    cdf = tl.cumsum(probs, 0)
    # The image's counter stream (sampler.token_uniforms): SplitMix64 of its key plus the token's number.
    image = row // tokens_per_image
    n = (begin + row % tokens_per_image + 1).to(tl.uint64)
    z = tl.load(keys + image).to(tl.uint64, bitcast=True) + n * golden
    z = (z ^ (z >> 30)) * mix1
    z = (z ^ (z >> 27)) * mix2
    z = z ^ (z >> 31)
    uniform = (z >> 40).to(tl.float32) * (1.0 / 16777216.0)
    target = uniform * tl.max(cdf, 0)  # cdf's last entry: it never falls
    index = tl.sum((cdf <= target).to(tl.int32), 0)  # searchsorted(cdf, target, right=True)
    tl.store(out + row, tl.minimum(index, V - 1).to(tl.int64))


def _unsigned(x: int) -> int:
    return x % (1 << 64)


def supports(logits: torch.Tensor) -> bool:
    """Whether ``kernel_draw`` takes these logits: fp32, contiguous, a vocabulary that fits a program."""
    return logits.dtype == torch.float32 and logits.is_contiguous() and logits.shape[-1] <= MAX_VOCAB


def kernel_draw(logits: torch.Tensor, keys: torch.Tensor, begin: int, t: float | None, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 0.0, num_warps: int | None = None,
                early_stop: bool | None = None, topp_from_topk: bool | None = None) -> torch.Tensor:
    """``sampler.draw_scale``'s arguments and result (token indices (B, l)), drawn by ``_draw_kernel``.
    num_warps: per program (default: 8 for vocabularies above 2048, else 4); early_stop, topp_from_topk: the
    searches' shortcuts (default ``TOPK_EARLY_STOP``, ``TOPP_FROM_TOPK``)."""
    if not supports(logits):
        raise ValueError(f"kernel_draw needs contiguous fp32 logits of at most {MAX_VOCAB} entries per row, "
                         f"got {logits.dtype} {tuple(logits.shape)}")
    rows, tokens, V = logits.shape
    B = rows // 2 if t is not None else rows
    out = torch.empty(B, tokens, dtype=torch.long, device=logits.device)
    if out.numel() == 0:
        return out
    f32 = lambda v: float(np.float32(v))  # noqa: E731  (rounded as a tensor-scalar product rounds them)
    _draw_kernel[(B * tokens,)](
        logits, keys, out, tokens, B * tokens * V, begin,
        f32(1 + t) if t is not None else 1.0, f32(t) if t is not None else 0.0, f32(temperature),
        top_k, f32(1 - top_p), _unsigned(_GOLDEN), _unsigned(_MIX1), _unsigned(_MIX2),
        V=V, BLOCK=triton.next_power_of_2(V), GUIDED=t is not None, TEMPERED=temperature != 1.0,
        USE_K=0 < top_k < V, USE_P=0 < top_p < 1, LIBDEVICE_EXP=logits.is_cuda,
        EARLY_STOP=TOPK_EARLY_STOP if early_stop is None else early_stop,
        TOPP_FROM_TOPK=TOPP_FROM_TOPK if topp_from_topk is None else topp_from_topk,
        num_warps=num_warps or (8 if V > 2048 else 4), enable_fp_fusion=False)
    return out

"""A block's residual add, LayerNorm and AdaLN modulation as Triton kernels (``adaln_impl=fused``, CUDA, training).

A block computes  h1 = LN(x)(1 + s1) + t1,  x1 = x + a·g1,  h2 = LN(x1)(1 + s2) + t2  (s, t, g: one C-vector per
image from the class condition). Inductor runs the backward of this as ~12 kernels per block, re-reading the
same activations for each per-image gradient sum; a d16 step spends ~19 ms on it, about twice what its bytes
take (bench/results note 61). Here one forward kernel per LayerNorm (with the residual add before it, when
there is one) and one backward kernel: each program takes ``ROWS`` rows of one image, writes the input
gradients row by row (LayerNorm's backward, the residual's pass-through and the branch gradient a·g1 needs) and
keeps the image's sums for s, t and g in registers; torch adds the programs' partial sums.

It computes what the plain block computes: the residual sum rounded to the stream's dtype, then LayerNorm in
fp32 on it, the modulated output rounded once to the autocast dtype. tests/test_fused_adaln.py compares both
directions with the plain block in Triton's CPU interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from var.models.fused_attention import INTERPRETED  # Triton's CPU interpreter (tests)

ROWS = 16  # rows of one image per backward program


@triton.jit
def _adaln_fwd(x, o, gamma, scale, shift, x_out, h, stats, L, C, eps, RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < C
    at = row.to(tl.int64) * C + cols
    mod = (row // L).to(tl.int64) * C + cols  # the image's modulation
    xr = tl.load(x + at, mask=inside, other=0.0).to(tl.float32)
    if RESIDUAL:  # x + a * g, rounded to the stream's dtype as the plain block stores it
        a = tl.load(o + at, mask=inside, other=0.0).to(tl.float32)
        xr = (xr + a * tl.load(gamma + mod, mask=inside, other=0.0).to(tl.float32)).to(x_out.dtype.element_ty)
        tl.store(x_out + at, xr, mask=inside)
        xr = xr.to(tl.float32)
    mean = tl.sum(xr, axis=0) / C
    diff = tl.where(inside, xr - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / C + eps)
    s = tl.load(scale + mod, mask=inside, other=0.0).to(tl.float32)
    t = tl.load(shift + mod, mask=inside, other=0.0).to(tl.float32)
    tl.store(h + at, (diff * rstd * (1.0 + s) + t).to(h.dtype.element_ty), mask=inside)
    tl.store(stats + 2 * row, mean)
    tl.store(stats + 2 * row + 1, rstd)


@triton.jit
def _adaln_bwd(dh, dx_next, x, o, gamma, scale, stats, dx, do, partials, B, L, C, RESIDUAL: tl.constexpr,
               BLOCK: tl.constexpr, ROWS: tl.constexpr):
    chunk, b = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    inside = cols < C
    mod = b.to(tl.int64) * C + cols
    s1 = 1.0 + tl.load(scale + mod, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(gamma + mod, mask=inside, other=0.0).to(tl.float32)  # the scale's row when there is no residual
    d_scale = tl.zeros([BLOCK], tl.float32)
    d_shift = tl.zeros([BLOCK], tl.float32)
    d_gamma = tl.zeros([BLOCK], tl.float32)
    for i in range(ROWS):
        r = chunk * ROWS + i
        valid = r < L
        row = b.to(tl.int64) * L + r
        at = row * C + cols
        live = inside & valid
        dhr = tl.load(dh + at, mask=live, other=0.0).to(tl.float32)
        mean = tl.load(stats + 2 * row, mask=valid, other=0.0)
        rstd = tl.load(stats + 2 * row + 1, mask=valid, other=0.0)
        xhat = tl.where(live, (tl.load(x + at, mask=live, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
        d_scale += dhr * xhat
        d_shift += dhr
        gr = dhr * s1  # the gradient of LN's output
        dxr = (gr - tl.sum(gr, axis=0) / C - xhat * (tl.sum(gr * xhat, axis=0) / C)) * rstd
        if RESIDUAL:  # x1 also goes on down the stream: its gradient from there joins, and a = o gets dx1 * g
            dxr += tl.load(dx_next + at, mask=live, other=0.0).to(tl.float32)
            tl.store(do + at, (dxr * g).to(do.dtype.element_ty), mask=live)
            d_gamma += dxr * tl.load(o + at, mask=live, other=0.0).to(tl.float32)
        tl.store(dx + at, dxr.to(dx.dtype.element_ty), mask=live)
    part = (b.to(tl.int64) * tl.num_programs(0) + chunk) * C + cols
    per_kind = B * tl.num_programs(0) * C
    tl.store(partials + part, d_scale, mask=inside)
    tl.store(partials + per_kind + part, d_shift, mask=inside)
    if RESIDUAL:
        tl.store(partials + 2 * per_kind + part, d_gamma, mask=inside)


def _block(C: int) -> int:
    return triton.next_power_of_2(C)


@torch.library.custom_op("var::adaln", mutates_args=())
def _fwd_op(x: torch.Tensor, o: torch.Tensor | None, gamma: torch.Tensor | None, scale: torch.Tensor,
            shift: torch.Tensor, eps: float, out_dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, L, C), o (B, L, C) or None, gamma/scale/shift (B, C) -> (x + o*gamma or an empty tensor,
    the modulated LayerNorm in out_dtype, per-row mean and 1/std (B*L, 2) fp32)."""
    B, L, C = x.shape
    residual = o is not None
    x_out = torch.empty_like(x) if residual else x.new_empty(0)
    h = torch.empty(B, L, C, dtype=out_dtype, device=x.device)
    stats = torch.empty(B * L, 2, dtype=torch.float32, device=x.device)
    _adaln_fwd[(B * L,)](x, o if residual else x, gamma if residual else scale, scale, shift, x_out, h, stats, L, C,
                         eps, RESIDUAL=residual, BLOCK=_block(C), num_warps=4 if C <= 1024 else 8)
    return x_out, h, stats


@_fwd_op.register_fake
def _(x, o, gamma, scale, shift, eps, out_dtype):
    B, L, C = x.shape
    return (torch.empty_like(x) if o is not None else x.new_empty(0), x.new_empty(B, L, C, dtype=out_dtype),
            x.new_empty(B * L, 2, dtype=torch.float32))


@torch.library.custom_op("var::adaln_backward", mutates_args=())
def _bwd_op(dh: torch.Tensor, dx_next: torch.Tensor | None, x: torch.Tensor, o: torch.Tensor | None,
            gamma: torch.Tensor | None, scale: torch.Tensor, stats: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, do, dgamma, dscale, dshift); do and dgamma are empty without the residual. ``x`` is the
    normalised tensor (x + o*gamma with the residual)."""
    B, L, C = x.shape
    residual = o is not None
    chunks = triton.cdiv(L, ROWS)
    dh = dh.contiguous()
    dx_next = (torch.zeros_like(x) if dx_next is None else dx_next.contiguous()) if residual else dh
    dx = torch.empty_like(x)
    do = torch.empty_like(o) if residual else x.new_empty(0)
    partials = torch.empty(3 if residual else 2, B, chunks, C, dtype=torch.float32, device=x.device)
    _adaln_bwd[(chunks, B)](dh, dx_next, x, o if residual else x, gamma if residual else scale, scale, stats, dx,
                            do if residual else dx, partials, B, L, C, RESIDUAL=residual, BLOCK=_block(C), ROWS=ROWS,
                            num_warps=4 if C <= 1024 else 8)
    sums = partials.sum(2)  # (kinds, B, C); outputs must not be views of one another
    d_gamma = sums[2].to(gamma.dtype, copy=True) if residual else x.new_empty(0)
    return dx, do, d_gamma, sums[0].to(scale.dtype, copy=True), sums[1].to(scale.dtype, copy=True)


@_bwd_op.register_fake
def _(dh, dx_next, x, o, gamma, scale, stats):
    residual = o is not None
    return (torch.empty_like(x), torch.empty_like(o) if residual else x.new_empty(0),
            torch.empty_like(gamma) if residual else x.new_empty(0), torch.empty_like(scale), torch.empty_like(scale))


def _setup(ctx, inputs, output):
    x, o, gamma, scale, _, _, _ = inputs
    x_out, _, stats = output
    ctx.residual = o is not None
    ctx.save_for_backward(x_out if ctx.residual else x, o, gamma, scale, stats)


def _backward(ctx, d_x_out, dh, _d_stats):
    x, o, gamma, scale, stats = ctx.saved_tensors
    dx, do, d_gamma, d_scale, d_shift = _bwd_op(dh, d_x_out if ctx.residual else None, x, o, gamma, scale, stats)
    if not ctx.residual:
        return dx, None, None, d_scale, d_shift, None, None
    return dx, do, d_gamma, d_scale, d_shift, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def supports(x: torch.Tensor) -> bool:
    """CUDA (or the interpreter), a float (B, L, C) stream."""
    return (x.is_cuda or INTERPRETED) and x.ndim == 3 and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], v.shape[-1]).contiguous()  # (B, 1, C) modulation -> (B, C)


def adaln(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """LN(x) * (1 + scale) + shift in out_dtype; scale and shift (B, 1, C)."""
    _, h, _ = _fwd_op(x.contiguous(), None, None, _per_image(scale), _per_image(shift), eps, out_dtype)
    return h


def residual_adaln(x: torch.Tensor, a: torch.Tensor, gamma: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                   eps: float, out_dtype: torch.dtype):
    """(x1, h) with x1 = x + a * gamma in x's dtype and h = LN(x1) * (1 + scale) + shift in out_dtype."""
    x1, h, _ = _fwd_op(x.contiguous(), a.contiguous(), _per_image(gamma), _per_image(scale), _per_image(shift), eps,
                       out_dtype)
    return x1, h

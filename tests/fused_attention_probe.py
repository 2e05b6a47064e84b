"""Run by tests/test_fused_attention.py in a process of its own with TRITON_INTERPRET=1 (Triton's CPU
interpreter must be chosen before Triton is imported): runs ``fused`` attention's kernels forward and
backward against the plain path (F.normalize, the dense block-causal mask, softmax in float64) and prints
one JSON line per case with the largest errors; then a tiny VAR with ``attn_impl=fused`` against the same
model with ``scalewise``, eagerly and with compiled blocks (``compiled`` in argv)."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from tests.test_transformer_model import inputs, tiny
from var.models import fused_attention
from var.models.attention import block_causal_bias, scale_bounds

PN6 = (1, 2, 3, 4, 5, 6)  # 91 tokens: several 16-token tiles, scales that straddle them


def plain(qkv, temperature, patch_nums, heads: int):
    """What SelfAttention computes with cos_attn, in qkv's dtype: (B, L, C)."""
    B, L, C3 = qkv.shape
    q, k, v = qkv.view(B, L, 3, heads, C3 // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)
    q = F.normalize(q.float(), dim=-1).mul(temperature.view(1, heads, 1, 1)).to(v.dtype)
    k = F.normalize(k.float(), dim=-1).to(v.dtype)
    att = (q @ k.transpose(-1, -2)).float() + block_causal_bias(patch_nums)[:, :, :L, :L].to(q.device)
    out = att.softmax(-1).to(v.dtype) @ v
    return out.transpose(1, 2).reshape(B, L, C3 // 3)


def errors(fn, qkv, temperature, grad):
    """fn's output and gradients against the float64 plain path: largest error over the largest value."""
    qkv = qkv.detach().requires_grad_()
    temperature = temperature.detach().requires_grad_()
    out = fn(qkv, temperature)
    got = (out, *torch.autograd.grad(out, (qkv, temperature), grad.to(out.dtype)))
    q64 = qkv.detach().double().requires_grad_()
    t64 = temperature.detach().double().requires_grad_()
    ref_out = fn_ref(q64, t64)
    ref = (ref_out, *torch.autograd.grad(ref_out, (q64, t64), grad.double()))
    return [float((g.detach().double() - r.detach()).abs().max() / r.detach().abs().max()) for g, r in zip(got, ref)]


def op_case(name: str, dtype, tiles, length: int, temperatures=(4.0, 9.5), head_dim: int = 16,
            zero_rows: bool = False, save_qk: bool = True, normalise_first: bool = False):
    """``tiles``: one size for every kernel, or (queries, keys) per kernel as fused_attention.TILES."""
    global fn_ref
    fused_attention.TILES = {kernel: (*(tiles.get(kernel) if isinstance(tiles, dict) else (tiles, tiles)), 4, 1)
                             for kernel in ("fwd", "dkdv", "dq")}
    fused_attention.SAVE_QK = save_qk
    fused_attention.NORMALISE_FIRST = normalise_first
    fused_attention.NORMALISE_TILE = (tiles if isinstance(tiles, int) else 16, 4)
    heads = len(temperatures)
    g = torch.Generator().manual_seed(0)
    qkv = 2 * torch.randn(2, length, 3 * heads * head_dim, generator=g)
    if zero_rows:  # a q and a k of norm 0: F.normalize's eps branch, forward and backward
        qkv[0, 7, : heads * head_dim] = 0
        qkv[1, 3, heads * head_dim: 2 * heads * head_dim] = 0
    qkv = qkv.to(dtype)
    temperature = torch.tensor(temperatures)
    grad = torch.randn(2, length, heads * head_dim, generator=g)
    bounds = scale_bounds(PN6, length, "cpu")

    def fused(x, t):
        return fused_attention.fused_cos_attention(x, t, bounds, heads)

    def ref(x, t):
        return plain(x, t, PN6, heads)

    fn_ref = ref
    line = {"case": name, "fused": errors(fused, qkv, temperature, grad)}
    line["plain"] = errors(ref, qkv, temperature, grad)  # the plain path's own rounding in this dtype
    print(json.dumps(line), flush=True)


def normalise_first_case(name: str, dtype):
    """The output and both gradients with q and k normalised first against normalised in the forward's loop:
    the largest difference (the same rounded q and k go into the same arithmetic)."""
    fused_attention.TILES = {kernel: (16, 16, 4, 1) for kernel in ("fwd", "dkdv", "dq")}
    fused_attention.SAVE_QK = True
    g = torch.Generator().manual_seed(0)
    qkv, grad = (2 * torch.randn(2, 91, 96, generator=g)).to(dtype), torch.randn(2, 91, 32, generator=g)
    bounds, results = scale_bounds(PN6, 91, "cpu"), []
    for first in (False, True):
        fused_attention.NORMALISE_FIRST = first
        x, t = qkv.clone().requires_grad_(), torch.tensor([4.0, 9.5], requires_grad=True)
        out = fused_attention.fused_cos_attention(x, t, bounds, 2)
        results.append((out, *torch.autograd.grad(out, (x, t), grad.to(out.dtype))))
    fused_attention.NORMALISE_FIRST = False
    print(json.dumps({"case": name, "max_diff": max(float((a.float() - b.float()).abs().max())
                                                    for a, b in zip(*results))}), flush=True)


def model_case(name: str, compiled: bool, prog_si: int = -1, normalise_first: bool = False):
    """A float32 tiny VAR, teacher forcing: loss and every gradient, fused against scalewise."""
    fused_attention.NORMALISE_FIRST = normalise_first
    results = {}
    for impl in ("scalewise", "fused"):
        m = tiny(patch_nums=(1, 2, 3, 4)).float().train()
        m.set_attn_impl(impl)
        if compiled:
            m.compile_blocks(backend="inductor")
        labels, x = inputs(m)
        logits = m(labels, x.float(), prog_si=prog_si)
        target = torch.randint(0, m.V, logits.shape[:2], generator=torch.Generator().manual_seed(3))
        loss = F.cross_entropy(logits.transpose(1, 2), target)
        loss.backward()
        results[impl] = (loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    (ref_loss, ref_grads), (loss, grads) = results["scalewise"], results["fused"]
    worst = max(float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in ref_grads.items())
    print(json.dumps({"case": name, "loss_diff": float((loss - ref_loss).abs()), "grad_rel": worst,
                      "same_params": sorted(grads) == sorted(ref_grads)}), flush=True)


if __name__ == "__main__":
    op_case("fp32_tiles16", torch.float32, 16, 91, zero_rows=True)
    op_case("fp32_prefix55", torch.float32, 16, 55)  # progressive training: the first 5 scales
    # Unequal tiles (whole and cut tiles fall elsewhere in each kernel), normalising again in the backward.
    op_case("fp32_mixed_tiles_renormalised", torch.float32, {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)},
            91, zero_rows=True, save_qk=False)
    op_case("fp32_one_tile", torch.float32, 64, 91, temperatures=(1.0,), head_dim=32)
    op_case("bf16_tiles16", torch.bfloat16, 16, 91, temperatures=(9.5, 20.0))  # sharp softmax: rounding shows
    # q and k normalised by a kernel of their own first: the forward reads the unit key tiles.
    op_case("fp32_normalised_first", torch.float32, {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}, 91,
            zero_rows=True, normalise_first=True)
    op_case("bf16_normalised_first", torch.bfloat16, 16, 91, temperatures=(9.5, 20.0), normalise_first=True)
    normalise_first_case("fp32_normalised_first_same", torch.float32)
    normalise_first_case("bf16_normalised_first_same", torch.bfloat16)
    model_case("model_eager", compiled=False)
    model_case("model_eager_prefix", compiled=False, prog_si=2)
    model_case("model_eager_normalised_first", compiled=False, normalise_first=True)
    if "compiled" in sys.argv:
        model_case("model_compiled", compiled=True)
        model_case("model_compiled_normalised_first", compiled=True, normalise_first=True)

"""Run by tests/test_fused_adaln.py in a process of its own with TRITON_INTERPRET=1 (chosen before Triton is
imported): the fused AdaLN kernels forward and backward against the plain block's arithmetic in float64, one
JSON line per case with the largest error over the largest value of each output and gradient; then a tiny VAR
with ``adaln_impl=fused`` against the plain one, eagerly or with compiled blocks (``compiled`` in argv)."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from var.models import fused_adaln


def plain(x, a, gamma, scale, shift, eps, out_dtype):
    """The block's arithmetic: x1 = x + a * gamma in x's dtype, h = LN(x1) * (1 + scale) + shift in out_dtype."""
    x1 = x if a is None else (x.double() + a.double() * gamma.double()).to(x.dtype)
    h = F.layer_norm(x1.double(), x1.shape[-1:], eps=eps) * (1 + scale.double()) + shift.double()
    return x1, h.to(out_dtype)


def case(name, B, L, C, dtype, residual, out_dtype):
    g = torch.Generator().manual_seed(0)
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    x, a = make(B, L, C, scale=3.0) + 1.0, make(B, L, C)
    gamma, scale, shift = make(B, 1, C, scale=0.5), make(B, 1, C, scale=0.5), make(B, 1, C, scale=0.5)
    dx1, dh = make(B, L, C), make(B, L, C)
    inputs = [x, a, gamma, scale, shift] if residual else [x, scale, shift]
    results = {}
    for impl in ("fused", "plain64"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        if impl == "plain64":
            leaves = [t.detach().double().requires_grad_() for t in inputs]
        if residual:
            xx, aa, gg, ss, tt = leaves
            if impl == "fused":
                x1, h = fused_adaln.residual_adaln(xx, aa, gg, ss, tt, 1e-6, out_dtype)
            else:
                x1, h = plain(xx, aa, gg, ss, tt, 1e-6, torch.float64)
            outs, grads_in = (x1, h), (dx1, dh)
        else:
            xx, ss, tt = leaves
            if impl == "fused":
                h = fused_adaln.adaln(xx, ss, tt, 1e-6, out_dtype)
            else:
                h = plain(xx, None, None, ss, tt, 1e-6, torch.float64)[1]
            outs, grads_in = (h,), (dh,)
        grads = torch.autograd.grad(outs, leaves, [gi.to(o.dtype) for gi, o in zip(grads_in, outs)])
        results[impl] = [o.detach().double() for o in outs] + [gr.double() for gr in grads]
    errs = [((f - p).abs().max() / p.abs().max().clamp_min(1e-30)).item()
            for f, p in zip(results["fused"], results["plain64"])]
    print(json.dumps({"case": name, "errors": errs}), flush=True)


def model_case(compiled: bool = False, defer: bool = False):
    """A tiny VAR (fp32) with the fused AdaLN against the plain one: loss and parameter gradients; ``compiled``:
    its blocks through torch.compile (the kernels as torch.library ops in Inductor's graphs); ``defer``: each
    block's second residual add in the next block's first kernel (``defer_residual``)."""
    from tests.test_fast_paths import PN4, _loss_and_grads
    from tests.test_transformer_model import inputs, tiny

    plain_m, fused_m = tiny(patch_nums=PN4).float(), tiny(patch_nums=PN4, adaln_impl="fused", defer_residual=defer).float()
    fused_m.load_state_dict(plain_m.state_dict())
    if compiled:
        fused_m.compile_blocks()
    labels, x = inputs(plain_m)
    x = x.float()
    target = torch.randint(0, plain_m.V, (3, plain_m.L), generator=torch.Generator().manual_seed(2))
    (la, ga), (lb, gb) = (_loss_and_grads(m, labels, x, target, fused=True) for m in (fused_m, plain_m))
    rel = max(((ga[k] - gb[k]).norm() / gb[k].norm().clamp_min(1e-12)).item() for k in gb)
    name = ("model_compiled" if compiled else "model") + ("_deferred" if defer else "")
    print(json.dumps({"case": name, "loss_diff": (la - lb).abs().item(),
                      "grad_rel": rel,
                      "same_params": ga.keys() == gb.keys()}), flush=True)


if __name__ == "__main__":
    if "compiled" in sys.argv:
        model_case(compiled=True)
        model_case(compiled=True, defer=True)
        sys.exit()
    fused_adaln.ROWS = 4  # several programs per image, the last one ragged
    case("fp32_residual", 2, 11, 40, torch.float32, True, torch.float32)
    case("fp32_plain", 2, 11, 40, torch.float32, False, torch.float32)
    case("fp32_residual_pow2", 3, 8, 64, torch.float32, True, torch.float32)
    case("bf16_residual", 2, 11, 40, torch.bfloat16, True, torch.bfloat16)
    case("fp32_stream_bf16_out", 2, 9, 48, torch.float32, True, torch.bfloat16)
    model_case()
    model_case(defer=True)

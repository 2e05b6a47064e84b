"""The block's feed-forward half, forward + backward, per ``ffn_impl``, and the epilogue GEMMs on their own.

    python -m bench.ffn_speed --depths 16 20 --batch 64 --out f.jsonl

``half``: what a block runs around its FFN, compiled as the blocks are, bf16 residual stream, under bf16
autocast: x + gamma * ffn(LN(x) * (1 + scale) + shift), forward and backward (parameter gradients included),
for ``plain`` (autocast's fc1, GELU, fc2) and ``fused`` (var/models/fused_ffn.py). ``gemms``: each cuBLASLt
epilogue GEMM against the torch ops it replaces (fc1 + GELU; fc2's input gradient + GELU's derivative + the
bias-gradient sum), with the largest difference from torch's result. Never run in CI.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import emit, environment, time_backward_under_autocast, time_calls
from var.models import cublaslt
from var.models import fused_ffn as fused_ffn_module
from var.models.fused_ffn import fused_ffn
from var.models.zoo import VARConfig

TOKENS = 680  # the official 256 px pyramid


def half(depth: int, batch: int, impl: str, reps: int) -> dict:
    fused_ffn_module.BACKWARD_WAY = {"fused": None, "fused_plain_backward": "torch",
                                     "fused_epilogue_bias": "epilogue_bias", "fused_epilogue": "epilogue"}.get(impl)
    cfg = VARConfig(depth=depth)
    C = cfg.width
    fc1, fc2 = torch.nn.Linear(C, 4 * C).cuda(), torch.nn.Linear(4 * C, C).cuda()
    gelu = torch.nn.GELU(approximate="tanh")
    x = torch.randn(batch, TOKENS, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mods = (torch.randn(batch, 1, 3, C, device="cuda") * 0.1).requires_grad_()

    @torch.compile(dynamic=False)
    def step(x, mods):
        gamma, scale, shift = mods.unbind(2)
        h = F.layer_norm(x, (C,), eps=1e-6) * (1 + scale) + shift
        y = fc2(gelu(fc1(h))) if impl == "plain" else fused_ffn(h, fc1, fc2)
        return x + (y * gamma).to(x.dtype)

    first_s, ms = time_backward_under_autocast(step, (x, mods), torch.randn_like(x), reps)
    flops = 6 * 2 * C * 4 * C * batch * TOKENS  # two GEMMs, forward and backward
    return {"bench": "ffn_half", "depth": depth, "batch": batch, "ffn_impl": impl,
            "backward_ways": fused_ffn_module.chosen_ways(), "ms": round(ms, 4),
            "ms_per_depth": round(ms * depth, 2), "gemm_tflops": round(flops / ms / 1e9, 1),
            "first_s": round(first_s, 1), "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def gemms(depth: int, batch: int, reps: int) -> list[dict]:
    C = VARConfig(depth=depth).width
    M, N = batch * TOKENS, 4 * C
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, w1, b1 = torch.randn(M, C, **bf), torch.randn(N, C, **bf) / C**0.5, torch.randn(N, **bf) * 0.1
    g, w2 = torch.randn(M, C, **bf), torch.randn(C, N, **bf) / N**0.5
    pre = torch.addmm(b1, x, w1.t())
    act_ref = F.gelu(pre, approximate="tanh")
    g_act = (g @ w2)
    g_pre_ref = torch.ops.aten.gelu_backward(g_act.float(), torch.addmm(b1.float(), x.float(), w1.float().t()),
                                             approximate="tanh")
    act, pre_lt = cublaslt.linear_gelu_aux(x, w1, b1)
    g_pre, g_b1 = cublaslt.matmul_dgelu(g, w2, pre)
    cases = {
        "fc1_gelu_torch": lambda: F.gelu(torch.addmm(b1, x, w1.t()), approximate="tanh"),
        "fc1_gelu_aux_cublaslt": lambda: cublaslt.linear_gelu_aux(x, w1, b1),
        "fc1_plain_gemm": lambda: torch.addmm(b1, x, w1.t()),
        "dgelu_torch": lambda: torch.ops.aten.gelu_backward(g @ w2, pre, approximate="tanh").sum(0),
        "dgelu_bgrad_cublaslt": lambda: cublaslt.matmul_dgelu(g, w2, pre),
        "dgelu_cublaslt_then_sum": lambda: cublaslt.matmul_dgelu(g, w2, pre, bias_grad=False)[0].sum(0),
        "dgrad_plain_gemm": lambda: g @ w2,
        "wgrad_plain_gemm": lambda: g_pre.t() @ x,
    }
    rows = []
    for name, fn in cases.items():
        _, ms, _ = time_calls(fn, reps)
        rows.append({"bench": "ffn_gemm", "depth": depth, "batch": batch, "case": name, "ms": round(ms, 4),
                     "tflops": round(2 * M * N * C / ms / 1e9, 1)})
    act_fp32 = F.gelu(torch.addmm(b1.float(), x.float(), w1.float().t()), approximate="tanh")
    rows[1]["max_err_act"] = (act.float() - act_fp32).abs().max().item()
    rows[1]["max_err_pre"] = (pre_lt.float() - pre.float()).abs().max().item()
    rows[4]["max_err_grad_pre"] = (g_pre.float() - g_pre_ref).abs().max().item()
    rows[4]["max_err_bias_grad"] = (g_b1.float() - g_pre_ref.sum(0)).abs().max().item()
    rows[4]["scale_grad_pre"] = g_pre_ref.abs().max().item()
    g_pre_torch = torch.ops.aten.gelu_backward(g_act, pre, approximate="tanh")  # autocast's, for comparison
    rows[3]["max_err_grad_pre"] = (g_pre_torch.float() - g_pre_ref).abs().max().item()
    rows[3]["max_err_bias_grad"] = (g_pre_torch.sum(0).float() - g_pre_ref.sum(0)).abs().max().item()
    rows[0]["max_err_act"] = (act_ref.float() - act_fp32).abs().max().item()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[16, 20])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--impls", nargs="+", default=["plain", "fused", "fused_epilogue_bias", "fused_epilogue",
                                                   "fused_plain_backward"],
                    help="fused: the backward way timed per shape; fused_<way>: that way (fused_ffn.BACKWARD_WAYS)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip-gemms", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    env = environment()
    for depth in a.depths:
        rows = [] if a.skip_gemms else gemms(depth, a.batch, a.reps)
        rows += [half(depth, a.batch, impl, a.reps) for impl in a.impls]
        for row in rows:
            row.update(env)
            emit(row, a.out)


if __name__ == "__main__":
    main()

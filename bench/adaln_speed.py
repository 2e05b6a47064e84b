"""A block's AdaLN work, forward + backward, per ``adaln_impl``: the two modulated LayerNorms and the residual adds,
with stand-ins (one multiply each) for the attention and feed-forward branches. ``_deferred``: the block as
``defer_residual`` runs it, adding the previous block's feed-forward branch first and handing its own on.

    python -m bench.adaln_speed --depths 16 20 --batch 64 --out n.jsonl

Both run compiled as the blocks are, under bf16 autocast, with the stream in bf16 (``--stream fp32`` for the
default stream), gradients of x and of the per-image modulation included. Never run in CI.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import emit, environment, time_backward_under_autocast
from var.models import fused_adaln
from var.models.zoo import VARConfig

TOKENS = 680  # the official 256 px pyramid


IMPLS = ("plain", "fused", "plain_deferred", "fused_deferred")


def measure(depth: int, batch: int, impl: str, stream: torch.dtype, reps: int) -> dict:
    C = VARConfig(depth=depth).width
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(batch, TOKENS, C, device="cuda", dtype=stream, requires_grad=True)
    f0 = torch.randn(batch, TOKENS, C, **bf16, requires_grad=True)  # the previous block's deferred branch
    mods = (torch.randn(batch, 1, 7, C, **bf16) * 0.1).requires_grad_()  # g1, g2, s1, s2, t1, t2, g0
    w = torch.randn(C, **bf16)  # the branches' stand-in: h * w
    deferred, fused = impl.endswith("_deferred"), impl.startswith("fused")

    @torch.compile(dynamic=False)
    def step(x, f0, mods):
        g1, g2, s1, s2, t1, t2, g0 = mods.unbind(2)
        if fused:
            if deferred:
                x, h = fused_adaln.residual_adaln(x, f0, g0, s1, t1, 1e-6, torch.bfloat16)
            else:
                h = fused_adaln.adaln(x, s1, t1, 1e-6, torch.bfloat16)
            x, h = fused_adaln.residual_adaln(x, h * w, g1, s2, t2, 1e-6, torch.bfloat16)
        else:
            x = x + f0 * g0 if deferred else x
            h = F.layer_norm(x, (C,), eps=1e-6) * (1 + s1) + t1
            x = x + (h.to(torch.bfloat16) * w) * g1
            h = (F.layer_norm(x, (C,), eps=1e-6) * (1 + s2) + t2).to(torch.bfloat16)
        return (x, h * w) if deferred else x + (h * w) * g2

    grad = (torch.randn_like(x), torch.randn_like(f0)) if deferred else torch.randn_like(x)
    first_s, ms = time_backward_under_autocast(step, (x, f0, mods), grad, reps)
    return {"bench": "adaln", "depth": depth, "batch": batch, "adaln_impl": impl, "stream": str(stream),
            "ms": round(ms, 4), "ms_per_depth": round(ms * depth, 2), "first_s": round(first_s, 1),
            "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[16, 20])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--stream", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    env = environment()
    stream = torch.bfloat16 if a.stream == "bf16" else torch.float32
    for depth in a.depths:
        for impl in a.impls:
            row = {**measure(depth, a.batch, impl, stream, a.reps), **env}
            emit(row, a.out)


if __name__ == "__main__":
    main()

"""The token draws of one guided sampling batch alone: ms for all ten scales, as the fast path draws them.

    python -m bench.draw_speed --batches 64 1 --draws kernel compiled eager --out d.jsonl

Random logits (2 × batch rows, pn² tokens, V 4096) per scale of the official 256 px pyramid; the draw
(guidance mix at the linear schedule's weight, top-k 900, top-p 0.96, softmax, inverse-CDF draw from the
counter streams) is ``draw_kernel.kernel_draw`` (kernel), ``fast.compiled_draw`` (compiled) or the eager
``draw_scale``. The logits are made before the timed span, so it holds the draws only; each record also
says how many tokens the draw gave differently from the eager one. Never run in CI. One JSON line each.
"""

from __future__ import annotations

import argparse
import functools

import torch

from bench.common import OFFICIAL, emit, environment, time_calls
from var.sampling.draw_kernel import kernel_draw
from var.sampling.fast import compiled_draw
from var.sampling.sampler import draw_scale, guidance_scale, stream_keys

SETTINGS = dict(cfg=1.5, cfg_schedule="linear", top_k=900, top_p=0.96)
# kernel_w4: the kernel with 4 warps per program instead of its default 8; kernel_early_stop and
# kernel_full_search: its top-k search with and without the early stop; kernel_topp_from_topk and
# kernel_full_topp_search: its top-p search from the top-k threshold's bits or over all 32 (kernel: the
# module's defaults).
DRAWS = {"kernel": kernel_draw, "kernel_w4": functools.partial(kernel_draw, num_warps=4),
         "kernel_early_stop": functools.partial(kernel_draw, early_stop=True),
         "kernel_full_search": functools.partial(kernel_draw, early_stop=False),
         "kernel_topp_from_topk": functools.partial(kernel_draw, topp_from_topk=True),
         "kernel_full_topp_search": functools.partial(kernel_draw, topp_from_topk=False),
         "compiled": compiled_draw, "eager": draw_scale}


def measure(batch: int, draw_name: str, reps: int) -> dict:
    pn = OFFICIAL["patch_nums"]
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = [4 * torch.randn(2 * batch, p * p, OFFICIAL["vocab_size"], device="cuda", generator=g) for p in pn]
    keys = stream_keys(range(batch), "cuda")
    begins = [sum(q * q for q in pn[:i]) for i in range(len(pn))]

    def draws(draw) -> list[torch.Tensor]:
        return [draw(lg, keys, b, guidance_scale(SETTINGS["cfg"], SETTINGS["cfg_schedule"], si, len(pn)), 1.0,
                     SETTINGS["top_k"], SETTINGS["top_p"]) for si, (lg, b) in enumerate(zip(logits, begins))]

    first_s, ms, tokens = time_calls(lambda: draws(DRAWS[draw_name]), reps)
    assert all(t.shape == (batch, p * p) for t, p in zip(tokens, pn))
    differ = sum(int((a != b).sum()) for a, b in zip(tokens, draws(draw_scale)))
    return {"bench": "draw", "batch": batch, "draw": draw_name, **SETTINGS, "ms_per_batch": round(ms, 3),
            "first_s": round(first_s, 1), "tokens": batch * sum(p * p for p in pn), "differ_from_eager": differ,
            **environment()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--draws", nargs="+", default=["kernel", "compiled"], choices=sorted(DRAWS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    for batch in a.batches:
        for draw_name in a.draws:
            rec = measure(batch, draw_name, a.reps)
            emit(rec, a.out)


if __name__ == "__main__":
    main()

"""The KV-cache attention of one guided sampling batch, per scale and SDPA backend, replayed as CUDA graphs.

    python -m bench.sample_attention --depths 16 30 --rows 128 --out a.jsonl

Each scale's queries (rows, H, pn², 64) attend to the static cache's first ``end`` tokens, a view of a
(rows, H, 680, 64) buffer, as in graphed sampling (``var/sampling/graphed.py``). Every scale's call is
captured once per backend and replayed, so the small scales' launch overhead is what the graphs leave.
Prints ms per call and per model (× depth), and TFLOP/s over the attended pairs. Never run in CI.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import OFFICIAL, emit, environment, time_calls

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def measure(backend: str, depth: int, rows: int, reps: int, q_layout: str) -> list[dict]:
    """One record per scale: the backend's time for that scale's call (an error where it refuses)."""
    pn, H, c = OFFICIAL["patch_nums"], depth, 64
    L = sum(p * p for p in pn)
    k_cache = torch.randn(rows, H, L, c, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    records, end = [], 0
    for p in pn:
        n, end = p * p, end + p * p
        if q_layout == "bhlc":
            q = torch.randn(rows, H, n, c, device="cuda", dtype=torch.bfloat16)
        else:  # (rows, n, H, c) seen as (rows, H, n, c): the layout the fused qkv projection writes
            q = torch.randn(rows, n, H, c, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k, v = k_cache[:, :, :end], v_cache[:, :, :end]
        rec = {"bench": "sample_attention", "backend": backend, "q_layout": q_layout, "depth": depth,
               "rows": rows, "scale": p, "queries": n, "keys": end}
        try:
            with sdpa_kernel([BACKENDS[backend]]):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        F.scaled_dot_product_attention(q, k, v, scale=1.0)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    F.scaled_dot_product_attention(q, k, v, scale=1.0)
            ms = time_calls(graph.replay, reps)[1]
            flop = 4 * rows * H * n * end * c
            rec.update(ms=round(ms, 4), per_model_ms=round(ms * depth, 3), tflops=round(flop / ms / 1e9, 1))
        except Exception as e:  # a backend that refuses a shape is one result, not the end of the run
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        records.append(rec)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[16, 30])
    ap.add_argument("--rows", type=int, nargs="+", default=[128], help="2 × the image batch under guidance")
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--q-layouts", nargs="+", default=["blhc", "bhlc"], choices=["blhc", "bhlc"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    env = environment()
    for depth in a.depths:
        for rows in a.rows:
            for layout in a.q_layouts:
                for backend in a.backends:
                    recs = measure(backend, depth, rows, a.reps, layout)
                    ok = [r for r in recs if "ms" in r]
                    total = {"bench": "sample_attention", "backend": backend, "q_layout": layout, "depth": depth,
                             "rows": rows, "scales_timed": len(ok),
                             "per_model_ms": round(sum(r["per_model_ms"] for r in ok), 2)}
                    for rec in [*recs, total]:
                        emit({**rec, **env})
                        if a.out:
                            with open(a.out, "a") as f:
                                f.write(json.dumps({**rec, **env}) + "\n")


if __name__ == "__main__":
    main()

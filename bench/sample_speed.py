"""Sampling speed on one GPU: s/img and img/s per depth and batch, VQVAE decoding included, peak memory.

The reference setting: CFG 1.5 (linear schedule), top-k 900, top-p 0.96, 256 px (680 tokens), random
weights of the official architectures (d16..d30 and the released tokenizer's), bf16 autocast. The timed
span starts with class labels on the GPU and ends with uint8 images in host memory (what ``task=sample``
writes to PNG), over consecutive batches.

    python -m bench.sample_speed --depths 16 20 24 30 --batches 1 64 --variants plain fast --out s.jsonl
    python -m bench.sample_speed --one --depth 16 --batch 64 --variant fast

Variants: plain (eager per-scale steps with a growing KV cache, decoder in fp32); graphs (each scale a
CUDA graph over a preallocated cache, the blocks' Linear layers on bf16 copies, head matmul in TF32;
decoder compiled, bf16, channels-last, cuDNN's per-shape algorithm search); compiled (graphs with the
blocks compiled); fast (compiled, each batch decoded on a second stream while the next one samples: what
``task=sample`` runs on a GPU). Never run in CI. One JSON line each.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import NamedTuple

import numpy as np
import torch

from bench.common import emit, environment, official_vqvae, run_points, var_config
from var.models.zoo import build_var
from var.sampling.graphed import GraphedScaleSteps
from var.sampling.pipeline import OverlappedDecoding
from var.sampling.sampler import prepare_fast_decoder, sample_tokens

SETTINGS = dict(cfg=1.5, cfg_schedule="linear", top_k=900, top_p=0.96)


class Variant(NamedTuple):
    graphs: bool
    compile: bool
    overlap: bool


VARIANTS = {
    "plain": Variant(False, False, False),
    "graphs": Variant(True, False, False),
    "compiled": Variant(True, True, False),
    "fast": Variant(True, True, True),
}


def setup(depth: int, batch: int, variant: str):
    """(run, setup seconds): ``run(first, count)`` samples and decodes batches first .. first+count-1
    (batch i has seeds i*batch ...) and returns the last one's uint8 images (batch, 256, 256, 3)."""
    v = VARIANTS[variant]
    torch.manual_seed(0)
    var = build_var(var_config(depth)).cuda().eval()
    vqvae = official_vqvae("cuda")
    if v.graphs:
        prepare_fast_decoder(vqvae)
    auto = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    t0 = time.perf_counter()
    steps = GraphedScaleSteps(var, rows=2 * batch, compile=v.compile) if v.graphs else None
    torch.cuda.synchronize()
    setup_s = time.perf_counter() - t0
    decode = OverlappedDecoding(vqvae, auto if v.graphs else contextlib.nullcontext, channels_last=v.graphs,
                                overlap=v.overlap)
    labels = torch.randint(0, 1000, (batch,), device="cuda")

    def run(first: int, count: int) -> np.ndarray:
        pending = []
        for i in range(first, first + count):
            seeds = list(range(i * batch, (i + 1) * batch))
            _, f_hat = sample_tokens(var, vqvae, labels, seeds, autocast=auto, scale_step=steps, **SETTINGS)
            pending.append(decode.submit(f_hat))
        return [wait() for wait in pending][-1]

    return run, setup_s


def measure(depth: int, batch: int, variant: str, reps: int) -> dict:
    run, setup_s = setup(depth, batch, variant)
    run(0, 2)  # warm-up: compiling, cuBLAS/cuDNN autotuning, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    img = run(2, reps)
    per_batch = (time.perf_counter() - t) / reps
    assert img.shape == (batch, 256, 256, 3) and img.dtype == np.uint8
    return {
        "bench": "sample", "depth": depth, "batch": batch, "variant": variant, **SETTINGS,
        "s_per_batch": round(per_batch, 4), "s_per_img": round(per_batch / batch, 5),
        "img_per_s": round(batch / per_batch, 2), "setup_s": round(setup_s, 2), "reps": reps,
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), **environment(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", action="store_true")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--variant", default="fast", choices=list(VARIANTS))
    ap.add_argument("--depths", type=int, nargs="+", default=[16, 20, 24, 30])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--variants", nargs="+", default=["plain", "fast"], choices=list(VARIANTS))
    ap.add_argument("--reps", type=int, default=0, help="timed batches in a row (0: 10 at batch 1, 6 above)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=int, default=300)
    a = ap.parse_args()
    if a.one:
        emit(measure(a.depth, a.batch, a.variant, a.reps or (10 if a.batch == 1 else 6)))
        return
    points = [["--depth", str(d), "--batch", str(b), "--variant", v, "--reps", str(a.reps)]
              for d in a.depths for b in a.batches for v in a.variants]
    run_points("bench.sample_speed", points, a.out, a.timeout)


if __name__ == "__main__":
    main()

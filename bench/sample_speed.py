"""Sampling speed on one GPU: s/img and img/s per depth and batch, VQVAE decoding included, peak memory.

The reference setting: CFG 1.5 (linear schedule), top-k 900, top-p 0.96, 256 px (680 tokens), random
weights of the official architectures (d16..d30 and the released tokenizer's), bf16 autocast. The timed
span starts with class labels on the GPU and ends with float images in [0, 1] on the GPU.

    python -m bench.sample_speed --depths 16 20 24 30 --batches 1 64 --variants plain fast --out s.jsonl
    python -m bench.sample_speed --one --depth 16 --batch 64 --variant fast

Variants: plain (eager per-scale steps with a growing KV cache, decoder in fp32); graphs (each scale a
CUDA graph over a preallocated cache, the blocks' Linear layers on bf16 copies, head matmul in TF32;
decoder compiled, bf16, channels-last, cuDNN's per-shape algorithm search); fast (graphs with the blocks
and the token draws compiled: what ``task=sample`` runs on a GPU). Never run in CI. One JSON line each.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Sequence

import torch

from bench.common import emit, environment, official_vqvae, run_points, var_config
from var.models.transformer import RESIDUAL_DTYPES
from var.models.zoo import build_var
from var.sampling.fast import ImageSampler

SETTINGS = dict(cfg=1.5, cfg_schedule="linear", top_k=900, top_p=0.96)
VARIANTS = ("plain", "graphs", "fast")


def setup(depth: int, batch: int, variant: str, residual_dtype: str = "param", defer_residual: bool = False):
    """(once, setup seconds): ``once(i)`` samples and decodes batch i (seeds i*batch ...)."""
    torch.manual_seed(0)
    var = build_var(var_config(depth, residual_dtype=residual_dtype, defer_residual=defer_residual)).cuda().eval()
    vqvae = official_vqvae("cuda")
    t0 = time.perf_counter()
    sampler = ImageSampler(var, vqvae, "bf16", torch.device("cuda"), fast=variant != "plain",
                           compile=variant == "fast")
    if sampler.graphs is not None:
        sampler.graphs(2 * batch)  # the static caches and bf16 weight copies: timed as setup
    torch.cuda.synchronize()
    setup_s = time.perf_counter() - t0
    labels = torch.randint(0, 1000, (batch,), device="cuda")

    def once(i: int) -> torch.Tensor:
        return sampler(labels, list(range(i * batch, (i + 1) * batch)), **SETTINGS)

    return once, setup_s


# Ablations: each switches one lever of the fast path off (a module constant set to False), and the record
# says which were on.
LEVERS = {
    "inductor-group-norm": ("var.models.vqgan_blocks", "CHANNEL_SUM_GROUP_NORM", "channel_sum_group_norm"),
    "draw-kernel": ("var.sampling.fast", "DRAW_KERNEL", "draw_kernel"),
    "eager-draws": ("var.sampling.fast", "COMPILE_DRAWS", "compiled_draws"),
    "no-gelu-epilogue": ("var.sampling.graphed", "GELU_EPILOGUE", "gelu_epilogue"),
    "nearest-upsample": ("var.models.vqgan_blocks", "TRANSPOSED_UPSAMPLE_CONV", "transposed_upsample_conv"),
    "full-topk-search": ("var.sampling.draw_kernel", "TOPK_EARLY_STOP", "topk_early_stop"),
    "full-topp-search": ("var.sampling.draw_kernel", "TOPP_FROM_TOPK", "topp_from_topk"),
}


def set_levers(off: Sequence[str]) -> dict:
    """Switch the named levers off (the others on); {record field: on} for the JSON line."""
    on = {}
    for flag, (module, constant, field) in LEVERS.items():
        setattr(importlib.import_module(module), constant, flag not in off)
        on[field] = flag not in off
    return on


def measure(depth: int, batch: int, variant: str, reps: int, off: Sequence[str] = (),
            residual_dtype: str = "param", defer_residual: bool = False) -> dict:
    levers = set_levers(off)
    once, setup_s = setup(depth, batch, variant, residual_dtype, defer_residual)
    for i in range(2):  # warm-up: cuBLAS/cuDNN autotuning, allocator
        once(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for i in range(reps):
        img = once(i + 2)
    torch.cuda.synchronize()
    per_batch = (time.perf_counter() - t) / reps
    assert img.shape == (batch, 3, 256, 256) and torch.isfinite(img).all()
    return {
        "bench": "sample", "depth": depth, "batch": batch, "variant": variant, **SETTINGS,
        "s_per_batch": round(per_batch, 4), "s_per_img": round(per_batch / batch, 5),
        "img_per_s": round(batch / per_batch, 2), "setup_s": round(setup_s, 2),
        **levers, "residual_dtype": residual_dtype, "defer_residual": defer_residual,
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), **environment(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", action="store_true")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--variant", default="fast", choices=VARIANTS)
    ap.add_argument("--depths", type=int, nargs="+", default=[16, 20, 24, 30])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--variants", nargs="+", default=["plain", "fast"], choices=VARIANTS)
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions (0: 10 at batch 1, 3 above)")
    ap.add_argument("--off", nargs="*", default=[], choices=sorted(LEVERS),
                    help="ablations: inductor-group-norm (the decoder's GroupNorm as Inductor lowers it, not "
                         "through per-channel sums), draw-kernel (the tokens drawn by the compiled draw_scale, not the "
                         "Triton kernel), eager-draws (with draw-kernel: drawn eagerly, not compiled), "
                         "no-gelu-epilogue (fc1 and GELU as two kernels in the sampling steps), "
                         "nearest-upsample (the decoder's upsampling written out before its conv, not one "
                         "transposed conv), full-topk-search (the draw kernel's top-k search runs all 32 "
                         "halvings instead of stopping once exactly k keys are kept), full-topp-search (its "
                         "top-p search runs all 32 halvings instead of starting from the bits the top-k "
                         "threshold and the top key share)")
    ap.add_argument("--residual-dtype", default="param", choices=RESIDUAL_DTYPES,
                    help="the model's residual stream: param (fp32, the default) or autocast (bf16, opt-in: "
                         "it rounds the stream, so models trained with it sample with it)")
    ap.add_argument("--defer-residual", action="store_true",
                    help="each block's second residual add done by the next block, fused with its first LayerNorm "
                         "(model.defer_residual; the same arithmetic)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=int, default=300)
    a = ap.parse_args()
    if a.one:
        emit(measure(a.depth, a.batch, a.variant, a.reps or (10 if a.batch == 1 else 3), a.off, a.residual_dtype,
                     a.defer_residual))
        return
    points = [["--depth", str(d), "--batch", str(b), "--variant", v, "--reps", str(a.reps),
               "--residual-dtype", a.residual_dtype, *(["--defer-residual"] if a.defer_residual else []),
               "--off", *a.off]
              for d in a.depths for b in a.batches for v in a.variants]
    run_points("bench.sample_speed", points, a.out, a.timeout)


if __name__ == "__main__":
    main()

"""Training throughput of the VAR transformer on one GPU: img/s, tokens/s, TFLOP/s, MFU, peak memory.

One step is what ``VARTrainingModule`` runs (teacher-forcing input from the frozen quantizer, the loss
of ``training_loss``), then global-norm clipping at 2.0 and a fused AdamW step, under bf16 autocast; the
Lightning loop around it is left out. Random weights and tokens at the official 256 px setting (680
tokens per image). FLOPs: the ``official_mfu`` convention of var/models/flops.py (the reference's).

    python -m bench.train_throughput --depths 16 20 --batches 64 --variants plain fast --out t.jsonl
    python -m bench.train_throughput --one --depth 16 --batch 64 --variant fast     # one point
    python -m bench.train_throughput --table --variants fast --out t.jsonl         # the reference table

``--table`` measures the reference's (depth, batch) pairs; a point that runs out of memory is measured
again with activation checkpointing on every 2nd, then every block (``--ac K`` sets it from the start).

Variants: plain (dense masked SDPA, eager, full logits); fast (what ``speed=fast`` sets: the cosine attention
as Triton kernels, ``attn_impl=fused``, compiled blocks, the head's cross-entropy in token chunks with each
chunk's softmax and gradient compiled); fast_bf16res (the same with the residual stream in bf16 between the
blocks, as the official code carries it); fast_ffn[_bf16res] (with ``ffn_impl=fused``: GELU and its derivative
in the feed-forward GEMMs' epilogues), fast_adaln_bf16res (``adaln_impl=fused``: residual add, LayerNorm and
modulation as Triton kernels), fast_ffn_adaln[_bf16res] (both), fast_defer_bf16res and fast_adaln_defer_bf16res
(``defer_residual``: each block's second residual add done in the next block's first LayerNorm kernel),
fast_all[_bf16res] (all three); the ablations of one lever each:
fast_scalewise[_bf16res] (per-scale flash attention instead of the fused kernels, and the chunks uncompiled:
``speed=fast`` before 2026-12-07), fast_eager_ce_chunks[_bf16res] (the chunks uncompiled), fast_flex[_bf16res]
(FlexAttention), fast_autotune (compiled with max-autotune: Triton GEMM templates with fused epilogues where they
beat cuBLAS); and flex_only, compile_sdpa, chunked_ce_only; ``--ac K`` checkpoints every K-th block.
Never run in CI (needs a GPU). One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from typing import NamedTuple

import torch

from bench.common import (
    emit,
    environment,
    matmul_ceiling,
    official_vqvae,
    run_points,
    set_attention_knobs,
    time_calls,
    var_config,
)
from var.lit.var_module import VARTrainingModule
from var.models import fused_ffn
from var.models.flops import flops_per_image, param_counts
from var.models.peak_flops import peak_flops
from var.models.transformer import param_groups


class Variant(NamedTuple):
    attn_impl: str
    compile: bool
    fused_head_ce: bool
    compile_mode: str | None = None
    residual_dtype: str = "param"
    compile_head_ce: bool = False
    ffn_impl: str = "plain"
    adaln_impl: str = "plain"
    defer_residual: bool = False


BF16 = "autocast"  # residual_dtype of the _bf16res variants
VARIANTS = {
    "plain": Variant("sdpa", False, False),
    "fast": Variant("fused", True, True, compile_head_ce=True),
    "fast_bf16res": Variant("fused", True, True, residual_dtype=BF16, compile_head_ce=True),
    "fast_ffn": Variant("fused", True, True, compile_head_ce=True, ffn_impl="fused"),
    "fast_ffn_bf16res": Variant("fused", True, True, residual_dtype=BF16, compile_head_ce=True, ffn_impl="fused"),
    "fast_adaln_bf16res": Variant("fused", True, True, residual_dtype=BF16, compile_head_ce=True, adaln_impl="fused"),
    "fast_ffn_adaln": Variant("fused", True, True, compile_head_ce=True, ffn_impl="fused", adaln_impl="fused"),
    "fast_ffn_adaln_bf16res": Variant("fused", True, True, residual_dtype=BF16, compile_head_ce=True,
                                      ffn_impl="fused", adaln_impl="fused"),
    "fast_defer_bf16res": Variant("fused", True, True, residual_dtype=BF16, compile_head_ce=True, defer_residual=True),
    "fast_adaln_defer_bf16res": Variant("fused", True, True, residual_dtype=BF16, compile_head_ce=True,
                                        adaln_impl="fused", defer_residual=True),
    "fast_all": Variant("fused", True, True, compile_head_ce=True, ffn_impl="fused", adaln_impl="fused",
                        defer_residual=True),
    "fast_all_bf16res": Variant("fused", True, True, residual_dtype=BF16, compile_head_ce=True, ffn_impl="fused",
                                adaln_impl="fused", defer_residual=True),
    "fast_scalewise": Variant("scalewise", True, True),
    "fast_scalewise_bf16res": Variant("scalewise", True, True, residual_dtype=BF16),
    "fast_eager_ce_chunks": Variant("fused", True, True),
    "fast_eager_ce_chunks_bf16res": Variant("fused", True, True, residual_dtype=BF16),
    "fast_flex": Variant("flex", True, True, compile_head_ce=True),
    "fast_flex_bf16res": Variant("flex", True, True, residual_dtype=BF16, compile_head_ce=True),
    "fast_autotune": Variant("fused", True, True, "max-autotune-no-cudagraphs", compile_head_ce=True),
    "flex_only": Variant("flex", False, False),
    "compile_sdpa": Variant("sdpa", True, True),
    "chunked_ce_only": Variant("sdpa", False, True),
}


def setup_module(depth: int, variant: str, ac: int = 0, device="cuda"):
    """(config, VARTrainingModule) of the variant, with random weights and the official tokenizer's
    architecture, on ``device``; ``configure_model`` (compiling, checkpointing) not yet called."""
    v = VARIANTS[variant]
    cfg = var_config(depth, v.attn_impl, v.residual_dtype, v.ffn_impl, v.adaln_impl, v.defer_residual)
    quantizer = official_vqvae(device).quantize
    module = VARTrainingModule(dataclasses.asdict(cfg), quantizer, optim={}, schedule={}, loss={},
                               parallelism={"kind": "none", "activation_checkpointing": ac},
                               speed={"compile": v.compile, "fused_head_ce": v.fused_head_ce,
                                      "compile_head_ce": v.compile_head_ce,
                                      "compile_mode": v.compile_mode}).to(device)
    return cfg, module


def setup(depth: int, batch: int, variant: str, ac: int = 0, device="cuda", wrap=None, data_seed: int = 0):
    """(config, step): one training step as ``step()`` -> detached loss. ``wrap(module)``, if given, wraps
    ``module.var`` for data parallelism (bench/train_distributed.py) before the optimizer is built;
    ``data_seed`` draws the random tokens (one per rank there)."""
    device = torch.device(device)
    cfg, module = setup_module(depth, variant, ac, device)
    module.configure_model()
    if wrap is not None:
        wrap(module)
    module.var.train()
    opt = torch.optim.AdamW(param_groups(module.var, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
    params = [p for p in module.var.parameters() if p.requires_grad]
    g = torch.Generator(device=device).manual_seed(data_seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device, generator=g)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device, generator=g)
    # bf16 autocast on GPUs; the CPU smoke runs stay in fp32.
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> torch.Tensor:
        with amp:
            loss = module.training_loss(tokens, labels, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return cfg, step


def measure(depth: int, batch: int, variant: str, ac: int, steps: int, warmup: int, ceiling: float,
            merge_tokens: int | None = None, flex_options: str | None = None, flex_block: int | None = None,
            fused_tiles: str | None = None, normalise_first: int | None = None) -> dict:
    import var.models.attention as attention

    set_attention_knobs(merge_tokens, None if flex_options is None else json.loads(flex_options), flex_block,
                        None if fused_tiles is None else json.loads(fused_tiles),
                        None if normalise_first is None else bool(normalise_first))
    cfg, step = setup(depth, batch, variant, ac)
    losses = []
    first_s, step_ms, _ = time_calls(lambda: losses.append(step()), steps, warmup - 1)  # first: compiling
    first, last = losses[0], losses[-1]
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]  # compiled frames: one per distinct block graph
    step_s = step_ms / 1e3
    flops_img = flops_per_image(cfg)["official_mfu"]
    img_s = batch / step_s
    datasheet = peak_flops("bf16")
    return {
        "bench": "train", "depth": depth, "batch": batch, "variant": variant, **VARIANTS[variant]._asdict(),
        "activation_checkpointing": ac, "scalewise_merge_tokens": attention.SCALEWISE_MERGE_TOKENS,
        **({"flex_options": attention.FLEX_KERNEL_OPTIONS, "flex_block": attention.FLEX_BLOCK_SIZE}
           if VARIANTS[variant].attn_impl == "flex" else {}),
        **(fused_attention_knobs() if VARIANTS[variant].attn_impl == "fused" else {}),
        **({"ffn_backward_ways": fused_ffn.chosen_ways()} if VARIANTS[variant].ffn_impl == "fused" else {}),
        "params": param_counts(cfg)["total"], "img_per_s": round(img_s, 2),
        "tokens_per_s": round(img_s * cfg.seq_len), "step_ms": round(step_s * 1e3, 2),
        "tflops": round(img_s * flops_img / 1e12, 1), "mfu_vs_measured": round(img_s * flops_img / ceiling, 4),
        "mfu_vs_datasheet": round(img_s * flops_img / datasheet, 4) if datasheet else None,
        "matmul_ceiling_tflops": round(ceiling / 1e12, 1),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "first_step_s": round(first_s, 1), "compiled_graphs": graphs, "loss_first": round(first.item(), 4), "loss_last": round(last.item(), 4),
        **environment(),
    }


def fused_attention_knobs() -> dict:
    from var.models import fused_attention

    return {"fused_tiles": {k: list(v) for k, v in fused_attention.TILES.items()},
            "normalise_first": fused_attention.NORMALISE_FIRST}


# The reference table's (depth, batch) pairs: the official code runs out of memory at d24/48 and d30/32.
REFERENCE_BATCHES = {16: 64, 20: 64, 24: 48, 30: 32}


def out_of_memory(result: dict) -> bool:
    return "out of memory" in result.get("error", "").lower()


def point_args(depth: int, batch: int, variant: str, ac: int, a, ceiling: float) -> list[str]:
    knobs = [] if a.merge_tokens is None else ["--merge-tokens", str(a.merge_tokens)]  # attention settings
    knobs += [] if a.flex_options is None else ["--flex-options", a.flex_options]
    knobs += [] if a.flex_block is None else ["--flex-block", str(a.flex_block)]
    knobs += [] if a.fused_tiles is None else ["--fused-tiles", a.fused_tiles]
    knobs += [] if a.normalise_first is None else ["--normalise-first", str(a.normalise_first)]
    return ["--depth", str(depth), "--batch", str(batch), "--variant", variant, "--ac", str(ac),
            "--steps", str(a.steps), "--warmup", str(a.warmup), "--ceiling", str(ceiling), *knobs]


def run_table(a, ceiling: float) -> None:
    """Every reference point per variant, the cheap ones first; on OOM, more activation checkpointing."""
    for depth in a.depths:
        for variant in a.variants:
            for ac in [a.ac] + [k for k in (2, 1) if a.ac == 0 or k < a.ac]:
                (result,) = run_points("bench.train_throughput",
                                       [point_args(depth, REFERENCE_BATCHES[depth], variant, ac, a, ceiling)],
                                       a.out, a.timeout)
                if not out_of_memory(result):
                    break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", action="store_true", help="measure one point in this process")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--variant", default="fast", choices=sorted(VARIANTS))
    ap.add_argument("--table", action="store_true", help="the reference (depth, batch) pairs, see above")
    ap.add_argument("--depths", type=int, nargs="+", default=None, help="default: 16 20 (--table: 16 20 24 30)")
    ap.add_argument("--batches", type=int, nargs="+", default=[64])
    ap.add_argument("--variants", nargs="+", default=["plain", "fast"])
    ap.add_argument("--ac", type=int, default=0, help="checkpoint every K-th block (0: off)")
    ap.add_argument("--merge-tokens", type=int, default=None,
                    help="scalewise attention: merge the scales ending within N tokens into one call")
    ap.add_argument("--flex-options", default=None, help="JSON kernel_options for flex attention")
    ap.add_argument("--flex-block", type=int, default=None, help="flex attention's mask tile (tokens)")
    ap.add_argument("--fused-tiles", default=None,
                    help='JSON tiles for some fused attention kernels, e.g. \'{"dq": [128, 32, 4, 3]}\'')
    ap.add_argument("--normalise-first", type=int, choices=(0, 1), default=None,
                    help="fused attention: q and k normalised by a kernel before the forward (default: library's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--ceiling", type=float, default=None, help="matmul FLOP/s (default: measure)")
    ap.add_argument("--out", default=None, help="append the JSON lines here too")
    ap.add_argument("--timeout", type=int, default=420)
    a = ap.parse_args()
    ceiling = a.ceiling or matmul_ceiling()
    if a.one:
        emit(measure(a.depth, a.batch, a.variant, a.ac, a.steps, a.warmup, ceiling, a.merge_tokens, a.flex_options,
                     a.flex_block, a.fused_tiles, a.normalise_first))
        return
    if a.table:
        a.depths = a.depths or list(REFERENCE_BATCHES)
        unknown = sorted(set(a.depths) - set(REFERENCE_BATCHES))
        if unknown:
            raise SystemExit(f"--table knows depths {sorted(REFERENCE_BATCHES)}, not {unknown}")
        run_table(a, ceiling)
        return
    points = [point_args(d, b, v, a.ac, a, ceiling) for d in (a.depths or [16, 20]) for b in a.batches
              for v in a.variants]
    run_points("bench.train_throughput", points, a.out, a.timeout)


if __name__ == "__main__":
    main()

"""Training throughput on several GPUs of one host: DDP or FSDP2, img/s per GPU, MFU, peak memory, and
the scaling efficiency against one GPU.

The step is bench/train_throughput.py's (teacher forcing on random tokens at the official 256 px setting,
bf16 autocast, clipping, fused AdamW), wrapped in DDP or FSDP2 (``var.lit.var_module.shard_var``: each
block, then the root; bf16 parameters, fp32 gradient reduction). ``--batch`` is per GPU (weak scaling),
or give ``--global-batch`` to split one batch over the GPUs (DDP against FSDP2 at the same global batch).
Each point runs under torchrun in a fresh process group.

    python -m bench.train_distributed --depths 24 30 --gpus 1 2 4 --wraps fsdp --ac 2 --out d.jsonl
    python -m bench.train_distributed --depths 16 --gpus 2 --wraps ddp fsdp --global-batch 128
    python -m bench.train_distributed --device cpu --depths 2 --gpus 2 --batch 2 --steps 2 --warmup 1

Scaling efficiency = (img/s per GPU at N GPUs) / (img/s at 1 GPU) for the same depth, wrap and per-GPU
batch, filled in when both were measured in the same invocation. NCCL's NVLink multicast is switched off
(NCCL_NVLS_ENABLE=0). Never run in CI; ``--device cpu`` runs the same code over gloo as a smoke test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from bench.common import MULTICAST_OFF, emit, environment, matmul_ceiling, run_points
from bench.train_throughput import REFERENCE_BATCHES, VARIANTS, setup
from var.lit.var_module import shard_var
from var.models.flops import flops_per_image


def measure(a) -> dict | None:
    """One point, on every rank of the torchrun group; rank 0 returns the record."""
    cuda = a.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if a.global_batch and a.global_batch % world:
        raise SystemExit(f"--global-batch {a.global_batch} is not divisible by {world} GPUs")
    batch = a.global_batch // world if a.global_batch else a.batch
    torch.manual_seed(0)  # one initialisation on every rank (FSDP2 keeps each rank's own shard of it)

    def wrap(module):
        if a.wrap == "fsdp":
            shard_var(module.var, None, {"reshard_after_forward": True}, mixed_precision=cuda)
        else:
            module.var = torch.nn.parallel.DistributedDataParallel(module.var, device_ids=[device] if cuda else None)

    cfg, step = setup(a.depth, batch, a.variant, a.ac, device=device, wrap=wrap, data_seed=rank)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    first_s = time.perf_counter() - t0
    for _ in range(a.warmup - 1):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        last = step()
    sync()
    dist.barrier()
    step_s = (time.perf_counter() - t0) / a.steps
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()
    if rank:
        return None
    img_s = batch * world / step_s
    flops = img_s * flops_per_image(cfg)["official_mfu"]
    record = {"bench": "train_distributed", "depth": a.depth, "gpus": world, "wrap": a.wrap, "variant": a.variant,
              "activation_checkpointing": a.ac, "batch_per_gpu": batch, "global_batch": batch * world,
              "img_per_s": round(img_s, 2), "img_per_s_per_gpu": round(img_s / world, 2),
              "step_ms": round(step_s * 1e3, 2), "tflops_per_gpu": round(flops / world / 1e12, 1),
              "peak_alloc_gib_max_rank": round(peak.item(), 2), "first_step_s": round(first_s, 1),
              "loss_last": round(last.item(), 4)}
    if cuda:
        record["mfu_vs_measured"] = round(flops / world / a.ceiling, 4)
        record["matmul_ceiling_tflops"] = round(a.ceiling / 1e12, 1)
        record.update(environment())
    return record


def with_efficiency(results: list[dict]) -> None:
    """Scaling efficiency against the 1-GPU point of the same depth, wrap and per-GPU batch."""
    base = {(r["depth"], r["wrap"], r["batch_per_gpu"]): r["img_per_s_per_gpu"]
            for r in results if r.get("gpus") == 1}
    for r in results:
        one = base.get((r.get("depth"), r.get("wrap"), r.get("batch_per_gpu")))
        if one and "error" not in r:
            emit({"scaling_efficiency": round(r["img_per_s_per_gpu"] / one, 4),
                  **{k: r[k] for k in ("depth", "wrap", "gpus", "batch_per_gpu", "img_per_s_per_gpu")}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", action="store_true", help="measure one point (under torchrun)")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--depths", type=int, nargs="+", default=[16])
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="processes per point")
    ap.add_argument("--wrap", default="fsdp", choices=["ddp", "fsdp"])
    ap.add_argument("--wraps", nargs="+", default=["fsdp"], choices=["ddp", "fsdp"])
    ap.add_argument("--batch", type=int, default=None, help="per GPU (default: the reference table's)")
    ap.add_argument("--global-batch", type=int, default=None, help="split over the GPUs instead")
    ap.add_argument("--variant", default="fast", choices=sorted(VARIANTS))
    ap.add_argument("--ac", type=int, default=0, help="checkpoint every K-th block (0: off)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--ceiling", type=float, default=None, help="matmul FLOP/s (default: measure)")
    ap.add_argument("--out", default=None, help="append the JSON lines here too")
    ap.add_argument("--timeout", type=int, default=600)
    a = ap.parse_args()
    if a.one:
        record = measure(a)
        if record:
            emit(record)
        return
    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)
    ceiling = a.ceiling or (matmul_ceiling() if a.device == "cuda" else 1.0)
    results = []
    for depth in a.depths:
        batch = a.batch or REFERENCE_BATCHES.get(depth, 32)
        for wrap in a.wraps:
            for n in a.gpus:
                args = ["--depth", str(depth), "--wrap", wrap, "--batch", str(batch), "--variant", a.variant,
                        "--ac", str(a.ac), "--steps", str(a.steps), "--warmup", str(a.warmup),
                        "--device", a.device, "--ceiling", str(ceiling)]
                if a.global_batch:
                    args += ["--global-batch", str(a.global_batch)]
                launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
                results += run_points("bench.train_distributed", [args], a.out, a.timeout, launcher=launcher)
    with_efficiency(results)


if __name__ == "__main__":
    main()

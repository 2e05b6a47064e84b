"""Where the time goes: torch.profiler over a few training steps or sampling batches, top CUDA kernels.

    python -m bench.profile_step train --depth 16 --batch 64 --variant fast
    python -m bench.profile_step sample --depth 16 --batch 64 --variant fast

Prints the kernel table (by self CUDA time) and a coarse split by kernel family. Never run in CI.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.common import set_attention_knobs

# Kernel families, first match wins: Triton first (Inductor names its kernels after the ops they fuse, e.g.
# "convolution" or "scaled_dot_product"), then attention and convolution before the GEMM patterns, since
# cuDNN's SDPA and implicit-GEMM convolution kernels carry "sm90" and "xmma" in their names too.
FAMILIES = [("triton", r"^triton"),
            ("attention", r"flash|fmha|flex|attention|sdpa|dot_do_o|convert_dq|^_key_grads|^_query_grads|^_row_dots"),
            ("conv", r"conv|implicit|winograd|nchwToNhwc"), ("gemm", r"gemm|sm90|cutlass|nvjet|matmul|xmma|cublas"),
            ("sort/topk", r"sort|topk|radix|select"), ("optimizer", r"adam|multi_tensor|foreach"), ("norm", r"norm"),
            ("copy/cast", r"copy|cast|convert"), ("reduce", r"reduce"), ("elementwise", r"elementwise|vectorized")]


ANNOTATION = re.compile(r"Optimizer\.|ProfilerStep#")


def family(kernel: str) -> str:
    return next((f for f, pat in FAMILIES if re.search(pat, kernel, re.I)), "other")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["train", "sample"])
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--variant", default="fast")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--merge-tokens", type=int, default=None, help="see bench.train_throughput")
    ap.add_argument("--flex-block", type=int, default=None, help="see bench.train_throughput")
    ap.add_argument("--ops", default=None,
                    help="also list the ops matching this regex (e.g. 'aten::add') by input shape and call site")
    a = ap.parse_args()
    set_attention_knobs(merge_tokens=a.merge_tokens, flex_block=a.flex_block)
    if a.what == "train":
        from bench.train_throughput import setup

        _, fn = setup(a.depth, a.batch, a.variant)
    else:
        from bench.sample_speed import setup

        once, _ = setup(a.depth, a.batch, a.variant)
        fn = lambda: once(0)  # noqa: E731
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=a.ops is not None,
                 with_stack=a.ops is not None) as prof:
        for _ in range(a.iters):
            fn()
        torch.cuda.synchronize()
    # Kernels only: the ops and Triton launch ranges that enclose them report the same device time again, and so
    # do user annotations on the device's timeline (the optimizer's "Optimizer.step#AdamW.step").
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0 and e.device_type == DeviceType.CUDA
              and not ANNOTATION.match(e.key)]
    total = sum(e.self_device_time_total for e in events)
    fam = defaultdict(float)
    for e in events:
        fam[family(e.key)] += e.self_device_time_total
    print(f"{a.what} d{a.depth} b{a.batch} {a.variant}: GPU busy {total / 1e3 / a.iters:.1f} ms per iteration")
    for name, t in sorted(fam.items(), key=lambda kv: -kv[1]):
        print(f"  {name:12s} {t / 1e3 / a.iters:8.2f} ms  {100 * t / total:5.1f}%")
    print(f"{'ms/iter':>8s} {'calls':>6s} {'us/call':>8s}  kernel")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[: a.rows]:
        print(f"{e.self_device_time_total / 1e3 / a.iters:8.2f} {e.count / a.iters:6.0f} "
              f"{e.self_device_time_total / e.count:8.1f}  {e.key[:150]}")
    if a.ops:
        print_ops(prof, a.ops, a.iters)


def print_ops(prof, pattern: str, iters: int) -> None:
    """Ops matching ``pattern`` with the device time of their kernels, by input shapes and Python call site
    (where an eager kernel outside the compiled graphs comes from)."""
    rows = [e for e in prof.key_averages(group_by_input_shape=True, group_by_stack_n=6)
            if re.search(pattern, e.key) and e.device_time_total > 0]
    print(f"ops matching {pattern!r}: ms/iter, calls/iter, input shapes, call site")
    for e in sorted(rows, key=lambda e: -e.device_time_total)[:20]:
        stack = " <- ".join(fr for fr in (e.stack or []) if "site-packages" not in fr)[:400]
        print(f"{e.device_time_total / 1e3 / iters:8.2f} {e.count / iters:6.0f}  {e.key} {e.input_shapes}  {stack}")


if __name__ == "__main__":
    main()

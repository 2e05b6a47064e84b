"""Shared pieces of the GPU benchmarks: the official 256 px configuration, the environment stamp, the
matmul ceiling, and running each measurement in a fresh process (clean memory, an OOM is one result)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from var.models.vqvae import PRESETS, VQVAE
from var.models.zoo import VARConfig

REPO = Path(__file__).resolve().parents[1]

# NCCL's NVLink multicast (NVLS) stays off in the multi-GPU benchmarks: their numbers do not depend on it.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}

# The official ImageNet 256 setting: 1000 classes, 10 scales (680 tokens), V 4096, Cvae 32.
OFFICIAL = dict(num_classes=1000, vocab_size=4096, cvae=32, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))


def var_config(depth: int, attn_impl: str = "sdpa", residual_dtype: str = "param", ffn_impl: str = "plain",
               adaln_impl: str = "plain", defer_residual: bool = False) -> VARConfig:
    return VARConfig(depth=depth, attn_impl=attn_impl, residual_dtype=residual_dtype, ffn_impl=ffn_impl,
                     adaln_impl=adaln_impl, defer_residual=defer_residual, **OFFICIAL)


def official_vqvae(device) -> VQVAE:
    """The released tokenizer's architecture with random weights (timing does not depend on them)."""
    return VQVAE(PRESETS["vae_ch160v4096z32"]).to(device).eval()


def set_attention_knobs(merge_tokens: int | None = None, flex_options: dict | None = None,
                        flex_block: int | None = None, fused_tiles: dict | None = None,
                        normalise_first: bool | None = None) -> None:
    """Override var.models.attention's speed settings in this process (None: keep the library's):
    SCALEWISE_MERGE_TOKENS, FLEX_KERNEL_OPTIONS, FLEX_BLOCK_SIZE and, for the fused kernels, some of
    fused_attention.TILES and NORMALISE_FIRST. They change kernels and call grouping, never what is computed."""
    import var.models.attention as attention

    if fused_tiles is not None or normalise_first is not None:
        from var.models import fused_attention

        fused_attention.TILES = {**fused_attention.TILES, **{k: tuple(v) for k, v in (fused_tiles or {}).items()}}
        if normalise_first is not None:
            fused_attention.NORMALISE_FIRST = normalise_first
    if merge_tokens is not None:
        attention.SCALEWISE_MERGE_TOKENS = merge_tokens
    if flex_options is not None:
        attention.FLEX_KERNEL_OPTIONS = flex_options
    if flex_block is not None:
        attention.FLEX_BLOCK_SIZE = flex_block


def git_commit() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True)
    return (commit.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    """Date, device, torch and commit. BENCH_COMMIT overrides the commit where the tree measured is an
    export whose git metadata is missing or older than its files."""
    return {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "commit": os.environ.get("BENCH_COMMIT") or git_commit()}


def matmul_ceiling(n: int = 8192, iters: int = 50) -> float:
    """Measured dense bf16 matmul FLOP/s (the MFU denominator the reference table uses)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t)


def time_calls(fn, reps: int, warmup: int = 3):
    """(seconds of the first call, compiling included; ms per call over ``reps`` timed calls after ``warmup``
    more; the last call's result). Peak-memory statistics restart before the timed calls."""
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        out = fn()
    end.record()
    torch.cuda.synchronize()
    return first_s, start.elapsed_time(end) / reps, out


def emit(record: dict, out: str | None = None) -> None:
    """Print one JSON line; append it to ``out`` too, if given."""
    print(json.dumps(record), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


def time_backward_under_autocast(step, inputs: tuple, grad, reps: int):
    """(first call's seconds, ms per call) of ``step(*inputs)`` and its backward from ``grad`` (a tensor, or
    one per output) under bf16 autocast."""

    def once():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = step(*inputs)
        torch.autograd.backward(out, grad)
        return out

    first_s, ms, _ = time_calls(once, reps)
    return first_s, ms


def _error_line(text: str) -> str:
    """The most telling line of a failed point's output: the last one naming an error (torchrun ends its
    report with a rule of '=' characters), else the last non-empty one."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().strip("=-")]
    named = [ln for ln in lines if "Error" in ln or "error:" in ln or "Exception" in ln]
    return ((named or lines or ["no output"])[-1])[:300]


def run_points(module: str, points: list[list[str]], out: str | None, timeout: int,
               launcher: list[str] | None = None) -> list[dict]:
    """Run ``python -m module --one ARGS`` per point in a fresh process (``launcher``, e.g. torchrun, in
    place of ``python``); collect the JSON lines it prints."""
    results = []
    for args in points:
        cmd = [*(launcher or [sys.executable]), "-m", module, "--one", *args]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                                 env=os.environ.copy())
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode != 0 or not lines:
                lines.append(json.dumps({"args": args, "exit": res.returncode,
                                         "error": _error_line(res.stderr or res.stdout)}))
        except subprocess.TimeoutExpired:
            lines = [json.dumps({"args": args, "error": f"timed out after {timeout} s"})]
        for ln in lines:
            print(ln, flush=True)
            results.append(json.loads(ln))
            if out:
                with open(out, "a") as f:
                    f.write(ln + "\n")
    return results

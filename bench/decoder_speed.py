"""The VQVAE decoder alone, as fast sampling runs it: ms per batch of 256 px images, per GroupNorm lowering.

    python -m bench.decoder_speed --batches 64 --out d.jsonl

The released tokenizer's architecture with random weights, bf16 autocast, channels-last, compiled
(``prepare_fast_decoder``). ``group_norm``: ``channel_sums`` (the decoder's GroupNorm through per-channel
sums, the default) or ``inductor`` (Inductor's own GroupNorm lowering). ``upsample``: ``transposed`` (each
x2 upsampling and its conv as one transposed conv, the default) or ``nearest`` (as written).
``cudnn_limit``: how many of cuDNN's algorithms its per-shape search tries (torch's
``cudnn.benchmark_limit``; 0: all of them). Each point
runs in a fresh process; the kernel split comes from one profiled batch (``--kernels N`` adds the N
longest kernels). Never run in CI. One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.common import emit, environment, official_vqvae, run_points, time_calls
from var.sampling.fast import prepare_fast_decoder
from var.sampling.sampler import decode_fhat

GROUP_NORMS = ("channel_sums", "inductor")
UPSAMPLES = ("transposed", "nearest")
# Triton first: its fused kernels' names mention the convolutions they read from.
KINDS = [("triton", r"triton"), ("conv", r"conv|implicit_gemm|xmma|cudnn"), ("copy", r"copy|Memcpy")]


def kernel_split(fn, top: int = 0) -> dict:
    """ms of one call by kernel kind (convolutions, Triton kernels, copies, other); with ``top``, also the
    ``top`` kernels that took longest as [ms, calls, name]."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    split = defaultdict(float)
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    for e in kernels:
        kind = next((k for k, pat in KINDS if re.search(pat, e.key, re.I)), "other")
        split[kind] += e.self_device_time_total / 1e3
    record = {f"{k}_ms": round(v, 2) for k, v in sorted(split.items())}
    if top:
        kernels.sort(key=lambda e: -e.self_device_time_total)
        record["top_kernels"] = [[round(e.self_device_time_total / 1e3, 2), e.count, e.key[:120]] for e in kernels[:top]]
    return record


def measure(batch: int, group_norm: str, upsample: str, reps: int, top: int = 0, cudnn_limit: int = 10) -> dict:
    import var.models.vqgan_blocks as vqgan_blocks

    vqgan_blocks.CHANNEL_SUM_GROUP_NORM = group_norm == "channel_sums"
    vqgan_blocks.TRANSPOSED_UPSAMPLE_CONV = upsample == "transposed"
    vqvae = official_vqvae("cuda")
    prepare_fast_decoder(vqvae)
    torch.backends.cudnn.benchmark_limit = cudnn_limit
    f_hat = torch.randn(batch, vqvae.Cvae, 16, 16, device="cuda")
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731

    def once() -> torch.Tensor:
        return decode_fhat(vqvae, f_hat, autocast=autocast, channels_last=True)

    first_s, ms, img = time_calls(once, reps)
    assert img.shape == (batch, 3, 256, 256) and torch.isfinite(img).all()
    return {"bench": "decoder", "batch": batch, "group_norm": group_norm, "upsample": upsample,
            "cudnn_benchmark_limit": cudnn_limit, "ms_per_batch": round(ms, 2),
            "img_per_s": round(batch / ms * 1e3, 1), "first_s": round(first_s, 1),
            "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), **kernel_split(once, top),
            **environment()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--group-norm", default="channel_sums", choices=GROUP_NORMS)
    ap.add_argument("--batches", type=int, nargs="+", default=[64])
    ap.add_argument("--group-norms", nargs="+", default=list(GROUP_NORMS), choices=GROUP_NORMS)
    ap.add_argument("--upsample", default="transposed", choices=UPSAMPLES)
    ap.add_argument("--upsamples", nargs="+", default=list(UPSAMPLES), choices=UPSAMPLES)
    ap.add_argument("--cudnn-limits", type=int, nargs="+", default=[10],
                    help="algorithms cuDNN's per-shape search tries, per point (0: all; torch's default 10)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--kernels", type=int, default=0, help="list this many of the longest kernels in each record")
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=int, default=300)
    a = ap.parse_args()
    if a.one:
        emit(measure(a.batch, a.group_norm, a.upsample, a.reps, a.kernels, a.cudnn_limits[0]))
        return
    points = [["--batch", str(b), "--group-norm", g, "--upsample", u, "--reps", str(a.reps),
               "--kernels", str(a.kernels), "--cudnn-limits", str(c)]
              for b in a.batches for g in a.group_norms for u in a.upsamples for c in a.cudnn_limits]
    run_points("bench.decoder_speed", points, a.out, a.timeout)


if __name__ == "__main__":
    main()

"""One of the decoder's 3x3 convolutions alone, per way of running it: ms per call and TFLOP/s.

    python -m bench.decoder_conv --shapes 256:160 128:160 64:320 --out c.jsonl

bf16, channels-last, batch 64 (what fast sampling decodes), cuDNN's per-shape search on. Ways:
``cudnn`` (as the decoder runs it: torch's default search of 10 algorithms), ``cudnn_all`` (the search
tries every algorithm, ``cudnn.benchmark_limit = 0``), ``split`` (the output channels as two convolutions
of 128 and C-128 channels, concatenated, compiled: 160 channels fill 2.5 of the 3 64-wide tiles cuDNN
picks), ``autotune`` (torch.compile's max-autotune, which also tries Triton convolution templates). The
outputs are compared with ``cudnn``'s. Never run in CI. One JSON line per measurement.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import emit, environment, time_calls

WAYS = ("cudnn", "cudnn_all", "split", "autotune")


def split_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, at: int = 128) -> torch.Tensor:
    """The conv's output channels [0, at) and [at, C) as two convs, joined."""
    return torch.cat([F.conv2d(x, w[:at], b[:at], padding=1), F.conv2d(x, w[at:], b[at:], padding=1)], dim=1)


def measure(size: int, channels: int, way: str, batch: int, reps: int) -> dict:
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.benchmark_limit = 0 if way == "cudnn_all" else 10
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, channels, size, size, device="cuda", generator=g, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(channels, channels, 3, 3, device="cuda", generator=g) / (3 * channels**0.5)).to(torch.bfloat16)
    w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(channels, device="cuda", generator=g, dtype=torch.bfloat16)
    plain = lambda: F.conv2d(x, w, b, padding=1)  # noqa: E731
    if way == "split":
        fn = torch.compile(lambda: split_conv(x, w, b))
    elif way == "autotune":
        fn = torch.compile(plain, mode="max-autotune-no-cudagraphs")
    else:
        fn = plain
    first_s, ms, out = time_calls(fn, reps)
    ref = plain()
    flop = 2 * 9 * channels * channels * size * size * batch
    return {"bench": "decoder_conv", "size": size, "channels": channels, "batch": batch, "way": way,
            "ms": round(ms, 3), "tflops": round(flop / ms / 1e9, 1), "first_s": round(first_s, 1),
            "max_abs_diff": float((out.float() - ref.float()).abs().max()), **environment()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["256:160", "128:160", "64:320"],
                    help="size:channels of the convolutions to time")
    ap.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    for shape in a.shapes:
        size, channels = (int(v) for v in shape.split(":"))
        for way in a.ways:
            rec = measure(size, channels, way, a.batch, a.reps)
            emit(rec, a.out)


if __name__ == "__main__":
    main()

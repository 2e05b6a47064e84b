"""The Triton draw kernel (var/sampling/draw_kernel.py) draws the tokens ``draw_scale`` draws: on the CPU
through Triton's interpreter, on a GPU compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from var.sampling.draw_kernel import MAX_VOCAB, kernel_draw, supports  # noqa: E402
from var.sampling.sampler import draw_scale, stream_keys  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_draws_the_eager_tokens_in_the_interpreter():
    """Every case of tests/draw_kernel_probe.py: guidance or none, top-k and top-p alone and together,
    temperature, a vocabulary that is not a power of two, ties at the boundaries, top-k of 1 and of V, a
    token top-p alone keeps, one token, kept logits of one sign and exponent, a top-p that keeps one token,
    large seeds and token offsets (the counter streams); each with the searches run in full, the top-k one
    stopping early, and that with the top-p one started from the top-k threshold's bits."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.draw_kernel_probe"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = [json.loads(line) for line in proc.stdout.splitlines()]
    # 6 cases with both filters run 3 searches, 2 with top-k alone run 2, 3 without top-k run 1
    assert len(cases) == 25 and sum(c["topp_from_topk"] for c in cases) == 6
    for case in cases:
        assert case["shape_ok"] and case["differ"] == 0, case
    by_name = {c["case"]: c for c in cases if not c["early_stop"]}
    assert by_name["official"]["distinct"] > 1 and by_name["one_dominates"]["distinct"] == 1
    assert by_name["positive_close"]["distinct"] > 1


def test_kernel_refuses_what_it_cannot_draw_in_one_line():
    keys = stream_keys([1], "cpu")
    assert supports(torch.zeros(2, 3, 64)) and not supports(torch.zeros(2, 3, 64, dtype=torch.bfloat16))
    assert not supports(torch.zeros(2, 64, 3).transpose(1, 2)) and not supports(torch.zeros(1, 1, MAX_VOCAB + 1))
    with pytest.raises(ValueError, match="fp32 logits.*bfloat16"):
        kernel_draw(torch.zeros(2, 3, 64, dtype=torch.bfloat16), keys, 0, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("early_stop, topp_from_topk", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("images", [1, 64])
def test_kernel_draws_the_eager_tokens_on_gpu(images, early_stop, topp_from_topk):
    """At the official vocabulary and settings, the 16x16 scale: a token may differ only where a cumulative
    sum (a tree in the kernel, a scan eagerly) puts a boundary a few ulps away, i.e. almost never."""
    g = torch.Generator(device="cuda").manual_seed(0)
    keys = stream_keys(range(images), "cuda")
    for t, top_k, top_p in ((1.5, 900, 0.96), (None, 0, 0.9), (0.5, 50, 0.0), (None, 0, 0.0)):
        rows = 2 * images if t is not None else images
        x = 4 * torch.randn(rows, 256, 4096, device="cuda", generator=g)
        got = kernel_draw(x, keys, 424, t, 1.0, top_k, top_p, early_stop=early_stop, topp_from_topk=topp_from_topk)
        ref = draw_scale(x, keys, 424, t, 1.0, top_k, top_p)
        assert got.shape == ref.shape == (images, 256)
        assert (got != ref).sum() <= max(1, ref.numel() // 5000), (t, top_k, top_p)

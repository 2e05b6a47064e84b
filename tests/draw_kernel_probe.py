"""Run by tests/test_draw_kernel.py in a process of its own with TRITON_INTERPRET=1 (Triton's CPU
interpreter must be chosen before Triton is imported): draws every case with the kernel and with
``draw_scale`` and prints one JSON line per case and way of searching (the full searches; the top-k one
stopping early; that and the top-p one from the top-k threshold's bits) with the number of tokens that
differ (once per way the case's filters make distinct)."""

from __future__ import annotations

import json

import torch

from var.sampling.draw_kernel import kernel_draw
from var.sampling.sampler import draw_scale, stream_keys


def logits_for(name: str, rows: int, tokens: int, V: int, g: torch.Generator) -> torch.Tensor:
    x = 3 * torch.randn(rows, tokens, V, generator=g)
    if name == "ties":  # many equal logits, at the top-k and top-p boundaries too
        x = (x * 2).round() / 2
    if name == "one_dominates":  # top-p keeps the most likely token only
        x[..., 5] += 40
    if name == "positive_close":  # the kept logits share sign and exponent: a short top-p search
        x = 40 + x / 4
    return x


# name: (images, tokens, V, guidance t or None, temperature, top_k, top_p, begin)
CASES = {
    "official": (2, 12, 4096, 0.8, 1.0, 900, 0.96, 0),
    "top_p_only_padded_vocab": (3, 8, 1000, None, 1.0, 0, 0.9, 21),
    "top_k_only_tempered": (3, 8, 64, 1.2, 0.7, 10, 0.0, 5),
    "no_filter": (3, 8, 64, None, 1.0, 0, 0.0, 600),
    "ties": (3, 16, 100, None, 1.0, 7, 0.5, 9),
    "greedy_top_k": (2, 8, 100, 0.5, 1.0, 1, 0.0, 30),
    "top_k_at_vocab": (2, 8, 100, None, 1.0, 100, 0.99, 1),
    "one_dominates": (2, 4, 256, 0.3, 1.0, 50, 0.01, 2),
    "one_token": (1, 1, 64, 1.5, 1.0, 20, 0.8, 0),
    "positive_close": (2, 8, 512, None, 1.0, 100, 0.7, 3),
    "top_p_tiny": (2, 8, 256, None, 1.0, 50, 1e-9, 0),
}
# (early_stop, topp_from_topk)
SEARCHES = ((False, False), (True, False), (True, True))


def main() -> None:
    g = torch.Generator().manual_seed(0)
    for name, (images, tokens, V, t, temperature, top_k, top_p, begin) in CASES.items():
        keys = stream_keys([3 + i for i in range(images - 1)] + [2**64 - 7], "cpu")
        x = logits_for(name, images * (2 if t is not None else 1), tokens, V, g)
        ref = draw_scale(x, keys, begin, t, temperature, top_k, top_p)
        uses_k, uses_p = 0 < top_k < V, 0 < top_p < 1
        paths = set()
        for early_stop, topp_from_topk in SEARCHES:
            path = (early_stop and uses_k, topp_from_topk and uses_k and uses_p)  # what the kernel compiles
            if path in paths:
                continue
            paths.add(path)
            got = kernel_draw(x, keys, begin, t, temperature, top_k, top_p, early_stop=early_stop,
                              topp_from_topk=topp_from_topk)
            print(json.dumps({"case": name, "early_stop": early_stop, "topp_from_topk": topp_from_topk,
                              "tokens": ref.numel(),
                              "differ": int((got != ref).sum()), "distinct": len(set(ref.flatten().tolist())),
                              "shape_ok": got.shape == ref.shape}))


if __name__ == "__main__":
    main()

"""Block-causal attention of teacher-forced training, forward + backward, per implementation and kernel.

    python -m bench.attention_speed --depths 16 20 --batch 64 --out a.jsonl

Times the attention op alone (q, k, v as views of one fused qkv tensor, bf16, the official 680-token
pyramid) compiled as the blocks compile it, so the per-scale outputs' concatenation and the partial key
gradients' sums are fused as in training. Implementations: ``dense`` (SDPA with the additive mask),
``flex`` (FlexAttention block mask in tiles of 128 or 64 tokens, default or max-autotune kernels) and
``scalewise`` per SDPA backend (auto: SDPA's choice) with the leading small scales merged into one masked
call (``merge`` tokens: 0 = one call per scale). Never run in CI.

``--cos`` times what the block runs between its qkv projection and ``proj`` with cosine attention (as the
official model): q and k normalised and q scaled per head, the attention, the output laid out as (B, L, C);
only then is ``fused`` (var/models/fused_attention.py: all of it in Triton kernels) comparable, and it is
measured only so. ``--fused-tiles`` tries its tile sizes (JSON, as fused_attention.TILES).

    python -m bench.attention_speed --cos --impls scalewise fused --merges 255 --backends auto

``--fused-kernels`` times each of fused's kernels on its own (forward, dO.O rows, key gradients, query
gradients) in three settings: the forward's saved q/k, none (the backward normalises again), and q and k
normalised by a kernel of their own before the forward (``normalise_first``: "fwd" is then both kernels,
"normalise" the first alone); then every candidate tile of each kernel (``TILE_CANDIDATES``), with the
library's setting: one JSON line per kernel and setting, with TFLOP/s over the allowed pairs' matmuls.
``--normalise-first 0 1`` runs the ``--cos`` cases both ways.

    python -m bench.attention_speed --fused-kernels --depths 16 20
    python -m bench.attention_speed --cos --impls fused --normalise-first 0 1 --depths 16 20
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import OFFICIAL, emit, environment, set_attention_knobs, time_calls
from var.models import fused_attention
from var.models.attention import (
    ATTENTION_IMPLS,
    attention_mask,
    block_causal_bias,
    block_causal_block_mask,
)

LIBRARY_TILES = dict(fused_attention.TILES)
LIBRARY_NORMALISE_FIRST = fused_attention.NORMALISE_FIRST
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def measure(impl: str, backend: str, merge: int, depth: int, batch: int, iters: int, block: int = 128,
            mode: str | None = None, flex_options: dict | None = None, cos: bool = False) -> dict:
    import var.models.attention as attention

    set_attention_knobs(flex_options=flex_options)
    pn = OFFICIAL["patch_nums"]
    L, H, c = sum(p * p for p in pn), depth, 64
    bias = block_causal_bias(pn).cuda()
    if impl == "flex":
        mask = block_causal_block_mask(pn, L, torch.device("cuda"), block_size=block)
    else:
        mask = attention_mask(impl, pn, bias, L, merge_tokens=merge)
    fn = ATTENTION_IMPLS[impl]
    qkv = torch.randn(batch, L, 3, H, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(*((batch, L, H * c) if cos else (batch, H, L, c)), device="cuda", dtype=torch.bfloat16)
    temperature = torch.full((H,), 4.0, device="cuda", requires_grad=True)  # the per-head scale of q

    @torch.compile(dynamic=False, mode=mode)
    def step(qkv):
        if impl == "fused":
            return fused_attention.fused_cos_attention(qkv.view(batch, L, 3 * H * c), temperature, mask.bounds, H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if not cos:
            return fn(q, k, v, 1.0 / c**0.5, mask)
        # in fp32, as autocast runs F.normalize in the blocks
        q = F.normalize(q.float(), dim=-1).mul(temperature.view(1, H, 1, 1)).to(v.dtype)
        k = F.normalize(k.float(), dim=-1).to(v.dtype)
        return fn(q, k, v, 1.0, mask).transpose(1, 2).reshape(batch, L, H * c)

    def once():
        with sdpa_kernel([BACKENDS[backend]]) if backend in BACKENDS else contextlib.nullcontext():
            out = step(qkv)
            out.backward(grad)
        qkv.grad = temperature.grad = None

    first, ms, _ = time_calls(once, iters)
    return {"bench": "attention", "impl": impl, "cos": cos, "backend": backend, "merge_tokens": merge,
            "flex_block": block, "fused_tiles": fused_attention.TILES if impl == "fused" else None,
            "normalise_first": fused_attention.NORMALISE_FIRST if impl == "fused" else None,
            "compile_mode": mode, "flex_options": attention.FLEX_KERNEL_OPTIONS if impl == "flex" else None,
            "depth": depth,
            "batch": batch, "fwd_bwd_ms": round(ms, 3), "per_model_step_ms": round(ms * depth, 1),
            "first_s": round(first, 1), **environment()}


# (queries, keys, warps, stages) per kernel. The inner loop steps over the key kernel's queries and over the
# other kernels' keys.
TILE_CANDIDATES = {
    "fwd": [(64, 64, 4, 2), (64, 64, 4, 4), (64, 32, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (32, 64, 4, 3),
            (32, 32, 4, 3), (64, 64, 2, 3), (32, 64, 2, 3), (16, 64, 4, 3)],
    "dkdv": [(64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (16, 64, 4, 4), (16, 64, 2, 3),
             (16, 128, 4, 3), (16, 32, 4, 3), (32, 32, 4, 3), (16, 64, 4, 2)],
    "dq": [(64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4), (64, 32, 2, 3), (32, 32, 4, 3),
           (32, 64, 4, 3), (64, 16, 4, 3), (32, 16, 4, 3), (64, 32, 4, 2)],
}
MATMULS = {"fwd": 2, "dkdv": 4, "dq": 3, "row_dots": 0, "normalise": 0}  # per allowed (query, key) pair, channel
SETTINGS = {"saved_qk": (True, False), "renormalised": (False, False), "normalise_first": (True, True)}


def measure_fused_kernels(depth: int, batch: int, iters: int, candidates: dict) -> list[dict]:
    """Each fused kernel timed alone at the library's tiles in each of SETTINGS ((save_qk, NORMALISE_FIRST));
    then each candidate tile of each kernel in the library's setting."""
    from var.models.attention import scale_bounds

    pn = OFFICIAL["patch_nums"]
    L, H, c = sum(p * p for p in pn), depth, 64
    ends, begins = scale_bounds(pn, L, torch.device("cuda"))
    pairs = int(ends.long().sum()) * batch * H  # each query sees the keys before its scale's end
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(batch, L, 3 * H * c, device="cuda", dtype=torch.bfloat16, generator=g)
    temp = torch.full((H,), 4.0, device="cuda")
    dout = torch.randn(batch, L, H * c, device="cuda", dtype=torch.bfloat16, generator=g)
    dqkv = torch.empty_like(qkv)
    fa = fused_attention
    records = []

    def time_kernel(kernel: str, setting: str, tiles: tuple | None = None) -> None:
        fa.TILES = {**LIBRARY_TILES, **({kernel: tiles} if tiles else {})}
        save_qk, fa.NORMALISE_FIRST = SETTINGS[setting]
        out, lse, qk = fa.forward(qkv, temp, ends, H, save_qk)
        delta = fa.row_dots(out, dout, H)
        run = {"fwd": lambda: fa.forward(qkv, temp, ends, H, save_qk),
               "normalise": lambda: fa.normalise_qk(qkv, temp, H),
               "row_dots": lambda: fa.row_dots(out, dout, H),
               "dkdv": lambda: fa.key_grads(dqkv, dout, qkv, temp, ends, begins, lse, delta, qk, H),
               "dq": lambda: fa.query_grads(dqkv, dout, qkv, temp, ends, lse, delta, qk, H)}[kernel]
        try:
            first, ms, _ = time_calls(run, iters)
            rec = {"ms": round(ms, 4), "first_s": round(first, 1),
                   "tflops": round(2 * MATMULS[kernel] * pairs * c / ms / 1e9, 1)}
        except Exception as e:  # a tile that does not fit the shared memory is one result
            rec = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        records.append({"bench": "attention_kernel", "kernel": kernel, "depth": depth, "batch": batch,
                        "setting": setting, "save_qk": save_qk, "normalise_first": fa.NORMALISE_FIRST,
                        "tiles": list({**fa.TILES, "normalise": fa.NORMALISE_TILE}.get(kernel, ())) or None, **rec,
                        **environment()})
        emit(records[-1])

    library = (fa.SAVE_QK, fa.NORMALISE_FIRST)
    for setting in SETTINGS:
        for kernel in ("normalise",) * SETTINGS[setting][1] + ("fwd", "row_dots", "dkdv", "dq"):
            time_kernel(kernel, setting)
    for kernel, tiles in candidates.items():
        for t in tiles:
            time_kernel(kernel, next(k for k, v in SETTINGS.items() if v == library), tuple(t))
    fa.TILES, fa.NORMALISE_FIRST = dict(LIBRARY_TILES), library[1]
    return records


def set_fused_knobs(tiles: str | None, normalise_first: int | None) -> None:
    """fused_attention.TILES for the next case: the library's own, or a JSON override of some kernels; and
    NORMALISE_FIRST (None: the library's)."""
    fused_attention.TILES = dict(LIBRARY_TILES)
    fused_attention.NORMALISE_FIRST = LIBRARY_NORMALISE_FIRST
    set_attention_knobs(fused_tiles=json.loads(tiles or "{}"),
                        normalise_first=None if normalise_first is None else bool(normalise_first))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[16])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--merges", type=int, nargs="+", default=[0, 91, 255, 424])
    ap.add_argument("--backends", nargs="+", default=["auto", "efficient"], help="auto: SDPA's own choice")
    ap.add_argument("--flex-blocks", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--impls", nargs="+", default=["dense", "scalewise", "flex"],
                    help="dense, scalewise, flex, fused (fused only with --cos)")
    ap.add_argument("--cos", action="store_true", help="time the normalisation and output layout too (above)")
    ap.add_argument("--fused-tiles", nargs="+", default=None,
                    help='JSON tiles for fused, one case each, e.g. \'{"fwd": [128, 64, 4, 3], "dkdv": [16, 64, 4, 3]}\'')
    ap.add_argument("--normalise-first", type=int, nargs="+", choices=(0, 1), default=None,
                    help="fused: q and k normalised before the forward (0/1, one case each; default: the library's)")
    ap.add_argument("--fused-kernels", action="store_true", help="time fused's kernels one by one (above)")
    ap.add_argument("--candidates", default=None,
                    help='JSON tile candidates per kernel for --fused-kernels (default: TILE_CANDIDATES)')
    ap.add_argument("--flex-modes", nargs="+", default=["default", "max-autotune-no-cudagraphs"])
    ap.add_argument("--flex-options", nargs="+", default=None,
                    help="JSON kernel_options for flex, one case each (default: attention.FLEX_KERNEL_OPTIONS)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.fused_kernels:
        for depth in a.depths:
            for rec in measure_fused_kernels(depth, a.batch, a.iters, json.loads(a.candidates or "null")
                                             or TILE_CANDIDATES):
                if a.out:
                    with open(a.out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
        return
    # Each case compiles afresh: a cached graph of another case could carry that case's SDPA backend.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    cases = [("dense", "efficient", 0, 128, None, None)]
    cases += [("scalewise", b, m, 128, None, None) for b in a.backends for m in a.merges]
    cases += [("flex", "auto", 0, blk, None if mode == "default" else mode, opts) for mode in a.flex_modes
              for blk in a.flex_blocks for opts in a.flex_options or [None]]
    if a.cos:
        cases += [("fused", "triton", 0, 64, None, (tiles, first)) for tiles in a.fused_tiles or [None]
                  for first in a.normalise_first or [None]]
    cases = [c for c in cases if c[0] in a.impls]
    for depth in a.depths:
        for impl, backend, merge, block, mode, opts in cases:
            name = {"dense": "sdpa"}.get(impl, impl)
            try:
                if impl == "fused":
                    set_fused_knobs(*opts)
                    opts = None
                rec = measure(name, backend, merge, depth, a.batch, a.iters, block, mode,
                              None if opts is None else json.loads(opts), cos=a.cos)
            except Exception as e:  # a backend that refuses a shape is one result, not the end of the run
                rec = {"bench": "attention", "impl": name, "backend": backend, "merge_tokens": merge,
                       "flex_block": block, "compile_mode": mode, "flex_options": opts, "depth": depth,
                       "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            torch._dynamo.reset()
            emit(rec, a.out)


if __name__ == "__main__":
    main()

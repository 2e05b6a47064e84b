"""Teacher-forced cosine attention as Triton kernels: q/k normalisation, block-causal attention and the
qkv gradient in one forward and three backward kernels (``attn_impl=fused``, CUDA; what ``speed=fast`` runs).

Around per-scale SDPA calls (attention.py, ``scalewise``) the blocks otherwise run the q/k L2-normalisation
as a pass of its own, sum partial key gradients, stack three gradients into the qkv projection's and transpose
the output for ``proj``: ~21 ms of a 169 ms d16 step (bench/results notes 23, 27). Here attention with its
normalisation takes 1.70 ms per d16 block forward and backward, against 3.18 for scalewise (notes 54, 58):

- forward (``_attention_fwd``): one program per (image, head, 64 queries) reads the raw q and k rows
  straight out of the qkv projection's output (B, L, 3, H, c), normalises them in registers, and runs
  flash attention over the keys its queries may see: a token of scale s sees the keys before the end of its
  own scale, so the mask is one comparison against ``ends``, made only on the key tiles a scale's end cuts
  (key tiles past the last query's end are never visited). The output goes out as (B, L, H, c), ``proj``'s
  input without a copy; the scaled q and unit k it used are kept for the backward (``SAVE_QK``), or written
  by a kernel of their own before it (``NORMALISE_FIRST``).
- backward: ``_row_dots`` (dO . O per query row, the softmax backward's row term), ``_key_grads`` (one
  program per 64 keys: loops over the queries that see them, 16 at a time, so the key and value gradients
  come out whole) and ``_query_grads`` (one per 64 queries, 32 keys at a time), both writing the raw q, k and
  v gradients, normalisation's backward applied, into one (B, L, 3, H, c) tensor: qkv's gradient as it is.

It computes what the plain path computes: q and k normalised in fp32, scaled, rounded to the qkv dtype,
softmax(q k^T) v with fp32 accumulation (the flash recurrence, as cuDNN's kernel). Gradients of q and k skip
one rounding the plain path makes (to bf16 between the attention kernel and the normalisation's backward).
tests/test_fused_attention.py compares both directions with the plain path in Triton's CPU interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Tiles (queries, keys), warps and pipeline stages per kernel, the fastest of bench.attention_speed
# --fused-kernels on an H100 (bench/results note 58): short inner loops' tiles (16 queries per step of the key
# kernel, 32 keys of the query kernel) waste less at the pyramid's ragged block-causal edge.
TILES = {"fwd": (64, 64, 4, 3), "dkdv": (16, 64, 4, 3), "dq": (64, 32, 4, 3)}
# The forward saves the scaled q and unit k it used (B x L x 2C in the qkv dtype), so that the backward's
# inner loops load them rather than normalise every tile again.
SAVE_QK = True
# q and k normalised by a kernel of their own first: the forward's inner loop loads unit key tiles instead of
# normalising them again in every program (same values and bytes, one launch more). Off until timed.
NORMALISE_FIRST = False
NORMALISE_TILE = (64, 4)  # rows per program, warps
NORM_EPS = 1e-12  # F.normalize's
# Triton's CPU interpreter (tests) runs the kernels on CPU tensors; it must be chosen before Triton loads.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _unit_rows(x, eps):
    """x (R, c) fp32 -> (x / max(|x|, eps), max(|x|, eps)) row by row: F.normalize (up to an ulp: one division
    per row, then products)."""
    norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)
    return x * (1.0 / norm)[:, None], norm


@triton.jit
def _unit_rows_backward(grad, unit, norm, eps):
    """d/dx of x / max(|x|, eps) applied to grad (R, c): (grad - (grad . u) u) / |x|, or grad / eps below eps."""
    radial = tl.where(norm > eps, tl.sum(grad * unit, axis=1), 0.0)
    return (grad - radial[:, None] * unit) * (1.0 / norm)[:, None]


@triton.jit
def _dot(a, b, EMULATED: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 inputs at full precision (Triton's default would be TF32)."""
    if EMULATED or a.dtype == tl.float32:  # the interpreter's bf16 dot is wrong: it multiplies raw bits
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _cast(x, dtype, EMULATED: tl.constexpr):
    """x.to(dtype), rounding to nearest even; the interpreter truncates to bf16, so there it rounds the bits."""
    if EMULATED and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _program_tile(H, SIZE: tl.constexpr):
    """This program's tile number, image * H + head, image, head and the token indices of its tile (every
    kernel runs on a grid of (tiles, images * heads))."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    return tile, bh, bh // H, bh % H, tile * SIZE + tl.arange(0, SIZE)


@triton.jit
def _rows(x, part, parts, b, h, idx, L, H, D: tl.constexpr):
    """Pointers and row mask of tokens ``idx``, head h, image b of part ``part`` in a (B, L, parts, H, D)
    tensor: q, k, v of qkv (parts 3), the saved scaled q and unit k (2), out and dout (1)."""
    C = H * D
    ptrs = x + b.to(tl.int64) * L * parts * C + part * C + h * D + idx[:, None] * (parts * C) + tl.arange(0, D)[None, :]
    return ptrs, (idx < L)[:, None]


@triton.jit
def _load_rows(x, part, parts, b, h, idx, L, H, D: tl.constexpr):
    ptrs, inside = _rows(x, part, parts, b, h, idx, L, H, D)
    return tl.load(ptrs, mask=inside, other=0.0)


@triton.jit
def _unit_keys(qkv, b, h, idx, L, H, eps, D: tl.constexpr, EMULATED: tl.constexpr):
    """Normalised k rows in the qkv dtype, with their unit vectors and norms (fp32)."""
    unit, norm = _unit_rows(_load_rows(qkv, 1, 3, b, h, idx, L, H, D).to(tl.float32), eps)
    return _cast(unit, qkv.dtype.element_ty, EMULATED), unit, norm


@triton.jit
def _scaled_queries(qkv, temp, b, h, idx, L, H, eps, D: tl.constexpr, EMULATED: tl.constexpr):
    """temperature * unit q rows in the qkv dtype, with the unit vectors and norms (fp32)."""
    unit, norm = _unit_rows(_load_rows(qkv, 0, 3, b, h, idx, L, H, D).to(tl.float32), eps)
    return _cast(unit * tl.load(temp + h), qkv.dtype.element_ty, EMULATED), unit, norm


@triton.jit
def _visible_keys(ends, pid_m, L, BM: tl.constexpr, BN: tl.constexpr):
    """For query tile pid_m: the keys below ``whole`` (a multiple of BN) every query of the tile sees, and the
    end of the keys any of them sees. Ends grow with the token: the first query's end and the last one's."""
    return tl.load(ends + pid_m * BM) // BN * BN, tl.load(ends + tl.minimum(pid_m * BM + BM, L) - 1)


@triton.jit
def _store_qk(qkv, temp, qk, b, h, rows, L, H, eps, D: tl.constexpr, EMULATED: tl.constexpr):
    """Writes the scaled q and unit k rows of ``rows`` to qk (B, L, 2, H, D); returns the q rows."""
    q, _, _ = _scaled_queries(qkv, temp, b, h, rows, L, H, eps, D, EMULATED)
    ptrs, inside = _rows(qk, 0, 2, b, h, rows, L, H, D)
    tl.store(ptrs, q, mask=inside)
    ptrs, inside = _rows(qk, 1, 2, b, h, rows, L, H, D)
    k, _, _ = _unit_keys(qkv, b, h, rows, L, H, eps, D, EMULATED)
    tl.store(ptrs, k, mask=inside)
    return q


@triton.jit
def _normalise_qk(qkv, temp, qk, L, H, eps, BM: tl.constexpr, D: tl.constexpr, EMULATED: tl.constexpr):
    """qk = (temperature * unit q, unit k) of BM rows, before the forward (``NORMALISE_FIRST``)."""
    _, _, b, h, rows = _program_tile(H, BM)
    _store_qk(qkv, temp, qk, b, h, rows, L, H, eps, D, EMULATED)


@triton.jit
def _attention_fwd(qkv, temp, ends, out, lse, qk, L, H, eps, BM: tl.constexpr, BN: tl.constexpr,
                   D: tl.constexpr, EMULATED: tl.constexpr, SAVE_QK: tl.constexpr, NORMALISED: tl.constexpr):
    """NORMALISED: qk holds every scaled q and unit k row already (``_normalise_qk``); otherwise each key tile
    is normalised where it is used, and with SAVE_QK the program writes its own rows to qk."""
    pid_m, bh, b, h, rows = _program_tile(H, BM)
    if NORMALISED:
        q = _load_rows(qk, 0, 2, b, h, rows, L, H, D)
    elif SAVE_QK:  # the backward's inner loops read these instead of normalising every tile again
        q = _store_qk(qkv, temp, qk, b, h, rows, L, H, eps, D, EMULATED)
    else:
        q, _, _ = _scaled_queries(qkv, temp, b, h, rows, L, H, eps, D, EMULATED)
    q_end = tl.load(ends + rows, mask=rows < L, other=1)
    whole, kv_end = _visible_keys(ends, pid_m, L, BM, BN)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for start in range(0, whole, BN):
        m_i, l_i, acc = _fwd_step(q, q_end, m_i, l_i, acc, qkv, temp, qk, b, h, start, L, H, eps, BN, D, EMULATED,
                                  NORMALISED, False)
    for start in range(whole, kv_end, BN):  # the tiles the scales' ends cut: masked
        m_i, l_i, acc = _fwd_step(q, q_end, m_i, l_i, acc, qkv, temp, qk, b, h, start, L, H, eps, BN, D, EMULATED,
                                  NORMALISED, True)
    ptrs, inside = _rows(out, 0, 1, b, h, rows, L, H, D)
    tl.store(ptrs, _cast(acc / l_i[:, None], out.dtype.element_ty, EMULATED), mask=inside)
    tl.store(lse + bh.to(tl.int64) * L + rows, m_i + tl.log(l_i), mask=rows < L)


@triton.jit
def _fwd_step(q, q_end, m_i, l_i, acc, qkv, temp, qk, b, h, start, L, H, eps, BN: tl.constexpr, D: tl.constexpr,
              EMULATED: tl.constexpr, NORMALISED: tl.constexpr, MASKED: tl.constexpr):
    """The flash recurrence over one key tile. Every query sees key 0, so m_i is finite after the first tile."""
    cols = start + tl.arange(0, BN)
    k = _saved(qkv, temp, qk, 1, b, h, cols, L, H, eps, D, EMULATED, NORMALISED)
    s = _dot(q, tl.trans(k), EMULATED)
    if MASKED:  # a token of scale s sees the keys before the end of its scale
        s = tl.where(cols[None, :] < q_end[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    v = _load_rows(qkv, 2, 3, b, h, cols, L, H, D)
    acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, EMULATED), v, EMULATED)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _row_dots(out, dout, delta, L, H, BM: tl.constexpr, D: tl.constexpr):
    """delta[b, h, l] = dO . O over the head's c values: the softmax backward's row term."""
    _, bh, b, h, rows = _program_tile(H, BM)
    o = _load_rows(out, 0, 1, b, h, rows, L, H, D).to(tl.float32)
    do = _load_rows(dout, 0, 1, b, h, rows, L, H, D).to(tl.float32)
    tl.store(delta + bh.to(tl.int64) * L + rows, tl.sum(o * do, axis=1), mask=rows < L)


@triton.jit
def _saved(qkv, temp, qk, part: tl.constexpr, b, h, idx, L, H, eps, D: tl.constexpr, EMULATED: tl.constexpr,
           SAVED: tl.constexpr):
    """Scaled q rows (part 0) or unit k rows (1) as the forward used them: read from its saved copy, or
    normalised again."""
    if SAVED:
        x = _load_rows(qk, part, 2, b, h, idx, L, H, D)
    elif part == 0:
        x, _, _ = _scaled_queries(qkv, temp, b, h, idx, L, H, eps, D, EMULATED)
    else:
        x, _, _ = _unit_keys(qkv, b, h, idx, L, H, eps, D, EMULATED)
    return x


@triton.jit
def _row_stats(ends, lse, delta, b, h, rows, L, H):
    """Where query rows' scales end (0 past L: they see nothing), their log-sum-exp and dO . O."""
    stats = (b * H + h).to(tl.int64) * L + rows
    inside = rows < L
    return (tl.load(ends + rows, mask=inside, other=0), tl.load(lse + stats, mask=inside, other=0.0),
            tl.load(delta + stats, mask=inside, other=0.0))


@triton.jit
def _key_grads(qkv, temp, ends, begins, dout, lse, delta, qk, dqkv, L, H, eps, BM: tl.constexpr,
               BN: tl.constexpr, D: tl.constexpr, EMULATED: tl.constexpr, SAVED: tl.constexpr):
    """dK and dV of BN keys, summed over every query that sees them; transposed scores (keys x queries)."""
    pid_n, bh, b, h, cols = _program_tile(H, BN)
    k, k_unit, k_norm = _unit_keys(qkv, b, h, cols, L, H, eps, D, EMULATED)
    v = _load_rows(qkv, 2, 3, b, h, cols, L, H, D)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    # The first query that sees these keys is their scale's first token (rounded down to a query tile).
    first = tl.load(begins + pid_n * BN) // BM * BM
    # Queries from the last key's scale on see every key of the tile; those before it, only some.
    whole = tl.cdiv(tl.load(begins + tl.minimum(pid_n * BN + BN, L) - 1), BM) * BM
    for start in range(first, whole, BM):
        dk, dv = _key_step(k, v, dk, dv, cols, start, qkv, temp, ends, dout, lse, delta, qk, b, h, L, H, eps,
                           BM, D, EMULATED, SAVED, True)
    for start in range(whole, L, BM):
        dk, dv = _key_step(k, v, dk, dv, cols, start, qkv, temp, ends, dout, lse, delta, qk, b, h, L, H, eps,
                           BM, D, EMULATED, SAVED, False)
    dk = _unit_rows_backward(dk, k_unit, k_norm, eps)
    ptrs, inside = _rows(dqkv, 1, 3, b, h, cols, L, H, D)
    tl.store(ptrs, _cast(dk, dqkv.dtype.element_ty, EMULATED), mask=inside)
    ptrs, inside = _rows(dqkv, 2, 3, b, h, cols, L, H, D)
    tl.store(ptrs, _cast(dv, dqkv.dtype.element_ty, EMULATED), mask=inside)


@triton.jit
def _key_step(k, v, dk, dv, cols, start, qkv, temp, ends, dout, lse, delta, qk, b, h, L, H, eps,
              BM: tl.constexpr, D: tl.constexpr, EMULATED: tl.constexpr, SAVED: tl.constexpr, MASKED: tl.constexpr):
    """One query tile's share of dK and dV. Rows past L have dO = 0 and dO . O = 0: they add nothing."""
    rows = start + tl.arange(0, BM)
    q = _saved(qkv, temp, qk, 0, b, h, rows, L, H, eps, D, EMULATED, SAVED)
    q_end, row_lse, row_delta = _row_stats(ends, lse, delta, b, h, rows, L, H)
    do = _load_rows(dout, 0, 1, b, h, rows, L, H, D)
    p_t = tl.exp(_dot(k, tl.trans(q), EMULATED) - row_lse[None, :])
    if MASKED:
        p_t = tl.where(cols[:, None] < q_end[None, :], p_t, 0.0)
    dv += _dot(_cast(p_t, do.dtype, EMULATED), do, EMULATED)
    ds_t = p_t * (_dot(v, tl.trans(do), EMULATED) - row_delta[None, :])
    return dk + _dot(_cast(ds_t, q.dtype, EMULATED), q, EMULATED), dv


@triton.jit
def _query_grads(qkv, temp, ends, dout, lse, delta, qk, dqkv, dtemp, L, H, eps, BM: tl.constexpr,
                 BN: tl.constexpr, D: tl.constexpr, EMULATED: tl.constexpr, SAVED: tl.constexpr):
    """dQ of BM queries over the keys they see, and the tile's share of the temperature's gradient."""
    pid_m, bh, b, h, rows = _program_tile(H, BM)
    q, q_unit, q_norm = _scaled_queries(qkv, temp, b, h, rows, L, H, eps, D, EMULATED)
    q_end, row_lse, row_delta = _row_stats(ends, lse, delta, b, h, rows, L, H)
    do = _load_rows(dout, 0, 1, b, h, rows, L, H, D)
    whole, kv_end = _visible_keys(ends, pid_m, L, BM, BN)
    dq = tl.zeros([BM, D], tl.float32)
    for start in range(0, whole, BN):
        dq = _query_step(q, q_end, row_lse, row_delta, do, dq, start, qkv, temp, qk, b, h, L, H, eps, BN, D,
                         EMULATED, SAVED, False)
    for start in range(whole, kv_end, BN):
        dq = _query_step(q, q_end, row_lse, row_delta, do, dq, start, qkv, temp, qk, b, h, L, H, eps, BN, D,
                         EMULATED, SAVED, True)
    # dq is d/d(t * unit q): the temperature's share is sum(dq . unit q), the unit vector's is t * dq.
    tl.store(dtemp + bh.to(tl.int64) * tl.num_programs(0) + pid_m, tl.sum(tl.sum(dq * q_unit, axis=1), axis=0))
    dq = _unit_rows_backward(dq * tl.load(temp + h), q_unit, q_norm, eps)
    ptrs, inside = _rows(dqkv, 0, 3, b, h, rows, L, H, D)
    tl.store(ptrs, _cast(dq, dqkv.dtype.element_ty, EMULATED), mask=inside)


@triton.jit
def _query_step(q, q_end, row_lse, row_delta, do, dq, start, qkv, temp, qk, b, h, L, H, eps, BN: tl.constexpr,
                D: tl.constexpr, EMULATED: tl.constexpr, SAVED: tl.constexpr, MASKED: tl.constexpr):
    """One key tile's share of dQ."""
    cols = start + tl.arange(0, BN)
    k = _saved(qkv, temp, qk, 1, b, h, cols, L, H, eps, D, EMULATED, SAVED)
    v = _load_rows(qkv, 2, 3, b, h, cols, L, H, D)
    p = tl.exp(_dot(q, tl.trans(k), EMULATED) - row_lse[:, None])
    if MASKED:
        p = tl.where(cols[None, :] < q_end[:, None], p, 0.0)
    ds = p * (_dot(do, tl.trans(v), EMULATED) - row_delta[:, None])
    return dq + _dot(_cast(ds, k.dtype, EMULATED), k, EMULATED)


# ------------------------------------------------------------------------------------------ launches
# One function per kernel, so that bench.attention_speed --fused-kernels can time each on its own.
def normalise_qk(qkv: torch.Tensor, temperature: torch.Tensor, heads: int) -> torch.Tensor:
    """The scaled q and unit k of every row, (B, L, 2C) in qkv's dtype."""
    B, L, C3 = qkv.shape
    qk = qkv.new_empty(B, L, 2 * C3 // 3)
    BM, warps = NORMALISE_TILE
    _normalise_qk[(triton.cdiv(L, BM), B * heads)](qkv, temperature, qk, L, heads, NORM_EPS, BM=BM,
                                                   D=C3 // 3 // heads, EMULATED=INTERPRETED, num_warps=warps)
    return qk


def forward(qkv: torch.Tensor, temperature: torch.Tensor, ends: torch.Tensor, heads: int, save_qk: bool):
    """(out (B, L, C), lse (B, H, L) fp32, the scaled q and unit k as (B, L, 2C) or, without save_qk, an
    empty tensor). With save_qk and NORMALISE_FIRST they are written before the forward, which reads them."""
    B, L, C3 = qkv.shape
    C = C3 // 3
    out = torch.empty(B, L, C, dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(B, heads, L, dtype=torch.float32, device=qkv.device)
    first = NORMALISE_FIRST and save_qk
    qk = normalise_qk(qkv, temperature, heads) if first else qkv.new_empty((B, L, 2 * C) if save_qk else (0,))
    BM, BN, warps, stages = TILES["fwd"]
    _attention_fwd[(triton.cdiv(L, BM), B * heads)](
        qkv, temperature, ends, out, lse, qk, L, heads, NORM_EPS, BM=BM, BN=BN, D=C // heads,
        EMULATED=INTERPRETED, SAVE_QK=save_qk and not first, NORMALISED=first, num_warps=warps, num_stages=stages)
    return out, lse, qk


def row_dots(out: torch.Tensor, dout: torch.Tensor, heads: int) -> torch.Tensor:
    B, L, C = out.shape
    delta = torch.empty(B, heads, L, dtype=torch.float32, device=out.device)
    _row_dots[(triton.cdiv(L, 64), B * heads)](out, dout, delta, L, heads, BM=64, D=C // heads)
    return delta


def key_grads(dqkv, dout, qkv, temperature, ends, begins, lse, delta, qk, heads: int) -> None:
    """Writes the k and v thirds of dqkv."""
    B, L, C3 = qkv.shape
    BM, BN, warps, stages = TILES["dkdv"]
    _key_grads[(triton.cdiv(L, BN), B * heads)](
        qkv, temperature, ends, begins, dout, lse, delta, qk, dqkv, L, heads, NORM_EPS, BM=BM, BN=BN,
        D=C3 // 3 // heads, EMULATED=INTERPRETED, SAVED=qk.numel() > 0, num_warps=warps, num_stages=stages)


def query_grads(dqkv, dout, qkv, temperature, ends, lse, delta, qk, heads: int) -> torch.Tensor:
    """Writes the q third of dqkv; returns the temperature's gradient (H,)."""
    B, L, C3 = qkv.shape
    BM, BN, warps, stages = TILES["dq"]
    tiles = triton.cdiv(L, BM)
    dtemp = torch.empty(B, heads, tiles, dtype=torch.float32, device=qkv.device)
    _query_grads[(tiles, B * heads)](
        qkv, temperature, ends, dout, lse, delta, qk, dqkv, dtemp, L, heads, NORM_EPS, BM=BM, BN=BN,
        D=C3 // 3 // heads, EMULATED=INTERPRETED, SAVED=qk.numel() > 0, num_warps=warps, num_stages=stages)
    return dtemp.sum(dim=(0, 2))


# ------------------------------------------------------------------------------------------ torch ops
@torch.library.custom_op("var::fused_cos_attention", mutates_args=())
def _fwd_op(qkv: torch.Tensor, temperature: torch.Tensor, ends: torch.Tensor, begins: torch.Tensor,
            heads: int, save_qk: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward(qkv, temperature, ends, heads, save_qk)


@_fwd_op.register_fake
def _(qkv, temperature, ends, begins, heads, save_qk):
    B, L, C3 = qkv.shape
    return (qkv.new_empty(B, L, C3 // 3), qkv.new_empty(B, heads, L, dtype=torch.float32),
            qkv.new_empty((B, L, 2 * C3 // 3) if save_qk else (0,)))


@torch.library.custom_op("var::fused_cos_attention_backward", mutates_args=())
def _bwd_op(dout: torch.Tensor, qkv: torch.Tensor, temperature: torch.Tensor, ends: torch.Tensor,
            begins: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, qk: torch.Tensor, heads: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    dout = dout.contiguous()
    delta = row_dots(out, dout, heads)
    dqkv = torch.empty_like(qkv)
    key_grads(dqkv, dout, qkv, temperature, ends, begins, lse, delta, qk, heads)
    return dqkv, query_grads(dqkv, dout, qkv, temperature, ends, lse, delta, qk, heads)


@_bwd_op.register_fake
def _(dout, qkv, temperature, ends, begins, out, lse, qk, heads):
    return torch.empty_like(qkv), temperature.new_empty(heads)


def _setup(ctx, inputs, output):
    qkv, temperature, ends, begins, heads, _ = inputs
    ctx.heads = heads
    ctx.save_for_backward(qkv, temperature, ends, begins, *output)


def _backward(ctx, dout, _dlse, _dqk):
    qkv, temperature, ends, begins, out, lse, qk = ctx.saved_tensors
    dqkv, dtemp = _bwd_op(dout, qkv, temperature, ends, begins, out, lse, qk, ctx.heads)
    return dqkv, dtemp, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def supports(qkv: torch.Tensor, heads: int) -> bool:
    """Whether the kernels can run this (B, L, 3C) qkv: on CUDA (or interpreted), a float dtype, a head
    size that is a power of two from 16 (tl.dot's smallest)."""
    D = qkv.shape[-1] // 3 // heads
    return ((qkv.is_cuda or INTERPRETED) and qkv.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and qkv.ndim == 3 and D >= 16 and D & (D - 1) == 0)


def fused_cos_attention(qkv: torch.Tensor, temperature: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor],
                        heads: int) -> torch.Tensor:
    """(B, L, C) attention output (heads side by side, ``proj``'s input) of the qkv projection (B, L, 3C):
    q and k L2-normalised per head, q times ``temperature`` (H,), block-causal over ``bounds``
    (``scale_bounds``); what SelfAttention computes with ``cos_attn`` and attn_impl ``scalewise``."""
    if not supports(qkv, heads):
        raise ValueError(f"fused attention needs a CUDA (B, L, 3C) float qkv with a power-of-two head size "
                         f">= 16; got {qkv.dtype} {tuple(qkv.shape)} on {qkv.device} with {heads} heads")
    ends, begins = bounds
    out, _, _ = _fwd_op(qkv.contiguous(), temperature.float().contiguous(), ends, begins, heads, SAVE_QK)
    return out

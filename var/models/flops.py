"""Parameter and FLOP accounting for VAR, under named conventions (the one place they are defined).

Parameters (counted on the meta device, so d30 costs nothing):
- ``total``: every parameter (what the paper's "18M ... 2B" and the README's "310M" count).
- ``non_embedding``: total minus class_emb, pos_start, pos_1LC, lvl_embed, word_embed and head; it keeps
  the blocks (with their AdaLN) and the head's AdaLN.
- ``core``: the blocks' weight matrices, the paper's eq. 8: d * (4w^2 + 8w^2 + 6w^2) = 73728 d^3
  (shared AdaLN: 12 d w^2 + 6 w^2).

Training FLOPs per image (L = sum(pn^2) tokens; one image is one sequence). Matmuls only: biases,
norms, softmax, GELU and the modulation are elementwise and left out. Backward = 2 x forward.
- ``6NL``: 6 * non_embedding * L. Kaplan/Chinchilla style; it treats the AdaLN matrices as if they ran
  per token (they run once per image) and leaves out attention and the head.
- ``exact``: 3 * forward, forward =
      2 * (qkv + proj + fc1 + fc2 weights) * depth * L          per-token block matmuls
    + 2 * Cvae * C * (L - first_l)                              word_embed (the start token skips it)
    + 2 * C * V * L                                             head
    + 2 * (block AdaLN + head AdaLN weights)                     once per image, on the class vector
    + 4 * C * depth * P,  P = sum_k n_k * S_k                   QK^T and AV over the allowed pairs only
  with n_k = pn_k^2 and S_k the tokens of scales 0..k (block-causal mask).
- ``exact_dense_attn``: as ``exact`` with P = L^2, what a dense masked kernel (SDPA + mask) executes.
- ``official_mfu``: the GPU-performance reference, 6 * M * L + 6 * A + 12 * depth * L^2 * C with
  M = per-token matmul weights (blocks' qkv/proj/fc1/fc2 + word_embed + head) and A = AdaLN weights
  (blocks + head). It equals ``exact_dense_attn`` up to counting word_embed on all L tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from var.models.zoo import VARConfig, build_var

EMBEDDING_PARAM_PREFIXES = ("class_emb.", "pos_start", "pos_1LC", "lvl_embed.", "word_embed.", "head.")

FLOP_CONVENTIONS = {
    "6NL": "6 x non-embedding params x L tokens per image",
    "exact": "3 x forward matmul FLOPs; AdaLN once per image; attention over block-causal pairs only",
    "exact_dense_attn": "3 x forward matmul FLOPs; AdaLN once per image; attention over the dense L x L",
    "official_mfu": "6 x per-token matmul params x L + 6 x AdaLN params + 12 x depth x L^2 x width",
}


def count_params(model: nn.Module) -> dict[str, int]:
    """total / non_embedding / embedding / core parameter counts of a built (possibly meta) VAR."""
    total = emb = core = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if name.startswith(EMBEDDING_PARAM_PREFIXES):
            emb += n
        if p.ndim == 2 and (name.startswith("blocks.") or name.startswith("shared_ada_lin.")):
            core += n
    return {"total": total, "non_embedding": total - emb, "embedding": emb, "core": core}


def param_counts(cfg: VARConfig) -> dict[str, int]:
    with torch.device("meta"):
        return count_params(build_var(cfg))


def core_params_paper(depth: int) -> int:
    """The paper's eq. 8: 18 * depth * (64 * depth)^2."""
    return 73728 * depth**3


def attention_pairs(patch_nums) -> tuple[int, int]:
    """(block-causal, dense) number of (query, key) pairs for one image."""
    causal, seen = 0, 0
    for pn in patch_nums:
        seen += pn * pn
        causal += pn * pn * seen
    return causal, seen * seen


def forward_flops(cfg: VARConfig) -> dict[str, int]:
    """Forward matmul FLOPs of one image, by component."""
    C, d, V = cfg.width, cfg.depth, cfg.vocab_size
    L, first_l = cfg.seq_len, cfg.patch_nums[0] ** 2
    hidden = round(C * cfg.mlp_ratio)
    block_w = 3 * C * C + C * C + 2 * C * hidden  # qkv, proj, fc1, fc2
    adaln_w = (6 * C * C if cfg.shared_aln else 6 * C * C * d) + 2 * C * C
    causal, dense = attention_pairs(cfg.patch_nums)
    return {
        "blocks": 2 * block_w * d * L,
        "word_embed": 2 * cfg.cvae * C * (L - first_l),
        "head": 2 * C * V * L,
        "adaln": 2 * adaln_w,
        "attn_causal": 4 * C * d * causal,
        "attn_dense": 4 * C * d * dense,
    }


def flops_per_image(cfg: VARConfig, non_embedding_params: int | None = None) -> dict[str, int]:
    """Training FLOPs of one image under every convention of ``FLOP_CONVENTIONS``."""
    f = forward_flops(cfg)
    if non_embedding_params is None:
        non_embedding_params = param_counts(cfg)["non_embedding"]
    C, d, L = cfg.width, cfg.depth, cfg.seq_len
    common = f["blocks"] + f["word_embed"] + f["head"] + f["adaln"]
    per_token_w = f["blocks"] // (2 * L) + cfg.cvae * C + C * cfg.vocab_size
    return {
        "6NL": 6 * non_embedding_params * L,
        "exact": 3 * (common + f["attn_causal"]),
        "exact_dense_attn": 3 * (common + f["attn_dense"]),
        "official_mfu": 6 * per_token_w * L + 6 * (f["adaln"] // 2) + 12 * d * L * L * C,
    }


def describe(cfg: VARConfig) -> dict:
    """Params and FLOPs per image of one config, for run records (every number labelled)."""
    params = param_counts(cfg)
    return {
        "params": params,
        "core_params_paper": core_params_paper(cfg.depth),
        "tokens_per_image": cfg.seq_len,
        "train_flops_per_image": flops_per_image(cfg, params["non_embedding"]),
        "flop_conventions": dict(FLOP_CONVENTIONS),
    }

"""The VAR transformer (next-scale prediction, Tian et al. 2404.02905), as a plain nn.Module.

A GPT-2-like decoder over the flattened token pyramid of L = sum(pn^2) tokens, conditioned on the class:

    tokens:  [sos | word_embed(teacher-forcing input of scales 1..K-1)] + lvl_embed(scale) + pos_1LC
    sos:     class_emb(label) + pos_start          (the class is both the start token and ...)
    blocks:  x += drop_path(gamma1 * attn(LN(x)*(1+scale1)+shift1))
             x += drop_path(gamma2 * ffn(LN(x)*(1+scale2)+shift2))
             with (gamma1, gamma2, scale1, scale2, shift1, shift2) = ada_lin(class_emb)  (... the AdaLN condition)
    head:    head(LN(x)*(1+scale)+shift), logits in fp32

Attention is block-causal over scales (see attention.py). Parameter and buffer names follow the official
code so that the released var_d{16,20,24,30}.pth load strictly; the param count of the official
configurations is exact (d16: 310,283,520).

Deliberate differences from the official code:
- class dropout (``cond_drop_rate``) applies only in training mode; the official also drops labels at
  validation, which biases the measured test loss that the scaling laws are fitted to.
- under autocast the residual stream stays in the parameter dtype by default; only the matmuls run in low
  precision. ``residual_dtype="autocast"`` casts it to the autocast dtype (bf16) as the official code does:
  half the bytes for the memory-bound elementwise work around the matmuls, at bf16 rounding of the stream.
- no dropout / attention dropout (the official uses rate 0 everywhere).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from var.models.attention import attention_mask, block_causal_bias, scale_ids
from var.models.block import AdaLNBeforeHead, AdaLNSelfAttn, SharedAdaLin, complete
from var.models.fused_cross_entropy import linear_cross_entropy

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
RESIDUAL_DTYPES = ("param", "autocast")  # the residual stream under autocast: fp32 parameters' dtype | bf16


def _no_autocast(device: torch.device):
    """Embeddings and the head run outside autocast, as in the official code."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer.

    ``forward(label_B, x_BLCv)`` is teacher forcing: x_BLCv (B, L - first_l, Cvae) holds the inputs of
    scales 1..K-1 (scale 0's input is the start token); returns logits (B, L, V) for all L tokens.
    ``enable_kv_cache(True)`` + ``forward_scale`` run one scale at a time for sampling.
    """

    def __init__(self, depth: int, embed_dim: int, num_heads: int, num_classes: int = 1000,
                 vocab_size: int = 4096, cvae: int = 32, patch_nums: Sequence[int] = OFFICIAL_PATCH_NUMS,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, norm_eps: float = 1e-6,
                 shared_aln: bool = False, cos_attn: bool = True, cond_drop_rate: float = 0.1,
                 attn_impl: str = "sdpa", init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5,
                 init_head: float = 0.02, init_std: float = -1.0, residual_dtype: str = "param",
                 ffn_impl: str = "plain", adaln_impl: str = "plain", defer_residual: bool = False):
        super().__init__()
        if residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"residual_dtype={residual_dtype!r}: expected one of {', '.join(RESIDUAL_DTYPES)}")
        self.residual_dtype = residual_dtype
        self.depth, self.C, self.num_heads = depth, embed_dim, num_heads
        self.num_classes, self.V, self.Cvae = num_classes, vocab_size, cvae
        self.cond_drop_rate = cond_drop_rate
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends, cur = [], 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.prog_si = -1  # progressive training: train on scales 0..prog_si only (-1: all)

        C = embed_dim
        self.word_embed = nn.Linear(cvae, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)  # row num_classes = null class (CFG)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)

        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if shared_aln else nn.Identity()
        # Drop path grows linearly with block index from 0 to drop_path_rate (python floats: meta-safe).
        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(C, C, num_heads, mlp_ratio, dpr[i], norm_eps, shared_aln, cos_attn, attn_impl, ffn_impl,
                          adaln_impl, defer_residual)
            for i in range(depth)
        ])
        self.drop_path_rate = drop_path_rate

        # Persistent buffers: they are part of the released state dicts.
        self.register_buffer("lvl_1L", scale_ids(self.patch_nums).view(1, self.L))
        self.register_buffer("attn_bias_for_masking", block_causal_bias(self.patch_nums).contiguous())

        self.head_nm = AdaLNBeforeHead(C, C, norm_eps)
        self.head = nn.Linear(C, vocab_size)
        self.init_weights(init_adaln, init_adaln_gamma, init_head, init_std)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0) -> None:
        """The official initialisation (std sqrt(1/3C), small head, near-identity blocks)."""
        if init_std < 0:
            init_std = math.sqrt(1 / (3 * self.C))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=init_std)
        if init_head >= 0:
            self.head.weight.mul_(init_head)
            self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        rescale = math.sqrt(2 * self.depth)  # residual branches: keep the stream's variance O(1) in depth
        for b in self.blocks:
            b.attn.proj.weight.div_(rescale)
            b.ffn.fc2.weight.div_(rescale)
            if b.shared_aln:
                b.ada_gss.normal_().div_(math.sqrt(self.C))
                b.ada_gss[:, :, 2:].mul_(init_adaln)
                b.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                w = b.ada_lin[-1].weight  # rows: [gamma1, gamma2 | scale1, scale2, shift1, shift2]
                w[2 * self.C:].mul_(init_adaln)
                w[: 2 * self.C].mul_(init_adaln_gamma)  # tiny gammas: every block starts near identity

    # ------------------------------------------------------------ utilities
    def set_attn_impl(self, name: str) -> None:
        for b in self.blocks:
            b.attn.set_attn_impl(name)

    def set_grad_checkpointing(self, every: int) -> None:
        """Recompute every ``every``-th block in backward (1: all, 0: none): activation memory for compute."""
        for i, b in enumerate(self.blocks):
            b.grad_checkpointing = every > 0 and i % every == 0

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile each block in place (state-dict keys unchanged); all blocks share one graph."""
        for b in self.blocks:
            b.compile(**kwargs)

    def enable_kv_cache(self, enable: bool) -> None:
        """Turn the per-block KV caches on (empty) or off; call before and after each sampling run."""
        for b in self.blocks:
            b.attn.kv_caching(enable)

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream as the blocks carry it: as is, or in the autocast dtype (see residual_dtype)."""
        dev = x.device.type
        if self.residual_dtype == "autocast" and torch.is_autocast_enabled(dev):
            return x.to(torch.get_autocast_dtype(dev))
        return x

    def _run_blocks(self, x: torch.Tensor, cond, mask, run_block: Callable | None = None) -> torch.Tensor:
        """The stream through every block. With ``defer_residual`` each block hands its second residual add
        on to the next (AdaLNSelfAttn.forward); the last one's is added here."""
        branch = None
        for b in self.blocks:
            x = b(x, cond, mask, branch) if run_block is None else run_block(b, x, cond, mask, branch)
            if b.defer_residual:
                x, branch = x
        return complete(x, branch)

    def _lvl_pos(self, begin: int, end: int) -> torch.Tensor:
        """(1, end-begin, C) level + absolute position embedding of tokens begin..end."""
        return self.lvl_embed(self.lvl_1L[:, begin:end]) + self.pos_1LC[:, begin:end]

    # ------------------------------------------------------ teacher forcing
    def forward(self, label_B: torch.Tensor, x_BLCv: torch.Tensor, prog_si: int | None = None,
                target: torch.Tensor | None = None, label_smoothing: float = 0.0,
                ce_chunk_tokens: int = 8192, ce_compiled: bool = False) -> torch.Tensor:
        """Logits (B, ed, V) for the first ``prog_si + 1`` scales (all scales when prog_si is -1/None).

        x_BLCv: (B, >= ed - first_l, Cvae) teacher-forcing input of scales 1.., extra tokens are ignored.
        With ``target`` (B, >= ed) token indices, returns instead the mean cross-entropy over the ed tokens,
        computed by the memory-lean fused head (no logits kept; see fused_cross_entropy.py; ce_compiled: its
        chunks through torch.compile). It goes through forward so that wrappers' hooks (DDP, FSDP2) see it.
        """
        h, cond_BD = self.hidden_states(label_B, x_BLCv, prog_si)
        if target is None:
            return self.head_logits(h, cond_BD)
        feats = self.head_features(h, cond_BD)
        return linear_cross_entropy(feats, self.head.weight, self.head.bias, target[:, : h.shape[1]],
                                    label_smoothing, ce_chunk_tokens, compiled=ce_compiled)

    def hidden_states(self, label_B: torch.Tensor, x_BLCv: torch.Tensor, prog_si: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream after the last block (B, ed, C), class vector cond_BD (B, C)); see forward."""
        prog_si = self.prog_si if prog_si is None else prog_si
        ed = self.begin_ends[prog_si][1] if prog_si >= 0 else self.L
        B = label_B.shape[0]
        if self.training and self.cond_drop_rate > 0:  # classifier-free guidance training
            drop = torch.rand(B, device=label_B.device) < self.cond_drop_rate
            label_B = torch.where(drop, self.num_classes, label_B)

        with _no_autocast(self.pos_1LC.device):
            cond_BD = self.class_emb(label_B)
            x = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start
            if ed > self.first_l:
                x_in = x_BLCv[:, : ed - self.first_l].to(self.word_embed.weight.dtype)
                x = torch.cat((x, self.word_embed(x_in)), dim=1)
            x = x + self._lvl_pos(0, ed)

        mask = attention_mask(self.blocks[0].attn.attn_impl, self.patch_nums, self.attn_bias_for_masking, ed)
        cond = self.shared_ada_lin(cond_BD)
        x = self._run_blocks(self._residual(x), cond, mask)
        if ed == self.first_l:
            # word_embed is unused at the first scale; a zero-valued touch keeps DDP's gradient sync whole.
            x = x + 0 * (self.word_embed.weight[0, 0] + self.word_embed.bias[0])
        return x, cond_BD

    def head_features(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """The head's input: AdaLN of the final stream, in the parameter dtype (outside autocast)."""
        dtype = self.head.weight.dtype
        with _no_autocast(h.device):
            return self.head_nm(h.to(dtype), cond_BD.to(dtype))

    def head_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Logits (B, l, V) in fp32 of the final stream h (B, l, C)."""
        feats = self.head_features(h, cond_BD)
        with _no_autocast(h.device):
            logits = self.head(feats)
        return logits.float() if logits.element_size() < 4 else logits

    # ------------------------------------------------------- KV-cache path
    def forward_scale(self, cond_BD: torch.Tensor, x_BlCv: torch.Tensor | None, si: int,
                      run_block: Callable | None = None) -> torch.Tensor:
        """One sampling step: logits (B, pn_si^2, V) of scale ``si``, attending to the cached scales < si.

        cond_BD: ``class_emb(label)`` (B, C), the caller doubles the batch for CFG. x_BlCv: the input of
        scale si (B, pn_si^2, Cvae), ignored for si == 0 (the start token). Scales must come in order
        0, 1, ... with the KV cache enabled. run_block(block, x, cond, mask, branch), if given, runs each
        block in place of ``block(x, cond, mask, branch)`` (graphed sampling passes a compiled one).
        """
        bg, ed = self.begin_ends[si]
        cached = self.blocks[0].attn.cached_len
        if not self.blocks[0].attn.caching:
            raise RuntimeError("forward_scale needs model.enable_kv_cache(True) first")
        if cached != bg:
            raise RuntimeError(f"KV cache holds {cached} tokens but scale {si} starts at token {bg}")
        B = cond_BD.shape[0]
        with _no_autocast(self.pos_1LC.device):
            if si == 0:
                x = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start
            else:
                x = self.word_embed(x_BlCv.to(self.word_embed.weight.dtype))
            x = x + self._lvl_pos(bg, ed)
        cond = self.shared_ada_lin(cond_BD)
        x = self._run_blocks(self._residual(x), cond, None, run_block)  # cached keys: all earlier, no mask
        return self.head_logits(x, cond_BD)


# Names (substrings) of parameters that get no weight decay besides 1-D params and biases:
# embedding tables and learned gains/temperatures.
NO_DECAY_NAMES = ("class_emb", "pos_start", "pos_1LC", "lvl_embed", "scale_mul", "ada_gss", "gamma")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices, none on norms, biases, embeddings and gains.

    ``word_embed`` is a Linear projection of the tokenizer's vectors, not a lookup table, so it is decayed
    (as in the official code; the official also decays ``class_emb``, which is excluded here).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith("bias") or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def no_decay_names(model: nn.Module) -> list[str]:
    """Names of the parameters ``param_groups`` leaves undecayed (for logs and tests)."""
    ids = {id(p) for p in param_groups(model, 0.0)[1]["params"]}
    return [n for n, p in model.named_parameters() if id(p) in ids]

"""Model zoo: one ``depth`` dial sets every size, as in VAR.

VAR's rules (paper eq. 7, official ``models/__init__.py``): width = 64 * depth (head_dim is always 64),
heads = depth, drop-path rate = 0.1 * depth / 24, and the peak learning rate is linear in the global batch,
lr = base_lr * global_batch / 256 with base_lr = 1e-4. Presets ``d2`` ... ``d36`` cover every even depth;
``d36-s`` is the released 512px model (shared AdaLN, 2240 tokens).

The scaling grid (``SCALING_GRID``): the paper trains "12 sizes from 18M to 2B" with "d from 6 to 30", but
d6..d30 in steps of 2 gives 13. We drop d28: this keeps both ends (d6 = 18.5M, d30 = 2.01B), every released
depth (16, 20, 24, 30) and every depth the paper shows (6, 16, 26, 30, appendix Fig. 7), and d28 sits where
the grid is densest in log N (d26 -> d28 -> d30 are only x1.25 and x1.23 apart; d26 -> d30 is x1.53, still
a smaller step than d6 -> d8, x2.2).

AdaLN gamma init (``init_adaln_gamma``): the README commands use 1e-3 for d16/d20, 1e-4 for d24, 1e-5 for
d30 and 5e-6 for d36; ``adaln_gamma_for`` extends those steps to every depth (the argparse default is 1e-5).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from var.checkpoints import load_weights
from var.models.block import DropPath
from var.models.transformer import OFFICIAL_PATCH_NUMS, VAR

PATCH_NUMS_256 = OFFICIAL_PATCH_NUMS  # 680 tokens per image
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # 2240 tokens per image
BASE_LR, BASE_BATCH = 1e-4, 256
RELEASED_DEPTHS = (16, 20, 24, 30, 36)
SCALING_GRID = (6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 30)


def width_for(depth: int) -> int:
    return 64 * depth


def heads_for(depth: int) -> int:
    return depth


def drop_path_for(depth: int) -> float:
    return 0.1 * depth / 24


def lr_for(global_batch: int, base_lr: float = BASE_LR) -> float:
    """Peak learning rate, linear in the global batch (per 256 images)."""
    return base_lr * global_batch / BASE_BATCH


def adaln_gamma_for(depth: int) -> float:
    """Init multiplier of the AdaLN gamma rows: the README's per-depth values, as steps."""
    if depth <= 20:
        return 1e-3
    if depth <= 24:
        return 1e-4
    if depth <= 30:
        return 1e-5
    return 5e-6


@dataclass
class VARConfig:
    """Everything needed to build a VAR; ``None`` fields are derived from ``depth``."""

    depth: int = 16
    num_classes: int = 1000
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    vocab_size: int = 4096
    cvae: int = 32
    shared_aln: bool = False
    cos_attn: bool = True
    drop_path_rate: float | None = None
    cond_drop_rate: float = 0.1
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    init_adaln: float = 0.5
    init_adaln_gamma: float | None = None
    init_head: float = 0.02
    init_std: float = -1.0  # < 0: sqrt(1 / (3 * width))
    attn_impl: str = "sdpa"
    residual_dtype: str = "param"  # "autocast": the residual stream in bf16 under autocast, as the official
    ffn_impl: str = "plain"  # "fused": GELU and its derivative in the feed-forward GEMMs' epilogues (CUDA bf16)
    adaln_impl: str = "plain"  # "fused": residual add, LayerNorm and modulation as Triton kernels (CUDA)
    defer_residual: bool = False  # each block's second residual add done by the next block (fuses with its LN)

    @property
    def width(self) -> int:
        return width_for(self.depth)

    @property
    def num_heads(self) -> int:
        return heads_for(self.depth)

    @property
    def dpr(self) -> float:
        return drop_path_for(self.depth) if self.drop_path_rate is None else self.drop_path_rate

    @property
    def adaln_gamma(self) -> float:
        return adaln_gamma_for(self.depth) if self.init_adaln_gamma is None else self.init_adaln_gamma

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    def learning_rate(self, global_batch: int, base_lr: float = BASE_LR) -> float:
        return lr_for(global_batch, base_lr)

    def to_dict(self) -> dict:
        """Config plus the derived values, for run records."""
        return {**asdict(self), "width": self.width, "num_heads": self.num_heads, "dpr": self.dpr,
                "adaln_gamma": self.adaln_gamma, "seq_len": self.seq_len}


def official_config(depth: int) -> VARConfig:
    """The released configuration: 256px, unshared AdaLN; d36 is the 512px shared-AdaLN model."""
    if depth == 36:
        return VARConfig(depth=36, shared_aln=True, patch_nums=PATCH_NUMS_512)
    return VARConfig(depth=depth)


PRESETS: dict[str, VARConfig] = {f"d{d}": VARConfig(depth=d) for d in range(2, 37, 2)}
PRESETS["d36-s"] = official_config(36)


def preset(name: str) -> VARConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown VAR preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def build_var(cfg: VARConfig) -> VAR:
    """Build (and initialise) a VAR; wrap in ``with torch.device('meta'):`` to only count it."""
    return VAR(
        depth=cfg.depth, embed_dim=cfg.width, num_heads=cfg.num_heads, num_classes=cfg.num_classes,
        vocab_size=cfg.vocab_size, cvae=cfg.cvae, patch_nums=cfg.patch_nums, mlp_ratio=cfg.mlp_ratio,
        drop_path_rate=cfg.dpr, norm_eps=cfg.norm_eps, shared_aln=cfg.shared_aln, cos_attn=cfg.cos_attn,
        cond_drop_rate=cfg.cond_drop_rate, attn_impl=cfg.attn_impl, init_adaln=cfg.init_adaln,
        init_adaln_gamma=cfg.adaln_gamma, init_head=cfg.init_head, init_std=cfg.init_std,
        residual_dtype=cfg.residual_dtype, ffn_impl=cfg.ffn_impl, adaln_impl=cfg.adaln_impl,
        defer_residual=cfg.defer_residual,
    )


def load_released_var(path: str | os.PathLike, depth: int, device: str | torch.device = "cpu",
                      cfg: VARConfig | None = None) -> VAR:
    """A released ``var_d{depth}.pth`` (official key names) loaded strictly, in eval mode.

    The model is built on the meta device and materialised empty, so no time is spent on an init that
    the checkpoint overwrites; a strict load guarantees every parameter and buffer is then filled.
    Raises ``var.checkpoints.CheckpointError`` naming missing / unexpected / mis-shaped keys.
    """
    cfg = cfg or official_config(depth)
    with torch.device("meta"):
        model = build_var(cfg)
    model = model.to_empty(device=device)
    load_weights(model, path, what=f"VAR d{depth} weights")
    for m in model.modules():  # non-persistent buffers (drop-path rates) are not in the checkpoint
        if isinstance(m, DropPath):
            m.reset_parameters()
    return model.eval()

"""The scaling-law metrics over token predictions, accumulated as sums so they aggregate exactly.

L_mean is token-weighted over every token of the image (as the official VAR's L_mean), L_last covers the
last scale only; per-scale loss and token error (1 - top-1 accuracy) come with them. Sums and counts are
all-reduced before dividing, so the result is the same whatever the batch split across ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scale_index(patch_nums: list[int], device=None) -> torch.Tensor:
    """Scale id of each token position: (L,)."""
    return torch.cat([torch.full((p * p,), i, dtype=torch.long) for i, p in enumerate(patch_nums)]).to(device)


class TokenMetricSums:
    """Running per-scale sums of cross-entropy, correct predictions and token counts."""

    def __init__(self, patch_nums: list[int], device=None):
        self.patch_nums = list(patch_nums)
        k = len(patch_nums)
        self.scale_of = scale_index(patch_nums, device)
        self.ce = torch.zeros(k, dtype=torch.float64, device=device)
        self.correct = torch.zeros(k, dtype=torch.float64, device=device)
        self.count = torch.zeros(k, dtype=torch.float64, device=device)
        self.images = 0

    @torch.no_grad()
    def update(self, logits_BLV: torch.Tensor, target_BL: torch.Tensor, keep_B: torch.Tensor | None = None) -> None:
        """``keep_B`` masks out padding samples (evaluation pads ranks to equal batch counts)."""
        if keep_B is not None:
            logits_BLV, target_BL = logits_BLV[keep_B], target_BL[keep_B]
        L = target_BL.shape[1]
        scale = self.scale_of[:L].to(target_BL.device)
        ce = F.cross_entropy(logits_BLV.float().transpose(1, 2), target_BL, reduction="none")  # (B, L)
        hit = (logits_BLV.argmax(-1) == target_BL).double()
        k = len(self.patch_nums)
        self.ce += torch.zeros(k, dtype=torch.float64, device=ce.device).index_add_(0, scale, ce.double().sum(0))
        self.correct += torch.zeros(k, dtype=torch.float64, device=ce.device).index_add_(0, scale, hit.sum(0))
        self.count += torch.zeros(k, dtype=torch.float64, device=ce.device).index_add_(
            0, scale, torch.full((L,), float(target_BL.shape[0]), dtype=torch.float64, device=ce.device))
        self.images += target_BL.shape[0]

    def all_reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            packed = torch.cat([self.ce, self.correct, self.count,
                                torch.tensor([self.images], dtype=torch.float64, device=self.ce.device)])
            torch.distributed.all_reduce(packed)
            k = len(self.patch_nums)
            self.ce, self.correct, self.count = packed[:k], packed[k:2 * k], packed[2 * k:3 * k]
            self.images = int(packed[-1].item())

    def compute(self) -> dict:
        seen = self.count > 0
        per_loss = torch.where(seen, self.ce / self.count.clamp(min=1), torch.full_like(self.ce, float("nan")))
        per_err = torch.where(seen, 1 - self.correct / self.count.clamp(min=1), torch.full_like(self.ce, float("nan")))
        total = self.count.sum().clamp(min=1)
        return {
            "L_mean": float(self.ce.sum() / total),
            "L_last": float(per_loss[-1]),
            "err_mean": float(1 - self.correct.sum() / total),
            "err_last": float(per_err[-1]),
            "per_scale_loss": [float(v) for v in per_loss],
            "per_scale_err": [float(v) for v in per_err],
            "n_images": int(self.images),
        }

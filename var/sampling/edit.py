"""Zero-shot editing as in the official demo_zero_shot_edit notebook: in-/out-painting and class editing.

The source image is tokenized; the sampler runs as usual, and after each scale's draw the positions outside
the edit region take the source's tokens, so later scales attend to (and build on) the source there. Per
scale the keep mask is the finest-scale mask bilinearly resized to (pn, pn) and thresholded at > 0.5; scales
with pn^2 <= 3 (only 1x1) are forced to the source entirely. In-/out-painting use the null class (the paper
injects no label); class-conditional editing regenerates the region with a target class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from var.sampling.sampler import decode_fhat, run_scales

MODES = ("inpaint", "outpaint", "class")


def box_mask(side: int, box: Sequence[float]) -> torch.Tensor:
    """(side, side) bool, True inside box = (y0, x0, y1, x1) in fractions of the side (official rounding)."""
    y0, x0, y1, x1 = (float(v) for v in box)
    if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
        raise ValueError(f"box {list(box)}: need 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1")
    m = torch.zeros(side, side, dtype=torch.bool)
    m[round(y0 * side):round(y1 * side), round(x0 * side):round(x1 * side)] = True
    return m


def region_to_regenerate(region: torch.Tensor, mode: str) -> torch.Tensor:
    """The region (a box or a mask image, True inside) -> what to regenerate: inside for inpaint/class,
    outside for outpaint."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    return ~region if mode == "outpaint" else region


def scale_keep_masks(regen: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
    """Regenerate mask (B, h, w) or (h, w) bool at pixel or token resolution -> per scale keep (B, pn^2) bool.

    A mask finer than the last scale is first area-averaged to it (the fraction of each token's cell that is
    kept); then, as in the notebook, bilinear to each (pn, pn) and > 0.5.
    """
    if regen.ndim == 2:
        regen = regen.unsqueeze(0)
    keep = (~regen.bool()).float().unsqueeze(1)  # (B, 1, h, w)
    last = patch_nums[-1]
    if keep.shape[-2:] != (last, last):
        keep = F.interpolate(keep, size=(last, last), mode="area")
    out = []
    for pn in patch_nums:
        k = F.interpolate(keep, size=(pn, pn), mode="bilinear", align_corners=False).gt(0.5)
        if pn * pn <= 3:
            k.fill_(True)
        out.append(k.flatten(1))
    return out


@torch.no_grad()
def edit_tokens(var_model, vqvae, images: torch.Tensor, regen: torch.Tensor, labels: torch.Tensor,
                seeds: Sequence[int], **sampling) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor],
                                                           list[torch.Tensor]]:
    """Batched editing: (tokens, f_hat, source tokens, keep masks), each list per scale (B, pn^2).

    images (B, 3, R, R) in [-1, 1]; regen (B, h, w) or (h, w) bool, True = regenerate; labels (B,), the
    null class ``var_model.num_classes`` for in-/out-painting. ``sampling``: sample_tokens' keywords.
    """
    device = var_model.class_emb.weight.device
    was = vqvae.training
    vqvae.eval()
    try:
        src = vqvae.img_to_idxBl(images.to(device=device, dtype=vqvae.quant_conv.weight.dtype))
    finally:
        vqvae.train(was)
    keep = [k.expand(images.shape[0], -1).to(device) for k in scale_keep_masks(regen.to(device), var_model.patch_nums)]
    tokens, f_hat = run_scales(var_model, vqvae, labels, seeds, forced=list(zip(src, keep)), **sampling)
    return tokens, f_hat, src, keep


def edit_image(var_model, vqvae, image: torch.Tensor, mask: torch.Tensor, label: int, seed: int,
               **sampling) -> torch.Tensor:
    """Edit one image: (3, R, R) in [-1, 1] -> (3, R, R) in [-1, 1].

    mask (h, w) bool, True = regenerate, at pixel resolution or at the finest token grid. label: a class for
    class-conditional editing, ``var_model.num_classes`` (null) for in-/out-painting. seed: the draws'
    seed. ``sampling``: cfg, cfg_schedule, top_k, top_p, temperature, gumbel_smooth, autocast.
    """
    if image.ndim != 3 or mask.ndim != 2:
        raise ValueError(f"image must be (3, R, R) and mask (h, w); got {tuple(image.shape)}, {tuple(mask.shape)}")
    labels = torch.tensor([int(label)])
    _, f_hat, _, _ = edit_tokens(var_model, vqvae, image.unsqueeze(0), mask, labels, [int(seed)], **sampling)
    return decode_fhat(vqvae, f_hat)[0].mul(2).sub(1)

"""Next-scale sampling with a KV cache and classifier-free guidance (VAR.autoregressive_infer_cfg).

For each scale si = 0..K-1 the transformer sees only that scale's input (the start token at si = 0, else
the area-downsampled cumulative f_hat of the scales so far) and attends to the cached keys of the earlier
scales. With guidance the batch is doubled, rows [0:B] with the labels and [B:2B] with the null class
(index ``num_classes``), and the logits are mixed as (1 + t) * cond - t * uncond with t = cfg * si/(K-1)
(``linear``, the official schedule: no guidance at 1x1, full cfg at the last scale) or t = cfg (``constant``).

Every random number of image i is a function of (seeds[i], token index) alone: a counter-based stream
(SplitMix64 of the seed, then of each token's index in the pyramid; ``token_uniforms``), so an image depends on
its (label, seed) only, not on the batch it was drawn in or its position there. Tokens are drawn by inverse
CDF from those uniforms: one batched op per scale, no per-image loop and no host sync, which is what lets
the per-scale steps run as CUDA graphs (graphed.py). The Gumbel smoothing option draws its noise from a
per-image ``torch.Generator``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from var.sampling.config import CFG_SCHEDULES


# ------------------------------------------------------------------------------------------- filters
def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set filtered logits to -inf (a new tensor), with the official semantics (helpers.py).

    top-k keeps the logits >= the k-th largest (ties at the boundary are kept); k >= V is a no-op.
    top-p sorts ascending and drops the tokens whose cumulative probability is <= 1 - top_p, always keeping
    the most likely token.

    With both, one sort serves both: the k-th largest logit is read off the ascending sort, and the tokens
    below it are exactly its leading entries, so masking them there gives the sorted top-k-filtered logits
    that top-p needs (the official sorts twice: a top-k, then a full sort of the filtered logits).

    The dropped tokens are a leading run of the ascending sort (the cumulative sum only grows), so the
    first kept sorted logit is a threshold in vocabulary order: no scatter of the mask back through the
    sort's permutation. Logits tied with that threshold are all kept, as top-k keeps its boundary ties.
    """
    V = logits.shape[-1]
    use_k, use_p = 0 < top_k < V, 0 < top_p < 1
    if use_k and not use_p:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        return logits.masked_fill(logits < kth, -torch.inf)
    if use_p:
        sorted_logits = logits.sort(dim=-1, descending=False)[0]
        kept = sorted_logits
        if use_k:
            kept = sorted_logits.masked_fill(sorted_logits < sorted_logits[..., V - top_k: V - top_k + 1], -torch.inf)
        drop = kept.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)  # top-k's -inf leading entries included
        dropped = drop[..., :-1].sum(dim=-1, keepdim=True)  # the most likely token always stays
        logits = logits.masked_fill(logits < sorted_logits.gather(-1, dropped), -torch.inf)
    return logits


def guidance_scale(cfg: float, schedule: str, si: int, num_scales: int) -> float:
    """t of scale si: the weight of (cond - uncond) added to cond."""
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule={schedule!r}: expected one of {', '.join(CFG_SCHEDULES)}")
    ratio = si / (num_scales - 1) if num_scales > 1 else 1.0
    return cfg * ratio if schedule == "linear" else cfg


def _gumbel_mix(logits_lV: torch.Tensor, tau: float, gen: torch.Generator) -> torch.Tensor:
    """Soft Gumbel-softmax weights (l, V) with the image's generator (official gumbel_softmax_with_rng)."""
    gumbels = -torch.empty_like(logits_lV).exponential_(generator=gen).log()
    return ((logits_lV + gumbels) / tau).softmax(dim=-1)


# ------------------------------------------------------------------------------------- randomness
def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic, as uint64)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def stream_keys(seeds: Sequence[int], device) -> torch.Tensor:
    """(B,) int64: one stream key per image, from its seed."""
    return mix64(torch.tensor([_signed(int(s) % (1 << 64)) for s in seeds], dtype=torch.long, device=device))


def token_uniforms(keys: torch.Tensor, begin: int, count: int) -> torch.Tensor:
    """(B, count) float32 in [0, 1) for tokens begin..begin+count of each image's pyramid (24-bit)."""
    n = torch.arange(begin + 1, begin + count + 1, dtype=torch.long, device=keys.device)
    z = mix64(keys.unsqueeze(1) + n.unsqueeze(0) * _GOLDEN)
    return _shr(z, 40).to(torch.float32) * (1.0 / (1 << 24))


def inverse_cdf_draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of probs (..., V) with its uniform (...): P(i) = probs_i / sum(probs).

    ``right=True`` makes a zero-probability token unreachable even when u lands on a flat stretch of the CDF.
    """
    cdf = probs.float().cumsum(dim=-1)
    target = (uniforms * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


# ------------------------------------------------------------------------------------------- draws
def guided_logits(logits: torch.Tensor, t: float | None, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 0.0) -> torch.Tensor:
    """The logits a scale's tokens are drawn from: (1 + t) * cond - t * uncond over the two halves of the
    rows (t None: the rows are the batch, no guidance), divided by the temperature, top-k/top-p filtered."""
    if t is not None:
        B = logits.shape[0] // 2
        logits = (1 + t) * logits[:B] - t * logits[B:]
    if temperature != 1.0:
        logits = logits / temperature
    return top_k_top_p_filter(logits, top_k, top_p)


def draw_with_uniforms(logits: torch.Tensor, uniforms: torch.Tensor, t: float | None, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Token indices (B, l) of one scale from its model logits ((2B if guided else B), l, V): the softmax
    of ``guided_logits``, drawn by inverse CDF with the uniforms (B, l). One function, so that the fast path
    can compile it whole (fast.py) and draw what this draws."""
    probs = guided_logits(logits, t, temperature, top_k, top_p).softmax(dim=-1)
    return inverse_cdf_draw(probs, uniforms)


def draw_scale(logits: torch.Tensor, keys: torch.Tensor, begin: int, t: float | None, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """``draw_with_uniforms`` with the images' counter streams for tokens begin..begin+l of the pyramid."""
    return draw_with_uniforms(logits, token_uniforms(keys, begin, logits.shape[1]), t, temperature, top_k, top_p)


# --------------------------------------------------------------------------------------------- core
def _eager_scale_step(var_model, autocast: Callable) -> Callable:
    def step(cond_BD, x, si):
        with autocast():
            return var_model.forward_scale(cond_BD, x, si)
    return step


def _check_args(var_model, labels: torch.Tensor, seeds: Sequence[int], cfg: float, cfg_schedule: str,
                top_k: int, top_p: float, temperature: float, gumbel_smooth: float) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (B,), got shape {tuple(labels.shape)}")
    if len(seeds) != labels.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {labels.shape[0]} labels: give one seed per image")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > var_model.num_classes):
        raise ValueError(f"labels must be in [0, {var_model.num_classes}] ({var_model.num_classes}: unconditional)")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule={cfg_schedule!r}: expected one of {', '.join(CFG_SCHEDULES)}")
    if cfg < 0 or top_k < 0 or not 0 <= top_p <= 1 or temperature <= 0 or gumbel_smooth < 0:
        raise ValueError("need cfg >= 0, top_k >= 0, 0 <= top_p <= 1, temperature > 0, gumbel_smooth >= 0")


@torch.no_grad()
def run_scales(var_model, vqvae, labels: torch.Tensor, seeds: Sequence[int], cfg: float = 1.5,
               cfg_schedule: str = "linear", top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
               gumbel_smooth: float = 0.0, autocast: Callable = contextlib.nullcontext,
               forced: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
               logits_out: list | None = None, guided: bool | None = None,
               scale_step: Callable | None = None, draw: Callable = draw_scale,
               ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The sampling loop shared by sampling and editing; see ``sample_tokens`` for the arguments.

    forced: per scale (source tokens (B, pn^2), keep (B, pn^2) bool): kept positions take the source's
      token (and code vector) after the draw, so later scales attend to them (zero-shot editing).
    logits_out: if a list, receives each scale's raw model logits ((2B if guided else B), pn^2, V).
    guided: run the doubled batch (default: cfg > 0). With cfg = 0 and guided=True the null rows are
      computed and weighted by 0, which must give the plain conditional result.
    scale_step: fn(cond_BD, x, si) -> logits replacing the eager ``forward_scale`` (e.g. a
      ``GraphedScaleSteps`` of graphed.py); it owns its cache, and ``autocast`` is then its business.
    draw: ``draw_scale`` or a function computing the same (e.g. its compiled form, fast.py); the Gumbel
      smoothing option draws eagerly.
    """
    _check_args(var_model, labels, seeds, cfg, cfg_schedule, top_k, top_p, temperature, gumbel_smooth)
    device = var_model.class_emb.weight.device
    patch_nums, K = var_model.patch_nums, len(var_model.patch_nums)
    if tuple(vqvae.patch_nums) != tuple(patch_nums):
        raise ValueError(f"tokenizer patch_nums {tuple(vqvae.patch_nums)} != transformer's {tuple(patch_nums)}")
    guided = cfg > 0 if guided is None else guided
    B = labels.shape[0]
    labels = labels.to(device=device, dtype=torch.long)
    keys = stream_keys(seeds, device)
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds] if gumbel_smooth > 0 else []
    step = scale_step or _eager_scale_step(var_model, autocast)
    codebook = vqvae.quantize.embedding.weight
    states = (var_model.training, vqvae.training)
    var_model.eval()
    vqvae.eval()
    try:
        var_model.enable_kv_cache(True)
        lab = torch.cat((labels, torch.full_like(labels, var_model.num_classes))) if guided else labels
        cond_BD = var_model.class_emb(lab)
        f_hat, x, tokens = None, None, []
        for si, pn in enumerate(patch_nums):
            logits = step(cond_BD, x, si)
            if logits_out is not None:
                logits_out.append(logits.clone())
            t = guidance_scale(cfg, cfg_schedule, si, K) if guided else None
            begin = var_model.begin_ends[si][0]
            h = None
            if gumbel_smooth <= 0:
                idx = draw(logits, keys, begin, t, temperature, top_k, top_p)
            else:
                logits = guided_logits(logits, t, temperature, top_k, top_p)  # the soft mix needs them too
                idx = inverse_cdf_draw(logits.softmax(dim=-1), token_uniforms(keys, begin, pn * pn))
                ratio = si / (K - 1) if K > 1 else 1.0
                tau = max(gumbel_smooth * (1 - 0.95 * ratio), 0.005)
                w = torch.stack([_gumbel_mix(logits[i] * (1 + ratio), tau, g) for i, g in enumerate(gens)])
                h = w.to(codebook.dtype) @ codebook  # (B, l, Cvae): a soft mix of codes
            if forced is not None:
                src, keep = forced[si]
                src, keep = src.to(device), keep.to(device)
                idx = torch.where(keep, src, idx)
                if h is not None:
                    h = torch.where(keep.unsqueeze(-1), vqvae.quantize.embedding(src).to(h.dtype), h)
            tokens.append(idx)
            # Hard tokens go in as indices: the exact path the teacher-forcing input takes.
            step_in = idx if h is None else h.transpose(1, 2).reshape(B, -1, pn, pn)
            f_hat, nxt = vqvae.get_next_autoregressive_input(si, f_hat, step_in)
            if si < K - 1:
                x = nxt.flatten(2).transpose(1, 2)
                if guided:
                    x = torch.cat((x, x))
        return tokens, f_hat
    finally:
        var_model.enable_kv_cache(False)
        var_model.train(states[0])
        vqvae.train(states[1])


def sample_tokens(var_model, vqvae, labels: torch.Tensor, seeds: Sequence[int], cfg: float = 1.5,
                  cfg_schedule: str = "linear", top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
                  gumbel_smooth: float = 0.0, autocast: Callable = contextlib.nullcontext,
                  logits_out: list | None = None, scale_step: Callable | None = None,
                  draw: Callable = draw_scale) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sample B token pyramids: (K LongTensors (B, pn^2), f_hat (B, Cvae, H, H) fp32).

    labels (B,): classes; ``var_model.num_classes`` means unconditional (the null class). seeds: one per
    image. cfg: guidance strength (0: none, a single forward of B rows per scale). cfg_schedule: ``linear``
    | ``constant``. top_k / top_p: 0 is off. temperature divides the (guided) logits. gumbel_smooth > 0:
    the official ``more_smooth`` (the returned tokens are the hard draws, f_hat is built from the soft
    mix). autocast: a zero-argument callable returning a context for the transformer's forward, e.g.
    ``lambda: torch.autocast("cuda", torch.bfloat16)``. logits_out, scale_step, draw: see ``run_scales``.
    The model's train/eval mode is restored and its KV cache switched off afterwards.
    """
    return run_scales(var_model, vqvae, labels, seeds, cfg=cfg, cfg_schedule=cfg_schedule, top_k=top_k,
                      top_p=top_p, temperature=temperature, gumbel_smooth=gumbel_smooth, autocast=autocast,
                      logits_out=logits_out, scale_step=scale_step, draw=draw)


@torch.no_grad()
def decode_fhat(vqvae, f_hat: torch.Tensor, autocast: Callable = contextlib.nullcontext,
                channels_last: bool = False) -> torch.Tensor:
    """f_hat -> image (B, 3, R, R) fp32 in [0, 1], leaving the tokenizer's train/eval mode as it was.

    autocast / channels_last: run the decoder's convolutions in low precision / NHWC (faster on GPUs).
    """
    was = vqvae.training
    vqvae.eval()
    try:
        if channels_last:
            f_hat = f_hat.contiguous(memory_format=torch.channels_last)
        with autocast():
            img = vqvae.fhat_to_img(f_hat)
        return img.float().add(1).mul(0.5).contiguous()
    finally:
        vqvae.train(was)


def sample_images(var_model, vqvae, labels: torch.Tensor, seeds: Sequence[int], decode_autocast: bool = False,
                  channels_last: bool = False, **kwargs) -> torch.Tensor:
    """``sample_tokens`` and decode: float (B, 3, R, R) in [0, 1]. decode_autocast: decode under the
    sampling ``autocast`` too (the official samples under one autocast for both)."""
    _, f_hat = sample_tokens(var_model, vqvae, labels, seeds, **kwargs)
    ctx = kwargs.get("autocast", contextlib.nullcontext) if decode_autocast else contextlib.nullcontext
    return decode_fhat(vqvae, f_hat, autocast=ctx, channels_last=channels_last)


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (the sampler's range) -> uint8 of the same shape, rounding as torchvision's
    save_image does."""
    return (x.detach().float() * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3) on the host (see unit_to_uint8)."""
    return unit_to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


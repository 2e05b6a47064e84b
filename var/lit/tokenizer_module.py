"""LightningModule training the multi-scale VQVAE: VQGAN's compound loss around VAR's residual quantizer.

    loss_G = w_pixel * |x - x_rec|_{1|2} + w_lpips * LPIPS(x_rec, x) + vq_loss + lambda * w_gan * hinge_G(D(x_rec))
    loss_D = hinge_D(D(x), D(x_rec))                     (both GAN terms only from step disc_start on)

vq_loss is the quantizer's own (commitment beta * |sg(f_hat) - f|^2 plus codebook |f_hat - sg(f)|^2, averaged
over scales); lambda is VQGAN's adaptive weight, the ratio of the reconstruction and GAN gradient norms at the
decoder's last layer. Paper: VAR Sec. 3 eq. 5; recipe: Esser et al. 2021 (VQGAN).

Codebook health is watched per scale, because multi-scale VQ tends to collapse at the coarse scales (a
1x1 map sees one vector per image): usage and perplexity from the quantizer's hit EMA, and optionally
dead codes are re-seeded from recent quantizer inputs of each scale.
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from var.models.discriminator import NLayerDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from var.models.perceptual import load_lpips
from var.models.quantizer import MultiScaleQuantizer
from var.models.vqvae import VQVAE, VQVAEConfig


# ------------------------------------------------------------------------------------------ codebook health
def scale_margins(tokens_per_scale: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(K,) EMA hit count a code needs to count as used at a scale: 8% of a uniform share of that scale.

    The released rule uses the full-resolution token count for every scale, which makes a 1x1 scale read
    ~0% by construction; scaling the margin by each scale's own token count keeps the scales comparable.
    """
    return tokens_per_scale.float() / vocab_size * 0.08


def perplexity(hits_SV: torch.Tensor) -> torch.Tensor:
    """(K,) exp(entropy) of each scale's code histogram: V for uniform use, 1 for a collapsed scale."""
    p = hits_SV / hits_SV.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum(dim=1))


@torch.no_grad()
def scale_inputs(q: MultiScaleQuantizer, f: torch.Tensor) -> list[torch.Tensor]:
    """What the quantizer matches at each scale: the residual the coarser scales left, area-downsampled.

    Returns K tensors (B * pn^2, C); these are the right seeds for a dead code meant to serve that scale.
    """
    f = f.float()
    pyramid, out = q.f_to_fhat_pyramid(f), []
    for si, pn in enumerate(q.patch_nums):
        r = f - pyramid[si - 1] if si else f
        if si < len(q.patch_nums) - 1:
            r = F.interpolate(r, size=(pn, pn), mode="area")
        out.append(r.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
    return out


@torch.no_grad()
def reseed_dead_codes(q: MultiScaleQuantizer, f: torch.Tensor, tokens_per_scale: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Give codes unused at every scale new vectors drawn from the quantizer inputs of recent latents ``f``.

    Dead codes are dealt round-robin to the scales, coarsest first, and each takes a distinct input vector
    of its scale, so the coarse scales (few vectors per batch, the first to collapse) get as many fresh
    codes as the fine ones. Returns the (V,) mask of re-seeded codes.
    """
    margin = scale_margins(tokens_per_scale, q.vocab_size).to(q.ema_vocab_hit_SV)
    dead = ~(q.ema_vocab_hit_SV >= margin[:, None]).any(dim=0)
    n = int(dead.sum())
    if n == 0:
        return dead
    per_scale = scale_inputs(q, f)
    picks = []
    for k, cand in enumerate(per_scale):
        m, N = len(range(k, n, len(per_scale))), cand.shape[0]
        if m:
            idx = torch.randperm(N, generator=generator)[:m] if N >= m else torch.randint(N, (m,), generator=generator)
            picks.append(cand[idx.to(cand.device)])
    q.reseed_codes(dead, torch.cat(picks), generator=generator)
    return dead


# ------------------------------------------------------------------------------------------------ module
class TokenizerModule(L.LightningModule):
    """Manual optimisation: one generator (VQVAE) step and, once the GAN is on, one discriminator step."""

    def __init__(self, vqvae: dict, loss: dict, optim: dict, disc: dict, reseed: dict,
                 lpips_weights: str | None = None, lpips_random: bool = False, grid_dir: str | None = None,
                 grid_images: int = 16, channels_last: bool = False, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()  # Lightning checkpoints carry the config beside the weights
        self.automatic_optimization = False
        self.vqvae = VQVAE(VQVAEConfig(**vqvae))
        self.loss_cfg, self.optim_cfg, self.reseed_cfg = dict(loss), dict(optim), dict(reseed)
        self.disc = None
        if self.loss_cfg.get("w_gan", 0) > 0:
            self.disc = NLayerDiscriminator(ndf=disc.get("ndf", 64), n_layers=disc.get("n_layers", 3),
                                            norm=disc.get("norm", "group"))
        lpips = None
        if self.loss_cfg.get("w_lpips", 0) > 0:
            lpips = load_lpips(lpips_weights, random_weights=lpips_random)
        # Outside the module tree on purpose: frozen, and 15M VGG weights no checkpoint needs to carry.
        object.__setattr__(self, "lpips", lpips)
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))  # mean of per-image PSNR
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.grid_dir, self.grid_images, self.channels_last = grid_dir, grid_images, channels_last
        self._recent_f: deque[torch.Tensor] = deque(maxlen=max(1, int(self.reseed_cfg.get("buffer_batches", 8))))
        self.loss_history: list[float] = []  # pixel loss per step, for the task's summary
        self.val_results: dict = {}
        self.reseeded = 0
        self.usage_window = 50  # steps; train/usage_* is the % of codes hit at each scale in the last window
        self.register_buffer("_window_hits", torch.zeros(len(self.vqvae.patch_nums), self.vqvae.V), persistent=False)
        self._window_steps, self._window_usage, self._window_ppl = 0, None, None

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.vqvae.patch_nums

    def _tokens_per_scale(self, batch_size: int) -> torch.Tensor:
        world = self.trainer.world_size if self._trainer is not None else 1
        return torch.tensor([batch_size * world * pn * pn for pn in self.patch_nums])

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum") if self.trainer.world_size > 1 else t

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def pixel_loss(self, rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        kind = self.loss_cfg.get("pixel", "l2")
        return F.l1_loss(rec, x) if kind == "l1" else F.mse_loss(rec, x)

    def lr_factor(self, step: int) -> float:
        """Linear warmup, then constant or cosine down to min_lr_ratio at max_steps."""
        warmup = int(self.optim_cfg.get("warmup_steps", 0))
        if step < warmup:
            return (step + 1) / warmup
        if self.optim_cfg.get("schedule", "constant") != "cosine":
            return 1.0
        total = max(1, self.trainer.max_steps - warmup)
        t = min(1.0, (step - warmup) / total)
        lo = float(self.optim_cfg.get("min_lr_ratio", 0.1))
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))

    def on_fit_start(self) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.lpips is not None:
            self.lpips.to(self.device)

    def on_validation_start(self) -> None:
        if self.lpips is not None:
            self.lpips.to(self.device)

    # ----------------------------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        x = self._layout(batch[0])
        step = self.global_step
        opt_g, opt_d = self._optimizers()
        for opt, key in ((opt_g, "lr"), (opt_d, "disc_lr")):
            if opt is not None:
                base = self.optim_cfg.get(key) or self.optim_cfg["lr"]
                for group in opt.param_groups:
                    group["lr"] = base * self.lr_factor(step)

        # Generator: the forward of VQVAE.forward, unrolled to keep f for the codebook bookkeeping.
        f = self.vqvae.img_to_f(x)
        f_hat, vq_loss, info = self.vqvae.quantize(f, reduce_hits=self._sum_over_ranks)
        rec = self.vqvae.decoder(self.vqvae.post_quant_conv(f_hat))
        pix = self.pixel_loss(rec, x)
        nll = self.loss_cfg.get("w_pixel", 1.0) * pix
        p_loss = None
        if self.lpips is not None:
            p_loss = self.lpips(rec.float(), x.float()).mean()
            nll = nll + self.loss_cfg["w_lpips"] * p_loss
        gan_on = self.disc is not None and step >= int(self.loss_cfg.get("disc_start", 0))
        loss = nll + vq_loss
        if gan_on:
            self.disc.requires_grad_(False)  # the G loss must not move D
            g_loss = hinge_g_loss(self.disc(rec))
            lam = adaptive_gan_weight(nll, g_loss, self.vqvae.get_last_layer(),
                                      float(self.loss_cfg.get("adaptive_max", 1e4)))
            loss = loss + lam * self.loss_cfg["w_gan"] * g_loss
            self.log_dict({"train/g_loss": g_loss.detach(), "train/gan_weight": lam})
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._clip(opt_g)
        opt_g.step()

        if gan_on:
            self.disc.requires_grad_(True)
            d_loss = hinge_d_loss(self.disc(x.detach()), self.disc(rec.detach()))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self._clip(opt_d)
            # Through the strategy, not opt_d.step(): Lightning counts every LightningOptimizer.step() as a
            # global step, which would make max_steps, checkpoints and val intervals count D steps too.
            self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None)
            self.log("train/d_loss", d_loss.detach())

        self._recent_f.append(f.detach().float())
        every, first = int(self.reseed_cfg.get("every", 0)), int(self.reseed_cfg.get("first", 0))
        due = (step + 1) % every == 0 or step + 1 == first if every > 0 else False
        if due and step + 1 < self.trainer.max_steps:
            self.reseed_dead_codes(x.shape[0])
        self._log_train(pix, vq_loss, p_loss, rec, x, info)
        return loss.detach()

    def _optimizers(self):
        opts = self.optimizers()
        return (opts[0], opts[1]) if isinstance(opts, list) else (opts, None)

    def _clip(self, opt) -> None:
        clip = self.optim_cfg.get("grad_clip")
        if clip:
            self.clip_gradients(opt, gradient_clip_val=float(clip), gradient_clip_algorithm="norm")

    def _log_train(self, pix, vq_loss, p_loss, rec, x, info) -> None:
        self.loss_history.append(float(pix.detach()))
        with torch.no_grad():
            mse = F.mse_loss(rec.detach().clamp(-1, 1), x).item() / 4  # images in [-1,1]; PSNR on [0,1]
        logs = {"train/rec": pix.detach(), "train/vq": vq_loss.detach(),
                "train/psnr": -10 * math.log10(max(mse, 1e-10))}
        if p_loss is not None:
            logs["train/lpips"] = p_loss.detach()
        # Usage over a window of steps, from this module's own tally: the quantizer's EMA gives re-seeded
        # codes a grace count, which would read as use.
        self._window_hits += info.hits.detach().to(self._window_hits)
        self._window_steps += 1
        if self._window_steps >= self.usage_window or self._window_usage is None:
            self._window_usage = (self._window_hits > 0).float().mean(dim=1) * 100
            self._window_ppl = perplexity(self._window_hits)
            self._window_hits.zero_()
            self._window_steps = 0
        for i, pn in enumerate(self.patch_nums):
            logs[f"train/usage_s{i}_{pn}"] = self._window_usage[i]
            logs[f"train/perplexity_s{i}"] = self._window_ppl[i]
        self.log_dict(logs, prog_bar=False)
        self.log("rec", pix.detach(), prog_bar=True, logger=False)
        self.log("psnr", logs["train/psnr"], prog_bar=True, logger=False)
        self.log("use_min", self._window_usage.min(), prog_bar=True, logger=False)

    # -------------------------------------------------------------------------------------- dead codes
    @torch.no_grad()
    def reseed_dead_codes(self, batch_size: int) -> int:
        """Re-seed dead codes (see ``reseed_dead_codes``) and reset their Adam moments.

        Under DDP the hit EMA, hence the dead set, is the same on every rank; rank 0's draw is broadcast.
        """
        if not self._recent_f:
            return 0
        q = self.vqvae.quantize
        g = torch.Generator(device="cpu").manual_seed(int(self.hparams.seed) * 7919 + self.global_step)
        dead = reseed_dead_codes(q, torch.cat(list(self._recent_f)), self._tokens_per_scale(batch_size), g)
        n = int(dead.sum())
        if n == 0:
            return 0
        weight = q.embedding.weight
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(weight.data, src=0)
        state = self._optimizers()[0].optimizer.state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead.to(state[key].device)] = 0
        self.reseeded += n
        self.log("train/reseeded", float(n))
        return n

    # --------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        K, V = len(self.patch_nums), self.vqvae.V
        self._val_hits = torch.zeros(K, V, device=self.device)
        self._val_sums = torch.zeros(3, device=self.device)  # l1 sum, lpips sum, images
        self._grid_saved = False

    def validation_step(self, batch, batch_idx):
        x = self._layout(batch[0])
        rec, _, info = self.vqvae(x)
        rec = rec.float().clamp(-1, 1)
        x = x.float()
        self.val_psnr.update((rec + 1) / 2, (x + 1) / 2)
        self.val_ssim.update((rec + 1) / 2, (x + 1) / 2)
        self._val_hits += info.hits.to(self._val_hits)
        self._val_sums[0] += (rec - x).abs().mean(dim=(1, 2, 3)).sum()
        if self.lpips is not None:
            self._val_sums[1] += self.lpips(rec, x).sum()
        self._val_sums[2] += x.shape[0]
        if not self._grid_saved and self.global_rank == 0 and self.grid_dir:
            save_recon_grid(x[: self.grid_images], rec[: self.grid_images],
                            Path(self.grid_dir) / f"recon_step{self.global_step:07d}.png")
            self._grid_saved = True

    def on_validation_epoch_end(self) -> None:
        hits, sums = self._sum_over_ranks(self._val_hits), self._sum_over_ranks(self._val_sums)
        n = sums[2].clamp_min(1)
        res = {"val/psnr": self.val_psnr.compute(), "val/ssim": self.val_ssim.compute(), "val/l1": sums[0] / n}
        if self.lpips is not None:
            res["val/lpips"] = sums[1] / n
        usage = (hits > 0).float().mean(dim=1) * 100  # % of the codebook used over the whole split
        ppl = perplexity(hits)
        for i, pn in enumerate(self.patch_nums):
            res[f"val/usage_s{i}_{pn}"] = usage[i]
            res[f"val/perplexity_s{i}"] = ppl[i]
        self.val_psnr.reset()
        self.val_ssim.reset()
        self.log_dict(res, rank_zero_only=True)  # already summed over ranks
        self.val_results = {k: float(v) for k, v in res.items()} | {"step": self.global_step}

    # -------------------------------------------------------------------------------------- optimisers
    def configure_optimizers(self):
        o = self.optim_cfg
        betas, wd = tuple(o.get("betas", (0.5, 0.9))), o.get("weight_decay", 0.0)
        opt_g = torch.optim.Adam(self.vqvae.parameters(), lr=o["lr"], betas=betas, weight_decay=wd)
        if self.disc is None:
            return opt_g
        opt_d = torch.optim.Adam(self.disc.parameters(), lr=o.get("disc_lr") or o["lr"], betas=betas, weight_decay=wd)
        return [opt_g, opt_d]


def save_recon_grid(x: torch.Tensor, rec: torch.Tensor, path: Path, cols: int = 8, pad: int = 2) -> None:
    """PNG of originals above their reconstructions, ``cols`` pairs per row band; images in [-1, 1]."""
    def to_u8(t: torch.Tensor) -> np.ndarray:
        return ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    a, b = to_u8(x), to_u8(rec)
    n, s = a.shape[0], a.shape[1]
    cols = min(cols, n)
    bands = math.ceil(n / cols)
    grid = np.full((bands * 2 * (s + pad) + pad, cols * (s + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + 2 * r * (s + pad), pad + c * (s + pad)
        grid[top:top + s, left:left + s] = a[i]
        grid[top + s + pad:top + 2 * s + pad, left:left + s] = b[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(grid).save(tmp)
    tmp.replace(path)

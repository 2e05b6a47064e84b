"""Multi-scale residual vector quantizer of VAR (next-scale prediction).

One codebook is shared by all K scales. For scale k with side pn_k the residual r = f - f_hat is
area-downsampled to pn_k x pn_k, each position takes its nearest code (Euclidean argmin), the code map is
bicubic-upsampled back to H x W and refined by Phi_k(h) = (1-r)*h + r*conv3x3(h); the result is added to f_hat
and removed from the residual. The last scale (pn_K = H) is neither down- nor upsampled.

Attribute names (``embedding``, ``quant_resi.qresi_ls.{i}``, ``ema_vocab_hit_SV``) mirror the released
``vae_ch160v4096z32.pth`` so its state dict loads as is. Every path runs in fp32 with autocast off: the argmin
and the running residual are too sensitive for half precision.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Phi(nn.Conv2d):
    """Phi(h) = (1 - ratio) * h + ratio * conv3x3(h). A Conv2d subclass so its keys are just weight/bias."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul(self.ratio)


class PhiShared(nn.Module):
    """share_quant_resi=1: one Phi for every scale."""

    def __init__(self, phi: nn.Module):
        super().__init__()
        self.qresi = phi

    def __getitem__(self, k: int) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """share_quant_resi=n>=2: n Phis, each used by a contiguous run of scales (see ``phi_indices``)."""

    def __init__(self, phis: Sequence[nn.Module]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)

    def __getitem__(self, k: int) -> nn.Module:
        return self.qresi_ls[k]


def phi_indices(num_scales: int, num_phi: int) -> list[int]:
    """Which Phi each scale uses: scale k sits at k/(K-1) in [0,1] and takes the nearest of ``num_phi`` ticks.

    Ticks are evenly spaced in [1/(2n), 1-1/(2n)], except for n=4 where the released model used [1/(3n), 1-1/(3n)].
    Written as numpy.linspace computes it (start + i*step, last tick = stop) so exact ties resolve the same way:
    K=10, n=4 gives 0,0,1,1,1,2,2,3,3,3.
    """
    if num_phi == 1:
        return [0] * num_scales
    lo = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    hi = 1 - lo
    step = (hi - lo) / (num_phi - 1)
    ticks = [i * step + lo for i in range(num_phi)]
    ticks[-1] = hi
    out = []
    for si in range(num_scales):
        at = si / (num_scales - 1) if num_scales > 1 else 0.0
        dist = [abs(t - at) for t in ticks]
        out.append(dist.index(min(dist)))  # first minimum, like np.argmin
    return out


@dataclass
class QuantInfo:
    """Per-batch bookkeeping of one quantizer forward: tokens and per-scale code histograms."""

    indices: list[torch.Tensor]  # K tensors (B, pn^2), long
    hits: torch.Tensor  # (K, V) float: how often each code was chosen at each scale in this batch

    def usage(self) -> torch.Tensor:
        """(K,) fraction of the codebook hit at least once, per scale."""
        return (self.hits > 0).float().mean(dim=1)

    def perplexity(self) -> torch.Tensor:
        """(K,) exp(entropy) of the code histogram, per scale: V for uniform use, 1 for collapse."""
        p = self.hits / self.hits.sum(dim=1, keepdim=True).clamp_min(1)
        return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum(dim=1))


@functools.lru_cache(maxsize=64)
def _bicubic_matrix(src: int, dst: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """(dst*dst, src*src): F.interpolate(mode="bicubic") from src x src to dst x dst as one linear map."""
    basis = torch.eye(src * src, dtype=torch.float64).view(src * src, 1, src, src)
    up = F.interpolate(basis, size=(dst, dst), mode="bicubic")  # column j = the image of basis pixel j
    return up.view(src * src, dst * dst).t().contiguous().to(device=device, dtype=dtype)


def bicubic_upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.interpolate(x, (size, size), mode="bicubic")`` as a matmul with the precomputed linear map.

    Same result to float rounding, but one GEMM: the CUDA bicubic kernel runs a thread per *output pixel*
    and loops over batch x channels, so at 16 x 16 outputs it took 1.6 ms per call (14 ms of every d16
    training step at batch 64, the same again per sampled batch).
    """
    B, C, h, w = x.shape
    if h != w:
        return F.interpolate(x, size=(size, size), mode="bicubic")
    m = _bicubic_matrix(h, size, str(x.device), x.dtype)
    with torch.autocast(x.device.type, enabled=False):  # keep the input's precision, like F.interpolate
        return (x.reshape(B * C, h * w) @ m.t()).view(B, C, size, size)


class MultiScaleQuantizer(nn.Module):
    def __init__(
        self, vocab_size: int, Cvae: int, patch_nums: Sequence[int], beta: float = 0.25,
        quant_resi: float = 0.5, share_quant_resi: int = 4,
    ):
        super().__init__()
        self.vocab_size, self.Cvae, self.beta = vocab_size, Cvae, beta
        self.patch_nums = tuple(patch_nums)
        K = len(self.patch_nums)

        def make_phi() -> nn.Module:
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        # The three containers give the three released key layouts: quant_resi.{k}, .qresi, .qresi_ls.{k}.
        if share_quant_resi == 0:
            self.quant_resi = nn.ModuleList([make_phi() for _ in range(K)])
            self.phi_index = phi_indices(K, K)
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
            self.phi_index = [0] * K
        else:
            self.quant_resi = PhiPartiallyShared([make_phi() for _ in range(share_quant_resi)])
            self.phi_index = phi_indices(K, share_quant_resi)

        # Persistent: the released checkpoint carries it, and a strict load needs the key.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(K, vocab_size))
        self.records = 0
        self.embedding = nn.Embedding(vocab_size, Cvae)
        # Uniform in +-1/V as in VQGAN: codes start near the origin and are pulled out by the VQ loss.
        nn.init.uniform_(self.embedding.weight, -1.0 / vocab_size, 1.0 / vocab_size)

    def extra_repr(self) -> str:
        return f"patch_nums={self.patch_nums}, beta={self.beta}, phi_index={self.phi_index}"

    # ----------------------------------------------------------------------------- building blocks
    def phi(self, si: int) -> nn.Module:
        return self.quant_resi[self.phi_index[si]]

    def _no_autocast(self):
        return torch.autocast(device_type=self.embedding.weight.device.type, enabled=False)

    def _is_last(self, si: int) -> bool:
        return si == len(self.patch_nums) - 1

    def _down(self, x: torch.Tensor, si: int) -> torch.Tensor:
        pn = self.patch_nums[si]
        return x if self._is_last(si) else F.interpolate(x, size=(pn, pn), mode="area")

    @torch.no_grad()
    def _nearest_code(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """(B,C,h,w) -> (B,h,w) indices of the nearest code; |z|^2 + |e|^2 - 2 z.e like the released model."""
        B, C, h, w = z_BChw.shape
        z = z_BChw.permute(0, 2, 3, 1).reshape(-1, C)
        e = self.embedding.weight.float()
        d = torch.addmm(z.square().sum(1, keepdim=True) + e.square().sum(1), z, e.T, alpha=-2, beta=1)
        return d.argmin(dim=1).view(B, h, w)

    def _embed(self, idx: torch.Tensor, pn: int) -> torch.Tensor:
        """(B,pn^2) or (B,pn,pn) indices -> (B,C,pn,pn) fp32 embeddings."""
        return self.embedding(idx.reshape(idx.shape[0], pn, pn)).float().permute(0, 3, 1, 2)

    def _up_phi(self, h_BChw: torch.Tensor, si: int) -> torch.Tensor:
        """Bicubic-upsample one scale's code map to the full latent size (not at the last scale), then Phi."""
        if not self._is_last(si):
            h_BChw = bicubic_upsample(h_BChw, self.patch_nums[-1])
        return self.phi(si)(h_BChw.contiguous())

    def _residual_steps(self, f: torch.Tensor):
        """Yield (indices (B,pn,pn), Phi output (B,C,H,W)) scale by scale; the residual itself carries no grad."""
        f_rest = f.detach().clone()
        for si in range(len(self.patch_nums)):
            idx = self._nearest_code(self._down(f_rest, si))
            h = self._up_phi(self.embedding(idx).permute(0, 3, 1, 2), si)
            f_rest.sub_(h.detach())
            yield idx, h

    def _check_size(self, f: torch.Tensor) -> None:
        H = self.patch_nums[-1]
        if f.shape[-2:] != (H, H):
            raise ValueError(f"latent is {tuple(f.shape[-2:])} but the last patch_num needs ({H}, {H})")

    # ----------------------------------------------------------------------------- training forward
    def forward(
        self, f: torch.Tensor, reduce_hits: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, QuantInfo]:
        """f (B,C,H,W) -> (f_hat with a straight-through gradient to f, vq_loss, QuantInfo).

        vq_loss = mean over scales of beta*MSE(f_hat.detach(), f) + MSE(f_hat, f.detach()): the first term
        commits the encoder, the second trains codebook and Phi. ``reduce_hits`` (e.g. an all-reduce sum)
        is applied to the (K,V) histogram before it is returned and, in training mode, fed to the usage EMA.
        """
        self._check_size(f)
        K = len(self.patch_nums)
        with self._no_autocast():
            f = f.float()
            f_hat = torch.zeros_like(f)
            loss = f.new_zeros(())
            indices, hits = [], []
            for idx, h in self._residual_steps(f):
                f_hat = f_hat + h
                loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
                indices.append(idx.flatten(1))
                hits.append(idx.flatten().bincount(minlength=self.vocab_size).float())
            loss = loss / K
            f_hat = f + (f_hat - f).detach()  # value of f_hat, gradient of identity to the encoder
        hits_SV = torch.stack(hits)
        if reduce_hits is not None:
            hits_SV = reduce_hits(hits_SV)
        if self.training:
            self.record_hits(hits_SV)
        return f_hat, loss, QuantInfo(indices=indices, hits=hits_SV)

    # ----------------------------------------------------------------------------- codebook health
    @torch.no_grad()
    def record_hits(self, hits_SV: torch.Tensor) -> None:
        """EMA of per-scale code hits: copy on the first record, factor 0.9 for 100 records, then 0.99."""
        hits_SV = hits_SV.to(self.ema_vocab_hit_SV)
        if self.records == 0:
            self.ema_vocab_hit_SV.copy_(hits_SV)
        else:
            m = 0.9 if self.records < 100 else 0.99
            self.ema_vocab_hit_SV.mul_(m).add_(hits_SV, alpha=1 - m)
        self.records += 1

    def usage_percent(self, tokens_per_step: int) -> torch.Tensor:
        """(K,) % of codes whose EMA hits reach 8% of a uniform share (the released model's rule).

        ``tokens_per_step`` is world_size * B * H * W (full-resolution positions, for every scale, as released).
        """
        margin = tokens_per_step / self.vocab_size * 0.08
        return (self.ema_vocab_hit_SV >= margin).float().mean(dim=1) * 100

    def dead_code_mask(self, tokens_per_step: int) -> torch.Tensor:
        """(V,) bool: codes below the usage margin at every scale (the codebook is shared, so per code)."""
        margin = tokens_per_step / self.vocab_size * 0.08
        return ~(self.ema_vocab_hit_SV >= margin).any(dim=0)

    @torch.no_grad()
    def reseed_codes(
        self, dead: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator | None = None,
    ) -> int:
        """Overwrite the embedding rows where ``dead`` (V,) is True with rows drawn from ``candidates`` (N,C).

        Typical candidates are encoder features f flattened to (B*H*W, C). Draws without replacement when
        N is large enough. The reseeded codes get the mean EMA hit count of their scale, so they are given a
        grace period instead of being flagged dead again at the next check. Returns the number of rows.
        """
        rows = dead.to(torch.bool).nonzero().squeeze(1).to(self.embedding.weight.device)
        n, N = rows.numel(), candidates.shape[0]
        if n == 0 or N == 0:
            return 0
        gen_dev = generator.device if generator is not None else "cpu"
        if N >= n:
            pick = torch.randperm(N, generator=generator, device=gen_dev)[:n]
        else:
            pick = torch.randint(N, (n,), generator=generator, device=gen_dev)
        new = candidates.detach()[pick.to(candidates.device)]
        self.embedding.weight[rows] = new.to(self.embedding.weight)
        self.ema_vocab_hit_SV[:, rows] = self.ema_vocab_hit_SV.mean(dim=1, keepdim=True)
        return n

    # ----------------------------------------------------------------------------- tokenize / detokenize
    @torch.no_grad()
    def f_to_idxBl(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Latent (B,C,H,W) -> K LongTensors (B, pn^2)."""
        self._check_size(f)
        with self._no_autocast():
            return [idx.flatten(1) for idx, _ in self._residual_steps(f.float())]

    @torch.no_grad()
    def f_to_fhat_pyramid(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Latent -> the cumulative f_hat (B,C,H,W) after each of the K scales."""
        self._check_size(f)
        with self._no_autocast():
            f_hat, out = torch.zeros_like(f, dtype=torch.float32), []
            for _, h in self._residual_steps(f.float()):
                f_hat = f_hat + h
                out.append(f_hat)
            return out

    def embed_to_fhat(self, ms_h_BChw: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale code maps (B,C,pn,pn), possibly only the first k scales -> f_hat (B,C,H,W)."""
        H = self.patch_nums[-1]
        with self._no_autocast():
            f_hat = ms_h_BChw[0].new_zeros(ms_h_BChw[0].shape[0], self.Cvae, H, H, dtype=torch.float32)
            for si, h in enumerate(ms_h_BChw):
                f_hat = f_hat + self._up_phi(h.float(), si)
            return f_hat

    def idxBl_to_fhat(self, ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale indices (B, pn^2) -> f_hat (B,C,H,W)."""
        return self.embed_to_fhat([self._embed(idx, pn) for idx, pn in zip(ms_idx_Bl, self.patch_nums)])

    # ----------------------------------------------------------------------------- transformer inputs
    def idxBl_to_var_input(self, gt_ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input (B, L - pn_1^2, C) in fp32.

        The input for scale k+1 is the cumulative f_hat after scales 0..k, area-downsampled to pn_{k+1}
        (not the raw embedding of scale k). Scales 0..K-2 are used; the last one is never an input.
        """
        H = self.patch_nums[-1]
        B = gt_ms_idx_Bl[0].shape[0]
        with self._no_autocast():
            f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, H, dtype=torch.float32)
            nxt = []
            for si in range(len(self.patch_nums) - 1):
                f_hat = f_hat + self._up_phi(self._embed(gt_ms_idx_Bl[si], self.patch_nums[si]), si)
                pn = self.patch_nums[si + 1]
                nxt.append(F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2))
            return torch.cat(nxt, dim=1)

    def get_next_autoregressive_input(
        self, si: int, f_hat: torch.Tensor | None, h: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampling step: add scale ``si`` to f_hat, return (new f_hat, input for scale si+1 (B,C,pn,pn)).

        ``h`` is scale si as tokens (B, pn^2) / (B,pn,pn) or as a code map (B,C,pn,pn); a code map lets the
        caller mix embeddings (e.g. keep ground-truth tokens in an edited region). ``f_hat=None`` starts from
        zeros. f_hat is not modified in place. At the last scale both returned tensors are f_hat.
        """
        pn, H = self.patch_nums[si], self.patch_nums[-1]
        with self._no_autocast():
            if not torch.is_floating_point(h):
                h = self._embed(h, pn)
            if f_hat is None:
                f_hat = h.new_zeros(h.shape[0], self.Cvae, H, H, dtype=torch.float32)
            f_hat = f_hat.float() + self._up_phi(h.float(), si)
            if self._is_last(si):
                return f_hat, f_hat
            nxt = self.patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")

"""Multi-scale VQVAE: VQGAN encoder/decoder around the multi-scale residual quantizer.

    img (B,3,R,R) in [-1,1] -> encoder -> quant_conv -> f (B,Cvae,H,H), H = R / 2^(len(ch_mult)-1)
    f -> quantize -> K token maps (B, pn_k^2), the last one pn_K = H
    tokens -> f_hat -> post_quant_conv -> decoder -> image

``VQVAEConfig`` holds the hyper-parameters; ``PRESETS`` names the released one and small CPU-sized ones.
``load_released_vqvae`` loads the official ``vae_ch160v4096z32.pth`` strictly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from var.checkpoints import load_strict, safe_load, unwrap_state_dict
from var.models.quantizer import MultiScaleQuantizer, QuantInfo
from var.models.vqgan_blocks import Decoder, Encoder


@dataclass(frozen=True)
class VQVAEConfig:
    resolution: int = 256  # image side in pixels
    vocab_size: int = 4096  # V, one codebook for every scale
    z_channels: int = 32  # Cvae
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # downsample factor 2^(len-1)
    num_res_blocks: int = 2  # encoder; the decoder uses one more per level
    dropout: float = 0.0
    using_sa: bool = True  # self-attention after each res block of the lowest-resolution level
    using_mid_sa: bool = True  # self-attention in the middle block
    norm_groups: int = 32
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    beta: float = 0.25  # commitment weight
    quant_resi: float = 0.5  # Phi mix ratio
    share_quant_resi: int = 4  # 0: one Phi per scale, 1: one for all, n: n partially shared
    quant_conv_ks: int = 3

    def __post_init__(self):
        # Lists from YAML/CLI become tuples so the frozen config stays hashable and comparable.
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "patch_nums", tuple(self.patch_nums))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample

    @property
    def num_tokens(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    def validate(self) -> None:
        """One-line ValueError naming the offending field."""
        pns = tuple(self.patch_nums)
        if not pns or any(int(p) != p or p < 1 for p in pns):
            raise ValueError(f"patch_nums must be positive integers, got {pns}")
        if any(b <= a for a, b in zip(pns, pns[1:])):
            raise ValueError(f"patch_nums must be strictly increasing, got {pns}")
        if not self.ch_mult:
            raise ValueError("ch_mult must not be empty")
        if self.resolution % self.downsample:
            raise ValueError(
                f"resolution {self.resolution} is not divisible by the downsample factor {self.downsample} of ch_mult {self.ch_mult}"
            )
        if pns[-1] != self.latent_size:
            raise ValueError(
                f"patch_nums[-1]={pns[-1]} must equal the latent size {self.latent_size} "
                f"(resolution {self.resolution} / downsample {self.downsample} from ch_mult {self.ch_mult})"
            )
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
        if bad:
            raise ValueError(f"ch * ch_mult gives channels {bad} not divisible by norm_groups={self.norm_groups}")
        for name in ("vocab_size", "z_channels", "ch", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.share_quant_resi < 0:
            raise ValueError(f"share_quant_resi must be >= 0, got {self.share_quant_resi}")
        if self.quant_conv_ks % 2 != 1:
            raise ValueError(f"quant_conv_ks must be odd, got {self.quant_conv_ks}")


PRESETS: dict[str, VQVAEConfig] = {
    # The released tokenizer (256 px; the same weights serve 512 px with its own patch_nums).
    "vae_ch160v4096z32": VQVAEConfig(),
    # 64 px, 8x8 latent, 7 scales (L=155): the CPU default, trains in minutes.
    "vq_tiny64": VQVAEConfig(
        resolution=64, vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
        patch_nums=(1, 2, 3, 4, 5, 6, 8),
    ),
    # 64 px, wider and deeper, larger codebook.
    "vq_small64": VQVAEConfig(
        resolution=64, vocab_size=1024, z_channels=32, ch=64, ch_mult=(1, 1, 2, 4), num_res_blocks=2,
        patch_nums=(1, 2, 3, 4, 5, 6, 8),
    ),
    # 32 px, 4x4 latent, 4 scales: for unit tests only.
    "vq_test32": VQVAEConfig(
        resolution=32, vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
        patch_nums=(1, 2, 3, 4),
    ),
}


class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig | None = None, **overrides):
        super().__init__()
        config = VQVAEConfig(**{**asdict(config or VQVAEConfig()), **overrides})
        config.validate()
        self.config = config
        c = config
        self.V, self.Cvae, self.patch_nums = c.vocab_size, c.z_channels, tuple(c.patch_nums)
        self.vocab_size, self.downsample = c.vocab_size, c.downsample  # names the released class also exposes
        blocks = dict(
            ch=c.ch, ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks, z_channels=c.z_channels,
            dropout=c.dropout, using_sa=c.using_sa, using_mid_sa=c.using_mid_sa, groups=c.norm_groups,
        )
        self.encoder = Encoder(**blocks)
        self.decoder = Decoder(**blocks)
        self.quantize = MultiScaleQuantizer(
            c.vocab_size, c.z_channels, c.patch_nums, beta=c.beta, quant_resi=c.quant_resi,
            share_quant_resi=c.share_quant_resi,
        )
        ks = c.quant_conv_ks
        self.quant_conv = nn.Conv2d(c.z_channels, c.z_channels, ks, stride=1, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, ks, stride=1, padding=ks // 2)

    # ----------------------------------------------------------------------------- training
    def forward(
        self, img: torch.Tensor, reduce_hits: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, QuantInfo]:
        """img -> (reconstruction (unclamped), vq_loss, QuantInfo with per-scale indices and code hits)."""
        f_hat, vq_loss, info = self.quantize(self.img_to_f(img), reduce_hits=reduce_hits)
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, info

    def get_last_layer(self) -> torch.Tensor:
        """Decoder output weight, for the VQGAN adaptive GAN weight."""
        return self.decoder.conv_out.weight

    # ----------------------------------------------------------------------------- tokenize / detokenize
    def img_to_f(self, img: torch.Tensor) -> torch.Tensor:
        """Continuous latent before quantization (B,Cvae,H,H); also the candidates for dead-code reseeding."""
        return self.quant_conv(self.encoder(img))

    @torch.no_grad()
    def img_to_idxBl(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Image in [-1,1] -> K LongTensors (B, pn^2)."""
        return self.quantize.f_to_idxBl(self.img_to_f(img))

    def idxBl_to_fhat(self, ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.quantize.idxBl_to_fhat(ms_idx_Bl)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def idxBl_to_img(self, ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Tokens of all K scales (or only the first k: a coarser image) -> image in [-1,1]."""
        return self.fhat_to_img(self.idxBl_to_fhat(ms_idx_Bl))

    @torch.no_grad()
    def img_to_reconstructed_img(self, img: torch.Tensor, all_scales: bool = False):
        """Round trip through the tokens; ``all_scales`` gives the K progressively finer reconstructions."""
        pyramid = self.quantize.f_to_fhat_pyramid(self.img_to_f(img))
        return [self.fhat_to_img(f) for f in pyramid] if all_scales else self.fhat_to_img(pyramid[-1])

    # ----------------------------------------------------------------------------- transformer inputs
    def idxBl_to_var_input(self, gt_ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, L - pn_1^2, Cvae) teacher-forcing input; see MultiScaleQuantizer.idxBl_to_var_input."""
        return self.quantize.idxBl_to_var_input(gt_ms_idx_Bl)

    def get_next_autoregressive_input(self, si: int, f_hat: torch.Tensor | None, h: torch.Tensor):
        """(f_hat, next-scale input); see MultiScaleQuantizer.get_next_autoregressive_input."""
        return self.quantize.get_next_autoregressive_input(si, f_hat, h)


def count_params(model: VQVAE) -> dict[str, int]:
    """Parameter counts by part; 'total' also includes quant_conv and post_quant_conv."""
    n = {name: sum(p.numel() for p in getattr(model, name).parameters())
         for name in ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")}
    n["total"] = sum(p.numel() for p in model.parameters())
    return n


def load_released_vqvae(
    path: str | os.PathLike, config: VQVAEConfig | None = None, device: str | torch.device = "cpu",
    frozen: bool = True,
) -> VQVAE:
    """Build the released architecture and load ``vae_ch160v4096z32.pth`` strictly (weights_only=True).

    ``config`` may change patch_nums (e.g. the 512 px schedule) but must keep the released architecture.
    A mismatch raises CheckpointError listing missing, unexpected and mis-shaped keys. ``frozen``: eval mode
    and no gradients, as the tokenizer is used while training the transformer.
    """
    config = config or PRESETS["vae_ch160v4096z32"]
    sd = dict(unwrap_state_dict(safe_load(path, "VQVAE weights")))
    with torch.device("meta"):  # skip the random init of 109M parameters that are overwritten anyway
        model = VQVAE(config)
    model = model.to_empty(device=device)
    # The usage EMA is bookkeeping, not a weight: keep ours if the file has another number of scales.
    key = "quantize.ema_vocab_hit_SV"
    if key in sd and sd[key].shape[0] != len(config.patch_nums):
        sd[key] = torch.zeros_like(model.quantize.ema_vocab_hit_SV)
    load_strict(model, sd, f"VQVAE weights {path}")
    if frozen:
        model.eval().requires_grad_(False)
    return model

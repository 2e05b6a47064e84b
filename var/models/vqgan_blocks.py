"""VQGAN-style convolutional encoder and decoder of the multi-scale VQVAE.

The layout follows the latent-diffusion ``vq-f16`` autoencoder that VAR's tokenizer uses. Attribute names
(``down.{i}.block.{j}``, ``mid.attn_1``, ``up.{i}.upsample`` ...) are chosen so that the state-dict keys are
exactly those of the released ``vae_ch160v4096z32.pth``; renaming anything breaks loading it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from var.models.autocast import compute_dtype

# Compiled channels-last GroupNorm through per-channel sums (see GroupNorm); False: Inductor's own lowering.
CHANNEL_SUM_GROUP_NORM = True
# Compiled on CUDA, the x2 upsampling and its conv as one transposed conv (see Upsample2x); False: as written.
TRANSPOSED_UPSAMPLE_CONV = True


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that, compiled on a channels-last input, takes its statistics through per-channel sums.

    A group of a channels-last tensor is a few adjacent channels of every pixel (5 of 160 in the released
    decoder), so Inductor's own GroupNorm reduction reads it in 10-byte pieces strided by the pixel size: the
    decoder's 256 px GroupNorms ran at ~0.2 TB/s. Summing over the pixels per channel reads whole pixels (the
    contiguous dimension), and the per-group sums of those C numbers are tiny. Eager calls, and contiguous
    inputs, run nn.GroupNorm as before. Same parameters and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (CHANNEL_SUM_GROUP_NORM and torch.compiler.is_compiling() and x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            return group_norm_by_channel_sums(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def group_norm_by_channel_sums(x: torch.Tensor, groups: int, weight: torch.Tensor | None,
                               bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.group_norm of a 4-D x from per-channel sums over the pixels, in fp32 or wider; the output dtype is
    F.group_norm's under autocast.

    One pass over x for both moments, shifted by one value of each group (its first channel's first pixel):
    var = E[(x-k)^2] - E[x-k]^2 does not cancel when the mean is large against the spread, and the pass
    needs no centred copy of x."""
    N, C = x.shape[:2]
    cg = C // groups
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    count = cg * x.shape[2] * x.shape[3]

    def per_channel(per_group: torch.Tensor) -> torch.Tensor:  # (N, G) -> (N, C, 1, 1)
        return per_group.repeat_interleave(cg, dim=1).view(N, C, 1, 1)

    def group_mean(t: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, G)
        # Rows first: N*C*H outputs keep the GPU busy at batch 1 too (N*C alone is 160 there, each a
        # 65536-pixel loop).
        return t.sum(3).sum(2).view(N, groups, cg).sum(-1) / count

    shift = xf[:, ::cg, 0, 0]  # (N, G)
    d = xf - per_channel(shift)
    mean_d = group_mean(d)
    var = (group_mean(d * d) - mean_d * mean_d).clamp_min(0)
    y = (xf - per_channel(shift + mean_d)) * per_channel(torch.rsqrt(var + eps))
    if weight is not None:
        y = y * weight.to(acc).view(1, C, 1, 1) + bias.to(acc).view(1, C, 1, 1)
    return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


class NarrowOutConv2d(nn.Conv2d):
    """A convolution with few output channels (the decoder's RGB output) that runs in NCHW on CUDA: cuDNN's
    NHWC bf16 kernels for 3 output channels are slow (160 -> 3 channels on 64 x 256^2: 24.3 ms in NHWC,
    3.8 ms in NCHW, H100), and the decoder runs channels-last. Outside torch.compile, whose layout choice
    would keep NHWC; parameters and state-dict keys are those of nn.Conv2d."""

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return self._conv_forward(x.contiguous(), self.weight.contiguous(), self.bias)
        return super().forward(x)


class Upsample2x(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv.

    Compiled on CUDA it runs as the equal transposed conv (``upsample_conv_transposed``): 4 instead of 9
    multiply-adds per output pixel and no 4x upsampled tensor written and read back (the upsampling convs
    are ~75 of the released decoder's ~390 GFLOP per image). Same parameters and state-dict keys."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if TRANSPOSED_UPSAMPLE_CONV and torch.compiler.is_compiling() and x.is_cuda:
            return upsample_conv_transposed(x, self.conv.weight, self.conv.bias)
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def upsample_conv_transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(nearest_upsample_x2(x)) with padding 1, as a stride-2 4x4 transposed conv.

    An even output row 2m sees upsampled rows 2m-1, 2m, 2m+1 = input rows m-1, m, m: taps w0 on row m-1 and
    w1+w2 on row m; an odd row 2m+1 sees input rows m, m, m+1: w0+w1 on m, w2 on m+1. A transposed conv with
    stride 2 and padding 1 puts input row i at output row 2i-1+k, so its 4 taps are [w2, w1+w2, w0+w1, w0];
    likewise along columns. The borders agree: the zero padding falls on taps the transposed conv omits.
    The sums are taken in the weights' dtype, before autocast rounds them once."""
    def fold(w: torch.Tensor, dim: int) -> torch.Tensor:
        w0, w1, w2 = w.unbind(dim)
        return torch.stack((w2, w1 + w2, w0 + w1, w0), dim=dim)

    folded = fold(fold(weight, 2), 3).transpose(0, 1)  # (Cout, Cin, 3, 3) -> (Cin, Cout, 4, 4)
    return F.conv_transpose2d(x, folded, bias, stride=2, padding=1)


class Downsample2x(nn.Module):
    """Stride-2 3x3 conv; the asymmetric (right/bottom) zero pad keeps H/2 exactly, as in the released model."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 shortcut only when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # Identity has no parameters, so the key set matches the released file in both cases.
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; one fused 1x1 qkv conv (released layout)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # each B,HW,C
        h = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


def _mid_block(channels: int, dropout: float, using_mid_sa: bool, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, groups)
    mid.attn_1 = AttnBlock(channels, groups) if using_mid_sa else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, dropout, groups)
    return mid


class Encoder(nn.Module):
    """Image (B,3,H,W) -> features (B,z_channels,H/2^(L-1),W/2^(L-1)) with L = len(ch_mult)."""

    def __init__(
        self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
        in_channels: int = 3, dropout: float = 0.0, using_sa: bool = True, using_mid_sa: bool = True,
        groups: int = 32,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level, mult in enumerate(ch_mult):
            last = i_level == self.num_resolutions - 1
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()  # stays empty (no keys) except at the lowest resolution
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * mult, dropout, groups))
                block_in = ch * mult
                if last and using_sa:
                    level.attn.append(AttnBlock(block_in, groups))
            if not last:
                level.downsample = Downsample2x(block_in)
            self.down.append(level)
        self.mid = _mid_block(block_in, dropout, using_mid_sa, groups)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B,z_channels,h,w) -> image (B,3,h*2^(L-1),w*2^(L-1)); one more res block per level than the encoder."""

    def __init__(
        self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
        out_channels: int = 3, dropout: float = 0.0, using_sa: bool = True, using_mid_sa: bool = True,
        groups: int = 32,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid_block(block_in, dropout, using_mid_sa, groups)
        # Built from the lowest resolution up, but stored so that up[i] is the level at resolution i
        # (the released key order: up.0 is the full-resolution level).
        levels = []
        for i_level in reversed(range(self.num_resolutions)):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * ch_mult[i_level], dropout, groups))
                block_in = ch * ch_mult[i_level]
                if i_level == self.num_resolutions - 1 and using_sa:
                    level.attn.append(AttnBlock(block_in, groups))
            if i_level != 0:
                level.upsample = Upsample2x(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = NarrowOutConv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        h = F.silu(self.norm_out(h))
        if h.is_cuda:
            # The narrow output conv runs in NCHW and its input in the autocast dtype (the cast it would make
            # anyway): made here, inside the compiled decoder, the last fused kernel writes that form directly
            # instead of a full-size fp32 channels-last tensor being transposed and cast after it.
            h = h.to(dtype=compute_dtype(h), memory_format=torch.contiguous_format)
        return self.conv_out(h)

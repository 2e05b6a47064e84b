"""PatchGAN discriminator and hinge losses for tokenizer training (VQGAN recipe).

The discriminator scores overlapping patches (each output logit sees a 70x70 receptive field for 3 layers),
which pushes the decoder towards sharp local texture without judging global layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":  # batch-size independent; no cross-rank statistics to sync under DDP
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class NLayerDiscriminator(nn.Module):
    """conv(4,s2)-LReLU, then n_layers-1 x [conv(4,s2)-norm-LReLU], conv(4,s1)-norm-LReLU, conv(4,s1) -> 1 logit map."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                _norm(norm, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,C,H,W) -> (B,1,h,w) real/fake logits per patch."""
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # DCGAN init: small conv weights, norm scales around 1.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(real))] + E[relu(1 + D(fake))]); zero once margins hold."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -E[D(fake)]."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4,
) -> torch.Tensor:
    """VQGAN's balance: ||grad rec_loss|| / ||grad g_loss|| at the decoder's last layer (detached, clamped)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()

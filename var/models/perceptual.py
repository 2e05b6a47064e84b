"""LPIPS perceptual distance (Zhang et al. 2018, VGG16 variant), built from scratch; nothing is downloaded.

d(x, y) = sum over the 5 VGG16 stages (relu1_2 ... relu5_3) of spatial-mean( w_l . (n(x)_l - n(y)_l)^2 ),
where n() normalises each feature vector to unit length over channels and w_l is a learned 1x1 conv.

Weight files (read from local disk, torch.load weights_only=True):
  * one file, default name ``lpips_vgg16.pth``, holding ``LPIPS().state_dict()``:
      vgg.{0,2,5,7,10,12,14,17,19,21,24,26,28}.weight/bias   (torchvision VGG16 ``features`` indices)
      lin{0..4}.model.1.weight                                (LPIPS heads, shape (1, C_l, 1, 1))
  * or the two original files side by side:
      ``vgg16-397923af.pth``  torchvision VGG16 state dict (keys features.*; classifier.* is ignored)
      ``vgg.pth``             LPIPS v0.1 heads (keys lin0.model.1.weight ... lin4.model.1.weight)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from var.checkpoints import CheckpointError, load_strict, safe_load

SINGLE_FILE = "lpips_vgg16.pth"
VGG_FILE = "vgg16-397923af.pth"
LIN_FILE = "vgg.pth"
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"

# VGG16 conv widths up to relu5_3; "M" is a 2x2 max-pool. Layer indices then match torchvision's features.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_TAP_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
            c_in = v
    return nn.Sequential(*layers)


class _LinHead(nn.Module):
    """Dropout + bias-free 1x1 conv to one channel; ``model.1`` is the key layout of the LPIPS heads."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))
        # Non-negative so that even a randomly initialised LPIPS is a proper (>= 0) distance.
        nn.init.uniform_(self.model[1].weight, 0.0, 1.0 / channels)


class LPIPS(nn.Module):
    """Frozen perceptual metric; inputs are images in [-1, 1]. Random weights until ``load_lpips`` fills them."""

    def __init__(self):
        super().__init__()
        # LPIPS's input standardisation, expressed for [-1,1] inputs.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.vgg = _vgg16_features()
        for i, c in enumerate(_TAP_CHANNELS):
            setattr(self, f"lin{i}", _LinHead(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # Always eval: a parent module's .train() must not switch on the heads' dropout.
        return super().train(False)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.vgg):
            h = layer(h)
            if i in _TAPS:
                out.append(h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) x2 -> (B,) distances; differentiable w.r.t. the inputs."""
        fx, fy = self._features(x), self._features(y)
        total = 0.0
        for i, (a, b) in enumerate(zip(fx, fy)):
            total = total + getattr(self, f"lin{i}").model((a - b).square()).mean(dim=(1, 2, 3))
        return total


def _missing(where: str) -> CheckpointError:
    return CheckpointError(
        f"LPIPS weights not found at {where}: expected {SINGLE_FILE} (LPIPS().state_dict()) or both {VGG_FILE} "
        f"(torchvision VGG16, {VGG_URL}) and {LIN_FILE} (LPIPS v0.1 heads, {LIN_URL})"
    )


def _resolve(path: Path) -> tuple[Path, Path | None]:
    """A file is the single-file layout; a folder may hold either layout. Returns (file, heads file or None)."""
    if path.is_file():
        return path, None
    if path.is_dir():
        if (path / SINGLE_FILE).is_file():
            return path / SINGLE_FILE, None
        if (path / VGG_FILE).is_file() and (path / LIN_FILE).is_file():
            return path / VGG_FILE, path / LIN_FILE
    raise _missing(str(path))


def load_lpips(
    path: str | os.PathLike | None = None, *, vgg_path: str | os.PathLike | None = None,
    lin_path: str | os.PathLike | None = None, random_weights: bool = False,
) -> LPIPS:
    """LPIPS with weights from ``path`` (a file or a folder, see the module doc) or from ``vgg_path`` + ``lin_path``.

    ``random_weights=True`` skips loading (for tests and smoke runs); it is never a silent fallback.
    """
    model = LPIPS()
    if random_weights:
        return model
    if vgg_path is not None or lin_path is not None:
        if vgg_path is None or lin_path is None:
            raise ValueError("load_lpips: give both vgg_path and lin_path, or a single path")
        for p in (vgg_path, lin_path):
            if not Path(p).is_file():
                raise _missing(str(p))
        main, heads = Path(vgg_path), Path(lin_path)
    elif path is None:
        raise _missing("(no path configured)")
    else:
        main, heads = _resolve(Path(path))
    sd = safe_load(main, "LPIPS weights")
    if heads is not None:  # torchvision naming features.{i} -> vgg.{i}; the classifier is not used
        sd = {"vgg." + k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        sd.update(safe_load(heads, "LPIPS heads"))
    load_strict(model, sd, f"LPIPS weights {main}" + (f" + {heads}" if heads else ""))
    return model
